"""The pure tensor functions of each check, alone, eagerly and under XLA."""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from guardedopt import checks


def _both(fn, *args):
    """Runs `fn` eagerly and compiled with XLA; asserts both agree."""
    eager = fn(*args)
    compiled = tf.function(fn, jit_compile=True)(*args)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(compiled))
    return np.asarray(eager)


def _is_nonfinite(tensor):
    return checks.screened_nonfinite_and_zero([tensor])[0][0]


def _is_all_zero(tensor):
    return checks.screened_nonfinite_and_zero([tensor])[1][0]


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
def test_is_nonfinite(dtype):
    assert not _both(_is_nonfinite, tf.constant([1.0, 0.0, -3.0], dtype))
    assert _both(_is_nonfinite, tf.constant([1.0, np.nan], dtype))
    assert _both(_is_nonfinite, tf.constant([np.inf, 1.0], dtype))
    assert _both(_is_nonfinite, tf.constant([-np.inf], dtype))
    assert not _both(_is_nonfinite, tf.zeros([0, 3], dtype))
    assert not _both(lambda t: checks.screened_nonfinite([t])[0], tf.zeros([0, 3], dtype))


def test_is_nonfinite_reads_indexed_slices_values():
    slices = tf.IndexedSlices(tf.constant([[1.0, np.nan]]), tf.constant([2]), tf.constant([5, 2]))
    assert bool(_is_nonfinite(slices))
    clean = tf.IndexedSlices(tf.constant([[1.0, 2.0], [1.0, 2.0]]), tf.constant([2, 2]), tf.constant([5, 2]))
    assert not bool(_is_nonfinite(clean))


def test_is_all_zero():
    assert _both(_is_all_zero, tf.zeros([3, 2]))
    assert _both(_is_all_zero, tf.constant([0.0, -0.0]))
    assert not _both(_is_all_zero, tf.constant([0.0, 1e-30]))
    assert not _both(_is_all_zero, tf.constant([np.nan]))
    assert not bool(_is_all_zero(tf.zeros([0])))


def test_relative_step_and_epsilon_floor():
    old = tf.constant([[3.0, 4.0]])
    new = tf.constant([[3.0, 4.5]])
    steps = _both(lambda a, b: checks.row_relative_steps(a, b, [2], 1e-3), old, new)
    np.testing.assert_allclose(steps, [0.1], rtol=1e-6)
    zeros = tf.zeros([1, 4])
    step = tf.fill([1, 4], 1e-3)
    # A zero-initialised variable divides by ε·√n, not by 0.
    np.testing.assert_allclose(checks.row_relative_steps(zeros, step, [4], 1e-3), [1.0], rtol=1e-6)


def test_largest_magnitude_counts_nan_as_infinity_under_xla_too():
    values = np.ones(100_000, np.float32)
    values[77_777] = np.nan
    assert np.isinf(_both(checks.largest_magnitude, tf.constant(values)))
    np.testing.assert_equal(_both(checks.largest_magnitude, tf.constant([-3.0, 2.0])), 3.0)


def test_relative_resolution():
    assert checks.relative_resolution("float32") == 2.0**-23
    assert checks.relative_resolution(tf.float16) == 2.0**-10
    assert checks.relative_resolution("bfloat16") == 2.0**-7
    # Adam at lr 1e-10 moves weights of ~0.1 by ~1e-9 relative: below float32's.
    assert 1e-10 / 0.1 < checks.relative_resolution("float32")


def test_update_streak():
    streak = tf.constant([0, 2, 5, 1], tf.int64)
    flag = tf.constant([True, True, False, True])
    active = tf.constant([True, True, True, False])
    np.testing.assert_array_equal(_both(checks.update_streak, streak, flag, active), [1, 3, 0, 1])


def test_record_events():
    counts = tf.constant([0, 2], tf.int64)
    first = tf.constant([-1, 3], tf.int64)
    last = tf.constant([-1, 4], tf.int64)
    flag = tf.constant([True, True])
    c, f, l = checks.record_events(counts, first, last, flag, tf.constant(7, tf.int64))
    np.testing.assert_array_equal(c, [1, 3])
    np.testing.assert_array_equal(f, [7, 3])
    np.testing.assert_array_equal(l, [7, 7])


def test_scatter_to_slots():
    out = checks.scatter_to_slots([tf.constant(5.0), tf.constant(7.0)], [2, 0], 4, -1.0)
    np.testing.assert_array_equal(out, [7.0, -1.0, 5.0, -1.0])


def test_scatter_to_slots_takes_vectors_and_is_the_identity_in_order():
    vector = tf.constant([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(checks.scatter_to_slots(vector, [0, 1, 2], 3, -1.0), [1, 2, 3])
    np.testing.assert_array_equal(checks.scatter_to_slots(vector[:2], [3, 1], 4, 0.0), [0, 2, 0, 1])
    np.testing.assert_array_equal(checks.scatter_to_slots([], [], 2, -1.0), [-1, -1])


# ------------------------------------------------------------ sampled checks
LARGE = 10 * checks.SAMPLE_SIZE + 7  # runs of 32 entries every 320: 0-31, 320-351, ...
UNSAMPLED = 12_345 % LARGE  # 2098: never in the sample
assert UNSAMPLED not in checks.sample_positions(LARGE)


def _large(fill=1.0, at=None, value=None, dtype=np.float32):
    values = np.full(LARGE, fill, dtype)
    if at is not None:
        values[at] = value
    return tf.constant(values)


def test_flat_sample_reads_fixed_runs_of_consecutive_entries():
    values = tf.range(LARGE, dtype=tf.float32)
    sample = _both(checks.flat_sample, values)
    assert sample.shape == (checks.SAMPLE_SIZE,)
    stride, width = LARGE // checks.SAMPLE_BLOCKS, checks.SAMPLE_SIZE // checks.SAMPLE_BLOCKS
    expected = [b * stride + i for b in range(checks.SAMPLE_BLOCKS) for i in range(width)]
    np.testing.assert_array_equal(sample, expected)
    np.testing.assert_array_equal(checks.sample_positions(LARGE), expected)
    np.testing.assert_array_equal(checks.sample_positions(6), np.arange(6))
    small = tf.reshape(tf.range(6.0), [2, 3])
    np.testing.assert_array_equal(_both(checks.flat_sample, small), np.arange(6.0))
    assert checks.sample_size(LARGE) == checks.SAMPLE_SIZE and checks.sample_size(6) == 6
    # A size that is not a multiple of the run count: the length still matches.
    odd = _both(lambda v: checks.flat_sample(v, size=100), values)
    assert odd.shape == (checks.sample_size(LARGE, size=100),) == (96,)
    np.testing.assert_array_equal(odd, checks.sample_positions(LARGE, size=100))


def test_stack_samples_pads_rows():
    rows = _both(lambda a, b: checks.stack_samples([a, b], tf.float32), tf.constant([1.0, -2.0]), _large(3.0))
    assert rows.shape == (2, checks.SAMPLE_SIZE)
    np.testing.assert_array_equal(rows[0, :3], [1.0, -2.0, 0.0])
    assert (rows[1] == 3.0).all()


def _flags(*tensors):
    def both(*values):
        nonfinite, zero = checks.screened_nonfinite_and_zero(list(values))
        return tf.stack([nonfinite, zero])

    return _both(both, *tensors)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_screened_flags_find_a_nonfinite_entry_outside_the_sample(bad):
    flags = _flags(_large(at=UNSAMPLED, value=bad), tf.constant([1.0, 2.0]))
    np.testing.assert_array_equal(flags, [[True, False], [False, False]])


def test_screened_flags_are_exact_for_zero_gradients():
    almost = _large(0.0, at=UNSAMPLED, value=1e-30)
    flags = _flags(_large(0.0), almost, tf.constant([0.0, -0.0]), tf.constant([0.0, 2.0]))
    np.testing.assert_array_equal(flags[1], [True, False, True, False])
    assert not flags[0].any()


def test_screened_flags_of_a_large_tensor_whose_sum_is_exactly_zero():
    """A finite sum of 0 proves nothing: the exact check decides (not all zero)."""
    cancelling = _large(0.0, at=[UNSAMPLED, UNSAMPLED + 1], value=[2.0, -2.0])
    assert float(checks.propagating_sum(cancelling)) == 0.0
    np.testing.assert_array_equal(_flags(cancelling, _large(0.0)), [[False, False], [False, True]])


def test_screened_flags_read_no_sample_of_a_large_tensor():
    """The skip decision waits only for a large gradient's sum: the flags'
    HLO slices nothing (the small tensor's row is padded, the large tensor
    only summed; before, its sample was sliced out of it)."""
    def run(a, b):
        nonfinite, zero = checks.screened_nonfinite_and_zero([a, b])
        return tf.stack([nonfinite, zero])

    hlo = tf.function(run, jit_compile=True).experimental_get_compiler_ir(
        _large(), tf.constant([1.0, 2.0])
    )(stage="hlo")
    entry = hlo[hlo.index("\nENTRY"):]
    assert " slice(" not in entry


@pytest.mark.parametrize("dtype", [np.float32, tf.bfloat16.as_numpy_dtype, np.float16])
def test_screened_flags_do_not_skip_finite_values_whose_sum_overflows(dtype):
    huge = float(tf.as_dtype(dtype).max)
    flags = _flags(_large(huge, dtype=dtype))
    np.testing.assert_array_equal(flags, [[False], [False]])


def test_screened_flags_of_unknown_and_empty_sizes():
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def dynamic(values):
        nonfinite, zero = checks.screened_nonfinite_and_zero([values, tf.zeros([0])])
        return tf.stack([nonfinite, zero])

    np.testing.assert_array_equal(dynamic(tf.constant([1.0, np.nan])), [[True, False], [False, False]])
    np.testing.assert_array_equal(dynamic(tf.zeros([3])), [[False, False], [True, False]])


def test_screened_flags_read_indexed_slices_values():
    slices = tf.IndexedSlices(tf.constant([[1.0, np.nan]]), tf.constant([2]), tf.constant([5, 2]))
    nonfinite, zero = checks.screened_nonfinite_and_zero([slices])
    assert bool(nonfinite[0]) and not bool(zero[0])


def test_screened_nonfinite_weights():
    def run(a, b, c):
        return checks.screened_nonfinite([a, b, c])

    flags = _both(run, _large(at=UNSAMPLED, value=np.nan), _large(3e38), tf.constant([1.0, np.inf]))
    np.testing.assert_array_equal(flags, [True, False, True])
    assert not _both(run, _large(), _large(-2.0), tf.constant([1.0])).any()


def _product_sized(fill=1.0, at=None, value=None, dtype=np.float32):
    """50,000 entries (8 rows of 6,250 for the product); entry 31,337 is outside the sample."""
    values = np.full(50_000, fill, dtype)
    if at is not None:
        values[at] = value
    return tf.constant(values)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_by_products_is_exact_without_a_conditional(bad):
    """NaN/Inf outside the sample is found, finite values whose sum overflows
    are not flagged, and sizes the product does not take (LARGE has no
    divisor of 32 or more) and float16 go through the screened path; all
    eagerly and under XLA."""
    assert 31_337 not in checks.sample_positions(50_000) and checks._sum_row_length(LARGE) < 32
    tensors = (
        _product_sized(at=31_337, value=bad), _product_sized(3e38), _large(at=UNSAMPLED, value=bad),
        _product_sized(at=31_337, value=bad, dtype=np.float16), tf.constant([1.0, 2.0]), _large(-2.0),
    )
    expected = [True, False, True, True, False, False]
    run = lambda *t: checks.nonfinite_by_products(list(t))  # noqa: E731
    np.testing.assert_array_equal(_both(run, *tensors), expected)
    np.testing.assert_array_equal(_both(lambda *t: checks.screened_nonfinite(list(t)), *tensors), expected)
    assert not _both(run, _product_sized(), _product_sized(0.0), _large(), tf.constant([1.0])).any()
    # Tensors that the product takes: no conditional, one dot each (XLA did
    # not fold the product with zeros).
    taken = (tensors[0], tensors[1], tensors[4])
    hlo = tf.function(run, jit_compile=True).experimental_get_compiler_ir(*taken)(stage="optimized_hlo")
    assert hlo.count(" conditional(") == 0 and hlo.count(" dot(") == 2
    with pytest.raises(ValueError, match="`tensor` must be float32/float64"):
        checks.nonfinite_by_product(tensors[2])


def test_screened_checks_of_mixed_dtypes_trace():
    """A large float32 tensor next to a small float64 one (both branches of the
    rare conditional must have one dtype)."""
    def run(a, b):
        nonfinite, zero = checks.screened_nonfinite_and_zero([a, b])
        return tf.stack([nonfinite, zero, checks.screened_nonfinite([a, b])])

    small = tf.constant([1.0, np.nan], tf.float64)
    np.testing.assert_array_equal(
        _both(run, _large(at=UNSAMPLED, value=np.inf), small),
        [[True, True], [False, False], [True, True]],
    )


# ------------------------------------------------------------ propagating sums
# 50,000 = 8 rows of 6,250 and 300x40 = 8 rows of 1,500 take the matrix-vector
# product; 1,031 (a prime) and float16 take `reduce_sum`.
@pytest.mark.parametrize("shape", [[50_000], [300, 40], [1031], [8, 10_000]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_propagating_sum_is_the_sum(shape, dtype):
    values = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    expected = values.astype(np.float64).sum()
    # Eager and XLA add in different orders: each is checked against the exact
    # sum, to the dtype's rounding over the sum of magnitudes.
    tolerance = np.finfo(dtype).eps * 16 * np.abs(values).sum()
    for fn in (checks.propagating_sum, tf.function(checks.propagating_sum, jit_compile=True)):
        total = fn(tf.constant(values))
        assert total.dtype == dtype
        np.testing.assert_allclose(total.numpy(), expected, rtol=0, atol=tolerance)


def test_propagating_sum_takes_the_product_only_where_it_divides_the_size():
    def dots(values):
        hlo = tf.function(checks.propagating_sum, jit_compile=True).experimental_get_compiler_ir(values)(
            stage="optimized_hlo"
        )
        return hlo.count(" dot(")

    assert checks._sum_row_length(50_000) == 6_250
    assert checks._sum_row_length(10**7) == checks._SUM_ROW_LENGTH
    assert dots(tf.ones([50_000])) == 1
    assert dots(tf.ones([300, 40])) == 1
    assert dots(tf.ones([1031])) == 0  # no divisor: reduce_sum
    assert dots(tf.ones([50_000], tf.float16)) == 0
    for n in (1025, 10_000, 401_408, 10**6 + 1):
        k = checks._sum_row_length(n)
        assert n % k == 0 and n // k >= 8, (n, k)


@pytest.mark.parametrize("at", [0, 31_337, 49_999])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_propagating_sum_is_nonfinite_when_any_entry_is(at, bad):
    values = np.ones(50_000, np.float32)
    values[at] = bad
    assert not np.isfinite(_both(checks.propagating_sum, tf.constant(values)))


def test_propagating_sum_of_opposite_infinities_is_nan():
    both = np.ones([300, 40], np.float64)
    both[0, 0], both[-1, -1] = np.inf, -np.inf
    assert np.isnan(_both(checks.propagating_sum, tf.constant(both)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_screened_flags_find_a_nonfinite_entry_of_a_product_summed_tensor(bad):
    values = np.full(50_000, 0.5, np.float32)
    values[31_337] = bad  # outside the sample
    assert 31_337 not in checks.sample_positions(50_000)
    flags = _flags(tf.constant(values), tf.constant([1.0, 2.0]))
    np.testing.assert_array_equal(flags, [[True, False], [False, False]])
    weights = _both(lambda a: checks.screened_nonfinite([a]), tf.constant(values))
    np.testing.assert_array_equal(weights, [True])


def test_exact_branch_answers_each_tensor_in_turn():
    """The exact branch runs tensor after tensor; an answer (Inf, 0) must not leak into the next."""
    def run(a, b, c, d):
        nonfinite, zero = checks.screened_nonfinite_and_zero([a, b, c, d])
        return tf.stack([nonfinite, zero])

    flags = _both(
        run, _large(), _large(at=UNSAMPLED, value=np.nan), _large(0.0), _large(at=UNSAMPLED, value=-np.inf)
    )
    np.testing.assert_array_equal(flags, [[False, True, False, True], [False, False, True, False]])


_XLA_TEMP_SCRIPT = """
import tensorflow as tf
from guardedopt import checks
tensors = [tf.fill([{size}], float(i + 1)) for i in range({count})]
fn = tf.function(lambda *t: checks.screened_nonfinite(list(t)), jit_compile=True)
print(fn(*tensors).numpy())
"""


def test_exact_branch_reserves_about_one_tensor_not_all(tmp_path):
    """XLA's buffer assignment (a dump from a fresh process): the rare exact
    branch's `|x|` temporaries share one buffer, so the step reserves about
    one tensor's bytes however many tensors it checks (before: all of them)."""
    size, count = 50_000, 6
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path}", TF_CPP_MIN_LOG_LEVEL="3")
    script = textwrap.dedent(_XLA_TEMP_SCRIPT.format(size=size, count=count))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300, capture_output=True)
    reports = [p.read_text() for p in tmp_path.glob("*buffer-assignment.txt")]
    temps = [int(n) for text in reports for n in re.findall(r"allocation \d+: size (\d+), preallocated-temp", text)]
    one_tensor = size * 4
    assert one_tensor <= max(temps) < 2 * one_tensor, (max(temps), one_tensor)


def _conditionals(fn, *args):
    hlo = tf.function(fn, jit_compile=True).experimental_get_compiler_ir(*args)(stage="optimized_hlo")
    return hlo.count(" conditional(")


def test_exact_checks_stay_behind_an_xla_conditional():
    """The full-pass exact check must not run on every step: the conditional
    survives XLA's optimizations, also for a computed value (updated weights)."""
    args = (_large(), tf.constant([1.0, 2.0]))
    assert _conditionals(lambda a, b: checks.screened_nonfinite_and_zero([a, b]), *args) == 1
    assert _conditionals(lambda a, b: checks.screened_nonfinite([a * 2.0 - b[0], b]), *args) == 1
    # Small tensors only: exact at once, no conditional.
    assert _conditionals(lambda b: checks.screened_nonfinite_and_zero([b]), args[1]) == 0


def test_keep_conditional_keeps_bits_and_the_xla_conditional():
    values = tf.constant([-0.0, 1.5, np.nan, -np.inf])
    assert _both(checks.keep_conditional, values).tobytes() == values.numpy().tobytes()

    def rare_check(keep):
        def fn(x, y):
            w = x * 2.0 - y[0]  # a computed value, like the updated weights
            exact = lambda: keep(tf.stack([tf.reduce_max(tf.abs(w))]))
            return tf.cond(tf.math.is_finite(tf.reduce_sum(w)), lambda: tf.zeros([1]), exact)
        return fn

    args = (_large(), tf.constant([1.0, 2.0]))
    assert _conditionals(rare_check(checks.keep_conditional), *args) == 1


def test_sampled_l2_norms():
    rng = np.random.default_rng(0)
    large = rng.standard_normal(LARGE).astype(np.float32)
    small = np.array([3.0, 4.0], np.float32)
    def norms_of(a, b):
        return checks.sampled_l2_norms([a, b])

    norms = norms_of(tf.constant(large), tf.constant(small)).numpy()
    compiled = tf.function(norms_of, jit_compile=True)(tf.constant(large), tf.constant(small))
    np.testing.assert_allclose(compiled, norms, rtol=1e-6)  # XLA sums in another order
    np.testing.assert_allclose(norms[1], 5.0, rtol=1e-6)  # exact up to SAMPLE_SIZE
    # An estimate from 1024 of 10247 entries: within 10% for Gaussian entries.
    np.testing.assert_allclose(norms[0], np.linalg.norm(large), rtol=0.1)


def test_row_relative_steps_match_the_formula_on_the_real_entries():
    rng = np.random.default_rng(1)
    old = rng.standard_normal((2, 5)).astype(np.float32)
    new = old + 0.01 * rng.standard_normal((2, 5)).astype(np.float32)
    new[1, 3:] = old[1, 3:] = 0.0  # row 1 has 3 real entries and 2 of padding
    rows = checks.row_relative_steps(tf.constant(old), tf.constant(new), [5, 3], 1e-3).numpy()
    for r, size in enumerate([5, 3]):
        real_old, real_new = old[r, :size].astype(np.float64), new[r, :size].astype(np.float64)
        expected = np.linalg.norm(real_new - real_old) / max(np.linalg.norm(real_old), 1e-3 * size**0.5)
        np.testing.assert_allclose(rows[r], expected, rtol=1e-6)
    zero_rows = checks.row_relative_steps(tf.zeros([1, 4]), tf.fill([1, 4], 1e-3), [4], 1e-3)
    np.testing.assert_allclose(zero_rows, [1.0], rtol=1e-6)


def test_rows_under_floor_are_those_the_floor_divides():
    previous = tf.constant([[1e-9, -1e-9, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [1e-3, 1e-3, 1e-3, 1e-3]])
    # Floors: 1e-3 * sqrt(4) = 2e-3 and 1e-3 * sqrt(2) ~ 1.41e-3 for row 2's two real entries.
    assert checks.rows_under_floor(previous, [4, 4, 2], 1e-3).numpy().tolist() == [True, False, False]
    assert checks.rows_under_floor(previous, [4, 4, 4], 1e-3).numpy().tolist() == [True, False, False]
    assert checks.rows_under_floor(previous, [4, 4, 16], 1e-3).numpy().tolist() == [True, False, True]


def test_row_norms_and_relative_steps_of_large_finite_float32_rows_do_not_overflow():
    """Diverging weights of 1e20 (finite in float32; their squares are not): a step that
    triples them is a relative step of 2, not inf/inf = NaN."""
    old = np.full((1, 1024), 1e20, np.float32)
    steps = _both(lambda a, b: checks.row_relative_steps(a, b, [1024], 1e-3), tf.constant(old), tf.constant(3 * old))
    np.testing.assert_allclose(steps, [2.0], rtol=1e-6)
    np.testing.assert_allclose(_both(checks.row_norms, tf.constant(old)), [1e20 * 32], rtol=1e-6)
    norms = _both(lambda t: checks.sampled_l2_norms([t]), tf.constant(np.full(4096, 1e20, np.float32)))
    np.testing.assert_allclose(norms, [1e20 * 64], rtol=1e-6)  # a sample of 1024 of 4096, scaled by 2


def test_place_replaces_rows_at_static_positions():
    base = tf.reshape(tf.range(8.0), [4, 2])
    rows = tf.constant([[-1.0, -1.0], [-2.0, -2.0]])
    np.testing.assert_array_equal(_both(lambda v, b: checks.place(v, [3, 1], b), rows, base),
                                  [[0, 1], [-2, -2], [4, 5], [-1, -1]])
    replacement = base * 2
    assert checks.place(replacement, [0, 1, 2, 3], base) is replacement
