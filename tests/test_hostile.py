"""Hostile input (issue 6): property tests, fault injection in `fit`, misuse.

Property tests (hypothesis) draw gradient lists with NaN/Inf/0/-0/subnormal/
huge values, dtypes float16/bfloat16/float32/float64 and shapes including
scalars and 0-size variables. Invariants, checked against the bare inner
optimizer as oracle:

* a step is skipped exactly when a gradient is non-finite, or (with
  `nonfinite_weights="skip"`) the update turns finite weights non-finite; a
  skipped step leaves the weights, the inner slots and the inner `iterations`
  bit-identical, and the counters are exact (under the default
  `nonfinite_weights="warn"`, with `weights_check_every=1`, the same steps
  count non-finite weights);
* a step that is not skipped equals the bare optimizer's step bit for bit;
* eager, `tf.function` and XLA take the same decisions.

Example counts are small (CI budget); `derandomize=True` keeps CI repeatable.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import guardedopt
from guardedopt import findings as F
from guardedopt.optimizer import EVENT_ROWS

DTYPES = ("float16", "bfloat16", "float32", "float64")
SHAPES = ((), (0,), (1,), (3,), (2, 3), (0, 4))
SUBNORMAL = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149, "float64": 5e-324}
NONFINITE_ROW = EVENT_ROWS.index(F.NONFINITE_GRADIENT)
WEIGHTS_ROW = EVENT_ROWS.index(F.NONFINITE_WEIGHTS)


def _numpy_dtype(dtype):
    return tf.as_dtype(dtype).as_numpy_dtype


def _values(dtype, hostile):
    big = float(tf.as_dtype(dtype).max)
    tiny = SUBNORMAL[dtype]
    finite = [0.0, -0.0, 1.0, -0.5, 3.25, 1e-3, tiny, -tiny, big, -big]
    return finite + [math.nan, math.inf, -math.inf] if hostile else finite


@st.composite
def problems(draw, max_variables=3):
    """Variables (finite initial values) and one hostile gradient per variable."""
    specs = []
    for _ in range(draw(st.integers(1, max_variables))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.sampled_from(SHAPES))
        size = int(np.prod(shape))
        hostile = draw(st.booleans())
        gradient = draw(
            st.lists(st.sampled_from(_values(dtype, hostile)), min_size=size, max_size=size)
        )
        if hostile and size:  # at least one NaN/Inf in a hostile gradient
            position = draw(st.integers(0, size - 1))
            gradient[position] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        initial = draw(
            st.lists(st.sampled_from([0.0, 0.5, -1.0, 2.0, 1e-3]), min_size=size, max_size=size)
        )
        np_dtype = _numpy_dtype(dtype)
        specs.append(
            (
                dtype,
                np.array(initial, np_dtype).reshape(shape),
                np.array(gradient, np_dtype).reshape(shape),
            )
        )
    inner = draw(st.sampled_from(["sgd", "momentum", "adam"]))
    return specs, inner


INNER = {
    "sgd": lambda: keras.optimizers.SGD(0.5),
    "momentum": lambda: keras.optimizers.SGD(0.5, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.1),
}


def _bits(values):
    return [np.asarray(keras.ops.convert_to_numpy(v)).tobytes() for v in values]


def _setup(specs, inner, guarded, mode, weights_policy="warn"):
    variables = [
        keras.Variable(initial, dtype=dtype, name=f"v{i}")
        for i, (dtype, initial, _) in enumerate(specs)
    ]
    optimizer = INNER[inner]()
    if guarded:
        # Every step in full: the oracle counts the weights on every step.
        optimizer = guardedopt.GuardedOptimizer(
            optimizer, nonfinite_weights=weights_policy, weights_check_every=1
        )
    optimizer.build(variables)

    def step(*grads):
        optimizer.apply(list(grads), variables)

    if mode == "function":
        step = tf.function(step)
    elif mode == "xla":
        step = tf.function(step, jit_compile=True)
    return variables, optimizer, step


def _grads(specs):
    return [tf.constant(g, dtype=d) for d, _, g in specs]


def _oracle(specs, inner, mode, repeats, weights_policy="warn"):
    """The bare inner optimizer, with the guard's rule applied by hand: a step
    whose gradients are non-finite, or (policy "skip") that turns finite
    weights non-finite, is undone."""
    variables, optimizer, step = _setup(specs, inner, guarded=False, mode=mode)
    state = variables + optimizer.variables
    nonfinite = [bool(g.size) and not np.isfinite(g.astype("float64")).all() for _, _, g in specs]
    grads = _grads(specs)
    steps = []
    for _ in range(repeats):
        saved = [v.numpy() for v in state]
        step(*grads)
        weights = [np.asarray(v.numpy()).astype("float64") for v in variables]
        weights_bad = [
            bool(w.size) and not np.isfinite(w).all() and not any(nonfinite) for w in weights
        ]
        skip = any(nonfinite) or (weights_policy == "skip" and any(weights_bad))
        if skip:
            for v, value in zip(state, saved):
                v.assign(value)
        steps.append(dict(skip=skip, weights_bad=weights_bad, state=_bits(state)))
    return nonfinite, steps


def _check_invariants(specs, inner, mode, oracle_mode="eager", repeats=2, weights_policy="warn"):
    nonfinite, expected = _oracle(specs, inner, oracle_mode, repeats, weights_policy)
    variables, guard, step = _setup(specs, inner, guarded=True, mode=mode, weights_policy=weights_policy)
    state = variables + guard.inner_optimizer.variables
    grads = _grads(specs)
    for i, want in enumerate(expected):
        step(*grads)
        assert _bits(state) == want["state"], f"step {i + 1} (skip={want['skip']}) differs"
    skips = [e["skip"] for e in expected]
    event(f"skips={skips}, nonfinite={any(nonfinite)}")
    counts = guard.event_count.numpy()
    decisions = dict(
        skips=skips,
        guard_step=int(guard.guard_step.numpy()),
        skipped=int(guard.skipped_steps_total.numpy()),
        consecutive=int(guard.skipped_steps_consecutive.numpy()),
        last_good=int(guard.last_good_step.numpy()),
        nonfinite=counts[NONFINITE_ROW].tolist(),
        weights_bad=counts[WEIGHTS_ROW].tolist(),
        iterations=int(np.asarray(guard.iterations)),
    )
    trailing = len(skips) - len("".join("s" if k else "." for k in skips).rstrip("s"))
    good = [i + 1 for i, k in enumerate(skips) if not k]
    assert decisions["guard_step"] == repeats
    assert decisions["skipped"] == sum(skips)
    assert decisions["consecutive"] == trailing
    assert decisions["last_good"] == (good[-1] if good else 0)
    assert decisions["iterations"] == len(good)
    assert decisions["nonfinite"] == [repeats * int(n) for n in nonfinite]
    assert decisions["weights_bad"] == [
        sum(int(e["weights_bad"][k]) for e in expected) for k in range(len(specs))
    ]
    return decisions


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), weights_policy=st.sampled_from(["warn", "skip"]))
def test_hostile_gradients_eager(problem, weights_policy):
    specs, inner = problem
    _check_invariants(specs, inner, "eager", weights_policy=weights_policy)


@pytest.mark.slow
@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_variables=4), weights_policy=st.sampled_from(["warn", "skip"]))
def test_hostile_gradients_same_decisions_in_every_mode(problem, weights_policy):
    """Eager, tf.function and XLA skip the same steps with the same counters.

    XLA may round the update itself differently from the kernels used eagerly
    (e.g. float16 arithmetic in float32), so its non-finite-weights oracle is
    the bare optimizer under XLA; the gradient decisions must match exactly.
    """
    specs, inner = problem
    eager = _check_invariants(specs, inner, "eager", weights_policy=weights_policy)
    function = _check_invariants(specs, inner, "function", weights_policy=weights_policy)
    assert function == eager
    xla = _check_invariants(specs, inner, "xla", oracle_mode="xla", weights_policy=weights_policy)
    assert xla["nonfinite"] == eager["nonfinite"]
    if not any(eager["nonfinite"]) and xla["weights_bad"] == eager["weights_bad"]:
        assert xla == eager


# ------------------------------------------------------------ fault injection
BATCH = 4
CLASSES = 3


def _classification(batches, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(batches * BATCH, 4).astype("float32")
    w = rs.randn(4, CLASSES).astype("float32")
    y = np.argmax(x @ w, axis=1).astype("int32")
    return x, y


def _rows(batches):
    return np.concatenate([np.arange(b * BATCH, (b + 1) * BATCH) for b in batches]).astype(int)


def _mlp(extra_layer=None):
    keras.utils.set_random_seed(11)
    layers = [keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
              keras.layers.Dense(CLASSES)]
    if extra_layer is not None:
        layers.append(extra_layer)
    layers.append(keras.layers.Softmax())
    return keras.Sequential(layers)


def _fit(optimizer, x, y, sample_weight=None, callbacks=(), extra_layer=None):
    model = _mlp(extra_layer)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    guarded = isinstance(optimizer, guardedopt.GuardedOptimizer)
    model.fit(x, y, sample_weight=sample_weight, batch_size=BATCH, epochs=1, shuffle=False,
              verbose=0, callbacks=[guardedopt.GuardCallback()] * guarded + list(callbacks))
    return model


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y))


def _adam():
    return keras.optimizers.Adam(1e-2)


STORM = range(20, 120)  # NaN inputs on 100 consecutive steps
STORM_BATCHES = 150


@pytest.fixture(scope="module")
def storm_data():
    x, y = _classification(STORM_BATCHES)
    poisoned = x.copy()
    poisoned[[b * BATCH + 1 for b in STORM], 2] = np.nan
    return x, y, poisoned


def test_nan_storm_stops_with_guard_error(storm_data):
    """Default policy: 10 skipped steps in a row escalate to GuardError; the
    weights are exactly those before the storm, never NaN."""
    x, y, poisoned = storm_data
    model = _mlp()
    model.compile(optimizer=guardedopt.GuardedOptimizer(_adam()),
                  loss="sparse_categorical_crossentropy")
    with pytest.raises(guardedopt.GuardError) as info:
        model.fit(poisoned, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[guardedopt.GuardCallback()])
    error = info.value
    assert error.step == STORM[0] + 10
    assert "10 consecutive steps were skipped for non-finite gradients" in str(error)
    assert [f.code for f in error.findings] == [F.NONFINITE_GRADIENT]
    before_storm = _fit(_adam(), x[: STORM[0] * BATCH], y[: STORM[0] * BATCH])
    assert _bits(model.weights) == _bits(before_storm.weights)


def test_nan_storm_recovers_exactly(storm_data):
    """With room for the storm, training resumes afterwards and ends exactly
    where a clean run without those batches ends (same accuracy)."""
    x, y, poisoned = storm_data
    guarded = _fit(guardedopt.GuardedOptimizer(_adam(), max_consecutive_skips=1000), poisoned, y)
    guard = guarded.optimizer
    assert int(guard.skipped_steps_total.numpy()) == len(STORM)
    assert int(guard.iterations.numpy()) == STORM_BATCHES - len(STORM)
    keep = _rows(b for b in range(STORM_BATCHES) if b not in STORM)
    clean = _fit(_adam(), x[keep], y[keep])
    assert _bits(guarded.weights) == _bits(clean.weights)
    accuracy = _accuracy(guarded, x, y)
    assert accuracy == _accuracy(clean, x, y) and accuracy > 0.8


class _PoisonGradient(keras.layers.Layer):
    """Adds a scalar `s`; its gradient (only) is NaN while `poison` is set."""

    def build(self, input_shape):
        self.s = self.add_weight(shape=(), initializer="zeros", name="s")
        self.poison = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                      name="poison")

    def call(self, inputs):
        poison = self.poison

        @tf.custom_gradient
        def shift(s):
            def grad(dy):
                return dy * tf.where(poison > 0, tf.constant(np.nan, dy.dtype), 1.0)
            return tf.identity(s), grad

        return inputs + shift(self.s)


class _PoisonAt(keras.callbacks.Callback):
    def __init__(self, layer, batches):
        super().__init__()
        self.layer, self.batches = layer, set(batches)

    def on_train_batch_begin(self, batch, logs=None):
        self.layer.poison.assign(1.0 if batch in self.batches else 0.0)


def test_nan_in_one_variable_only():
    x, y = _classification(50)
    faulty = [5, 6, 31]
    layer = _PoisonGradient()
    guarded = _fit(guardedopt.GuardedOptimizer(_adam()), x, y, extra_layer=layer,
                   callbacks=[_PoisonAt(layer, faulty)])
    report = guarded.optimizer.report()
    (finding,) = report.by_code(F.NONFINITE_GRADIENT)
    assert finding.variables == (layer.s.path,)
    assert finding.count == 3 and report.skipped_steps == 3
    keep = _rows(b for b in range(50) if b not in faulty)
    clean = _fit(_adam(), x[keep], y[keep], extra_layer=_PoisonGradient())
    assert _bits(guarded.weights) == _bits(clean.weights)


def test_inf_in_the_loss():
    x, y = _classification(50)
    weight = np.ones(len(y), "float32")
    faulty = [7, 30]
    weight[[b * BATCH for b in faulty]] = np.inf
    guarded = _fit(guardedopt.GuardedOptimizer(_adam()), x, y, sample_weight=weight)
    assert guarded.optimizer.report().skipped_steps == 2
    keep = _rows(b for b in range(50) if b not in faulty)
    clean = _fit(_adam(), x[keep], y[keep])
    assert _bits(guarded.weights) == _bits(clean.weights)
    assert all(np.isfinite(w.numpy()).all() for w in guarded.weights)


# --------------------------------------------------------------------- misuse
def test_guarding_a_guard_is_rejected():
    with pytest.raises(ValueError, match="must not be a GuardedOptimizer: guarding a guard"):
        guardedopt.GuardedOptimizer(guardedopt.GuardedOptimizer("adam"))


def test_apply_with_mismatched_lists():
    variables = [keras.Variable(np.ones(2, "float32"))]
    guard = guardedopt.GuardedOptimizer("sgd")
    with pytest.raises(ValueError, match="Received: 2 gradients for 1 variables"):
        guard.apply([tf.ones(2), tf.ones(2)], variables)


def test_one_guard_for_two_models_is_rejected():
    x, y = _classification(2)
    guard = guardedopt.GuardedOptimizer(_adam())
    first = _mlp()
    first.compile(optimizer=guard, loss="sparse_categorical_crossentropy")
    first.fit(x, y, batch_size=BATCH, verbose=0)
    second = _mlp()
    second.compile(optimizer=guard, loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="for another model, or after making a layer trainable"):
        second.fit(x, y, batch_size=BATCH, verbose=0)


def test_unfreezing_a_layer_under_the_same_guard_says_what_to_do():
    """Keras refuses it too ("Unknown variable"); the message names this
    cause, not only a second model."""
    x, y = _classification(2)
    guard = guardedopt.GuardedOptimizer(_adam())
    model = _mlp()
    model.layers[0].trainable = False
    model.compile(optimizer=guard, loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=BATCH, verbose=0)
    model.layers[0].trainable = True
    model.compile(optimizer=guard, loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"Unknown variable .*after making a layer trainable and compiling again"):
        model.fit(x, y, batch_size=BATCH, verbose=0)


def test_stateless_apply_explains_why():
    guard = guardedopt.GuardedOptimizer("adam")
    with pytest.raises(ValueError, match="does not support `stateless_apply`.*tf.distribute"):
        guard.stateless_apply([], [], [])
