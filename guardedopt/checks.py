"""The tensor math of each check, as small pure functions.

Every function here takes tensors and returns tensors, uses only XLA-compilable
ops (no `tf.print`, `py_function`, `Assert` or host reads), and is tested alone
in `tests/test_checks.py`. `GuardedOptimizer` composes them inside its step.

Cost model (XLA:CPU in TF 2.21, measured; README "Performance"). A plain
sum of an array runs as one library call (fastest as a matrix-vector product
with ones: `propagating_sum`); a reduction of a computed value (`|x|`, `x*x`,
`is_finite(x)`) first writes that value to a full-size temporary. So the
checks of a large variable read it with plain sums only, and answer the rest
from a fixed sample of `SAMPLE_SIZE`
entries (`sample_positions`); the exact, slower form runs in a conditional
that is taken only when the cheap screen cannot decide
(`screened_magnitudes`), kept a real conditional by
`keep_conditional`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

# Entries of a variable that the sampled checks read. Variables up to this size
# are checked exactly and in full.
SAMPLE_SIZE = 1024
# The sample of a larger variable is this many evenly spaced runs of
# consecutive entries (32 runs of 32): 64 cache lines per read instead of
# 1024. Three reads per variable and step: 1024 strided single entries took
# 4.3 µs per read of a 10^5-entry variable under XLA:CPU, the runs 2.5 µs
# (tf.profiler, Adam, 10 variables).
SAMPLE_BLOCKS = 32


def gradient_values(gradient):
    """The dense values of a gradient: `.values` for `IndexedSlices`.

    Sparse gradients (from `Embedding`) are checked on the rows they carry,
    duplicates included, so they are never densified.
    """
    if isinstance(gradient, tf.IndexedSlices):
        return gradient.values
    return gradient


def largest_magnitude(tensor, axis=None) -> tf.Tensor:
    """max |x| with NaN counted as +Inf (over `axis`; all entries by default).

    The result is +Inf exactly when some entry is NaN or +/-Inf, 0 exactly when
    every entry is 0, and -Inf for an empty tensor: one reduction answers two
    questions. NaN is mapped explicitly because XLA's CPU `max` drops NaN while
    TensorFlow's kernels propagate it. Zero padding does not change it.
    """
    values = gradient_values(tensor)
    infinity = tf.constant(float("inf"), values.dtype)
    magnitudes = tf.where(tf.math.is_finite(values), tf.abs(values), infinity)
    return tf.reduce_max(magnitudes, axis=axis)


def flat_sample(tensor, size: int = SAMPLE_SIZE) -> tf.Tensor:
    """A fixed sample of at most `size` entries, flattened: `sample_positions`.

    The same positions are read at every step. A tensor of at most `size`
    entries, or of a size unknown at trace time, is returned whole
    (flattened).
    """
    values = tf.reshape(gradient_values(tensor), [-1])
    n = values.shape.num_elements()
    if n is None or n <= size:
        return values
    blocks, width, stride = _sample_layout(n, size)
    rows = tf.reshape(values[: blocks * stride], [blocks, stride])
    return tf.reshape(rows[:, :width], [-1])


def _sample_layout(n: int, size: int):
    """`(blocks, width, stride)` of the sample of `n > size` entries."""
    blocks = min(SAMPLE_BLOCKS, size)
    return blocks, size // blocks, n // blocks


def sample_positions(n: int, size: int = SAMPLE_SIZE) -> np.ndarray:
    """The flat positions `flat_sample` reads from a tensor of `n` entries.

    All of them up to `size`; beyond, `SAMPLE_BLOCKS` runs of `size //
    SAMPLE_BLOCKS` consecutive entries starting at `0, s, 2s, ...` with
    `s = n // SAMPLE_BLOCKS`.
    """
    if n <= size:
        return np.arange(n)
    blocks, width, stride = _sample_layout(n, size)
    return (np.arange(blocks)[:, None] * stride + np.arange(width)[None, :]).reshape(-1)


def sample_size(n: int, size: int = SAMPLE_SIZE) -> int:
    """Length of `flat_sample` of a tensor with `n` entries."""
    if n <= size:
        return n
    blocks, width, _ = _sample_layout(n, size)
    return blocks * width  # `size` when it is a multiple of SAMPLE_BLOCKS


def keep_conditional(value):
    """`value` unchanged (bits included), passed through a sort of two equal rows.

    XLA's conditional simplifier turns a conditional whose branches hold only
    cheap ops (elementwise ops and reductions count as cheap) into selects,
    which compute both branches on every step. It does so for a rare-path
    check of a computed value such as the updated weights (seen in the
    optimized HLO: the exact check then ran on every step, +0.5x of bare
    Adam). A sort counts as expensive, so a branch that returns this stays a
    real conditional that runs only when taken.
    """
    wide = _wide(value.dtype)
    rows = tf.sort(tf.stack([tf.cast(value, wide)] * 2), axis=0)
    return tf.cast(rows[0], value.dtype)


# Longest row of the matrix that `propagating_sum` multiplies by ones.
_SUM_ROW_LENGTH = 10_000
# Below this row length (a size with no larger divisor, e.g. a prime) the
# product has nothing to gain over `reduce_sum`.
_SUM_MIN_ROW_LENGTH = 32


def propagating_sum(tensor) -> tf.Tensor:
    """The sum of all entries of a float tensor: non-finite when any entry is.

    NaN and Inf propagate through every product by 1 and every addition, so
    a finite result proves every entry finite. Computed as `reshape(x, [r,
    k]) @ ones(k)` (a bitcast, no copy) for float32/float64 tensors of static
    size: XLA:CPU runs that dot on the intra-op thread pool at about the rate
    of the update's own loops, and its `reduce` of one large array runs
    slower. Measured in `/tmp` scripts (XLA, median of 15 interleaved rounds,
    2-core Xeon): 10^7 floats in one tensor 4.7 ms as a reduce, 1.7 ms as
    this product with TF's threads (4.8 and 3.3 ms with one thread); 10^4
    floats in each of 100 tensors about 0.8x; 10^5-10^6 about the same as a
    reduce. Other dtypes, sizes unknown at trace time and sizes with no
    divisor in `[_SUM_MIN_ROW_LENGTH, _SUM_ROW_LENGTH]` use `reduce_sum`.
    """
    values = gradient_values(tensor)
    k = _product_row_length(values)
    if not k:
        return tf.reduce_sum(values)
    return _sum_of_row_products(values, tf.ones([k], values.dtype))


def _sum_of_row_products(values, vector):
    """`sum(reshape(values, [-1, k]) @ vector)` for a `vector` of length `k`: one dot, in place."""
    rows = tf.reshape(values, [-1, vector.shape[0]])
    return tf.reduce_sum(tf.linalg.matvec(rows, vector))


def _product_row_length(values) -> int:
    """The row length at which `propagating_sum` takes the product, or 0 where it does not."""
    if values.dtype not in (tf.float32, tf.float64):
        return 0
    k = _sum_row_length(_static_size(values))
    return k if k >= _SUM_MIN_ROW_LENGTH else 0


def nonfinite_by_product(tensor) -> tf.Tensor:
    """Whether a float tensor holds a NaN/Inf, exactly, from one product with zeros.

    `reshape(x, [r, k]) @ zeros(k)` sums `x_i * 0`: that is NaN when any
    entry is NaN or +/-Inf (`Inf * 0` is NaN) and exactly 0 otherwise, so
    unlike a plain sum it cannot overflow and needs no exact pass behind a
    conditional. It is the same one product as `propagating_sum` (XLA keeps a
    dot with a zero vector: it does not fold `x * 0`, which is NaN for
    non-finite `x`; tests check both eagerly and under XLA), and takes the
    tensors that that product takes (`_product_row_length`).
    """
    values = gradient_values(tensor)
    k = _product_row_length(values)
    if not k:
        raise ValueError(f"`tensor` must be float32/float64 with a size the product takes. Received: {values!r}")
    return tf.math.is_nan(_sum_of_row_products(values, tf.zeros([k], values.dtype)))


def _sum_row_length(n) -> int:
    """The largest divisor of `n` up to `min(_SUM_ROW_LENGTH, n // 8)`: at least 8 rows."""
    if not n:
        return 0
    k = min(_SUM_ROW_LENGTH, n // 8)
    while k > 1 and n % k:
        k -= 1
    return k


def _static_size(values):
    return values.shape.num_elements()


def _wide(dtype):
    """float64 for float64, else float32: the dtype the checks compute in."""
    return tf.float64 if dtype == tf.float64 else tf.float32


def _common_dtype(tensors):
    return tf.float64 if any(t.dtype == tf.float64 for t in tensors) else tf.float32


def stack_samples(tensors: Sequence, dtype, size: int = SAMPLE_SIZE) -> tf.Tensor:
    """`flat_sample` of each tensor as a row of a `[len(tensors), size]` matrix.

    Rows are zero-padded to `size`. One matrix lets one fused loop answer a
    question for every variable at once, instead of a few small kernels per
    variable (each costs the compiled step a fixed few microseconds). Every
    tensor must have a static size.
    """
    rows = []
    for tensor in tensors:
        sample = tf.cast(flat_sample(tensor, size), dtype)
        rows.append(tf.pad(sample, [[0, size - _static_size(sample)]]))
    return tf.stack(rows) if rows else tf.zeros([0, size], dtype)


def screened_magnitudes(tensors: Sequence) -> tf.Tensor:
    """A magnitude per tensor that answers the gradient flags exactly.

    The answer is +Inf exactly when a tensor holds a NaN/Inf, 0 exactly when
    it is all zero, and otherwise finite and positive. Tensors of at most
    `SAMPLE_SIZE` entries are answered from their row of one sample matrix
    (all of the tensor): their largest magnitude. A larger tensor is
    answered by its `propagating_sum` alone: a finite, non-zero sum proves
    it finite and not all zero, and the answer is then |sum|. No sample of
    it is read, so the skip decision waits only for the sums. Only when some
    large tensor's sum is non-finite or exactly 0 (a NaN/Inf; finite values
    whose sum overflows; an all-zero gradient; entries that cancel) does the
    exact single-pass check (`largest_magnitude`) run, for the large
    tensors, in one conditional taken only then. Tensors of unknown size
    (and empty ones) are checked one by one.

    Returns:
        A vector, one entry per tensor, in float32 (float64 if any tensor is
        float64); -Inf for an empty tensor.
    """
    values = [gradient_values(t) for t in tensors]
    dtype = _common_dtype(values)
    if not all(_static_size(v) for v in values):
        return _one_by_one_unless_sized(values, screened_magnitudes, _exact_largest, dtype)
    small = [i for i, v in enumerate(values) if _static_size(v) <= SAMPLE_SIZE]
    large = [i for i, v in enumerate(values) if _static_size(v) > SAMPLE_SIZE]
    if small:
        small_answers = largest_magnitude(stack_samples([values[i] for i in small], dtype), axis=1)
        if not large:
            return small_answers
    totals = tf.stack([tf.cast(propagating_sum(values[i]), dtype) for i in large])
    decided = tf.logical_and(tf.math.is_finite(totals), tf.not_equal(totals, 0))
    large_answers = tf.cond(
        tf.reduce_all(decided),
        lambda: tf.abs(totals),
        lambda: _exact_largest_kept([values[i] for i in large], dtype),
    )
    if not small:
        return large_answers
    # One gather puts every answer in its tensor's row (`small + large` lists each row once).
    answers = tf.concat([small_answers, large_answers], axis=0)
    return place(answers, small + large, tf.zeros([len(values)], dtype))


def _exact_largest(values, dtype):
    if _static_size(values) == 0:
        return tf.constant(float("-inf"), dtype)
    return tf.cast(largest_magnitude(values), dtype)


def _exact_largest_kept(values, dtype):
    """The rare branch: `largest_magnitude` of each tensor, in a kept conditional.

    One tensor at a time: each `|x|` temporary is computed only after the
    previous tensor's answer (`_after`), so XLA can put them all in one
    buffer and the branch reserves the bytes of the largest tensor, not of
    all of them.
    """
    answers = []
    for v in values:
        v = gradient_values(v)
        if answers:
            v = _after(v, answers[-1])
        answers.append(_exact_largest(v, dtype))
    return keep_conditional(tf.stack(answers))


def _after(values, largest):
    """`values`, bits included, ordered after `largest` (a `largest_magnitude`, never -1)."""
    return tf.where(tf.equal(largest, -1), tf.zeros_like(values), values)


def _one_by_one_unless_sized(values, batched, single, dtype):
    """`batched(...)` of the tensors of known, non-zero size; `single(v, dtype)` of the others."""
    sized = [i for i, v in enumerate(values) if _static_size(v)]
    vector = batched([values[i] for i in sized]) if sized else None
    entries = [None if i in sized else single(v, dtype) for i, v in enumerate(values)]
    for j, i in enumerate(sized):
        entries[i] = tf.cast(vector[j], dtype)
    return tf.stack(entries) if entries else tf.zeros([0], dtype)


def screened_nonfinite_and_zero(tensors: Sequence):
    """`(is_nonfinite, is_all_zero)` vectors, from `screened_magnitudes`."""
    largest = screened_magnitudes(tensors)
    # +Inf, not -Inf: that is an empty tensor (finite, and not "all zero").
    infinity = tf.constant(float("inf"), largest.dtype)
    return tf.equal(largest, infinity), tf.equal(largest, tf.zeros([], largest.dtype))


def screened_nonfinite(tensors: Sequence, samples=None) -> tf.Tensor:
    """Whether each tensor (of static size) holds a NaN/Inf, as a vector.

    Plain sums prove the large tensors finite; the exact check runs, in one
    conditional, only if one of them is not. `samples`:
    `stack_samples(tensors, ...)` when already computed; tensors of at most
    `SAMPLE_SIZE` entries are answered exactly from it.
    """
    return _nonfinite_of(tensors, samples, _screened_nonfinite_large)


def nonfinite_by_products(tensors: Sequence, samples=None) -> tf.Tensor:
    """`screened_nonfinite` with each large tensor read by `nonfinite_by_product`.

    Also exact, and without the conditional and its exact pass per tensor:
    about seven fewer computations per large tensor in XLA's optimized HLO
    (`apply` of Adam at 10^6 in 100 variables: 2,668 -> 1,966). The guard uses it
    where the tensors already enter a conditional (the weights check of every
    `weights_check_every`-th step). Where they do not (the check of every step
    before a restore), XLA, no longer made to write the updated weights once
    as the conditional's operand, fused the update's last subtraction into
    each reader and wrote one more full-size array (`nonfinite_weights="skip"`
    1.69x -> 1.91x bare Adam at 10^6 in 10 variables); there
    `screened_nonfinite` stays.
    """
    return _nonfinite_of(tensors, samples, _nonfinite_large_by_products)


def _nonfinite_of(tensors, samples, large_flags):
    """Per-tensor NaN/Inf flags: small tensors from `samples`, large ones by `large_flags(list)`."""
    if not tensors:
        return tf.zeros([0], tf.bool)
    if samples is None:
        samples = stack_samples(tensors, _common_dtype(tensors))
    in_sample = nonfinite_in_samples(samples)
    large = [i for i, t in enumerate(tensors) if _static_size(t) > SAMPLE_SIZE]
    if not large:
        return in_sample
    flags = large_flags([tensors[i] for i in large])
    return tf.logical_or(in_sample, place(flags, large, tf.zeros([len(tensors)], tf.bool)))


def _nonfinite_large_by_products(tensors):
    """`nonfinite_by_product` of each tensor it takes; `_screened_nonfinite_large` of the rest."""
    taken = [i for i, t in enumerate(tensors) if _product_row_length(gradient_values(t))]
    rest = [i for i in range(len(tensors)) if i not in taken]
    flags = [nonfinite_by_product(tensors[i]) for i in taken]
    if not rest:
        return tf.stack(flags)
    rest_flags = _screened_nonfinite_large([tensors[i] for i in rest])
    return place(tf.concat([tf.stack(flags), rest_flags], axis=0) if flags else rest_flags,
                 taken + rest, tf.zeros([len(tensors)], tf.bool))


def _screened_nonfinite_large(tensors):
    """NaN/Inf flags of large tensors: their plain sums, the exact pass only if one is not finite."""
    all_finite = tf.reduce_all(tf.stack([tf.math.is_finite(propagating_sum(t)) for t in tensors]))
    dtype = _common_dtype(tensors)  # one dtype for both branches
    largest = tf.cond(
        all_finite,
        lambda: tf.zeros([len(tensors)], dtype),
        lambda: _exact_largest_kept(tensors, dtype),
    )
    return tf.math.is_inf(largest)


def nonfinite_in_samples(samples) -> tf.Tensor:
    """Whether each row of a `stack_samples` matrix holds a NaN/Inf.

    A NaN/Inf in a row is in its tensor too, and a row is all of a tensor of
    up to `SAMPLE_SIZE` entries; zero padding reads as finite.
    """
    return tf.math.is_inf(largest_magnitude(samples, axis=1))


def sampled_l2_norms(tensors: Sequence) -> tf.Tensor:
    """The L2 norm of each tensor, as a vector, estimated from its sample.

    `‖sample‖ * sqrt(n / k)`, exact up to `SAMPLE_SIZE` entries: unbiased in
    the squared norm for entries of similar magnitude; a norm concentrated in
    entries the sample misses is underestimated. Tensors of unknown size are
    measured exactly.
    """
    values = [gradient_values(t) for t in tensors]
    dtype = _common_dtype(values)
    if not all(_static_size(v) for v in values):
        return _one_by_one_unless_sized(values, sampled_l2_norms, lambda v, d: tf.cast(l2_norm(v), d), dtype)
    scale = [(_static_size(v) / sample_size(_static_size(v))) ** 0.5 for v in values]
    return tf.cast(row_norms(stack_samples(values, dtype)) * tf.constant(scale, tf.float64), dtype)


def row_relative_steps(previous, current, sizes: Sequence[int], epsilon: float) -> tf.Tensor:
    """The effective step ‖current - previous‖ / max(‖previous‖, ε·√size) per row, in float32.

    `epsilon` is a floor on the root-mean-square of the weights, so a variable
    initialised at zero (a bias) does not divide by zero, and the floor does
    not depend on the variable's size. `sizes[r]` is the number of real
    (unpadded) entries of row `r`: the size in that floor.
    """
    delta = row_norms(current - previous)
    scale = tf.maximum(row_norms(previous), _step_floor(sizes, epsilon))
    return tf.cast(delta / scale, tf.float32)


def rows_under_floor(previous, sizes: Sequence[int], epsilon: float) -> tf.Tensor:
    """Per row, whether ‖previous‖ is below the ε·√size floor of `row_relative_steps`.

    There the effective step is ‖Δw‖ over the floor, not over ‖w‖: a small
    value says the step is small in absolute terms, not that it is below the
    weights' float resolution (w + Δw does not round back to w).
    """
    return row_norms(previous) < _step_floor(sizes, epsilon)


def _step_floor(sizes: Sequence[int], epsilon: float) -> tf.Tensor:
    return tf.constant([epsilon * max(k, 1) ** 0.5 for k in sizes], tf.float64)


def row_norms(matrix) -> tf.Tensor:
    """The L2 norm of each row, in float64.

    Summed in float64: in float32 the squares of entries above about 1.8e19
    overflow, and the effective step of large but finite (diverging) weights
    read as inf/inf = NaN, which no threshold catches.
    """
    return tf.sqrt(tf.reduce_sum(tf.square(tf.cast(matrix, tf.float64)), axis=1))


_RELATIVE_RESOLUTION = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def relative_resolution(dtype) -> float:
    """Machine epsilon of a float dtype: the smallest relative change it can hold."""
    return _RELATIVE_RESOLUTION.get(tf.as_dtype(dtype).name, 0.0)


def l2_norm(tensor) -> tf.Tensor:
    """The L2 norm of `tensor` in float32 (float64 stays float64)."""
    values = gradient_values(tensor)
    dtype = tf.float64 if values.dtype == tf.float64 else tf.float32
    values = tf.cast(values, dtype)
    return tf.sqrt(tf.reduce_sum(tf.square(values)))


def update_streak(streak, flag, active) -> tf.Tensor:
    """Consecutive-step counters: +1 where `flag`, reset where not, kept where inactive."""
    grown = tf.where(flag, streak + 1, tf.zeros_like(streak))
    return tf.where(active, grown, streak)


def record_events(counts, first_step, last_step, flag, step):
    """Updates per-variable event counts and first/last step where `flag` holds.

    `first_step` is -1 until the first event.

    Returns:
        `(counts, first_step, last_step)` updated.
    """
    counts = counts + tf.cast(flag, counts.dtype)
    first_step = tf.where(
        tf.logical_and(flag, first_step < 0), tf.fill(tf.shape(first_step), step), first_step
    )
    last_step = tf.where(flag, tf.fill(tf.shape(last_step), step), last_step)
    return counts, first_step, last_step


def place(values, positions: Sequence[int], base) -> tf.Tensor:
    """`base` with row `positions[j]` replaced by `values[j]`, for static positions.

    A gather from `concat([values, base])` with indices known at trace time:
    no scatter op (which would count as a densifying op next to sparse
    gradients) and the identity when `positions` lists every row in order.
    """
    positions = list(positions)
    size = base.shape[0]
    if positions == list(range(size)):
        return values
    if not positions:
        return base
    slot = {p: j for j, p in enumerate(positions)}
    index = [slot.get(i, len(positions) + i) for i in range(size)]
    return tf.gather(tf.concat([values, base], axis=0), index)


def scatter_to_slots(values, positions: Sequence[int], size: int, fill):
    """Places per-variable values at static `positions` of a length-`size` vector.

    `values` is a list of scalars or a vector. Positions not listed get
    `fill`. Positions are Python ints known at trace time (see `place`).
    """
    fill = tf.convert_to_tensor(fill)
    if isinstance(values, (list, tuple)):
        values = tf.stack(values) if values else tf.zeros([0], fill.dtype)
    return place(tf.cast(values, fill.dtype), positions, tf.fill([size], fill))
