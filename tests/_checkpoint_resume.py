"""Kill-and-resume helper for `tests/test_checkpoint.py`.

The test trains one epoch in its own process and saves a `tf.train.Checkpoint`
and a `.keras` file (through `ModelCheckpoint`). This script is the "new
process": it restores each, trains the second epoch and saves every variable:

    python tests/_checkpoint_resume.py CKPT_PREFIX MODEL.keras OUT.npz

The model, data and training are defined here and imported by the test, so
both processes train exactly the same way.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import guardedopt  # noqa: E402

BATCH = 8
BATCHES = 12
NAN_BATCH = 3  # every epoch's fourth batch has a NaN input: one skipped step per epoch


def data():
    rs = np.random.RandomState(0)
    x = rs.randn(BATCH * BATCHES, 5).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32") + (x[:, 2] > 1).astype("int32")
    x[NAN_BATCH * BATCH + 2, 4] = np.nan
    return x, y


def make_model(optimizer=None):
    """The model, compiled with `optimizer` (default: a guarded Adam)."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    if optimizer is None:
        optimizer = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-2))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model


def train(model, epochs=1, callbacks=(), clean=False):
    x, y = data()
    if clean:
        x = np.nan_to_num(x)
    guarded = guardedopt.callback.find_guard(model.optimizer) is not None
    model.fit(
        x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[guardedopt.GuardCallback()] * guarded + list(callbacks),
    )
    return model


def state(model):
    """Every number that must continue exactly: weights, guard and inner state."""
    guard = model.optimizer
    # By position: layer and optimizer names differ between processes.
    arrays = {f"weight/{i}": v.numpy() for i, v in enumerate(model.weights)}
    arrays.update({f"optimizer/{i}": v.numpy() for i, v in enumerate(guard.variables)})
    return arrays


def main(argv):
    prefix, keras_path, out = argv[1:4]
    results = {}

    # 1. tf.train.Checkpoint, restored before the optimizer is built (deferred).
    model = make_model()
    status = tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(prefix)
    train(model)
    status.assert_consumed()
    results.update({f"tf_deferred/{k}": v for k, v in state(model).items()})

    # 2. The .keras file written by ModelCheckpoint. (Restoring a checkpoint
    # into a built optimizer is tested in-process: test_checkpoint.py.)
    model = keras.models.load_model(keras_path)
    assert isinstance(model.optimizer, guardedopt.GuardedOptimizer)
    train(model)
    results.update({f"keras/{k}": v for k, v in state(model).items()})

    np.savez(out, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
