"""GuardCallback: finds the guard, writes TensorBoard summaries."""

import glob

import keras
import pytest
import tensorflow as tf

import guardedopt
from guardedopt.callback import find_guard
from helpers import LOSS, classification_data, mlp


def _tags(log_dir):
    tags = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_writes_counters_and_per_variable_figures(tmp_path):
    x, y = classification_data(64)
    model = mlp()
    model.compile(optimizer=guardedopt.GuardedOptimizer("adam"), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[guardedopt.GuardCallback(log_dir=str(tmp_path), summary_every=2, histograms=True)])
    tags = _tags(tmp_path)
    assert tags["guard/skipped_steps_total"] == [2, 4, 6, 8]
    kernel = model.trainable_variables[0].path.replace("/", "/")
    assert any(t.startswith("step_ratio/") and kernel.split("/")[-2] in t for t in tags)
    assert any(t.startswith("gradient_norm/") for t in tags)
    assert "guard/step_ratio" in tags


def test_finds_guard_inside_loss_scale_optimizer_and_rejects_bare():
    guard = guardedopt.GuardedOptimizer("adam")
    assert find_guard(keras.optimizers.LossScaleOptimizer(guard)) is guard
    assert find_guard(keras.optimizers.Adam()) is None
    x, y = classification_data(16)
    model = mlp()
    model.compile(optimizer="adam", loss=LOSS)
    with pytest.raises(ValueError, match="GuardCallback needs a model compiled with a GuardedOptimizer"):
        model.fit(x, y, verbose=0, callbacks=[guardedopt.GuardCallback()])
    with pytest.raises(ValueError, match="`summary_every` must be an integer >= 1"):
        guardedopt.GuardCallback(summary_every=0)
