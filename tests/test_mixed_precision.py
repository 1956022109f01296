"""GuardedOptimizer with mixed precision and loss scaling (issue 6).

Two orders exist:

* inner: `GuardedOptimizer(LossScaleOptimizer(Adam()))` (recommended). The guard
  sees every step, counts overflow steps apart from NaN bugs, reports a loss
  scale stuck at its floor, and makes replicas agree on overflows. With
  `model.compile` under "mixed_float16" it needs `auto_scale_loss=False`.
* outer: `LossScaleOptimizer(GuardedOptimizer(Adam()))`, what `model.compile`
  builds from `GuardedOptimizer(Adam())` under "mixed_float16". The scaler
  skips overflow steps before the guard sees them.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import guardedopt
from guardedopt import findings as F
from guardedopt.callback import find_guard

LSO = keras.optimizers.LossScaleOptimizer


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _data(n=64, nan_rows=()):
    rs = np.random.RandomState(0)
    x = rs.randn(n, 6).astype("float32")
    y = (x[:, :3].sum(axis=1) > 0).astype("int32")
    for row in nan_rows:
        x[row, 0] = np.nan
    return x, y


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            # The output stays float32, as the Keras mixed-precision guide says.
            keras.layers.Dense(2, activation="softmax", dtype="float32"),
        ]
    )


def _fit(optimizer, x, y, epochs=2, **compile_kwargs):
    model = _model()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", **compile_kwargs)
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return model


def _same_bits(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        u, v = np.asarray(keras.ops.convert_to_numpy(u)), np.asarray(keras.ops.convert_to_numpy(v))
        if u.tobytes() != v.tobytes():
            return False
    return True


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_compile_guard_is_transparent(policy):
    """`compile(GuardedOptimizer(Adam()))`: the same weights as `compile(Adam())`.

    Under mixed_float16 Keras wraps both in a LossScaleOptimizer (outer order).
    """
    x, y = _data()
    bare = _fit(keras.optimizers.Adam(1e-2), x, y)
    guarded = _fit(guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-2)), x, y)
    if policy == "mixed_float16":
        assert isinstance(guarded.optimizer, LSO)
    guard = find_guard(guarded.optimizer)
    assert guard is not None and int(guard.guard_step.numpy()) == 16
    assert _same_bits(bare.weights, guarded.weights)
    assert guard.report().ok


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"], indirect=True)
def test_swap_ema_weights_callback_finds_the_averages_through_the_guard(policy):
    # Keras' SwapEMAWeights unwraps one level: under mixed_float16 that is
    # LossScaleOptimizer -> guard, which had no averages ("SwapEMAWeights
    # must be used when `use_ema=True`").
    x, y = _data()

    def fit(optimizer):
        model = _model()
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        swap = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, validation_data=(x, y), callbacks=[swap])
        return model

    bare = fit(keras.optimizers.Adam(1e-2, use_ema=True))
    guarded = fit(guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-2, use_ema=True)))
    assert isinstance(guarded.optimizer, LSO) == (policy == "mixed_float16")
    assert _same_bits(bare.weights, guarded.weights)
    assert not _same_bits(bare.weights, _fit(keras.optimizers.Adam(1e-2, use_ema=True), x, y).weights)  # it swapped


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_inner_order_overflows_are_counted_not_reported(policy):
    """Natural float16 overflows (initial scale 2**30): counted, skipped by the
    scaler, never reported as NaN bugs; bit-identical to the bare scaler."""
    x, y = _data()

    def lso():
        return LSO(keras.optimizers.Adam(1e-2), initial_scale=2.0**30)

    bare = _fit(lso(), x, y)
    guarded = _fit(guardedopt.GuardedOptimizer(lso()), x, y, auto_scale_loss=False)
    guard = guarded.optimizer
    assert isinstance(guard, guardedopt.GuardedOptimizer)
    assert _same_bits(bare.weights, guarded.weights)
    assert _same_bits(bare.optimizer.variables, guard.inner_optimizer.variables)
    report = guard.report()
    overflow = report.stats["loss_scale_overflow_steps"]
    assert overflow >= 5  # 2**30 halves to <= 2**25 before float16 gradients fit
    assert float(bare.optimizer.dynamic_scale.numpy()) == 2.0**30 / 2.0**overflow
    assert report.skipped_steps == 0
    assert report.ok, str(report)
    assert report.stats["loss_scale"] == float(bare.optimizer.dynamic_scale.numpy())


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_inner_order_in_compile_needs_auto_scale_loss_false(policy):
    guard = guardedopt.GuardedOptimizer(LSO(keras.optimizers.Adam()))
    model = _model()
    with pytest.raises(ValueError, match="must not be wrapped in another loss scaler") as info:
        model.compile(optimizer=guard, loss="sparse_categorical_crossentropy")
    assert "auto_scale_loss=False" in str(info.value)


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_inner_order_keras_file(policy, tmp_path):
    """Keras does not save `auto_scale_loss`, so `load_model` would wrap the
    guard in a second scaler: it fails with the clear error, and loading
    with `compile=False` then compiling as before restores everything."""
    x, y = _data()

    def guard():
        return guardedopt.GuardedOptimizer(LSO(keras.optimizers.Adam(1e-2)))

    model = _fit(guard(), x, y, epochs=1, auto_scale_loss=False)
    path = str(tmp_path / "inner.keras")
    model.save(path)
    with pytest.raises(ValueError, match="must not be wrapped in another loss scaler"):
        keras.models.load_model(path)
    loaded = keras.models.load_model(path, compile=False)
    loaded.compile(optimizer=guard(), loss="sparse_categorical_crossentropy",
                   auto_scale_loss=False)
    loaded.optimizer.build(loaded.trainable_variables)
    loaded.load_weights(path)
    assert _same_bits(model.optimizer.variables, loaded.optimizer.variables)
    assert _same_bits(model.weights, loaded.weights)


def test_outer_scaler_disables_the_inner_optimizers_static_scale():
    """LossScaleOptimizer sets `loss_scale_factor=None` on what it wraps; the
    guard passes it on, so a static factor on the inner optimizer is not
    applied on top of the dynamic scale."""
    inner = keras.optimizers.SGD(0.1, loss_scale_factor=128.0)
    guard = guardedopt.GuardedOptimizer(inner)
    assert guard.loss_scale_factor == 128.0
    LSO(guard)
    assert inner.loss_scale_factor is None and guard.loss_scale_factor is None


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_overflow_steps_bit_identical_to_bare_scaler(mode):
    """Explicit gradients through GuardedOptimizer(LSO(SGD)) and LSO(SGD):
    every variable (weights, slots, scale, counter) matches after every step
    (under XLA: the bare scaler under XLA)."""
    sequence = [1.0, np.inf, 0.5, np.nan, -2.0, 1e-3]

    def setup(guarded):
        weight = keras.Variable(np.linspace(-1, 1, 5).astype("float32"), name="w")
        optimizer = LSO(keras.optimizers.SGD(0.1, momentum=0.9), initial_scale=8.0)
        if guarded:
            optimizer = guardedopt.GuardedOptimizer(optimizer)
        optimizer.build([weight])
        step = lambda g: optimizer.apply([g], [weight])  # noqa: E731
        if mode != "eager":
            step = tf.function(step, jit_compile=mode == "xla")
        return weight, optimizer, step

    bare = setup(False)
    guarded = setup(True)
    base = np.linspace(0.5, 1.5, 5).astype("float32")
    for value in sequence:
        gradient = tf.constant(base * np.float32(value))
        bare[2](gradient)
        guarded[2](gradient)
        assert _same_bits([bare[0]], [guarded[0]])
        assert _same_bits(bare[1].variables, guarded[1].inner_optimizer.variables)
    guard = guarded[1]
    assert int(guard.loss_scale_overflow_steps.numpy()) == 2
    assert int(guard.skipped_steps_total.numpy()) == 0
    assert float(guard.inner_optimizer.dynamic_scale.numpy()) == 2.0
    assert int(guard.iterations.numpy()) == 4
    assert F.NONFINITE_GRADIENT not in guard.report().codes


def _nan_every_step(policy, order, steps=20):
    """Real NaN in every batch: the scaler halves its scale until it is < 1."""
    x, y = _data(n=8 * steps, nan_rows=range(0, 8 * steps, 8))
    model = _model()
    if order == "inner":
        optimizer = guardedopt.GuardedOptimizer(LSO(keras.optimizers.Adam(1e-2)))
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                      auto_scale_loss=False)
    else:
        optimizer = LSO(guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-2)))
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    before = [w.numpy().copy() for w in model.weights]
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model, before


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_loss_scale_at_floor_is_reported_inner_order(policy):
    model, before = _nan_every_step(policy, "inner")
    guard = model.optimizer
    assert _same_bits(before, model.weights)  # nothing was applied
    report = guard.report()
    assert report.stats["loss_scale_overflow_steps"] == 20
    assert report.skipped_steps == 0
    assert F.NONFINITE_GRADIENT not in report.codes
    (finding,) = report.by_code(F.LOSS_SCALE_AT_FLOOR)
    assert finding.severity == F.ERROR
    assert finding.value == 2.0**15 / 2.0**20 and finding.threshold == 1.0
    assert "after 20 overflow step(s) out of 20" in finding.message
    assert "not a float16 overflow" in finding.hint


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_loss_scale_at_floor_is_reported_outer_order(policy):
    """The outer scaler is found through the model's optimizer (GuardCallback
    registers it; a custom loop calls `_watch_outer` the same way)."""
    model, before = _nan_every_step(policy, "outer")
    guard = find_guard(model.optimizer)
    assert _same_bits(before, model.weights)
    assert guard.report().by_code(F.LOSS_SCALE_AT_FLOOR) == []  # not registered yet
    guard._watch_outer(model.optimizer)
    (finding,) = guard.report().by_code(F.LOSS_SCALE_AT_FLOOR)
    assert finding.value == 2.0**15 / 2.0**20
    assert "loss_scale_optimizer" in finding.message


def test_below_resolution_uses_each_variables_dtype():
    """An update of 1.5e-3 on weights of 1.0 is below bfloat16's resolution (the
    spacing just below 1 is 2**-8) but not float16's (2**-11) or float32's."""
    dtypes = ["bfloat16", "float16", "float32"]
    variables = [keras.Variable(np.ones(4), dtype=d, name=f"w_{d}") for d in dtypes]
    guard = guardedopt.GuardedOptimizer(
        keras.optimizers.SGD(1.5e-3), tiny_step="warn", min_step=1e-6, patience=2
    )
    guard.build(variables)
    step = tf.function(lambda: guard.apply([tf.ones(4, d) for d in dtypes], variables))
    for _ in range(3):
        step()
    assert [float(v.numpy()[0]) != 1.0 for v in variables] == [False, True, True]
    report = guard.report()
    (finding,) = report.by_code(F.TINY_STEP)
    assert finding.variables == (variables[0].path,)
    assert "below the bfloat16 precision" in finding.message
    assert finding.details["below_resolution_steps"] == {variables[0].path: 3}
