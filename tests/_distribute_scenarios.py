"""Distributed scenarios for `tests/test_distribute.py`, run in a subprocess.

The logical CPU devices must be configured before TensorFlow initialises its
devices, so this script runs in its own process:

    python tests/_distribute_scenarios.py OUT.json [scenario ...]

It writes one JSON object: scenario name -> results (or {"error": traceback}).
Every scenario injects a NaN on one replica (or one worker) only, and compares
the guarded run with an unguarded run that never saw the faulty step.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import guardedopt  # noqa: E402

DEVICES = ["/cpu:0", "/cpu:1"]
STEPS = 5
POISON_STEP = 2  # 0-based; the guard's step 3
BATCH = 8


def _data():
    rs = np.random.RandomState(0)
    x = rs.randn(BATCH, 4).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
    return x, y


def _model():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(1)]
    )


def _local(strategy, variable):
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return [np.asarray(t.numpy()) for t in strategy.experimental_local_results(value)]


def _replicas_identical(strategy, variables):
    """Paths of the variables whose replicas differ (bitwise)."""
    differ = []
    for v in variables:
        values = _local(strategy, v)
        if any(a.tobytes() != values[0].tobytes() for a in values[1:]):
            differ.append(getattr(v, "path", v.name))
    return differ


def _bytes_equal(a_list, b_list):
    return all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(a_list, b_list)
    ) and len(a_list) == len(b_list)


def _custom_loop(strategy, make_optimizer, poison, steps, use_function=True):
    """Trains `steps` steps of a custom `strategy.run` loop.

    `poison(step)` is True when replica 1 (only) must get a NaN loss.
    """
    with strategy.scope():
        model = _model()
        optimizer = make_optimizer()
        optimizer.build(model.trainable_variables)
    x, y = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(dataset))

    def train(inputs, poisoned):
        def replica_fn(xb, yb):
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(xb) - yb)) / BATCH
                loss = optimizer.scale_loss(loss)
                bad = tf.logical_and(poisoned, tf.equal(replica, 1))
                loss = loss * tf.where(bad, tf.constant(np.nan, tf.float32), 1.0)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_fn, args=inputs)

    if use_function:
        train = tf.function(train)
    for step in range(steps):
        train(next(iterator), tf.constant(bool(poison(step))))
    return model, optimizer


def _guard_of(optimizer):
    return guardedopt.callback.find_guard(optimizer)


def _summary(strategy, model, optimizer, reference_model):
    guard = _guard_of(optimizer)
    weights = [_local(strategy, v)[0] for v in model.trainable_variables]
    reference = [_local(strategy, v)[0] for v in reference_model.trainable_variables]
    result = dict(
        replicas=strategy.num_replicas_in_sync,
        differ=_replicas_identical(strategy, model.variables + optimizer.variables),
        finite=bool(all(np.isfinite(w).all() for w in weights)),
        equal_to_reference=_bytes_equal(weights, reference),
        iterations=[int(i) for i in _local(strategy, optimizer.iterations)]
        if isinstance(optimizer.iterations, (tf.Variable, keras.Variable))
        else [int(np.asarray(optimizer.iterations))],
    )
    if guard is not None:
        result.update(
            skipped=[int(s) for s in _local(strategy, guard.skipped_steps_total)],
            guard_step=[int(s) for s in _local(strategy, guard.guard_step)],
            overflow=[int(s) for s in _local(strategy, guard.loss_scale_overflow_steps)],
            codes=guard.report().codes,
        )
    return result


def _adam():
    return keras.optimizers.Adam(1e-2)


def _skip_poisoned(step):
    return step == POISON_STEP


def _never(step):
    return False


_REFERENCES = {}


def _reference(strategy, use_function=True):
    """The unguarded run without the faulty step (one per strategy and mode)."""
    key = (id(strategy), use_function)
    if key not in _REFERENCES:
        _REFERENCES[key] = _custom_loop(
            strategy, _adam, _never, STEPS - 1, use_function=use_function
        )[0]
    return _REFERENCES[key]


def scenario_custom_loop(strategy, use_function=True):
    model, optimizer = _custom_loop(
        strategy, lambda: guardedopt.GuardedOptimizer(_adam()), _skip_poisoned, STEPS,
        use_function=use_function,
    )
    return _summary(strategy, model, optimizer, _reference(strategy, use_function))


def scenario_eager_loop(strategy):
    return scenario_custom_loop(strategy, use_function=False)


def scenario_fit(strategy):
    rs = np.random.RandomState(0)
    x = rs.randn(6 * BATCH, 4).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
    poisoned = x.copy()
    # Batch 2, sample 6: the second half of a global batch goes to replica 1.
    poisoned[2 * BATCH + 6, 1] = np.nan

    def fit(make_optimizer, xs, ys, callbacks=()):
        with strategy.scope():  # Keras optimizers bind to the strategy they are made in
            model = _model()
            model.compile(optimizer=make_optimizer(), loss="mse")
        model.fit(xs, ys, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=list(callbacks))
        return model

    guarded = fit(lambda: guardedopt.GuardedOptimizer(_adam()), poisoned, y,
                  [guardedopt.GuardCallback()])
    keep = np.r_[0 : 2 * BATCH, 3 * BATCH : 6 * BATCH]
    reference = fit(_adam, x[keep], y[keep])
    return _summary(strategy, guarded, guarded.optimizer, reference)


def scenario_loss_scale_inner(strategy):
    """GuardedOptimizer(LossScaleOptimizer(Adam)): Keras' scaler decides on the
    first replica's gradients only; the NaN on replica 1 must not get through."""
    lso = keras.optimizers.LossScaleOptimizer
    model, optimizer = _custom_loop(
        strategy, lambda: guardedopt.GuardedOptimizer(lso(_adam())), _skip_poisoned, STEPS
    )
    result = _summary(strategy, model, optimizer, _reference(strategy))
    result["scale"] = [float(s) for s in _local(strategy, optimizer.inner_optimizer.dynamic_scale)]
    return result


def scenario_loss_scale_outer(strategy):
    lso = keras.optimizers.LossScaleOptimizer
    model, optimizer = _custom_loop(
        strategy, lambda: lso(guardedopt.GuardedOptimizer(_adam())), _skip_poisoned, STEPS
    )
    return _summary(strategy, model, optimizer, _reference(strategy))


def scenario_central_storage(strategy):
    central = tf.distribute.experimental.CentralStorageStrategy(DEVICES, parameter_device="/cpu:0")
    return scenario_custom_loop(central)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario_parameter_server(strategy):
    """A real (in-process) ParameterServerStrategy: the guard must refuse it."""
    spec = tf.train.ClusterSpec(
        {
            "worker": [f"127.0.0.1:{_free_port()}"],
            "ps": [f"127.0.0.1:{_free_port()}"],
            "chief": [f"127.0.0.1:{_free_port()}"],
        }
    )
    servers = [  # noqa: F841 - kept alive for the strategy
        tf.distribute.Server(spec, job_name=job, task_index=0, protocol="grpc", start=True)
        for job in ("worker", "ps")
    ]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type="chief", task_id=0, rpc_layer="grpc"
    )
    pss = tf.distribute.experimental.ParameterServerStrategy(resolver)
    errors = {}
    with pss.scope():
        try:
            guardedopt.GuardedOptimizer(_adam())
        except ValueError as error:
            errors["construct"] = str(error)
    guard = guardedopt.GuardedOptimizer(_adam())  # made outside, built inside
    with pss.scope():
        variable = keras.Variable(np.ones(3, "float32"))
        try:
            guard.build([variable])
        except ValueError as error:
            errors["build"] = str(error)
    return errors


SCENARIOS = {
    name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")
}


def main(argv):
    out = argv[1]
    names = argv[2:] or list(SCENARIOS)
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    results = {}
    for name in names:
        start = time.monotonic()
        try:
            results[name] = SCENARIOS[name](strategy)
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.monotonic() - start, 2)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
