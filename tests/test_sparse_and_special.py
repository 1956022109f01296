"""Sparse gradients and the inner optimizer's special features (issue 6).

* `IndexedSlices` (from `Embedding`) are checked on their `.values`, duplicate
  indices included, and the guard adds no op that densifies them.
* `overwrite_with_gradient` variables, EMA, gradient accumulation, clipping
  and weight decay on the inner optimizer keep working: the guarded run is
  bit-identical to the bare one (eager and `tf.function`), and a skipped step
  leaves all of their state as if the step never happened.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import guardedopt
from guardedopt import findings as F

# Ops that turn IndexedSlices (or sparse updates) into a dense tensor.
DENSIFYING_OPS = {
    "UnsortedSegmentSum",
    "ScatterNd",
    "SparseToDense",
    "TensorScatterAdd",
    "TensorScatterUpdate",
    "SparseTensorDenseAdd",
}
VOCABULARY = 500


def _bits(values):
    return [np.asarray(keras.ops.convert_to_numpy(v)).tobytes() for v in values]


def _embedding_model():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((3,), dtype="int32")
    embedded = keras.layers.Embedding(VOCABULARY, 8)(inputs)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(embedded))
    return keras.Model(inputs, outputs)


def _op_counts(concrete):
    """Op types in a traced step, including cond/while bodies."""
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    counts = {}
    for node in nodes:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def _traced_embedding_step(optimizer):
    model = _embedding_model()
    optimizer.build(model.trainable_variables)
    seen = {}

    @tf.function
    def step(ids, target):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(ids) - target))
        grads = tape.gradient(loss, model.trainable_variables)
        seen["sparse"] = isinstance(grads[0], tf.IndexedSlices)
        optimizer.apply(grads, model.trainable_variables)

    ids = tf.constant([[1, 1, 7], [7, 3, 3]], tf.int32)  # duplicate rows
    concrete = step.get_concrete_function(ids, tf.zeros((2, 1)))
    assert seen["sparse"], "the embedding gradient should be IndexedSlices"
    return _op_counts(concrete)


@pytest.mark.parametrize(
    "make_inner",
    [lambda: keras.optimizers.SGD(0.1), lambda: keras.optimizers.Adam(1e-2)],
    ids=["sgd", "adam"],
)
def test_guard_adds_no_densifying_op(make_inner):
    bare = _traced_embedding_step(make_inner())
    guarded = _traced_embedding_step(guardedopt.GuardedOptimizer(make_inner()))
    for op in DENSIFYING_OPS:
        assert guarded.get(op, 0) <= bare.get(op, 0), (
            f"the guard adds {op} ops: {guarded.get(op, 0)} vs {bare.get(op, 0)} unguarded"
        )
    if isinstance(make_inner(), keras.optimizers.SGD):
        # Plain SGD keeps the update sparse (a scatter): nothing may densify.
        assert not DENSIFYING_OPS & set(guarded), sorted(DENSIFYING_OPS & set(guarded))


def _sparse_setup(guarded, mode):
    table = keras.Variable(
        np.random.RandomState(0).randn(VOCABULARY, 4).astype("float32"), name="table"
    )
    inner = keras.optimizers.SGD(0.1)
    optimizer = guardedopt.GuardedOptimizer(inner) if guarded else inner
    optimizer.build([table])

    def step(values, indices):
        optimizer.apply([tf.IndexedSlices(values, indices, tf.constant([VOCABULARY, 4]))], [table])

    return table, optimizer, (tf.function(step) if mode == "function" else step)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_indexed_slices_with_duplicates(mode):
    """NaN in one duplicate row of an IndexedSlices gradient skips the step;
    finite slices update exactly as unguarded (duplicates summed by the scatter)."""
    bare_table, _, bare_step = _sparse_setup(False, mode)
    table, guard, step = _sparse_setup(True, mode)
    indices = tf.constant([4, 9, 4, 4], tf.int64)
    clean = tf.constant(np.arange(16, dtype="float32").reshape(4, 4) / 10)
    poisoned = clean.numpy().copy()
    poisoned[2, 1] = np.nan  # the second duplicate of row 4 only

    before = _bits([table])
    step(tf.constant(poisoned), indices)
    assert _bits([table]) == before
    assert int(guard.skipped_steps_total.numpy()) == 1
    assert int(guard.iterations.numpy()) == 0
    report = guard.report()
    assert report.codes == [F.NONFINITE_GRADIENT]
    assert report.by_code(F.NONFINITE_GRADIENT)[0].variables == (table.path,)

    step(clean, indices)
    bare_step(clean, indices)
    assert _bits([table]) == _bits([bare_table])
    assert int(guard.skipped_steps_total.numpy()) == 1


def _special_variables(overwrite):
    rs = np.random.RandomState(1)
    kernel = keras.Variable(rs.randn(3, 4).astype("float32"), name="kernel")
    bias = keras.Variable(np.zeros(4, "float32"), name="bias")
    if not overwrite:
        return [kernel, bias]
    # As float8 layers' scale/amax history: the "gradient" is the new value.
    amax = keras.Variable(np.ones(2, "float32"), name="amax", trainable=True)
    amax.overwrite_with_gradient = True
    return [kernel, bias, amax]


def _gradient_sequence():
    rs = np.random.RandomState(2)
    steps = []
    for _ in range(5):
        steps.append(
            [rs.randn(3, 4).astype("float32"), rs.randn(4).astype("float32"),
             np.abs(rs.randn(2)).astype("float32")]
        )
    return steps


SPECIAL = {
    # EMA runs without the overwrite_with_gradient variable: Keras 3.15's TF
    # backend fails on its `None` average when it overwrites the weights.
    "ema": lambda: keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=0.9,
                                         ema_overwrite_frequency=3),
    "gradient_accumulation": lambda: keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2),
    "clipnorm": lambda: keras.optimizers.Adam(1e-2, clipnorm=0.5),
    "global_clipnorm": lambda: keras.optimizers.SGD(0.1, momentum=0.9, global_clipnorm=0.5),
    "clipvalue": lambda: keras.optimizers.RMSprop(1e-2, clipvalue=0.2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    "sgd_weight_decay": lambda: keras.optimizers.SGD(0.1, weight_decay=0.05),
    "amsgrad": lambda: keras.optimizers.Adam(1e-2, amsgrad=True),
}
POISON = 2  # the step with a NaN in the kernel's gradient


def _run_special(make_inner, guarded, mode, poison):
    inner = make_inner()
    variables = _special_variables(overwrite=not inner.use_ema)
    optimizer = guardedopt.GuardedOptimizer(inner, tiny_step="ignore") if guarded else inner
    optimizer.build(variables)

    def step(grads):
        optimizer.apply(grads, variables)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    states = []
    for i, grads in enumerate(_gradient_sequence()):
        grads = [g.copy() for g in grads[: len(variables)]]
        if i == POISON:
            if not poison:
                continue  # the unguarded reference never sees the faulty step
            grads[0][1, 2] = np.nan
        step([tf.constant(g) for g in grads])
        states.append(_bits(variables) + _bits(inner.variables))
    optimizer.finalize_variable_values(variables)
    states.append(_bits(variables))
    return states, optimizer, [v.dtype for v in variables + inner.variables]


def _close(first, second, dtypes):
    """Within XLA's rounding: two compiled programs may fuse (and round) differently."""
    for a, b, dtype in zip(first, second, dtypes):
        np_dtype = tf.as_dtype(dtype).as_numpy_dtype
        np.testing.assert_allclose(np.frombuffer(a, np_dtype), np.frombuffer(b, np_dtype),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_special_inner_features_stay_transparent(name, mode):
    """A NaN step is skipped exactly, whatever the inner optimizer writes where
    (weight decay, EMA, accumulators, clipping), eagerly, in tf.function and
    under XLA (compared with the bare optimizer in the same mode)."""
    bare, _, dtypes = _run_special(SPECIAL[name], guarded=False, mode=mode, poison=False)
    guarded, guard, _ = _run_special(SPECIAL[name], guarded=True, mode=mode, poison=True)
    # The skipped step left every weight and slot bit for bit as it was.
    assert guarded[POISON] == guarded[POISON - 1]
    del guarded[POISON]
    assert len(bare) == len(guarded)
    for i, (b, g) in enumerate(zip(bare, guarded)):
        if mode == "xla":
            _close(b, g, dtypes)
        else:
            assert b == g, f"{name}/{mode}: state differs after clean step {i}"
    assert int(guard.skipped_steps_total.numpy()) == 1
    assert int(guard.guard_step.numpy()) == 5
    report = guard.report()
    assert report.by_code(F.NONFINITE_GRADIENT)[0].variables == ("kernel",)


@pytest.mark.parametrize("options", [{}, {"nonfinite_weights": "skip"}], ids=["default", "restore"])
@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_ema_overwrite_of_a_frozen_layer_on_a_skipped_step_is_undone(mode, options):
    # With ema_overwrite_frequency Keras overwrites every variable the
    # optimizer was built on, also a layer frozen since: the guard masked (or
    # restored) only the variables of this step, so a skipped step on an
    # overwrite iteration still moved the frozen layer (0.026 here).
    freeze_at, poison, steps = 4, 7, 12  # (7 + 1) % 8 == 0: the NaN step overwrites

    def run(guarded):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
        inner = keras.optimizers.Adam(5e-2, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=8)
        opt = guardedopt.GuardedOptimizer(inner, **options) if guarded else inner
        opt.build(model.trainable_variables)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(16, 6)).astype("float32")
        y = rng.integers(0, 3, 16)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        def step(inputs):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(inputs))
            variables = model.trainable_variables
            opt.apply_gradients(zip(tape.gradient(loss, variables), variables))

        traced = step if mode == "eager" else tf.function(step, jit_compile=mode == "xla")
        for i in range(steps):
            if i == freeze_at:
                model.layers[0].trainable = False
                traced = step if mode == "eager" else tf.function(step, jit_compile=mode == "xla")
            inputs = x.copy()
            if i == poison:
                if not guarded:
                    continue  # the reference never sees the faulty step
                inputs[0, 0] = np.nan
            frozen = _bits(model.layers[0].weights)
            traced(tf.constant(inputs))
            if i == poison:
                assert _bits(model.layers[0].weights) == frozen
        return model, opt, inner

    bare_model, _, bare_inner = run(guarded=False)
    model, guard, inner = run(guarded=True)
    assert int(guard.skipped_steps_total.numpy()) == 1
    first = _bits(bare_model.weights) + _bits(bare_inner.variables)
    second = _bits(model.weights) + _bits(inner.variables)
    if mode == "xla":
        _close(first, second, [v.dtype for v in bare_model.weights + bare_inner.variables])
    else:
        assert first == second


def _few_rows_fit(layer, inner, steps=40):
    """A custom loop on a large table of which each batch moves a few rows: an
    `Embedding` (sparse gradients) or a `Dense` layer on multi-hot inputs (a
    dense gradient, zero outside the batch's rows)."""
    vocab = 200_000
    rs = np.random.RandomState(0)
    ids = rs.randint(0, vocab, (steps, 8, 2)).astype("int32")  # 16 of the 200,000 rows per step
    labels = (ids[:, :, 0] % 2).astype("int32")
    keras.utils.set_random_seed(1)
    if layer == "embedding":
        body = [keras.Input((2,), dtype="int32"), keras.layers.Embedding(vocab, 16),
                keras.layers.GlobalAveragePooling1D()]
        features = lambda x: x
    else:
        body = [keras.Input((vocab,)), keras.layers.Dense(2, activation="tanh")]
        features = lambda x: tf.reduce_sum(tf.one_hot(x, vocab), axis=1)
    model = keras.Sequential(body + [keras.layers.Dense(2)])
    guard = guardedopt.GuardedOptimizer(inner)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(features(x), training=True))
        guard.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    for x, y in zip(ids, labels):
        step(x, y)
    return model, guard


@pytest.mark.parametrize("layer", ["embedding", "multi_hot_dense"])
def test_rows_the_sample_misses_are_no_tiny_step(layer):
    """SGD moves only the batch's rows, which the table's 1024-entry sample rarely
    holds: a zero sampled step there is no tiny step. A learning rate of 1e-10
    is still found, on the layers the sample does see."""
    model, guard = _few_rows_fit(layer, keras.optimizers.SGD(0.5))
    assert guard.report().by_code(F.TINY_STEP) == []
    model, guard = _few_rows_fit(layer, keras.optimizers.SGD(1e-10))
    (finding,) = guard.report().by_code(F.TINY_STEP)
    assert model.trainable_variables[-1].path in finding.variables
