"""GuardCallback: finds the guard, writes TensorBoard summaries, logs and raises during fit."""

import glob
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import guardedopt
from guardedopt.callback import find_guard
from helpers import LOSS, classification_data, logged, mlp


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


class _AtEpochEnd(keras.callbacks.Callback):
    """Records `read()` at the end of each epoch."""

    def __init__(self, read):
        super().__init__()
        self.read = read
        self.values = []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append(self.read())


def test_logs_class_imbalance_during_fit_not_only_at_its_end(caplog):
    x, _ = classification_data(n=256)
    y = np.zeros(256, "int32")
    y[:8] = 1  # class 1 is 3% of the labels, class 2 never appears
    model = mlp()
    guard = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-3), class_weight="observe")
    model.compile(optimizer=guard, loss=guard.weighted(LOSS))
    spy = _AtEpochEnd(lambda: len(logged(caplog, "guardedopt: [class_imbalance]")))
    with caplog.at_level(logging.WARNING):
        model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[guardedopt.GuardCallback(), spy])
    # Logged once, at the first check (its first batch), and not again within log_interval_seconds.
    assert spy.values == [1, 1]


def test_invalid_labels_stop_fit_at_the_first_check():
    x, _ = classification_data(n=256, classes=2)
    y = (x[:, :1] > 0).astype("float32")
    y[40:45] = 2.0  # binary labels outside [0, 1], in the second batch
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, activation="sigmoid")])
    guard = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-3), class_weight="auto")
    model.compile(optimizer=guard, loss=guard.weighted("binary_crossentropy"))
    spy = _AtEpochEnd(lambda: None)
    with pytest.raises(ValueError, match=r"ClassBalancer found 5 invalid binary label\(s\) \(e\.g\. 2\)"):
        model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                  callbacks=[guardedopt.GuardCallback(), spy])
    assert spy.values == []  # raised in the first epoch, not after the last one
    assert int(guard.iterations.numpy()) == 2  # at the check after the second batch


def test_logs_the_loss_scale_at_floor_during_fit(caplog):
    keras.mixed_precision.set_global_policy("mixed_float16")  # conftest resets it after the test
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(2, activation="softmax", dtype="float32")])
    guard = guardedopt.GuardedOptimizer(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2)), log_interval_seconds=0.0)
    model.compile(optimizer=guard, loss="sparse_categorical_crossentropy", auto_scale_loss=False)
    x = np.full((160, 6), np.nan, "float32")  # every step overflows: the scale halves each step
    y = np.zeros(160, "int32")
    spy = _AtEpochEnd(lambda: len(logged(caplog, "guardedopt: [loss_scale_at_floor] The dynamic")))
    with caplog.at_level(logging.WARNING):
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[guardedopt.GuardCallback(), spy])
    assert spy.values == [1, 1]  # 2**15 halved 16 times is below 1 within the first epoch's 20 steps


@pytest.mark.parametrize("kwargs, message", [
    (dict(histograms="no"), "`histograms` must be a bool. Received: histograms='no'"),
    (dict(log_dir=5), "`log_dir` must be None or a path (str). Received: log_dir=5"),
    (dict(summary_every=0), "`summary_every` must be an integer >= 1. Received: summary_every=0"),
])
def test_bad_arguments_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError) as info:
        guardedopt.GuardCallback(**kwargs)
    assert str(info.value) == message
