"""The pure tensor functions of each check, alone, eagerly and under XLA."""

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


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
def test_is_nonfinite(dtype):
    assert not _both(checks.is_nonfinite, tf.constant([1.0, 0.0, -3.0], dtype))
    assert _both(checks.is_nonfinite, tf.constant([1.0, np.nan], dtype))
    assert _both(checks.is_nonfinite, tf.constant([np.inf, 1.0], dtype))
    assert _both(checks.is_nonfinite, tf.constant([-np.inf], dtype))
    assert not _both(checks.is_nonfinite, tf.zeros([0, 3], dtype))


def test_is_nonfinite_reads_indexed_slices_values():
    slices = tf.IndexedSlices(tf.constant([[1.0, np.nan]]), tf.constant([2]), tf.constant([5, 2]))
    assert bool(checks.is_nonfinite(slices))
    clean = tf.IndexedSlices(tf.constant([[1.0, 2.0], [1.0, 2.0]]), tf.constant([2, 2]), tf.constant([5, 2]))
    assert not bool(checks.is_nonfinite(clean))


def test_is_all_zero():
    assert _both(checks.is_all_zero, tf.zeros([3, 2]))
    assert _both(checks.is_all_zero, tf.constant([0.0, -0.0]))
    assert not _both(checks.is_all_zero, tf.constant([0.0, 1e-30]))
    assert not _both(checks.is_all_zero, tf.constant([np.nan]))
    assert not bool(checks.is_all_zero(tf.zeros([0])))


def test_relative_step_and_epsilon_floor():
    old = tf.constant([3.0, 4.0])
    new = tf.constant([3.0, 4.5])
    np.testing.assert_allclose(_both(lambda a, b: checks.relative_step(a, b, 1e-3), old, new), 0.1, rtol=1e-6)
    zeros = tf.zeros([4])
    step = tf.fill([4], 1e-3)
    # A zero-initialised variable divides by ε·√n, not by 0.
    np.testing.assert_allclose(float(checks.relative_step(zeros, step, 1e-3)), 1.0, rtol=1e-6)


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
