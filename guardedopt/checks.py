"""The tensor math of each check, as small pure functions.

Every function here takes tensors and returns tensors, uses only XLA-compilable
ops (no `tf.print`, `py_function`, `Assert` or host reads), and is tested alone
in `tests/test_checks.py`. `GuardedOptimizer` composes them inside its step.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf


def gradient_values(gradient):
    """The dense values of a gradient: `.values` for `IndexedSlices`.

    Sparse gradients (from `Embedding`) are checked on the rows they carry,
    duplicates included, so they are never densified.
    """
    if isinstance(gradient, tf.IndexedSlices):
        return gradient.values
    return gradient


def is_nonfinite(gradient) -> tf.Tensor:
    """True when any entry of `gradient` is NaN or +/-Inf (False when empty)."""
    return nonfinite_and_zero(gradient)[0]


def is_all_zero(gradient) -> tf.Tensor:
    """True when every entry of `gradient` is exactly 0 (and it is not empty)."""
    return nonfinite_and_zero(gradient)[1]


def largest_magnitude(tensor) -> tf.Tensor:
    """max |x| with NaN counted as +Inf: one reduction answers two questions.

    The result is +Inf exactly when some entry is NaN or +/-Inf, 0 exactly when
    every entry is 0, and -Inf for an empty tensor. NaN is mapped explicitly
    because XLA's CPU `max` drops NaN while TensorFlow's kernels propagate it.
    """
    values = gradient_values(tensor)
    infinity = tf.constant(float("inf"), values.dtype)
    return tf.reduce_max(tf.where(tf.math.is_finite(values), tf.abs(values), infinity))


def nonfinite_and_zero(tensor):
    """`(is_nonfinite, is_all_zero)` of `tensor` from a single pass over it."""
    values = gradient_values(tensor)
    if values.shape.num_elements() == 0:
        return tf.constant(False), tf.constant(False)
    largest = largest_magnitude(values)
    return tf.math.is_inf(largest), tf.equal(largest, tf.zeros([], largest.dtype))


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


def relative_step(old, new, epsilon: float) -> tf.Tensor:
    """The effective step ‖new - old‖ / max(‖old‖, epsilon·√size), in float32.

    `epsilon` is a floor on the root-mean-square of the weights, so a variable
    initialised at zero (a bias) does not divide by zero, and the floor does not
    depend on the variable's size.
    """
    size = max(old.shape.num_elements() or 0, 1)
    old32 = tf.cast(old, tf.float32)
    delta = tf.cast(new, tf.float32) - old32
    floor = tf.constant(epsilon * size**0.5, tf.float32)
    denominator = tf.maximum(tf.sqrt(tf.reduce_sum(tf.square(old32))), floor)
    return tf.sqrt(tf.reduce_sum(tf.square(delta))) / denominator


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


def scatter_to_slots(values: Sequence[tf.Tensor], positions: Sequence[int], size: int, fill):
    """Places per-variable scalars at static `positions` of a length-`size` vector.

    Positions not listed get `fill`. Positions are Python ints known at trace
    time, so this is a static gather of scalars, not a dynamic scatter.
    """
    by_position = dict(zip(positions, values))
    fill = tf.convert_to_tensor(fill)
    return tf.stack([by_position.get(i, fill) for i in range(size)]) if size else tf.zeros(
        [0], fill.dtype
    )
