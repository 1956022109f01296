"""Online class weights, estimated inside the compiled training step (issue 4).

With heavily imbalanced classes the gradient is dominated by the majority
class, and a model can reach a high accuracy by never predicting the rare
ones. Keras' `fit(class_weight=...)` fixes this only when the distribution is
known up front: the weights are frozen for the run, and `class_weight` does not
combine with `sample_weight`, multi-output models or Python generators.

`ClassBalancer` instead counts the labels as they stream through the training
step (in non-trainable Keras variables, with XLA-compilable ops only) and turns
the counts into per-sample weights:

```python
balancer = ClassBalancer(method="balanced")
model.compile(optimizer="adam",
              loss=balancer.weighted("sparse_categorical_crossentropy"))
model.fit(x, y, epochs=5)          # numpy, tf.data, generators, sample_weight
balancer.class_weights()           # current weights, one per class
balancer.findings()                # `class_imbalance` finding, if any
```

Weight formulas (`counts` n_c, N = sum_c n_c, only classes with n_c > 0):

* `"balanced"`: w_c = N / (K * n_c) with K the number of classes seen, i.e.
  scikit-learn's `compute_class_weight("balanced", ...)`.
* `"effective_number"` (Cui et al., "Class-Balanced Loss Based on Effective
  Number of Samples", CVPR 2019): w_c proportional to (1 - beta) / (1 -
  beta**n_c).

Both are normalised so that the mean weight over the samples seen is 1
(sum_c n_c * w_c = N); the learning rate keeps its meaning. `max_weight` caps a
weight; the cap and the normalisation hold together (see `balanced_weights`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf
from keras.src.losses.loss import squeeze_or_expand_to_same_rank

from guardedopt import findings as findings_lib
from guardedopt import validation

BALANCED = "balanced"
EFFECTIVE_NUMBER = "effective_number"
METHODS = (BALANCED, EFFECTIVE_NUMBER, None)

AUTO = "auto"
SPARSE = "sparse"
ONE_HOT = "one_hot"
BINARY = "binary"
LABEL_FORMATS = (AUTO, SPARSE, ONE_HOT, BINARY)

# Defaults, documented in the class docstring and the README.
DEFAULT_BETA = 0.999
DEFAULT_MAX_WEIGHT = 100.0
DEFAULT_WARMUP = 0
DEFAULT_IMBALANCE_THRESHOLD = 10.0

# Soft/one-hot label rows must sum to 1 within this tolerance (float32 sums of
# label-smoothed rows are not exact).
_ROW_SUM_TOLERANCE = 1e-3

# The fix suggested by the `class_imbalance` finding. Kept here so that the
# optimizer can word it for its own API in one place.
HINT_OBSERVE_ONLY = (
    "pass class_weight='auto' to GuardedOptimizer and wrap the loss with "
    "opt.weighted(loss) (or use ClassBalancer(method='balanced').weighted(loss)); "
    "judge the model by per-class recall or balanced accuracy, not accuracy"
)
HINT_REWEIGHTING = (
    "class weights are already applied online (method={method!r}); judge the "
    "model by per-class recall or balanced accuracy rather than accuracy, and "
    "collect more data for the rare classes if their recall stays low"
)


# ---------------------------------------------------------------------------
# Pure weight functions (tensor in, tensor out; XLA-compilable).
# ---------------------------------------------------------------------------


def _check_max_weight(max_weight: Optional[float]) -> Optional[float]:
    if max_weight is None:
        return None
    # A cap below 1 cannot coexist with a sample-mean weight of 1.
    return validation.check_float("max_weight", max_weight, minimum=1.0)


def _normalize_and_cap(
    raw: tf.Tensor, counts: tf.Tensor, max_weight: Optional[float]
) -> tf.Tensor:
    """Scales `raw` to sample-mean 1 over `counts`, capping at `max_weight`.

    Finds the scale s with sum_c n_c * min(s * raw_c, M) = N (water-filling):
    sorting the classes by raw weight, the solution caps the top k classes for
    the one k where the capped classes reach M and the uncapped ones do not.
    The mass a capped class loses is redistributed over the uncapped classes,
    so the mean stays exactly 1 (possible for every M >= 1).

    `raw` must be 0 for classes with count 0. Classes never seen get the
    largest weight of a seen class ("as rare as the rarest class we know"); it
    never reaches the loss, as a class in the batch has been counted.
    """
    seen = counts > 0
    total = tf.reduce_sum(counts)
    mass = tf.reduce_sum(counts * raw)
    safe_mass = tf.where(mass > 0, mass, tf.ones_like(mass))
    scale = total / safe_mass
    if max_weight is None:
        weights = raw * scale
    else:
        cap = tf.constant(max_weight, counts.dtype)
        order = tf.argsort(raw, direction="DESCENDING", stable=True)
        r = tf.gather(raw, order)
        n = tf.gather(counts, order)
        zero = tf.zeros([1], counts.dtype)
        # For k = 0..C-1 classes capped: counts of the capped classes and
        # raw mass of the uncapped ones.
        capped_count = tf.concat([zero, tf.cumsum(n)[:-1]], 0)
        uncapped_mass = mass - tf.concat([zero, tf.cumsum(n * r)[:-1]], 0)
        positive = uncapped_mass > 0
        s_k = tf.where(
            positive,
            (total - cap * capped_count)
            / tf.where(positive, uncapped_mass, tf.ones_like(uncapped_mass)),
            tf.zeros_like(uncapped_mass),
        )
        r_prev = tf.concat([tf.fill([1], tf.constant(np.inf, counts.dtype)), r[:-1]], 0)
        slack = 1e-6 * cap
        # s_k * r_prev is inf * s for k = 0: "no class above" always reaches M.
        reaches_cap = tf.logical_or(
            tf.range(tf.size(r)) == 0, s_k * r_prev >= cap - slack
        )
        valid = positive & (s_k > 0) & reaches_cap & (s_k * r <= cap + slack)
        first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)
        # No valid k only through rounding; fall back to scale-then-clip.
        scale = tf.where(tf.reduce_any(valid), tf.gather(s_k, first), scale)
        weights = tf.minimum(raw * scale, cap)
    weights = tf.where(seen, weights, tf.zeros_like(weights))
    unseen_weight = tf.where(
        tf.reduce_any(seen), tf.reduce_max(weights), tf.ones([], counts.dtype)
    )
    weights = tf.where(seen, weights, unseen_weight)
    # Nothing seen yet: no information, no reweighting.
    return tf.where(total > 0, weights, tf.ones_like(weights))


def _as_counts(counts: Any) -> tf.Tensor:
    counts = tf.convert_to_tensor(counts)
    if not counts.dtype.is_floating:
        counts = tf.cast(counts, tf.float32)
    if counts.shape.rank != 1:
        raise ValueError(
            f"`counts` must be a vector with one count per class. "
            f"Received: counts.shape={counts.shape}"
        )
    return counts


def balanced_weights(
    counts: Any, *, max_weight: Optional[float] = None
) -> tf.Tensor:
    """scikit-learn's "balanced" class weights from per-class counts.

    w_c = N / (K * n_c), N the total count and K the number of classes with
    n_c > 0. These already have a sample-mean of 1 (sum_c n_c * w_c = N), so
    without a cap they equal `sklearn.utils.class_weight.compute_class_weight(
    "balanced", classes=..., y=...)` for the classes present.

    Order of cap and normalisation: the result is min(s * raw_c, max_weight)
    with the one scale s that keeps sum_c n_c * w_c = N, i.e. the weight a
    capped class loses goes to the uncapped classes; both constraints hold.

    Args:
        counts: Per-class (possibly fractional, e.g. decayed) counts, shape [C].
        max_weight: Optional cap on any weight, >= 1.

    Returns:
        float weights of shape [C]. Classes with count 0 get the largest weight
        of a class seen; all ones when nothing has been counted.
    """
    max_weight = _check_max_weight(max_weight)
    counts = _as_counts(counts)
    seen = counts > 0
    raw = tf.where(seen, 1.0 / tf.where(seen, counts, tf.ones_like(counts)), 0.0)
    return _normalize_and_cap(raw, counts, max_weight)


def effective_number_weights(
    counts: Any, beta: float = DEFAULT_BETA, *, max_weight: Optional[float] = None
) -> tf.Tensor:
    """Class-balanced weights from the effective number of samples.

    Cui et al. (CVPR 2019): a class with n_c samples has an effective number
    E_c = (1 - beta**n_c) / (1 - beta), and w_c is proportional to 1 / E_c.
    beta = 0 gives equal weights; beta -> 1 tends to "balanced". Normalised to
    a sample-mean of 1 and capped like `balanced_weights`.

    Args:
        counts: Per-class counts, shape [C].
        beta: In [0, 1).
        max_weight: Optional cap on any weight, >= 1.

    Returns:
        float weights of shape [C].
    """
    beta = validation.check_float(
        "beta", beta, minimum=0.0, maximum=1.0, max_inclusive=False
    )
    max_weight = _check_max_weight(max_weight)
    counts = _as_counts(counts)
    seen = counts > 0
    if beta == 0.0:
        raw = tf.where(seen, tf.ones_like(counts), tf.zeros_like(counts))
    else:
        # 1 - beta**n computed as -expm1(n * log(beta)): exact for beta close
        # to 1, where beta**n rounds to 1 in float32.
        log_beta = tf.constant(math.log(beta), counts.dtype)
        safe_counts = tf.where(seen, counts, tf.ones_like(counts))
        effective = -tf.math.expm1(safe_counts * log_beta) / (1.0 - beta)
        raw = tf.where(seen, 1.0 / effective, tf.zeros_like(counts))
    return _normalize_and_cap(raw, counts, max_weight)


# ---------------------------------------------------------------------------
# Training-context detection.
# ---------------------------------------------------------------------------

try:  # pragma: no cover - import guard
    # Private but long-stable TF API: is any GradientTape recording? Keras'
    # `train_step` computes the loss under a tape, `test_step` (validation in
    # fit, `evaluate`) does not. Losses get no `training` flag from Keras.
    from tensorflow.python.eager import record as _tape_record

    def _gradient_tape_active() -> bool:
        return bool(_tape_record.could_possibly_record())

except ImportError:  # pragma: no cover

    def _gradient_tape_active() -> bool:
        return True


# ---------------------------------------------------------------------------
# ClassBalancer.
# ---------------------------------------------------------------------------


def _check_method(method: Any) -> Optional[str]:
    if method is None or (isinstance(method, str) and method in METHODS):
        return method
    raise ValueError(
        f"`method` must be one of {', '.join(repr(m) for m in METHODS)}. "
        f"Received: method={method!r}"
    )


def _static_dim(shape: tf.TensorShape, axis: int) -> Optional[int]:
    return tf.compat.dimension_value(shape[axis])


@keras.saving.register_keras_serializable(package="guardedopt")
class ClassBalancer:
    """Estimates the label distribution online and turns it into class weights.

    The counts live in non-trainable Keras variables and are updated inside
    the (XLA-)compiled training step by `observe`; `weighted(loss)` wraps a
    Keras loss so that this happens automatically in `model.fit`.

    Args:
        method: `"balanced"` (default; scikit-learn's formula),
            `"effective_number"` (Cui et al. 2019) or `None` (observe only:
            counts feed the `class_imbalance` finding, all weights are 1).
        num_classes: Number of classes, >= 2. If None, inferred at the first
            `observe` from `y_pred`'s last dimension (1 means binary, 2
            classes) or from one-hot labels' last dimension.
        beta: For `"effective_number"`, in [0, 1). Defaults to 0.999 (the
            paper's choice for long-tailed CIFAR/ImageNet).
        max_weight: Cap on any class weight, >= 1, or None for no cap.
            Defaults to 100: it binds only for classes rarer than about
            1/(100 K) of the data, and keeps a class seen once (or a class
            whose decayed count faded) from multiplying its gradient
            without bound. Cap and mean-1 normalisation hold together
            (the capped excess is redistributed over the other classes).
        warmup: No reweighting (all weights 1) until this many labels have
            been seen, counting the current batch. Defaults to 0: the
            estimate of the first batch is already bounded by the cap and
            by the batch size; raise it for tiny batches with many classes.
        decay: None (default) for cumulative counts. A float in (0, 1) makes
            the counts an exponential moving average for drifting streams:
            counts <- decay * counts + batch_counts, i.e. a memory of about
            batch_size / (1 - decay) labels.
        label_format: `"auto"` (default), `"sparse"` (integer class ids,
            shape [B] or [B, 1]), `"one_hot"` ([B, C]; soft rows summing to 1,
            e.g. label smoothing or mixup, count fractionally) or `"binary"`
            ([B] or [B, 1] in [0, 1] with a sigmoid output [B, 1]).
        imbalance_threshold: `findings()` reports `class_imbalance` when the
            most frequent class is more than this many times as frequent as
            the least frequent one (or a class was never seen). Defaults to 10.

    Labels whose `sample_weight` is 0 (padding) are not counted; any other
    label counts once whatever its weight, and the class weight multiplies the
    user's `sample_weight`, as Keras does for `class_weight`. Counts are
    float32 (exact up to 2**24 labels per class).
    """

    def __init__(
        self,
        method: Optional[str] = BALANCED,
        num_classes: Optional[int] = None,
        beta: float = DEFAULT_BETA,
        max_weight: Optional[float] = DEFAULT_MAX_WEIGHT,
        warmup: int = DEFAULT_WARMUP,
        decay: Optional[float] = None,
        label_format: str = AUTO,
        imbalance_threshold: float = DEFAULT_IMBALANCE_THRESHOLD,
    ):
        self.method = _check_method(method)
        self._num_classes = (
            None
            if num_classes is None
            else validation.check_int("num_classes", num_classes, minimum=2)
        )
        self.beta = validation.check_float(
            "beta", beta, minimum=0.0, maximum=1.0, max_inclusive=False
        )
        self.max_weight = _check_max_weight(max_weight)
        self.warmup = validation.check_int("warmup", warmup, minimum=0)
        self.decay = (
            None
            if decay is None
            else validation.check_float(
                "decay",
                decay,
                minimum=0.0,
                maximum=1.0,
                min_inclusive=False,
                max_inclusive=False,
            )
        )
        self.label_format = validation.check_policy(
            "label_format", label_format, LABEL_FORMATS
        )
        self.imbalance_threshold = validation.check_float(
            "imbalance_threshold", imbalance_threshold, minimum=1.0
        )
        self._variable_factory: Optional[Callable[..., Any]] = None
        self._variables: List[Any] = []
        # Format resolved at the last trace; only used to word error messages.
        self._seen_format: Optional[str] = None

    # -- state ---------------------------------------------------------------

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes, None until given or inferred."""
        return self._num_classes

    @property
    def built(self) -> bool:
        """Whether the state variables exist."""
        return bool(self._variables)

    @property
    def variables(self) -> List[Any]:
        """State variables in a stable order (empty before `build`).

        `[class_counts (C,), labels_seen (), invalid_labels (),
        invalid_label_example ()]`, all float32 and non-trainable.
        """
        return list(self._variables)

    def set_variable_factory(
        self, add_variable: Optional[Callable[..., Any]]
    ) -> None:
        """Sets the `add_variable` used when `observe` builds lazily.

        The optimizer's `build` may run after the first loss evaluation (Keras
        builds the optimizer at the first `apply`); registering its
        `add_variable` here makes a lazy build create optimizer-owned variables.
        """
        self._variable_factory = add_variable

    def build(
        self, num_classes: int, add_variable: Optional[Callable[..., Any]] = None
    ) -> None:
        """Creates the state variables.

        Args:
            num_classes: Number of classes, >= 2. Must agree with the
                `num_classes` given at construction, if any.
            add_variable: Optional callable
                `add_variable(shape=..., dtype=..., initializer=..., name=...)`
                returning a variable, e.g. an optimizer's `add_variable` so the
                counts are tracked, checkpointed and saved with it. Defaults to
                the factory set by `set_variable_factory`, else plain
                non-trainable `keras.Variable`s.

        Raises:
            ValueError: `num_classes` is invalid or disagrees with the known one.
        """
        num_classes = validation.check_int("num_classes", num_classes, minimum=2)
        if self._num_classes is not None and num_classes != self._num_classes:
            raise ValueError(
                f"ClassBalancer was set up for num_classes={self._num_classes}, "
                f"cannot build it for num_classes={num_classes}."
            )
        if self.built:
            return
        factory = add_variable or self._variable_factory or _new_keras_variable
        specs = (
            ("class_counts", (num_classes,)),
            ("labels_seen", ()),
            ("invalid_labels", ()),
            ("invalid_label_example", ()),
        )
        self._variables = [
            factory(shape=shape, dtype="float32", initializer="zeros", name=name)
            for name, shape in specs
        ]
        self._num_classes = num_classes

    def reset_state(self) -> None:
        """Zeroes the counts and the invalid-label record."""
        for v in self._variables:
            v.assign(tf.zeros(v.shape, v.dtype))

    # -- in-step -------------------------------------------------------------

    def observe(
        self,
        y_true: Any,
        y_pred: Any = None,
        sample_weight: Any = None,
        *,
        update: bool = True,
        ignore_class: Optional[int] = None,
    ) -> tf.Tensor:
        """Counts a batch of labels and returns its per-sample weights.

        Runs inside `tf.function(jit_compile=True)`. The weights are computed
        from the counts including this batch (so every label's class has a
        count > 0). Shapes and dtypes are checked at trace time (ValueError);
        label values cannot be asserted under XLA, so invalid labels are
        counted and `check()` raises on the host; in eager mode `observe`
        raises at once, before changing any state.

        Args:
            y_true: Labels: sparse [B] / [B, 1] (integer class ids), one-hot
                [B, C], or binary [B] / [B, 1] in [0, 1]. More leading axes
                (e.g. [B, T] sequence labels) are allowed.
            y_pred: Optional model output; used to tell the label format
                apart and to infer `num_classes`.
            sample_weight: Optional user weights, broadcastable to the
                per-sample shape; multiplied into the result. Labels with
                weight 0 are not counted.
            update: False leaves the counts unchanged (evaluation).
            ignore_class: A sparse label value to skip (neither counted nor
                invalid, weight 1), like Keras' `ignore_class`.

        Returns:
            float32 weights of the per-sample shape (labels' shape without
            the class axis or trailing 1-axis), times `sample_weight` if given.
        """
        y_true = tf.convert_to_tensor(y_true)
        if y_pred is not None:
            y_pred = tf.convert_to_tensor(y_pred)
        fmt, num_classes = self._resolve_format(y_true, y_pred)
        if not self.built:
            self.build(num_classes)
        self._seen_format = fmt

        sample_shape, masses, usable, invalid, example = self._decode(
            y_true, fmt, ignore_class
        )
        sw = _align_sample_weight(sample_weight, sample_shape)

        counts_var, seen_var, invalid_var, example_var = self._variables
        counted = usable if sw is None else usable & (sw != 0.0)
        counted_f = tf.cast(counted, tf.float32)
        batch_counts = tf.reduce_sum(masses * counted_f[:, None], axis=0)
        n_invalid = tf.reduce_sum(tf.cast(invalid, tf.float32))

        if tf.executing_eagerly() and float(n_invalid) > 0:
            first = int(tf.argmax(tf.cast(invalid, tf.int32)))
            raise ValueError(
                self._invalid_message(
                    int(float(n_invalid)), float(example[first]), fmt, num_classes
                )
            )

        counts = counts_var.value
        seen = seen_var.value
        if update:
            counts = (
                counts + batch_counts
                if self.decay is None
                else self.decay * counts + batch_counts
            )
            seen = seen + tf.reduce_sum(counted_f)
            # First invalid row by masked min/sum rather than argmax/gather,
            # which fail on an empty batch.
            rows = tf.range(tf.size(example))
            first = tf.reduce_min(tf.where(invalid, rows, tf.size(example)))
            batch_example = tf.reduce_sum(tf.where(rows == first, example, 0.0))
            old_invalid = invalid_var.value
            # Keep the first invalid label ever seen: the most useful example.
            example_var.assign(
                tf.where(
                    (old_invalid == 0.0) & (n_invalid > 0.0),
                    batch_example,
                    example_var.value,
                )
            )
            invalid_var.assign(old_invalid + n_invalid)
            counts_var.assign(counts)
            seen_var.assign(seen)

        class_weights = self._weights_from(counts, seen)
        per_sample = tf.reduce_sum(masses * class_weights[None, :], axis=-1)
        # Invalid and ignored labels are left unweighted (weight 1).
        per_sample = tf.where(usable, per_sample, tf.ones_like(per_sample))
        if sw is not None:
            per_sample = per_sample * sw
        return tf.reshape(per_sample, sample_shape)

    def _weights_from(self, counts: tf.Tensor, seen: tf.Tensor) -> tf.Tensor:
        if self.method is None:
            return tf.ones_like(counts)
        if self.method == BALANCED:
            weights = balanced_weights(counts, max_weight=self.max_weight)
        else:
            weights = effective_number_weights(
                counts, self.beta, max_weight=self.max_weight
            )
        if self.warmup > 0:
            weights = tf.where(
                seen >= float(self.warmup), weights, tf.ones_like(weights)
            )
        return weights

    def _resolve_format(
        self, y_true: tf.Tensor, y_pred: Optional[tf.Tensor]
    ) -> Tuple[str, int]:
        """Static label format and number of classes (trace time)."""
        dtype = y_true.dtype
        if not (dtype.is_integer or dtype.is_floating or dtype == tf.bool):
            raise ValueError(
                f"Labels must be integer, float or bool tensors. "
                f"Received: y_true.dtype={dtype.name}"
            )
        ry = y_true.shape.rank
        if ry is None or ry == 0:
            raise ValueError(
                "Labels must have a known rank >= 1 (a batch axis). "
                f"Received: y_true.shape={y_true.shape}"
            )
        yt_last = _static_dim(y_true.shape, -1)
        rp = p_last = None
        if y_pred is not None:
            rp = y_pred.shape.rank
            if rp is None or rp == 0:
                raise ValueError(
                    "`y_pred` must have a known rank >= 1. "
                    f"Received: y_pred.shape={y_pred.shape}"
                )
            p_last = _static_dim(y_pred.shape, -1)
        shapes = f"Received: y_true.shape={y_true.shape}" + (
            "" if y_pred is None else f", y_pred.shape={y_pred.shape}"
        )

        fmt = self.label_format
        if fmt == AUTO:
            if y_pred is not None:
                if rp == ry + 1:
                    fmt = BINARY if p_last == 1 else SPARSE
                elif rp == ry and (p_last == 1 or rp == 1):
                    fmt = BINARY
                elif rp == ry and yt_last == 1:
                    fmt = SPARSE
                elif rp == ry:
                    fmt = ONE_HOT
                else:
                    raise ValueError(
                        "Cannot tell the label format: expected sparse labels "
                        "[B] or [B, 1] with y_pred [B, C], one-hot labels "
                        "[B, C] with y_pred [B, C], or binary labels [B] or "
                        f"[B, 1] with y_pred [B, 1]. {shapes}"
                    )
            elif ry >= 2 and yt_last != 1:
                fmt = ONE_HOT
            else:
                fmt = SPARSE

        # Number of classes implied by the shapes.
        if fmt == BINARY:
            if y_pred is not None and not (
                (rp == ry + 1 and p_last == 1) or (rp == ry and p_last in (1, None))
                or (rp == ry and rp == 1)
            ):
                raise ValueError(
                    "Binary labels need a single sigmoid output per sample "
                    f"(y_pred [B, 1] or [B]). {shapes}"
                )
            implied = 2
        elif fmt == ONE_HOT:
            if ry < 2:
                raise ValueError(
                    f"One-hot labels must have a class axis [B, C]. {shapes}"
                )
            if y_pred is not None and p_last is not None and yt_last is not None:
                if p_last != yt_last:
                    raise ValueError(
                        f"One-hot labels have {yt_last} classes but y_pred has "
                        f"{p_last} (last dimensions differ). {shapes}"
                    )
            implied = yt_last if yt_last is not None else p_last
        else:  # SPARSE
            if dtype == tf.bool:
                raise ValueError(
                    "Sparse labels must be integer class ids, not bool; use "
                    f"label_format='binary' for 0/1 labels. {shapes}"
                )
            implied = None
            if y_pred is not None:
                # [B] or [B, 1] labels (more leading axes allowed) need
                # y_pred with exactly one class axis more than the samples.
                label_rank = ry - 1 if (ry >= 2 and yt_last == 1) else ry
                if rp != label_rank + 1:
                    raise ValueError(
                        "Sparse labels [B] or [B, 1] need y_pred of shape "
                        f"[B, C]. {shapes}"
                    )
                implied = p_last
            if implied == 1:
                raise ValueError(
                    "y_pred has a single output unit: use binary labels (0/1) "
                    f"with label_format='binary' or 'auto'. {shapes}"
                )

        known = self._num_classes
        if implied is not None and known is not None and implied != known:
            where = {
                SPARSE: "y_pred's last dimension",
                ONE_HOT: "the one-hot labels",
                BINARY: "binary labels (sigmoid output)",
            }[fmt]
            raise ValueError(
                f"Wrong number of classes: {where} imply {implied} classes, but "
                f"the ClassBalancer has num_classes={known}. {shapes}"
            )
        num_classes = implied if implied is not None else known
        if num_classes is None:
            raise ValueError(
                "Cannot infer the number of classes: pass num_classes= to "
                "ClassBalancer, or y_pred with a static last dimension to "
                f"observe(). {shapes}"
            )
        if num_classes < 2:
            raise ValueError(
                f"Labels need at least 2 classes; found {num_classes}. {shapes}"
            )
        return fmt, int(num_classes)

    def _decode(
        self, y_true: tf.Tensor, fmt: str, ignore_class: Optional[int]
    ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """Flattens labels to class masses [N, C] plus per-row flags.

        Returns (sample_shape, masses, usable, invalid, example): `usable`
        rows are valid and not ignored; `example` holds per row the value shown
        in an error message (the label, or for one-hot the offending sum/entry).
        """
        num_classes = self._num_classes
        ry = y_true.shape.rank
        if fmt == ONE_HOT:
            sample_shape = tf.shape(y_true)[:-1]
            rows = tf.reshape(tf.cast(y_true, tf.float32), [-1, num_classes])
            row_sum = tf.reduce_sum(rows, axis=-1)
            row_min = tf.reduce_min(rows, axis=-1)
            row_max = tf.reduce_max(rows, axis=-1)
            sum_ok = tf.abs(row_sum - 1.0) <= _ROW_SUM_TOLERANCE
            valid = (
                tf.reduce_all(tf.math.is_finite(rows), axis=-1)
                & (row_min >= 0.0)
                & (row_max <= 1.0)
                & sum_ok
            )
            example = tf.where(
                sum_ok, tf.where(row_min < 0.0, row_min, row_max), row_sum
            )
            masses = tf.where(valid[:, None], rows, tf.zeros_like(rows))
            usable = valid
        else:
            if ry >= 2 and _static_dim(y_true.shape, -1) == 1:
                sample_shape = tf.shape(y_true)[:-1]
            else:
                sample_shape = tf.shape(y_true)
            labels = tf.reshape(y_true, [-1])
            if fmt == BINARY:
                y = tf.cast(labels, tf.float32)
                valid = tf.math.is_finite(y) & (y >= 0.0) & (y <= 1.0)
                y = tf.where(valid, y, tf.zeros_like(y))
                # Soft binary targets count fractionally, like soft one-hot.
                masses = tf.stack([1.0 - y, y], axis=-1)
                masses = tf.where(valid[:, None], masses, tf.zeros_like(masses))
                example = tf.cast(labels, tf.float32)
                usable = valid
            else:
                if labels.dtype.is_integer:
                    # Range check in the label dtype: int64 ids must not wrap.
                    valid = (labels >= 0) & (labels < num_classes)
                    ignored = (
                        tf.zeros_like(valid)
                        if ignore_class is None
                        else tf.equal(labels, tf.cast(ignore_class, labels.dtype))
                    )
                else:
                    f = labels
                    valid = (
                        tf.math.is_finite(f)
                        & (tf.math.floor(f) == f)
                        & (f >= 0.0)
                        & (f < float(num_classes))
                    )
                    ignored = (
                        tf.zeros_like(valid)
                        if ignore_class is None
                        else tf.equal(f, tf.cast(ignore_class, f.dtype))
                    )
                valid = valid | ignored
                usable = valid & ~ignored
                safe = tf.where(usable, labels, tf.zeros_like(labels))
                index = tf.cast(safe, tf.int32)
                masses = tf.one_hot(index, num_classes, dtype=tf.float32)
                masses = tf.where(usable[:, None], masses, tf.zeros_like(masses))
                example = tf.cast(labels, tf.float32)
        return sample_shape, masses, usable, ~valid, example

    # -- host side -----------------------------------------------------------

    def counts(self) -> np.ndarray:
        """Per-class (possibly decayed) counts as float64, shape [C].

        Zeros before the first `observe` when `num_classes` is known; an
        empty array when it is not.
        """
        if not self.built:
            return np.zeros(self._num_classes or 0, np.float64)
        return np.asarray(self._variables[0].numpy(), np.float64)

    def labels_seen(self) -> int:
        """Labels counted so far (cumulative, not decayed)."""
        if not self.built:
            return 0
        return int(round(float(self._variables[1].numpy())))

    def invalid_labels(self) -> int:
        """Invalid labels met inside compiled steps so far."""
        if not self.built:
            return 0
        return int(round(float(self._variables[2].numpy())))

    def class_weights(self) -> np.ndarray:
        """Current class weights (what the next batch would get), shape [C].

        Ones before anything is counted, during warm-up and for
        `method=None`; empty when `num_classes` is not known yet.
        """
        if not self.built:
            return np.ones(self._num_classes or 0, np.float64)
        weights = self._weights_from(
            tf.convert_to_tensor(self._variables[0].numpy()),
            tf.convert_to_tensor(self._variables[1].numpy()),
        )
        return np.asarray(weights.numpy(), np.float64)

    def check(self) -> None:
        """Raises ValueError if invalid labels were met inside compiled steps."""
        n = self.invalid_labels()
        if n:
            example = float(self._variables[3].numpy())
            raise ValueError(
                self._invalid_message(
                    n, example, self._seen_format or SPARSE, self._num_classes
                )
            )

    @staticmethod
    def _invalid_message(
        n: int, example: float, fmt: str, num_classes: Optional[int]
    ) -> str:
        if fmt == ONE_HOT:
            return (
                f"ClassBalancer found {n} invalid one-hot label row(s) (e.g. an "
                f"entry or row sum of {example:g}): one-hot labels must have "
                f"{num_classes} entries in [0, 1] summing to 1."
            )
        if fmt == BINARY:
            return (
                f"ClassBalancer found {n} invalid binary label(s) (e.g. "
                f"{example:g}): binary labels must lie in [0, 1]."
            )
        if not math.isfinite(example):
            why = f"non-finite label {example:g}"
        elif example != math.floor(example):
            why = (
                f"non-integer label {example:g}; sparse labels are class ids, "
                "use one-hot labels for soft targets"
            )
        else:
            why = f"label {example:g} is out of range"
        return (
            f"ClassBalancer found {n} invalid sparse label(s) ({why}): sparse "
            f"labels must be integers in [0, {num_classes}) for "
            f"num_classes={num_classes}."
        )

    def findings(self, step: Optional[int] = None) -> List[findings_lib.Finding]:
        """A `class_imbalance` finding when the classes are imbalanced.

        Imbalanced: the most frequent class is more than `imbalance_threshold`
        times as frequent as the least frequent class seen, or some class was
        never seen while others were (ratio inf).

        Args:
            step: Optimizer step to stamp on the finding.

        Returns:
            `[Finding]` or `[]`.

        Raises:
            ValueError: invalid labels were met (see `check`).
        """
        self.check()
        counts = self.counts()
        total = float(counts.sum())
        if not self.built or total <= 0:
            return []
        seen = counts > 0
        freq = counts / total
        majority = int(np.argmax(counts))
        minority = int(np.argmin(np.where(seen, counts, np.inf)))
        unseen = [int(c) for c in np.flatnonzero(~seen)]
        ratio = float("inf") if unseen else float(counts[majority] / counts[minority])
        if ratio <= self.imbalance_threshold:
            return []
        details: Dict[str, Any] = {
            "counts": [float(c) for c in counts],
            "frequencies": [float(f) for f in freq],
            "ratio": ratio,
            "majority_class": majority,
            "minority_class": unseen[0] if unseen else minority,
            "unseen_classes": unseen,
            "labels_seen": self.labels_seen(),
            "method": self.method,
        }
        if unseen:
            what = (
                f"class(es) {', '.join(map(str, unseen))} never appeared in "
                f"{self.labels_seen()} training labels"
            )
        else:
            what = (
                f"class {majority} makes up {100 * freq[majority]:.3g}% of "
                f"{self.labels_seen()} training labels and class {minority} "
                f"only {100 * freq[minority]:.3g}% (ratio {ratio:.3g} > "
                f"{self.imbalance_threshold:g})"
            )
        if self.method is None:
            severity = findings_lib.WARNING
            hint = HINT_OBSERVE_ONLY
            message = f"Classes are imbalanced: {what}."
        else:
            severity = findings_lib.INFO
            hint = HINT_REWEIGHTING.format(method=self.method)
            details["weights"] = [float(w) for w in self.class_weights()]
            message = (
                f"Classes are imbalanced: {what}; reweighting them ({self.method})."
            )
        return [
            findings_lib.Finding(
                code=findings_lib.CLASS_IMBALANCE,
                message=message,
                hint=hint,
                first_step=step,
                last_step=step,
                value=ratio,
                threshold=self.imbalance_threshold,
                severity=severity,
                count=1,
                details=details,
            )
        ]

    # -- wrappers & serialization ----------------------------------------------

    def weighted(
        self,
        loss: Any,
        name: Optional[str] = None,
        add_variable: Optional[Callable[..., Any]] = None,
    ) -> "WeightedLoss":
        """Wraps `loss` so that its samples are reweighted by this balancer.

        Args:
            loss: A `keras.losses.Loss`, a loss name or a function.
            name: Name of the wrapper; `"weighted_" + loss name` by default.
            add_variable: Optional variable factory for a lazy build (see
                `set_variable_factory`); ignored once built.

        Returns:
            A `WeightedLoss`.
        """
        if add_variable is not None and not self.built:
            self.set_variable_factory(add_variable)
        return WeightedLoss(loss, balancer=self, name=name)

    def get_config(self) -> Dict[str, Any]:
        """Every option, with `num_classes` once known."""
        return {
            "method": self.method,
            "num_classes": self._num_classes,
            "beta": self.beta,
            "max_weight": self.max_weight,
            "warmup": self.warmup,
            "decay": self.decay,
            "label_format": self.label_format,
            "imbalance_threshold": self.imbalance_threshold,
        }

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "ClassBalancer":
        """Inverse of `get_config` (unbuilt; `build(num_classes)` then load)."""
        return cls(**config)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"ClassBalancer({opts})"


CLASS_WEIGHT_OPTIONS = ("observe", "auto", BALANCED, EFFECTIVE_NUMBER)


def balancer_from_option(class_weight: Any) -> Optional[ClassBalancer]:
    """The `ClassBalancer` for `GuardedOptimizer(class_weight=...)`.

    Args:
        class_weight: `None` (off), `"observe"` (count only, `method=None`),
            `"auto"` or `"balanced"`, `"effective_number"`, a `ClassBalancer`
            (used as is) or a `ClassBalancer` config dict.

    Returns:
        A `ClassBalancer`, or None for None.

    Raises:
        ValueError: For any other value.
    """
    if class_weight is None or isinstance(class_weight, ClassBalancer):
        return class_weight
    if isinstance(class_weight, dict):
        return _balancer_from_dict(class_weight)
    if isinstance(class_weight, str) and class_weight in CLASS_WEIGHT_OPTIONS:
        method = {"observe": None, "auto": BALANCED}.get(class_weight, class_weight)
        return ClassBalancer(method=method)
    allowed = ", ".join(repr(o) for o in (None,) + CLASS_WEIGHT_OPTIONS)
    raise ValueError(
        f"`class_weight` must be one of {allowed} or a ClassBalancer. "
        f"Received: class_weight={class_weight!r}"
    )


def _balancer_from_dict(config: Dict[Any, Any]) -> ClassBalancer:
    """A `ClassBalancer` from its config, or from its `keras.saving` serialization."""
    if "class_name" in config:
        try:
            balancer = keras.saving.deserialize_keras_object(config)
        except (TypeError, ValueError) as error:
            raise ValueError(
                "`class_weight` given as a serialized object could not be "
                f"deserialized ({error}). Received: class_weight={config!r}"
            ) from None
        if isinstance(balancer, ClassBalancer):
            return balancer
    options = set(inspect.signature(ClassBalancer.__init__).parameters) - {"self"}
    if config and all(isinstance(key, str) and key in options for key in config):
        return ClassBalancer.from_config(config)
    raise ValueError(
        "`class_weight` given as a dict must be a ClassBalancer config (keys among "
        f"{sorted(options)}) or a serialized ClassBalancer. Received: "
        f"class_weight={config!r}. Fixed per-class weights ({{class_id: weight}}) "
        "belong in `model.fit(class_weight=...)`; `class_weight='auto'` here "
        "estimates them online."
    )


def _new_keras_variable(*, shape, dtype, initializer, name):
    # autocast=False: float32 counts must stay float32 under mixed precision.
    return keras.Variable(
        initializer=initializer,
        shape=shape,
        dtype=dtype,
        trainable=False,
        autocast=False,
        name=name,
    )


def _align_sample_weight(
    sample_weight: Any, sample_shape: tf.Tensor
) -> Optional[tf.Tensor]:
    """`sample_weight` as a flat float32 vector matching the samples, or None.

    Accepts the per-sample shape, the same with a trailing 1 ([B, 1] for [B]),
    or a prefix of it (e.g. [B] for [B, T] sequence labels), like Keras.
    """
    if sample_weight is None:
        return None
    sw = tf.cast(tf.convert_to_tensor(sample_weight), tf.float32)
    # The rank of the per-sample shape is static even when its sizes are not.
    target_rank = int(sample_shape.shape[0])
    rank = sw.shape.rank
    if rank is None:
        raise ValueError("`sample_weight` must have a known rank.")
    if rank == target_rank + 1 and _static_dim(sw.shape, -1) == 1:
        sw = tf.squeeze(sw, -1)
    elif rank > target_rank:
        raise ValueError(
            "`sample_weight` must have one weight per sample, shape "
            f"{_shape_str(target_rank)} (or with a trailing 1). Received: "
            f"sample_weight.shape={sw.shape}"
        )
    while sw.shape.rank < target_rank:
        sw = sw[..., None]
    sw = tf.broadcast_to(sw, sample_shape)
    return tf.reshape(sw, [-1])


def _shape_str(rank: int) -> str:
    return "[" + ", ".join(["B"] + [f"d{i}" for i in range(1, rank)]) + "]"


# ---------------------------------------------------------------------------
# WeightedLoss.
# ---------------------------------------------------------------------------


def _resolve_loss(loss: Any) -> Any:
    if isinstance(loss, keras.losses.Loss):
        return loss
    resolved = keras.losses.get(loss)
    if resolved is None or not callable(resolved):
        raise ValueError(
            "`loss` must be a keras.losses.Loss, a loss name or a function "
            f"(y_true, y_pred) -> per-sample losses. Received: loss={loss!r}"
        )
    return resolved


def _loss_name(loss: Any) -> str:
    return getattr(loss, "name", None) or getattr(loss, "__name__", "loss")


@keras.saving.register_keras_serializable(package="guardedopt")
class WeightedLoss(keras.losses.Loss):
    """A Keras loss whose samples are reweighted by a `ClassBalancer`.

    In training (the loss is computed under a `tf.GradientTape`, as in Keras'
    `train_step` or a custom loop) it calls `balancer.observe(y_true, y_pred,
    sample_weight)` and passes the result as the sample weights of the
    wrapped loss, which then reduces as it always does. In evaluation
    (`evaluate`, validation in `fit`: no tape) the counts are not updated and
    no class weights are applied, like Keras' `class_weight`; pass
    `training=` to override. Do not combine with `fit(class_weight=...)`.

    Args:
        loss: A `keras.losses.Loss`, a loss name ("sparse_categorical_
            crossentropy") or a function `(y_true, y_pred) -> losses`.
        balancer: The `ClassBalancer`; a default one (`method="balanced"`)
            when None.
        name: Defaults to `"weighted_" + the loss name`.
    """

    def __init__(
        self,
        loss: Any,
        balancer: Optional[ClassBalancer] = None,
        name: Optional[str] = None,
    ):
        inner = _resolve_loss(loss)
        # Reduce like the wrapped loss (functions: Keras' default reduction).
        is_loss = isinstance(inner, keras.losses.Loss)
        super().__init__(
            name=name or f"weighted_{_loss_name(inner)}",
            reduction=inner.reduction if is_loss else "sum_over_batch_size",
            dtype=inner.dtype if is_loss else None,
        )
        self.loss = inner
        self.balancer = balancer if balancer is not None else ClassBalancer()

    def _ignore_class(self) -> Optional[int]:
        if isinstance(self.loss, keras.losses.Loss):
            try:
                return self.loss.get_config().get("ignore_class")
            except NotImplementedError:  # pragma: no cover - user loss
                return None
        return None

    def __call__(
        self,
        y_true: Any,
        y_pred: Any,
        sample_weight: Any = None,
        training: Optional[bool] = None,
    ) -> tf.Tensor:
        if training is None:
            training = _gradient_tape_active()
        if training:
            sample_weight = self.balancer.observe(
                y_true, y_pred, sample_weight, ignore_class=self._ignore_class()
            )
        if isinstance(self.loss, keras.losses.Loss):
            return self.loss(y_true, y_pred, sample_weight=sample_weight)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true: Any, y_pred: Any) -> tf.Tensor:
        """Unreduced losses of the wrapped loss (no class weights)."""
        if isinstance(self.loss, keras.losses.Loss):
            return self.loss.call(y_true, y_pred)
        # As Keras' wrapper of a loss function does (a string loss in
        # `compile`): (N,) labels against (N, 1) predictions meet in rank.
        if hasattr(y_true, "shape") and hasattr(y_pred, "shape"):
            y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
        return self.loss(y_true, y_pred)

    def get_config(self) -> Dict[str, Any]:
        # Serialized as a Keras object: in a `.keras` file the balancer of
        # `opt.weighted(loss)` is then one shared object (Keras'
        # `ObjectSharingScope`), so the loaded loss counts into the loaded
        # optimizer's restored counts.
        return {
            "loss": keras.saving.serialize_keras_object(self.loss),
            "balancer": keras.saving.serialize_keras_object(self.balancer),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "WeightedLoss":
        config = dict(config)
        loss = keras.losses.deserialize(config.pop("loss"))
        balancer = config.pop("balancer")
        if "class_name" in balancer:
            balancer = keras.saving.deserialize_keras_object(balancer)
        else:  # The bare options, as files of earlier versions hold them.
            balancer = ClassBalancer.from_config(balancer)
        return cls(loss, balancer=balancer, **config)


__all__ = [
    "BALANCED",
    "EFFECTIVE_NUMBER",
    "ClassBalancer",
    "WeightedLoss",
    "balancer_from_option",
    "balanced_weights",
    "effective_number_weights",
]
