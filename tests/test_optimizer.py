"""GuardedOptimizer behaviour: skips, raises, findings, delegation, serialization."""

import logging
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import guardedopt
from guardedopt import checks
from guardedopt import findings as F
from helpers import LOSS, bitwise_equal, classification_data, logged, make_step, mlp, state_of

MODES = ("eager", "graph", "xla")


class Poison:
    """A switch that makes the loss (and so every gradient) NaN when on."""

    def __init__(self, on: bool):
        self.factor = tf.Variable(np.float32("nan") if on else np.float32(1.0))

    def assign(self, on: bool):
        self.factor.assign(np.float32("nan") if on else np.float32(1.0))


def _nan_step(model, optimizer, mode, poison):
    """A step whose gradient is NaN while `poison` is on."""

    x, y = classification_data()

    def step():
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x)) * poison.factor
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    return step if mode == "eager" else tf.function(step, jit_compile=mode == "xla")


@pytest.mark.parametrize("mode", MODES)
def test_skip_loses_nothing_and_recovers(mode):
    model = mlp()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-2))
    poison = Poison(False)
    step = _nan_step(model, opt, mode, poison)
    for _ in range(3):
        step()
    before = state_of(model, opt)
    poison.assign(True)
    step()
    step()
    assert bitwise_equal(before, state_of(model, opt)), "a skipped step changed the state"
    assert int(opt.iterations) == 3
    report = opt.report()
    assert report.skipped_steps == 2 and report.steps == 5
    finding = report.by_code(F.NONFINITE_GRADIENT)[0]
    assert finding.first_step == 4 and finding.last_step == 5
    assert set(finding.variables) == {v.path for v in model.trainable_variables}
    assert "skipped" in finding.message
    poison.assign(False)
    step()
    assert int(opt.iterations) == 4
    assert not bitwise_equal(before, state_of(model, opt))
    assert int(opt.skipped_steps_consecutive.numpy()) == 0
    assert int(opt.last_good_step.numpy()) == 6


class _GatedSGD(keras.optimizers.SGD):
    """SGD whose update waits at a gate: a test can act while a guarded step is open."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.entered, self.gate = threading.Event(), threading.Event()

    def update_step(self, gradient, variable, learning_rate):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        super().update_step(gradient, variable, learning_rate)


def _in_thread(fn, errors):
    def run():
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - re-raised by the test
            errors.append(error)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_another_threads_write_is_not_masked_by_an_eager_skipped_step():
    weights = keras.Variable(np.ones(3, np.float32))
    inner = _GatedSGD(learning_rate=0.1)
    opt = guardedopt.GuardedOptimizer(inner)
    opt.build([weights])
    errors = []
    step = _in_thread(lambda: opt.apply([tf.fill([3], np.float32("nan"))], [weights]), errors)
    assert inner.entered.wait(60)
    # The skipped step's masked writes are open now; this thread's write must land.
    weights.assign([5.0, 6.0, 7.0])
    inner.gate.set()
    step.join(60)
    assert not errors, errors
    np.testing.assert_array_equal(weights.numpy(), [5.0, 6.0, 7.0])
    assert opt.report().skipped_steps == 1
    assert not set(weights.value.__dict__) & {"assign", "assign_add", "assign_sub"}


@pytest.mark.parametrize("jit_compile", (False, True))
def test_two_guarded_steps_traced_at_once_on_shared_weights_keep_their_own_masks(jit_compile):
    weights = keras.Variable(np.ones(3, np.float32))
    finite_inner, nan_inner = _GatedSGD(learning_rate=0.5), _GatedSGD(learning_rate=0.5)
    finite = guardedopt.GuardedOptimizer(finite_inner)
    skipped = guardedopt.GuardedOptimizer(nan_inner)
    for opt in (finite, skipped):
        opt.build([weights])
    gradient = tf.constant([1.0, 2.0, 4.0])

    def stepper(opt, grads):
        return tf.function(lambda: opt.apply([grads], [weights]), jit_compile=jit_compile)

    errors = []
    # The finite step opens its masks first and closes them while the skipped
    # step's are still open: neither may use or remove the other's.
    first = _in_thread(stepper(finite, gradient), errors)
    assert finite_inner.entered.wait(60)
    second = _in_thread(stepper(skipped, gradient * np.float32("nan")), errors)
    assert nan_inner.entered.wait(60)
    finite_inner.gate.set()
    first.join(60)
    nan_inner.gate.set()
    second.join(60)
    assert not errors, errors
    np.testing.assert_array_equal(weights.numpy(), np.float32(1.0) - np.float32(0.5) * gradient.numpy())
    assert finite.report().skipped_steps == 0 and skipped.report().skipped_steps == 1
    assert int(finite.iterations) == 1 and int(skipped.iterations) == 0


@pytest.mark.parametrize("mode", MODES)
def test_escalates_to_raise_after_max_consecutive_skips(mode):
    model = mlp()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=3)
    poison = Poison(True)
    step = _nan_step(model, opt, mode, poison)
    step()
    step()
    with pytest.raises(guardedopt.GuardError, match="3 consecutive steps were skipped") as info:
        step()
        opt.check()
    assert info.value.step == 3
    assert info.value.findings[0].code == F.NONFINITE_GRADIENT


@pytest.mark.parametrize("mode", MODES)
def test_raise_policy_raises_at_host_boundary_without_applying(mode):
    model = mlp()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-2), nonfinite_gradient="raise")
    poison = Poison(False)
    step = _nan_step(model, opt, mode, poison)
    step()
    before = state_of(model, opt)
    poison.assign(True)
    with pytest.raises(guardedopt.GuardError) as info:
        step()
        opt.check()
    message = str(info.value)
    assert "step 2" in message and "nonfinite_gradient" in message
    assert model.trainable_variables[0].path in message
    assert bitwise_equal(before, state_of(model, opt))
    opt.check()  # cleared: the caller may catch and continue


def test_raise_in_fit_through_callback():
    x, y = classification_data(64)
    x[5, 0] = np.nan
    model = mlp()
    opt = guardedopt.GuardedOptimizer("adam", nonfinite_gradient="raise")
    model.compile(optimizer=opt, loss=LOSS)
    with pytest.raises(guardedopt.GuardError, match="nonfinite_gradient"):
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                  callbacks=[guardedopt.GuardCallback()])
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_callback_puts_skips_in_logs_and_logs_once(caplog):
    x, y = classification_data(64)
    x[:16, 0] = np.nan  # the first batch of every epoch is poisoned
    model = mlp()
    opt = guardedopt.GuardedOptimizer("adam")
    model.compile(optimizer=opt, loss=LOSS)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(logs.get("guard_skipped"))

    with caplog.at_level(logging.WARNING):
        history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
                            callbacks=[guardedopt.GuardCallback(), Record()])
    assert seen == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    # The epoch's mean loss includes the poisoned batch; the weights do not.
    assert np.isnan(history.history["loss"][-1])
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert np.isfinite(model.evaluate(x[16:], y[16:], verbose=0))
    nan_logs = logged(caplog, "[nonfinite_gradient]")
    assert len(nan_logs) == 1, [r.getMessage() for r in caplog.records]


def test_none_gradients_warn_once_and_all_none_raises(caplog):
    model = mlp()
    unused = keras.Variable(np.ones(3, "float32"), name="unused")
    opt = guardedopt.GuardedOptimizer("sgd")
    grads = [tf.ones_like(v) for v in model.trainable_variables] + [None]
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            opt.apply(grads, model.trainable_variables + [unused])
    warnings = logged(caplog, "none_gradient")
    assert len(warnings) == 1 and "unused" in warnings[0]
    assert opt.report().by_code(F.NONE_GRADIENT)[0].variables == ("unused",)
    with pytest.raises(ValueError, match="No gradient for any of the 1 variables"):
        guardedopt.GuardedOptimizer("sgd").apply([None], [unused])
    with pytest.raises(ValueError, match="None gradient"):
        guardedopt.GuardedOptimizer("sgd", none_gradient="raise").apply(grads, model.trainable_variables + [unused])


@pytest.mark.parametrize("mode", ("graph", "xla"))
def test_zero_gradient_after_patience(mode):
    model = mlp()
    x, y = classification_data()
    opt = guardedopt.GuardedOptimizer("adam", patience=5)

    def step():
        with tf.GradientTape() as tape:
            hidden = model.layers[0](x)
            logits = model.layers[1](tf.stop_gradient(hidden) * 0.0 + hidden * 0.0)
            loss = LOSS(y, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    step = tf.function(step, jit_compile=mode == "xla")
    for _ in range(4):
        step()
    assert not opt.report().by_code(F.ZERO_GRADIENT)
    step()
    found = opt.report().by_code(F.ZERO_GRADIENT)[0]
    # The first layer is cut off by the `* 0.0`, and the second layer's kernel
    # only ever sees zeros; its bias still learns.
    dead = {v.path for v in model.layers[0].trainable_variables} | {model.layers[1].kernel.path}
    assert set(found.variables) == dead
    assert found.first_step == 5 and found.threshold == 5


@pytest.mark.parametrize("mode", ("graph", "xla"))
def test_tiny_learning_rate_is_below_float32_resolution(mode):
    """The seed question's case: Adam(learning_rate=1e-10)."""
    model = mlp()
    x, y = classification_data()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-10), patience=5)
    step = make_step(model, opt, tf.constant(x), tf.constant(y), mode)
    for _ in range(6):
        step()
    found = opt.report().by_code(F.TINY_STEP)[0]
    kernels = {v.path for v in model.trainable_variables if "kernel" in v.path}
    assert kernels <= set(found.variables)
    assert found.value == 0.0 and found.threshold == 1e-6
    assert "learning rate 1e-10" in found.message
    assert "below the float32 precision" in found.message and "rounds back to w" in found.message
    assert all(n >= 1 for p, n in found.details["below_resolution_steps"].items() if p in kernels)


def test_a_bias_before_batch_normalization_is_not_called_below_resolution():
    """Dense -> BatchNormalization with Keras' default SGD(0.01): the bias
    sits near 1e-9 (normalization cancels it) and moves on every step. Its
    effective step is tiny against the ε floor, but w + Δw does not round
    back to w, which the message claimed (the 1e-10 test above keeps that
    verdict for the kernels)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 3))).argmax(1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(16, name="d1"), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.Dense(3, name="out"),
    ])
    guard = guardedopt.GuardedOptimizer(keras.optimizers.SGD(0.01))
    model.compile(optimizer=guard, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    (found,) = guard.report().by_code(F.TINY_STEP)
    bias = model.get_layer("d1").bias
    assert found.variables == (bias.path,)
    assert float(np.abs(bias.numpy()).max()) < 1e-6
    assert "rounds back" not in found.message
    assert found.details["below_resolution_steps"] == {bias.path: 0}
    assert "a bias before a normalization layer" in found.hint


def _accumulating_run(learning_rate, accumulation, steps, mode):
    """A guard (patience 3) over Adam with `gradient_accumulation_steps`, after `steps` steps."""
    model = mlp()
    x, y = classification_data()
    opt = guardedopt.GuardedOptimizer(
        keras.optimizers.Adam(learning_rate, gradient_accumulation_steps=accumulation), patience=3
    )
    step = make_step(model, opt, tf.constant(x), tf.constant(y), mode)
    for _ in range(steps):
        step()
    return opt


@pytest.mark.parametrize("mode", ("graph", "xla"))
def test_gradient_accumulation_steps_are_not_tiny_steps(mode):
    # Seven of eight steps only accumulate: the weights stay, and those steps
    # were measured as steps of 0, so a healthy run reported tiny_step.
    opt = _accumulating_run(1e-2, accumulation=8, steps=32, mode=mode)
    assert int(opt.iterations.numpy()) == 4
    assert opt.report().by_code(F.TINY_STEP) == []
    assert all(0 < r < 1 for r in opt.last_step_ratio.numpy())  # the updates were measured


@pytest.mark.parametrize("mode", ("graph", "xla"))
def test_tiny_updates_under_gradient_accumulation_are_still_found(mode):
    opt = _accumulating_run(1e-10, accumulation=4, steps=16, mode=mode)
    found = opt.report().by_code(F.TINY_STEP)[0]
    assert found.first_step == 12  # the third update (steps 4, 8, 12)


def test_large_step_is_reported_with_the_measured_ratio():
    model = mlp()
    x, y = classification_data()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.SGD(50.0), patience=3, nonfinite_gradient="warn")
    step = make_step(model, opt, tf.constant(x), tf.constant(y), "graph")
    for _ in range(3):
        step()
    found = opt.report().by_code(F.LARGE_STEP)
    assert found and found[0].value > 1.0 and found[0].threshold == 1.0
    assert "learning rate 50" in found[0].message


def _overflowing_sgd_step(model, opt, mode):
    # Finite gradients (1e30) whose update (1e40) overflows float32.
    grads = [tf.fill(v.shape, 1e30) for v in model.trainable_variables]

    def step():
        opt.apply_gradients(zip(grads, model.trainable_variables))

    return step if mode == "eager" else tf.function(step, jit_compile=mode == "xla")


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_weights_are_reported_by_default(mode):
    model = mlp()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.SGD(1e10), tiny_step="ignore", large_step="ignore")
    step = _overflowing_sgd_step(model, opt, mode)
    step()
    assert not all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
    report = opt.report()
    found = report.by_code(F.NONFINITE_WEIGHTS)[0]
    assert found.first_step == 1 and "left as they are" in found.message
    assert "nonfinite_weights='skip'" in found.message
    assert report.skipped_steps == 0 and int(opt.iterations) == 1


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_weights_after_update_are_restored(mode):
    model = mlp()
    opt = guardedopt.GuardedOptimizer(
        keras.optimizers.SGD(1e10), nonfinite_weights="skip", tiny_step="ignore", large_step="ignore"
    )
    step = _overflowing_sgd_step(model, opt, mode)
    opt.build(model.trainable_variables)
    before = state_of(model, opt)
    step()
    assert bitwise_equal(before, state_of(model, opt))
    report = opt.report()
    found = report.by_code(F.NONFINITE_WEIGHTS)[0]
    assert "restored" in found.message and found.first_step == 1
    assert not report.by_code(F.NONFINITE_GRADIENT) and report.skipped_steps == 1


def _poisoning_step(variable, opt, entry, mode):
    """A step whose finite gradient overflows one `entry` of `variable` to -Inf."""
    grad = np.zeros(variable.shape, np.float32)
    grad.flat[entry] = 1e30
    grad = tf.constant(grad)

    def step():
        opt.apply_gradients([(grad, variable)])

    return step if mode == "eager" else tf.function(step, jit_compile=mode == "xla")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "entry, every, first_seen",
    [
        (40, 4, 4),  # outside the sample (runs 0-31, 128-159, ...): seen at the whole-variable pass
        (0, 4, 1),  # a sampled entry: seen at once
        (40, 1, 1),  # every step in full
    ],
)
def test_warn_checks_weights_in_full_every_weights_check_every_steps(mode, entry, every, first_seen):
    variable = keras.Variable(np.ones(4 * guardedopt.checks.SAMPLE_SIZE, np.float32), name="kernel")
    assert (entry in guardedopt.checks.sample_positions(4 * guardedopt.checks.SAMPLE_SIZE)) == (entry == 0)
    opt = guardedopt.GuardedOptimizer(
        keras.optimizers.SGD(1e10), weights_check_every=every, zero_gradient="ignore",
        tiny_step="ignore", large_step="ignore",
    )
    opt.build([variable])
    poison = _poisoning_step(variable, opt, entry, mode)
    poison()
    assert np.isneginf(variable.numpy().flat[entry])
    zero = tf.zeros_like(variable)
    for _ in range(5):
        opt.apply_gradients([(zero, variable)])
    found = opt.report().by_code(F.NONFINITE_WEIGHTS)
    assert found and found[0].first_step == first_seen
    assert ("weights_check_every=1 names the exact step" in found[0].message) == (every > 1)


def test_a_nonfinite_gradient_since_the_last_full_weights_check_explains_nan_weights():
    variable = keras.Variable(np.ones(4 * guardedopt.checks.SAMPLE_SIZE, np.float32), name="kernel")
    opt = guardedopt.GuardedOptimizer(
        keras.optimizers.SGD(0.1), weights_check_every=4, nonfinite_gradient="warn",
        zero_gradient="ignore", tiny_step="ignore", large_step="ignore",
    )
    opt.build([variable])
    nan = np.zeros(variable.shape, np.float32)
    nan[40] = np.nan  # outside the sample
    opt.apply_gradients([(tf.constant(nan), variable)])  # applied: the weight becomes NaN
    for _ in range(4):
        opt.apply_gradients([(tf.zeros_like(variable), variable)])
    report = opt.report()
    assert report.by_code(F.NONFINITE_GRADIENT)[0].first_step == 1
    assert not report.by_code(F.NONFINITE_WEIGHTS)  # the gradient's finding explains it (step 4)
    assert np.isnan(variable.numpy()[40])


def test_check_every_measures_only_every_nth_step():
    model = mlp()
    x, y = classification_data()
    opt = guardedopt.GuardedOptimizer("adam", check_every=3)
    step = make_step(model, opt, tf.constant(x), tf.constant(y), "graph")
    measured = []
    previous = opt.last_step_ratio.numpy() if opt.built else None
    for _ in range(7):
        step()
        ratio = opt.last_step_ratio.numpy()
        # An unmeasured step keeps the last ratio (-1 before the first).
        measured.append(bool((ratio >= 0).all() and (previous is None or (ratio != previous).all())))
        previous = ratio
    assert measured == [False, False, True, False, False, True, False]


def test_step_has_no_host_sync_ops():
    model = mlp()
    x, y = classification_data()
    opt = guardedopt.GuardedOptimizer("adam", nonfinite_gradient="raise", tiny_step="raise")
    step = make_step(model, opt, tf.constant(x), tf.constant(y), "xla")
    graph = step.get_concrete_function().graph
    op_types = {op.type for op in graph.get_operations()}
    for fn in graph._functions.values():
        op_types |= {node.op for node in fn.definition.node_def}
    assert not op_types & {"PyFunc", "EagerPyFunc", "PrintV2", "Assert", "CheckNumerics", "CheckNumericsV2"}


SETTINGS_SET_AFTER_CONSTRUCTION = {
    "exclude_from_weight_decay": lambda opt: opt.exclude_from_weight_decay(var_names=["bias"]),
    "clipnorm": lambda opt: setattr(opt, "clipnorm", 1e-3),
    "global_clipnorm": lambda opt: setattr(opt, "global_clipnorm", 1e-3),
    "clipvalue": lambda opt: setattr(opt, "clipvalue", 1e-4),
    "weight_decay": lambda opt: setattr(opt, "weight_decay", 0.0),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS_SET_AFTER_CONSTRUCTION))
def test_base_settings_made_on_the_guard_reach_the_inner_optimizer(setting):
    # They were kept on the guard, which never reads them: the step ran as if
    # they had not been made.
    def train(guarded):
        model = mlp()
        inner = keras.optimizers.AdamW(1e-2, weight_decay=0.5)
        opt = guardedopt.GuardedOptimizer(inner) if guarded else inner
        SETTINGS_SET_AFTER_CONSTRUCTION[setting](opt)
        x, y = classification_data()
        step = make_step(model, opt, tf.constant(x), tf.constant(y), "graph")
        for _ in range(3):
            step()
        return state_of(model, inner)

    def untouched():
        model = mlp()
        inner = keras.optimizers.AdamW(1e-2, weight_decay=0.5)
        x, y = classification_data()
        step = make_step(model, inner, tf.constant(x), tf.constant(y), "graph")
        for _ in range(3):
            step()
        return state_of(model, inner)

    bare = train(guarded=False)
    assert not bitwise_equal(bare, untouched())  # the setting changes the numbers
    assert bitwise_equal(train(guarded=True), bare)


@pytest.mark.parametrize("dtype", ("float32", "float64"))
def test_numpy_gradients_are_applied_as_the_bare_optimizer_applies_them(dtype):
    # Keras' apply takes NumPy arrays; the guard's checks read `.shape` as a
    # TensorShape and failed on the tuple.
    def train(guarded):
        model = mlp()
        inner = keras.optimizers.Adam(1e-2)
        opt = guardedopt.GuardedOptimizer(inner) if guarded else inner
        x, y = classification_data()
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = LOSS(y, model(x))
            grads = [g.numpy().astype(dtype) for g in tape.gradient(loss, model.trainable_variables)]
            opt.apply_gradients(zip(grads, model.trainable_variables))
        return state_of(model, inner)

    assert bitwise_equal(train(guarded=True), train(guarded=False))


def _multi_optimizer_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    # A variable the loss does not reach: its gradient is None every step.
    model.unused = model.add_weight(shape=(2,), initializer="ones", name="unused")
    return model


def _multi_optimizer():
    optimizers = keras.optimizers
    return optimizers.MultiOptimizer(
        optimizers.OptimizerMap(optimizers.SGD(0.05), {".*head.*": optimizers.Adam(1e-2)})
    )


@pytest.mark.skipif(not hasattr(keras.optimizers, "MultiOptimizer"), reason="Keras < 3.15")
@pytest.mark.parametrize("jit_compile", (False, True))
def test_multi_optimizer_with_a_none_gradient_fits_and_skips_exactly(jit_compile):
    # MultiOptimizer.apply takes one gradient per variable it was built on:
    # the guard dropped the None one ("Gradients must match trainable
    # variables one-to-one"), and report() failed on its learning_rate.
    x, y = classification_data(n=48)
    poisoned = x.copy()
    poisoned[20] = np.nan  # batch 2 of 3

    def train(guarded, data):
        model = _multi_optimizer_model()
        inner = _multi_optimizer()
        opt = guardedopt.GuardedOptimizer(inner, none_gradient="ignore") if guarded else inner
        model.compile(opt, LOSS, jit_compile=jit_compile)
        callbacks = [guardedopt.GuardCallback()] if guarded else []
        model.fit(data, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        return model, opt

    guarded, opt = train(True, poisoned)
    assert int(opt.skipped_steps_total.numpy()) == 1
    assert opt.report().by_code(F.NONFINITE_GRADIENT)[0].first_step == 2
    # The reference never sees the poisoned batch: batches 1 and 3 only.
    reference = _multi_optimizer_model()
    inner = _multi_optimizer()
    reference.compile(inner, LOSS, jit_compile=jit_compile)
    keep = np.r_[0:16, 32:48]
    reference.fit(x[keep], y[keep], batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert bitwise_equal([w.numpy() for w in guarded.weights], [w.numpy() for w in reference.weights])
    assert int(opt.iterations.numpy()) == int(inner.iterations.numpy()) == 2


def test_clipping_and_decay_read_and_write_through_to_the_optimizer_that_applies_them():
    # Reads gave the guard's own None (`opt.weight_decay *= 0.5` failed), and
    # with a loss scaler inside, the value landed on the scaler, which never
    # clips.
    opt = guardedopt.GuardedOptimizer(keras.optimizers.AdamW(1e-2, weight_decay=0.004))
    assert opt.weight_decay == 0.004 and opt.clipnorm is None
    opt.weight_decay *= 0.5
    assert opt.inner_optimizer.weight_decay == 0.002
    sgd = keras.optimizers.SGD(1.0)
    scaled = guardedopt.GuardedOptimizer(keras.optimizers.LossScaleOptimizer(sgd, initial_scale=1.0))
    scaled.clipnorm = 1e-3
    assert sgd.clipnorm == 1e-3 and scaled.clipnorm == 1e-3
    weight = keras.Variable(np.ones(4, np.float32))
    scaled.apply([tf.fill([4], 10.0)], [weight])
    np.testing.assert_allclose(weight.numpy(), 1.0 - 5e-4, rtol=1e-6)  # clipped to norm 1e-3


@pytest.mark.skipif(not hasattr(keras.optimizers, "MultiOptimizer"), reason="Keras < 3.15")
def test_multi_optimizer_sub_optimizer_accumulation_is_not_a_tiny_step():
    # Only the top inner optimizer's accumulation was looked at: the head's
    # accumulate-only steps read as steps of 0.
    optimizers = keras.optimizers
    inner = optimizers.MultiOptimizer(optimizers.OptimizerMap(
        optimizers.SGD(0.05), {".*head.*": optimizers.Adam(1e-2, gradient_accumulation_steps=4)}
    ))
    model = _multi_optimizer_model()
    opt = guardedopt.GuardedOptimizer(inner, none_gradient="ignore", patience=3)
    x, y = classification_data(n=16 * 32)
    model.compile(opt, LOSS)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert opt.report().by_code(F.TINY_STEP) == []
    assert all(0 < r < 1 for r in opt.last_step_ratio.numpy()[1:])  # the connected variables (slot 0: unused)


@pytest.mark.skipif(not hasattr(keras.optimizers, "MultiOptimizer"), reason="Keras < 3.15")
@pytest.mark.parametrize("jit_compile", (False, True))
@pytest.mark.parametrize("options", [{}, {"nonfinite_weights": "skip"}], ids=["default", "restore"])
def test_multi_optimizer_ema_overwrite_on_a_skipped_step_is_undone(jit_compile, options):
    # A sub-optimizer's EMA overwrite writes all of its variables, also one
    # left out of this step's apply: only the top inner optimizer's were
    # masked, so the skipped step moved it (5e-3).
    def run(poison_step):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((3,))
        first, second = keras.layers.Dense(4, name="body1")(inputs), keras.layers.Dense(4, name="body2")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(1, name="head")(keras.layers.Concatenate()([first, second])))
        optimizer_map = keras.optimizers.OptimizerMap(default_optimizer=keras.optimizers.SGD(1e-2))
        optimizer_map[".*body.*"] = keras.optimizers.Adam(5e-2, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=3)
        opt = guardedopt.GuardedOptimizer(keras.optimizers.MultiOptimizer(optimizer_map), none_gradient="ignore", **options)
        opt.build(model.trainable_variables)
        rng = np.random.RandomState(0)

        def make(without_body2):
            @tf.function(jit_compile=jit_compile)
            def step(x, y, poison):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean((model(x) - y) ** 2) * tf.where(poison, np.float32(np.nan), np.float32(1))
                variables = [v for v in model.trainable_variables if not (without_body2 and "body2" in v.path)]
                opt.apply(tape.gradient(loss, variables), variables)
            return step

        steps = {False: make(False), True: make(True)}
        for i in range(1, 7):
            x, y = rng.rand(8, 3).astype("float32"), rng.rand(8, 1).astype("float32")
            if poison_step is None and i == 3:
                continue  # the reference never sees the faulty step
            steps[i >= 3](tf.constant(x), tf.constant(y), tf.constant(i == poison_step))
        return model, opt

    reference, _ = run(poison_step=None)
    model, opt = run(poison_step=3)  # the Adam's third call: an overwrite step
    assert int(opt.skipped_steps_total.numpy()) == 1
    assert bitwise_equal([w.numpy() for w in model.weights], [w.numpy() for w in reference.weights])


@pytest.mark.skipif(not hasattr(keras.optimizers, "MultiOptimizer"), reason="Keras < 3.15")
def test_keras_callbacks_find_a_multi_optimizers_sub_optimizers_through_the_guard():
    # LearningRateScheduler and SwapEMAWeights look for `optimizer.optimizers`:
    # the guard had none, and its learning_rate is the MultiOptimizer's, which
    # raises.
    x, y = classification_data(n=48)

    def fit(guarded):
        optimizers = keras.optimizers
        inner = optimizers.MultiOptimizer(optimizers.OptimizerMap(
            optimizers.SGD(0.05), {".*head.*": optimizers.Adam(1e-2, use_ema=True)}
        ))
        model = _multi_optimizer_model()
        model.compile(guardedopt.GuardedOptimizer(inner, none_gradient="ignore") if guarded else inner, LOSS)
        callbacks = [
            keras.callbacks.LearningRateScheduler(lambda epoch, rate: rate * 0.5),
            keras.callbacks.SwapEMAWeights(swap_on_epoch=True),
        ]
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=callbacks, validation_data=(x, y))
        return model, inner

    bare, bare_inner = fit(guarded=False)
    guarded, inner = fit(guarded=True)
    assert sorted(float(o.learning_rate.numpy()) for o in inner.optimizers) == pytest.approx([0.0025, 0.0125])
    assert bitwise_equal([w.numpy() for w in guarded.weights], [w.numpy() for w in bare.weights])


def test_report_of_a_guard_built_on_no_variables():
    # A frozen model: the history of zero variables failed to reshape.
    opt = guardedopt.GuardedOptimizer("adam")
    opt.build([])
    report = opt.report()
    assert report.steps == 0 and report.findings == []
    assert report.stats["history"]["step_ratio"].shape[1] == 0


def test_delegates_learning_rate_iterations_and_variables():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    inner = keras.optimizers.SGD(schedule)
    opt = guardedopt.GuardedOptimizer(inner)
    model = mlp()
    x, y = classification_data()
    step = make_step(model, opt, tf.constant(x), tf.constant(y), "graph")
    for _ in range(10):
        step()
    assert int(opt.iterations) == int(inner.iterations) == 10
    np.testing.assert_allclose(float(opt.learning_rate), 0.05, rtol=1e-6)
    assert all(any(v is w for w in opt.variables) for v in inner.variables)
    fixed = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-3))
    fixed.learning_rate = 0.02
    np.testing.assert_allclose(float(fixed.inner_optimizer.learning_rate), 0.02, rtol=1e-7)


def test_accepts_instance_string_and_config_dict():
    assert isinstance(guardedopt.GuardedOptimizer("rmsprop").inner_optimizer, keras.optimizers.RMSprop)
    config = keras.optimizers.serialize(keras.optimizers.Adam(3e-4))
    inner = guardedopt.GuardedOptimizer(config).inner_optimizer
    assert isinstance(inner, keras.optimizers.Adam)
    np.testing.assert_allclose(float(inner.learning_rate), 3e-4, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_step=-1), "`min_step` must be a finite float >= 0. Received: min_step=-1"),
        (dict(max_step=0), "`max_step` must be a finite float > 0. Received: max_step=0"),
        (dict(min_step=0.5, max_step=0.1), "`max_step` must be greater than `min_step`"),
        (dict(patience=0), "`patience` must be an integer >= 1 and <= 9223372036854775807. Received: patience=0"),
        (dict(check_every=2.5), "`check_every` must be an integer >= 1 and <= 9223372036854775807. Received: check_every=2.5"),
        (dict(weights_check_every=0), "`weights_check_every` must be an integer >= 1 and <= 9223372036854775807. Received: weights_check_every=0"),
        (dict(nonfinite_gradient="drop"), "`nonfinite_gradient` must be one of 'ignore', 'warn', 'skip', 'raise'. Received: nonfinite_gradient='drop'"),
        (dict(tiny_step="skip"), "`tiny_step` must be one of 'ignore', 'warn', 'raise'. Received: tiny_step='skip'"),
        (dict(max_consecutive_skips=0), "`max_consecutive_skips` must be an integer >= 1"),
        (dict(step_epsilon=float("nan")), "`step_epsilon` must be a finite float > 0"),
        (dict(clipnorm=1.0), "set them on the inner optimizer"),
        # The guard's counters are int64: 2**63 failed at the first step.
        (dict(patience=2**63), "`patience` must be an integer >= 1 and <= 9223372036854775807. Received: patience=9223372036854775808"),
        # Keras' fit(class_weight=) format, and an empty dict: a TypeError, and
        # silently the "balanced" default.
        (dict(class_weight={0: 1.0, 1: 5.0}), "`class_weight` given as a dict must be a ClassBalancer config"),
        (dict(class_weight={}), "Received: class_weight={}. Fixed per-class weights ({class_id: weight}) belong in `model.fit(class_weight=...)`"),
        (dict(inner_optimizer={}), "`inner_optimizer` must be a keras.optimizers.Optimizer, an optimizer name or a config dict. Received: inner_optimizer={}"),
    ],
)
def test_bad_configuration_raises_clear_value_error(kwargs, message):
    kwargs = dict(dict(inner_optimizer="adam"), **kwargs)
    with pytest.raises(ValueError) as info:
        guardedopt.GuardedOptimizer(**kwargs)
    assert message in str(info.value)


def test_unknown_keyword_arguments_are_named_with_what_is_allowed():
    with pytest.raises(ValueError) as info:
        guardedopt.GuardedOptimizer("adam", patiense=5)
    message = str(info.value)
    assert message.startswith(
        "GuardedOptimizer got unknown argument(s) ['patiense']. Did you mean `patience` for `patiense`? "
        "Allowed: inner_optimizer, none_gradient,")
    assert message.endswith("class_weight, name; base-optimizer arguments go on the inner optimizer.")
    with pytest.raises(ValueError) as info:
        guardedopt.GuardedOptimizer("adam", clipnorm=1.0)
    assert str(info.value) == (
        "GuardedOptimizer does not take base-optimizer arguments ['clipnorm']: set them on the inner "
        "optimizer, e.g. `GuardedOptimizer(keras.optimizers.Adam(clipnorm=1.0))`.")


def test_misuse_is_rejected():
    with pytest.raises(ValueError, match="must not be a GuardedOptimizer"):
        guardedopt.GuardedOptimizer(guardedopt.GuardedOptimizer("adam"))
    with pytest.raises(ValueError, match="must not be a GuardedOptimizer"):  # its config deserializes to one
        guardedopt.GuardedOptimizer(keras.optimizers.serialize(guardedopt.GuardedOptimizer("adam")))
    with pytest.raises(ValueError, match="inner_optimizer"):
        guardedopt.GuardedOptimizer("no_such_optimizer")
    opt = guardedopt.GuardedOptimizer("sgd")
    first, second = mlp(), mlp(seed=1)
    opt.apply([tf.ones_like(v) for v in first.trainable_variables], first.trainable_variables)
    with pytest.raises(ValueError, match="for another model, or after making a layer trainable"):
        opt.apply([tf.ones_like(v) for v in second.trainable_variables], second.trainable_variables)
    with pytest.raises(ValueError, match="same length"):
        opt.apply([tf.ones_like(first.trainable_variables[0])], first.trainable_variables)
    with pytest.raises(ValueError, match="stateless_apply"):
        opt.stateless_apply([], [], [])


def test_config_round_trip():
    opt = guardedopt.GuardedOptimizer(
        keras.optimizers.AdamW(2e-3, weight_decay=0.01), nonfinite_gradient="raise",
        min_step=1e-8, max_step=5.0, patience=7, check_every=4, weights_check_every=3,
        name="guard",
    )
    config = opt.get_config()
    clone = guardedopt.GuardedOptimizer.from_config(config)
    assert clone.get_config() == config and clone.weights_check_every == 3
    assert isinstance(clone.inner_optimizer, keras.optimizers.AdamW)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, guardedopt.GuardedOptimizer) and again.get_config() == config


def _trained_guarded_model(x, y):
    model = mlp()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-2), patience=4)
    model.compile(optimizer=opt, loss=LOSS)
    x = x.copy()
    x[:16] = np.nan
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model, opt


def test_keras_file_round_trip_restores_guard_state_and_slots(tmp_path):
    x, y = classification_data(64)
    model, opt = _trained_guarded_model(x, y)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, guardedopt.GuardedOptimizer)
    assert loaded.optimizer.get_config() == opt.get_config()
    assert bitwise_equal(
        [np.array(keras.ops.convert_to_numpy(v)) for v in opt.variables],
        [np.array(keras.ops.convert_to_numpy(v)) for v in loaded.optimizer.variables],
    )
    assert loaded.optimizer.report().skipped_steps == 2
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert bitwise_equal(model.get_weights(), loaded.get_weights())


def test_tf_train_checkpoint_round_trip(tmp_path):
    x, y = classification_data(64)
    model, opt = _trained_guarded_model(x, y)
    prefix = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ckpt"))
    other = mlp(seed=3)
    other_opt = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-2), patience=4)
    other_opt.build(other.trainable_variables)
    tf.train.Checkpoint(model=other, optimizer=other_opt).restore(prefix).assert_consumed()
    assert bitwise_equal(model.get_weights(), other.get_weights())
    assert bitwise_equal(
        [np.array(keras.ops.convert_to_numpy(v)) for v in opt.variables],
        [np.array(keras.ops.convert_to_numpy(v)) for v in other_opt.variables],
    )


@pytest.mark.parametrize("builder", ["cnn", "embedding_model"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_real_models_fit_with_nan_batch(builder, jit_compile):
    import helpers

    model = getattr(helpers, builder)()
    rng = np.random.RandomState(0)
    if builder == "cnn":
        x = rng.rand(48, 8, 8, 1).astype("float32")
        x[16:32] = np.nan
    else:
        x = rng.randint(0, 20, (48, 5)).astype("int32")
    y = rng.randint(0, 3, 48)
    opt = guardedopt.GuardedOptimizer("adam")
    model.compile(optimizer=opt, loss=LOSS, jit_compile=jit_compile)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[guardedopt.GuardCallback()])
    report = opt.report()
    assert report.steps == 6
    assert report.skipped_steps == (2 if builder == "cnn" else 0)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_end_of_fit_summary_and_rate_limited_repeats(caplog):
    x, y = classification_data(64)
    x[:16, 0] = np.nan
    model = mlp()
    opt = guardedopt.GuardedOptimizer("adam", log_interval_seconds=0.0)
    model.compile(optimizer=opt, loss=LOSS)
    with caplog.at_level(logging.WARNING):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        summary = logged(caplog, "guardedopt summary")
        assert len(summary) == 1
        assert "after 4 steps (1 skipped)" in summary[0] and "nonfinite_gradient" in summary[0]
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    repeats = logged(caplog, "still happening")
    assert repeats and "(2 steps so far)" in repeats[-1]
    quiet = guardedopt.GuardedOptimizer("adam")  # default: at most once a minute
    quiet._log_once(opt.report().findings[0], count=1)
    caplog.clear()
    quiet._log_once(opt.report().findings[0], count=5)
    assert not caplog.records


def test_check_logs_a_new_finding_at_once_and_a_persistent_one_at_its_interval(caplog):
    model = mlp()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-10), patience=2, log_interval_seconds=3600.0)
    poison = Poison(on=False)
    step = _nan_step(model, opt, "graph", poison)
    with caplog.at_level(logging.WARNING):
        for _ in range(6):  # the tiny-step finding persists on every step
            step()
            opt.check()
        assert len(logged(caplog, "[tiny_step] The effective step")) == 1
        assert not logged(caplog, "still happening")
        poison.assign(True)  # a new finding, well within the hour since the last one
        step()
        opt.check()
        assert len(logged(caplog, "[nonfinite_gradient]")) == 1
        poison.assign(False)
        opt.log_interval_seconds = 0.0  # a repeat is now due at every new count
        step()
        opt.check()
    assert len(logged(caplog, "[tiny_step] The effective step")) == 1
    count = opt.report().by_code(F.TINY_STEP)[0].count
    assert logged(caplog, "still happening") == [
        f"guardedopt: [tiny_step] still happening for {', '.join(v.path for v in model.trainable_variables)} "
        f"({count} steps so far)."
    ]


def test_history_is_bounded_and_keeps_its_span(monkeypatch):
    monkeypatch.setattr(guardedopt.optimizer, "_HISTORY_POINTS", 8)
    variable = keras.Variable(np.ones(4, "float32"))
    opt = guardedopt.GuardedOptimizer(keras.optimizers.SGD(0.1))
    for _ in range(30):
        opt.apply([tf.ones(4)], [variable])
        opt.check()
    steps = opt.report().stats["history"]["step"]
    assert 4 <= len(steps) <= 8
    assert steps[0] == 1 and steps[-1] == 30
    assert np.all(np.diff(steps) > 0)
    assert opt.report().stats["history"]["step_ratio"].shape == (len(steps), 1)


# ------------------------------------------- large variables: sampled screens
def _wide_model():
    """A kernel of 40 x 300 = 12000 entries: far above checks.SAMPLE_SIZE."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((40,)), keras.layers.Dense(300), keras.layers.Dense(2)])


def _unsampled(variable, k):
    """The flat position just after the `k`-th run of the variable's sample."""
    positions = guardedopt.checks.sample_positions(int(np.prod(variable.shape)))
    width = guardedopt.checks.SAMPLE_SIZE // guardedopt.checks.SAMPLE_BLOCKS
    position = int(positions[(k + 1) * width - 1]) + 1
    assert position not in positions
    return position


@pytest.mark.parametrize("mode", MODES)
def test_nan_outside_the_sample_of_a_large_variable_is_skipped_exactly(mode):
    model = _wide_model()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-3))
    kernel = model.trainable_variables[0]
    grads = [tf.ones_like(v) * 1e-3 for v in model.trainable_variables]
    position = _unsampled(kernel, 5)  # between two sampled entries
    poisoned = np.full(kernel.shape, 1e-3, np.float32)
    poisoned.flat[position] = np.nan
    bad = [tf.constant(poisoned)] + grads[1:]

    def apply(g):
        opt.apply_gradients(zip(g, model.trainable_variables))

    step = apply if mode == "eager" else tf.function(apply, jit_compile=mode == "xla")
    step(grads)
    before = state_of(model, opt)
    step(bad)
    assert bitwise_equal(before, state_of(model, opt))
    finding = opt.report().by_code(F.NONFINITE_GRADIENT)[0]
    assert finding.variables == (kernel.path,)
    step(grads)
    assert int(opt.iterations) == 2 and int(opt.skipped_steps_total) == 1


@pytest.mark.parametrize("mode", ("graph", "xla"))
def test_zero_gradient_of_a_large_variable_is_exact(mode):
    model = _wide_model()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.SGD(0.1), patience=2)
    kernel, *rest = model.trainable_variables
    one_unsampled = np.zeros(kernel.shape, np.float32)
    one_unsampled.flat[_unsampled(kernel, 3)] = 1e-20  # the sample reads only zeros

    def apply(kernel_grad):
        grads = [kernel_grad] + [tf.ones_like(v) for v in rest]
        opt.apply_gradients(zip(grads, model.trainable_variables))

    step = tf.function(apply, jit_compile=mode == "xla")
    for _ in range(3):
        step(tf.constant(one_unsampled))
    assert not opt.report().by_code(F.ZERO_GRADIENT)
    for _ in range(2):
        step(tf.zeros_like(kernel))
    (finding,) = opt.report().by_code(F.ZERO_GRADIENT)
    assert finding.variables == (kernel.path,) and finding.first_step == 5


def _optimized_hlo(opt, variables, grads):
    step = tf.function(lambda *g: opt.apply(list(g), variables), jit_compile=True)
    return step.experimental_get_compiler_ir(*grads)(stage="optimized_hlo")


@pytest.mark.parametrize("sizes", [[50_000], [50_000, 20_000, 3_000, 500]])
def test_default_xla_step_copies_no_weight_or_slot(sizes):
    """The default step skips a NaN step by masking the inner optimizer's own
    writes, so XLA needs no pre-update copy of any weight or slot;
    nonfinite_weights='skip' needs one of each (the documented cost). With
    several variables, the one entry of the pre-update samples that the mask
    reads must still order every variable's sample read before its update."""

    def copies(**options):
        variables = [tf.Variable(tf.ones([size])) for size in sizes]
        opt = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-3), **options)
        opt.build(variables)
        hlo = _optimized_hlo(opt, variables, [tf.ones([size]) for size in sizes])
        return sum(hlo.count(f"f32[{size}]{{0}} copy(") for size in set(sizes))

    assert copies() == 0
    assert copies(check_every=10) == 0
    assert copies(weights_check_every=1) == 0
    assert copies(nonfinite_weights="skip") >= 1  # the old weights, kept for the restore


def _peak_step_bytes(sizes, **options):
    """Peak bytes of TF's CPU allocator (XLA's temporaries included) during
    three compiled steps, beyond the bytes in use before them."""
    variables = [tf.Variable(tf.ones([size])) for size in sizes]
    grads = [tf.fill([size], 0.5) for size in sizes]
    opt = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-3), **options)
    opt.build(variables)
    step = tf.function(lambda *g: opt.apply(list(g), variables), jit_compile=True)
    for _ in range(2):
        step(*grads)
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except ValueError:
        pytest.skip("this TF's CPU allocator keeps no statistics")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    for _ in range(3):
        step(*grads)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def test_running_xla_step_holds_at_most_one_variable_beyond_its_state():
    """The memory bar on the running step, not only in the HLO: while the
    default step runs, the allocator hands out at most one variable's bytes
    more than it held before; nonfinite_weights='skip' holds the old weights
    (and slots), which shows the measurement sees such copies."""
    sizes = [50_000, 20_000, 3_000, 500]
    one_variable, all_weights = 4 * max(sizes), 4 * sum(sizes)
    assert _peak_step_bytes(sizes) <= one_variable
    assert _peak_step_bytes(sizes, check_every=10) <= one_variable
    assert _peak_step_bytes(sizes, weights_check_every=1) <= one_variable
    assert _peak_step_bytes(sizes, nonfinite_weights="skip") >= all_weights


@pytest.mark.parametrize("weights_check_every, sums", [(10, 1), (1, 2)])
def test_default_xla_step_makes_no_full_pass_beyond_the_update_and_the_sums(weights_check_every, sums):
    """Per step, the only full-size loops are the inner update's own (m, v, w
    for Adam) and plain sums (`checks.propagating_sum`: a dot with ones, which
    reads the array in place): of the gradient, and of the new weights when
    they are checked in full every step (by default every 10th step, in a
    conditional). Every exact check stays inside a conditional taken only on
    a suspicious step (`checks.keep_conditional`: without it XLA hoisted the
    weights' check)."""
    size = 50_000
    variables = [tf.Variable(tf.ones([size]))]
    opt = guardedopt.GuardedOptimizer(
        keras.optimizers.Adam(1e-3), weights_check_every=weights_check_every
    )
    opt.build(variables)
    hlo = _optimized_hlo(opt, variables, [tf.ones([size])])
    entry = hlo[hlo.index("\nENTRY"):]
    loops = [line for line in entry.splitlines() if f"= f32[{size}]{{0}} fusion(" in line]
    assert len(loops) == 3, loops
    row_length = checks._sum_row_length(size)
    assert entry.count(f"= f32[{size // row_length}]{{0}} dot(") == sums
    assert "kind=kCustom" not in entry  # no library reduction of a full-size array
    assert entry.count(" conditional(") == 2


def test_writes_are_unmasked_after_the_step():
    model = mlp()
    x, y = classification_data()
    opt = guardedopt.GuardedOptimizer(keras.optimizers.AdamW(1e-2))
    make_step(model, opt, tf.constant(x), tf.constant(y), "graph")()
    for v in list(model.trainable_variables) + opt.inner_optimizer.variables:
        assert "assign" not in guardedopt.optimizer._unwrap_value(v).__dict__


@pytest.mark.parametrize("mode", ["graph", "xla"])
@pytest.mark.parametrize("check_every", [1, 2])
def test_weights_changed_between_steps_are_not_measured_as_a_step(mode, check_every):
    model = mlp()
    x, y = classification_data()
    opt = guardedopt.GuardedOptimizer(
        keras.optimizers.SGD(1e-3), large_step="raise", patience=1, check_every=check_every
    )
    step = make_step(model, opt, tf.constant(x), tf.constant(y), mode)
    for _ in range(check_every):
        step()
    # A jump from outside the optimizer (set_weights, a reload) is no step: a
    # step ratio of ~99 would raise. The next measured step is the update alone.
    model.set_weights([w * 100.0 for w in model.get_weights()])
    for _ in range(check_every):
        before = [v.numpy() for v in model.trainable_variables]
        step()
    opt.check()
    after = [v.numpy() for v in model.trainable_variables]
    expected = [
        np.linalg.norm(a - b) / max(np.linalg.norm(b), opt.step_epsilon * b.size**0.5)
        for a, b in zip(after, before)
    ]
    np.testing.assert_allclose(opt.last_step_ratio.numpy(), expected, rtol=1e-4)
    assert opt.report().skipped_steps == 0 and max(expected) < 0.1  # the jump: ~99
