"""One worker of the MultiWorkerMirroredStrategy test (`tests/test_distribute.py`).

    TF_CONFIG=... python tests/_multiworker_worker.py OUT.npz [scenario ...]

Each worker trains a custom `strategy.run` loop; worker 1 alone gets a NaN loss
at one step. It saves its final weights, optimizer variables and guard counters
to OUT.npz, plus the weights of an unguarded run that never saw that step.
(Keras 3 `model.fit` does not run under MultiWorkerMirroredStrategy with one
CPU replica per worker, even unguarded: see the README.)
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import guardedopt  # noqa: E402

STEPS = 5
POISON_STEP = 2
BATCH = 8


def _model():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(1)]
    )


def _train(strategy, make_optimizer, steps, poison_worker):
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with strategy.scope():
        model = _model()
        optimizer = make_optimizer()
        optimizer.build(model.trainable_variables)
    rs = np.random.RandomState(task)  # each worker has its own data
    x = rs.randn(BATCH, 4).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")

    @tf.function
    def step(poisoned):
        def replica_fn():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x) - y)) / (2 * BATCH)
                loss = optimizer.scale_loss(loss)
                loss = loss * tf.where(poisoned, tf.constant(np.nan, tf.float32), 1.0)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_fn)

    for i in range(steps):
        step(tf.constant(i == POISON_STEP and task == poison_worker))
    return model, optimizer


def main(argv):
    out = argv[1]
    scenarios = argv[2:] or ["adam"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    arrays = {}
    lso = keras.optimizers.LossScaleOptimizer
    makers = {
        "adam": (lambda: guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-2))),
        "loss_scale_inner": (
            lambda: guardedopt.GuardedOptimizer(lso(keras.optimizers.Adam(1e-2)))
        ),
    }
    for name in scenarios:
        print(f"scenario {name}", flush=True)
        model, optimizer = _train(strategy, makers[name], STEPS, poison_worker=1)
        guard = guardedopt.callback.find_guard(optimizer)
        for i, v in enumerate(model.trainable_variables):
            arrays[f"{name}/weight/{i}"] = v.numpy()
        for i, v in enumerate(optimizer.variables):
            arrays[f"{name}/optimizer/{i}"] = v.numpy()
        arrays[f"{name}/skipped"] = guard.skipped_steps_total.numpy()
        arrays[f"{name}/guard_step"] = guard.guard_step.numpy()
        arrays[f"{name}/overflow"] = guard.loss_scale_overflow_steps.numpy()
        arrays[f"{name}/iterations"] = np.asarray(optimizer.iterations)
        if name == "loss_scale_inner":
            arrays[f"{name}/scale"] = optimizer.inner_optimizer.dynamic_scale.numpy()
    reference, _ = _train(strategy, lambda: keras.optimizers.Adam(1e-2), STEPS - 1, None)
    for i, v in enumerate(reference.trainable_variables):
        arrays[f"reference/weight/{i}"] = v.numpy()
    np.savez(out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
