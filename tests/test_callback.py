"""GuardCallback: finds the guard, writes TensorBoard summaries."""

import glob

import keras
import numpy as np
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


def test_summaries_every_n_steps_also_with_steps_per_execution(tmp_path):
    # Batch ends come every 3 steps: `guard_step % 4 == 0` held at 12 and 24
    # only, one summary per lcm(3, 4) steps.
    x, y = classification_data(16 * 12)
    model = mlp()
    model.compile(optimizer=guardedopt.GuardedOptimizer("adam"), loss=LOSS, steps_per_execution=3)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[guardedopt.GuardCallback(log_dir=str(tmp_path), summary_every=4)])
    # The first batch end at or past each multiple of 4, over 24 steps.
    assert _tags(tmp_path)["guard/skipped_steps_total"] == [6, 9, 12, 18, 21, 24]


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


@pytest.mark.parametrize("jit_compile", [False, True])
def test_steps_per_execution_reads_once_per_execution_and_checks_every_step(jit_compile):
    x, y = classification_data(64)
    x[:16, 0] = np.nan  # the first batch of every epoch is poisoned
    model = mlp()
    opt = guardedopt.GuardedOptimizer("adam")
    model.compile(optimizer=opt, loss=LOSS, jit_compile=jit_compile, steps_per_execution=2)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((batch, logs["guard_skipped"]))

    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
              callbacks=[guardedopt.GuardCallback(), Record()])
    # Keras calls the callbacks once per execution of 2 batches (the last batch
    # index of each); the guard still checked every one of the 12 steps.
    assert seen == [(1, 1), (3, 1), (1, 2), (3, 2), (1, 3), (3, 3)]
    report = opt.report()
    assert (report.steps, report.skipped_steps) == (12, 3)
    assert int(opt.inner_optimizer.iterations.numpy()) == 9
    assert report.codes == ["nonfinite_gradient"]
    assert all(np.isfinite(w).all() for w in model.get_weights())
