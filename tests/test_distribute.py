"""GuardedOptimizer under tf.distribute (issue 6).

The MirroredStrategy scenarios need two logical CPU devices, which must be
configured before TensorFlow initialises its devices: they run in one
subprocess (`tests/_distribute_scenarios.py`), and each test below checks one
scenario's results. MultiWorkerMirroredStrategy runs two worker processes on
loopback (`tests/_multiworker_worker.py`).

In every scenario a NaN reaches one replica (or one worker) only. The guard must
skip the step on every replica, the replicas must stay bit-identical (weights,
slots and guard state), and the result must equal an unguarded run that never
saw the faulty step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 5  # as in _distribute_scenarios.py / _multiworker_worker.py
MIRRORED_TIMEOUT_S = 480
MULTIWORKER_TIMEOUT_S = 300


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """Runs every MirroredStrategy scenario once, in one subprocess."""
    out = tmp_path_factory.mktemp("mirrored") / "results.json"
    script = os.path.join(HERE, "_distribute_scenarios.py")
    proc = subprocess.run(
        [sys.executable, script, str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=MIRRORED_TIMEOUT_S,
    )
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    return json.loads(out.read_text())


def _scenario(results, name):
    result = results[name]
    if "error" in result:
        pytest.fail(f"scenario {name!r} failed in the subprocess:\n{result['error']}")
    return result


def _assert_skipped_once_everywhere(result, steps=STEPS):
    assert result["differ"] == [], "replicas diverged: " + ", ".join(result["differ"])
    assert result["finite"]
    assert result["equal_to_reference"], "weights differ from the run without the faulty step"
    assert set(result["skipped"]) == {1}
    assert set(result["guard_step"]) == {steps}
    assert set(result["iterations"]) == {steps - 1}  # the skipped step did not count
    assert result["codes"] == ["nonfinite_gradient"]


def test_mirrored_custom_loop_nan_on_one_replica(mirrored):
    result = _scenario(mirrored, "custom_loop")
    assert result["replicas"] == 2
    _assert_skipped_once_everywhere(result)


def test_mirrored_eager_loop_nan_on_one_replica(mirrored):
    _assert_skipped_once_everywhere(_scenario(mirrored, "eager_loop"))


def test_mirrored_fit_nan_in_one_replicas_batch_half(mirrored):
    # 6 batches; batch 3 has a NaN sample in the half that goes to replica 1.
    _assert_skipped_once_everywhere(_scenario(mirrored, "fit"), steps=6)


def test_central_storage_strategy(mirrored):
    _assert_skipped_once_everywhere(_scenario(mirrored, "central_storage"))


def test_mirrored_loss_scale_inner_overflow_on_one_replica(mirrored):
    """GuardedOptimizer(LossScaleOptimizer(Adam)).

    Keras' LossScaleOptimizer decides on the first replica's gradients only, so
    unguarded the NaN of replica 1 reaches the weights (Keras 3.15). Guarded,
    every replica skips it as an overflow: the scale halves, nothing is
    reported as a NaN bug, and the weights equal a run without that step.
    """
    result = _scenario(mirrored, "loss_scale_inner")
    assert result["differ"] == []
    assert result["finite"]
    assert result["equal_to_reference"]
    assert set(result["skipped"]) == {0}
    assert set(result["overflow"]) == {1}
    assert set(result["iterations"]) == {STEPS - 1}
    assert result["scale"] == [2.0**14, 2.0**14]
    assert result["codes"] == []


def test_mirrored_loss_scale_outer_nan_on_one_replica(mirrored):
    """LossScaleOptimizer(GuardedOptimizer(Adam)): the scaler misses replica 1's
    NaN and applies; the guard inside sees it and skips the step (reported as a
    non-finite gradient, since the guard cannot tell it from an overflow)."""
    _assert_skipped_once_everywhere(_scenario(mirrored, "loss_scale_outer"))


def test_parameter_server_strategy_is_rejected(mirrored):
    errors = _scenario(mirrored, "parameter_server")
    for where in ("construct", "build"):
        assert where in errors, f"no ValueError at {where}"
        message = errors[where]
        assert "does not support ParameterServerStrategy" in message
        assert "asynchronously" in message
        assert "MirroredStrategy" in message


def _one_replica_strategy(kind):
    import tensorflow as tf

    if kind == "mirrored":
        # What `MirroredStrategy()` gives on a machine with one GPU.
        return tf.distribute.MirroredStrategy(["/cpu:0"])
    return tf.distribute.OneDeviceStrategy("/cpu:0")


@pytest.mark.parametrize("kind", ("mirrored", "one_device"))
@pytest.mark.parametrize("mode", ("eager_loop", "function_loop", "fit", "fit_xla"))
def test_one_replica_strategy_skip_keeps_weights_slots_and_iterations(kind, mode):
    # A one-replica MirroredStrategy's optimizer writes reach the component
    # variables in a merge_call. The guard once masked only the mirrored
    # variable there: under XLA a skipped step still moved the weights, and in
    # a plain graph the trace failed (merge_call inside a cond).
    import keras
    import tensorflow as tf

    import guardedopt
    from helpers import state_of

    strategy = _one_replica_strategy(kind)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        opt = guardedopt.GuardedOptimizer(keras.optimizers.Adam(0.1))
        model.compile(opt, "mse", jit_compile=mode == "fit_xla")
    x = np.linspace(-1.0, 1.0, 32, dtype=np.float32).reshape(8, 4)
    targets = np.ones((8, 2), np.float32)

    def step(y):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    traced_step = tf.function(lambda y: strategy.run(step, args=(y,)))

    def train(y):
        if mode == "eager_loop":
            strategy.run(step, args=(tf.constant(y),))
        elif mode == "function_loop":
            traced_step(tf.constant(y))
        else:
            model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)

    train(targets)
    before = state_of(model, opt)
    poisoned = targets.copy()
    poisoned[0, 0] = np.nan
    train(poisoned)
    after = state_of(model, opt)
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "the skipped step changed the state"
    assert int(opt.iterations.numpy()) == 1
    assert opt.report().skipped_steps == 1
    train(targets)
    assert int(opt.iterations.numpy()) == 2
    assert not np.array_equal(before[0], state_of(model, opt)[0])


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.slow
def test_multi_worker_mirrored_nan_on_one_worker(tmp_path):
    """Two worker processes on loopback; worker 1 alone gets a NaN at step 3."""
    scenarios = ["adam", "loss_scale_inner"]
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    script = os.path.join(HERE, "_multiworker_worker.py")
    procs, logs = [], []
    start = time.monotonic()
    try:
        for index in range(2):
            config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            log = open(tmp_path / f"worker{index}.log", "w+")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, script, str(tmp_path / f"worker{index}.npz"), *scenarios],
                    cwd=ROOT, env=_env(TF_CONFIG=json.dumps(config)),
                    stdout=log, stderr=subprocess.STDOUT,
                )
            )
        for proc in procs:
            remaining = MULTIWORKER_TIMEOUT_S - (time.monotonic() - start)
            proc.wait(timeout=max(remaining, 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        tails = []
        for log in logs:
            log.seek(0)
            tails.append(log.read()[-3000:])
            log.close()
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0], f"worker exit codes {codes} after " \
        f"{time.monotonic() - start:.0f}s:\n" + "\n----\n".join(tails)

    w0 = np.load(tmp_path / "worker0.npz")
    w1 = np.load(tmp_path / "worker1.npz")
    assert sorted(w0.files) == sorted(w1.files)
    differ = [k for k in w0.files if w0[k].tobytes() != w1[k].tobytes()]
    assert differ == [], f"workers diverged: {differ}"
    weights = sorted(k for k in w0.files if k.startswith("reference/weight/"))
    for name in scenarios:
        for key in weights:
            ours = w0[key.replace("reference", name)]
            assert np.isfinite(ours).all()
            assert ours.tobytes() == w0[key].tobytes(), f"{name}: {key} differs from the reference"
        assert int(w0[f"{name}/guard_step"]) == STEPS
        assert int(w0[f"{name}/iterations"]) == STEPS - 1
    assert int(w0["adam/skipped"]) == 1
    assert int(w0["adam/overflow"]) == 0
    # Unguarded, Keras' LossScaleOptimizer hangs here: each worker branches on
    # its own gradients around an all-reduce. The guard makes them agree.
    assert int(w0["loss_scale_inner/skipped"]) == 0
    assert int(w0["loss_scale_inner/overflow"]) == 1
    assert float(w0["loss_scale_inner/scale"]) == 2.0**14
