"""Static checks of an optimizer's configuration (`suspicious_hyperparameter`).

`check_hyperparameters` looks at what an optimizer was configured with, before
or during training, and names settings that stop the weights from moving (a
learning rate of 1e-10 for Adam, `beta_1=1`, an epsilon that is 0 in float16,
a schedule that has decayed to nothing, `clipnorm=0`). It reads values only, so
it is safe to call from `GuardedOptimizer.build()`, even while a `tf.function`
is being traced.

Usual learning-rate ranges (`USUAL_LEARNING_RATES`) are what the optimizer's
authors and common recipes use; a value is reported only when it is *far*
outside, i.e. more than `FAR_FACTOR` times beyond either end.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from guardedopt import findings as F

# Learning-rate ranges that work in practice, by optimizer class name. A
# subclass uses the entry of its nearest known base class (MRO order).
USUAL_LEARNING_RATES: Dict[str, Tuple[float, float]] = {
    "Adam": (1e-5, 1e-2),
    "AdamW": (1e-5, 1e-2),
    "Adamax": (1e-5, 1e-2),
    "Nadam": (1e-5, 1e-2),
    "Lamb": (1e-5, 1e-2),
    "ScheduleFreeAdamW": (1e-5, 2.5e-2),
    "RMSprop": (1e-5, 1e-2),
    "Lion": (1e-6, 1e-3),
    "SGD": (1e-4, 1.0),
    "Adagrad": (1e-4, 1.0),
    "Adadelta": (1e-4, 1.0),
    "Ftrl": (1e-4, 1.0),
    "Adafactor": (1e-5, 1e-1),
    "Muon": (1e-4, 1e-1),
}
# Any other optimizer: a deliberately wide range.
DEFAULT_USUAL_LEARNING_RATE = (1e-5, 1.0)
# A value is "far" outside the usual range when beyond it by this factor.
FAR_FACTOR = 10.0
# Hyperparameters that are decay rates of moving averages: valid in [0, 1).
DECAY_RATE_NAMES = ("momentum", "beta_1", "beta_2", "rho", "adam_beta_1", "adam_beta_2")
# Gradient-clipping settings: a value <= 0 clips every gradient to zero.
CLIP_NAMES = ("clipnorm", "global_clipnorm", "clipvalue")


def usual_learning_rate(optimizer: Any) -> Tuple[float, float]:
    """The usual learning-rate range for `optimizer`'s class (or a base class)."""
    for cls in type(optimizer).__mro__:
        if cls.__name__ in USUAL_LEARNING_RATES:
            return USUAL_LEARNING_RATES[cls.__name__]
    return DEFAULT_USUAL_LEARNING_RATE


# Host-side Python only: autograph must not convert it when it runs inside a
# `tf.function` trace (from `GuardedOptimizer.build`); converting it and all
# it calls would cost seconds per trace.
@tf.autograph.experimental.do_not_convert
def check_hyperparameters(optimizer: Any, variable_dtype: Any = "float32") -> List[F.Finding]:
    """Finds optimizer settings that keep the weights from updating.

    Checks, for every optimizer inside `optimizer` (wrappers such as
    `GuardedOptimizer` and `LossScaleOptimizer` are unwrapped through
    `.inner_optimizer`, a `MultiOptimizer` through `.optimizers`):

    * the learning rate: non-finite or <= 0 (error), or more than `FAR_FACTOR`
      times outside `USUAL_LEARNING_RATES` for its class (warning);
    * a `LearningRateSchedule` that has decayed far below the usual range at
      the current `iterations` (warning);
    * decay rates (`momentum`, `beta_1`, `beta_2`, `rho`, ...) outside [0, 1)
      (error);
    * an `epsilon` that is negative, or positive but 0 in `variable_dtype`
      (e.g. 1e-8 in float16) (warning);
    * `clipnorm`, `global_clipnorm` or `clipvalue` <= 0 (error);
    * a negative `weight_decay` (error).

    Values are read eagerly (under `tf.init_scope`), so this works inside a
    `tf.function` trace. Settings that cannot be read are skipped, never
    raised on.

    Args:
        optimizer: Any Keras optimizer, wrapped or not.
        variable_dtype: dtype of the trained variables (where epsilon is added).

    Returns:
        The findings, code `suspicious_hyperparameter`; empty if all is well.
        Each finding's `variables` is `("<optimizer name>/<setting>",)`,
        `value` the setting and `threshold` the bound it violated.
    """
    dtype = np.dtype(_dtype_name(variable_dtype))
    out: List[F.Finding] = []
    with tf.init_scope():
        for opt in _leaf_optimizers(optimizer):
            out.extend(_check_learning_rate(opt))
            out.extend(_check_decay_rates(opt))
            out.extend(_check_epsilon(opt, dtype))
            out.extend(_check_clipping(opt))
            out.extend(_check_weight_decay(opt))
    return out


def _dtype_name(dtype: Any) -> str:
    # Accepts "float16", np.float16, tf.float16 and Keras dtype policies.
    for attr in ("variable_dtype", "name"):
        value = getattr(dtype, attr, None)
        if isinstance(value, str):
            return value
    return np.dtype(dtype).name


def _leaf_optimizers(optimizer: Any) -> Iterator[Any]:
    """Yields the optimizers that hold hyperparameters, wrappers unwrapped."""
    seen = set()
    stack = [optimizer]
    while stack:
        opt = stack.pop()
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        inner = getattr(opt, "inner_optimizer", None)
        if inner is not None:
            stack.append(inner)
            continue
        subs = _sub_optimizers(opt)
        if subs:
            stack.extend(reversed(subs))
            continue
        yield opt


def _sub_optimizers(opt: Any) -> List[Any]:
    # keras.optimizers.MultiOptimizer exposes its members as `.optimizers`.
    subs = getattr(type(opt), "optimizers", None)
    if subs is None:
        return []
    try:
        value = opt.optimizers
        return list(value.values()) if hasattr(value, "values") else list(value)
    except Exception:  # pylint: disable=broad-except
        return []


def _to_float(value: Any) -> Optional[float]:
    """A setting as a Python float, or None if it cannot be read."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if callable(value) and not hasattr(value, "numpy"):
            value = value()
        if hasattr(value, "numpy"):
            value = value.numpy()
        return float(np.asarray(value, dtype=np.float64).reshape(()))
    except Exception:  # pylint: disable=broad-except
        return None


def _class_name(opt: Any) -> str:
    return type(opt).__name__


def _key(opt: Any, setting: str) -> Tuple[str, ...]:
    return (f"{getattr(opt, 'name', _class_name(opt))}/{setting}",)


def _finding(opt, setting, message, hint, value, threshold, severity, **details) -> F.Finding:
    details.update(optimizer=_class_name(opt), parameter=setting)
    return F.Finding(
        code=F.SUSPICIOUS_HYPERPARAMETER,
        message=message,
        hint=hint,
        variables=_key(opt, setting),
        value=value,
        threshold=threshold,
        severity=severity,
        details=details,
    )


def _schedule(opt: Any) -> Any:
    """The `LearningRateSchedule` driving `opt`, or None for a fixed rate."""
    from keras.optimizers.schedules import LearningRateSchedule

    raw = getattr(opt, "_learning_rate", None)
    return raw if isinstance(raw, LearningRateSchedule) else None


def _iterations(opt: Any) -> Optional[int]:
    value = _to_float(getattr(opt, "iterations", None))
    return None if value is None else int(value)


# Steps at which a schedule is read: a warm-up (Keras' `CosineDecay(0.0, ...,
# warmup_target=...)`) starts at 0 and rises, so step 0 alone would call it
# zero.
_SCHEDULE_PROBES = (0, 1, 10, 100, 1_000, 10_000)
_PROBE_TEXT = ", ".join(str(s) for s in _SCHEDULE_PROBES)


def _schedule_peak(schedule: Any) -> Tuple[int, Optional[float]]:
    """`(step, rate)` of the highest rate at the probe steps (the first non-finite one wins)."""
    best_step, best = 0, None
    for step in _SCHEDULE_PROBES:
        rate = _to_float(lambda: schedule(step))  # pylint: disable=cell-var-from-loop
        if rate is None:
            continue
        if not math.isfinite(rate):
            return step, rate
        if best is None or rate > best:
            best_step, best = step, rate
    return best_step, best


def _check_learning_rate(opt: Any) -> List[F.Finding]:
    name = _class_name(opt)
    schedule = _schedule(opt)
    lo, hi = usual_learning_rate(opt)
    if schedule is not None:
        peak_step, lr = _schedule_peak(schedule)
    else:
        lr = _to_float(getattr(opt, "learning_rate", None))
    if lr is None:
        return []
    what = f"{name} learning_rate"
    if schedule is not None and math.isfinite(lr):
        what += f" (schedule at step {peak_step}, its highest of steps {_PROBE_TEXT})"
    elif schedule is not None:
        what += f" (schedule at step {peak_step})"
    fix = f"use a learning rate in the usual range {lo:g}..{hi:g} for {name}"
    if not math.isfinite(lr) or lr <= 0:
        return [
            _finding(
                opt, "learning_rate",
                f"{what}={lr:g}: with a learning rate that is not a positive "
                "finite number no step moves the weights in the right direction.",
                f"{fix}, e.g. `{name}(learning_rate={_default_lr(opt, lo, hi):g})`.",
                lr, 0.0, F.ERROR, usual_range=(lo, hi),
            )
        ]
    found = []
    if lr < lo / FAR_FACTOR:
        found.append(
            _finding(
                opt, "learning_rate",
                f"{what}={lr:g} is far below the usual range {lo:g}..{hi:g} for "
                f"{name}: each step changes the weights by about {lr:g} times "
                "the gradient (or less), so the model looks frozen.",
                f"{fix}, e.g. `{name}(learning_rate={_default_lr(opt, lo, hi):g})`.",
                lr, lo / FAR_FACTOR, F.WARNING, usual_range=(lo, hi),
            )
        )
    elif lr > hi * FAR_FACTOR:
        found.append(
            _finding(
                opt, "learning_rate",
                f"{what}={lr:g} is far above the usual range {lo:g}..{hi:g} for "
                f"{name}: steps this large overshoot and tend to diverge to NaN.",
                f"{fix}, e.g. `{name}(learning_rate={_default_lr(opt, lo, hi):g})`.",
                lr, hi * FAR_FACTOR, F.WARNING, usual_range=(lo, hi),
            )
        )
    if schedule is not None and not found:
        found.extend(_check_decayed_schedule(opt, schedule, lr, lo))
    return found


def _default_lr(opt: Any, lo: float, hi: float) -> float:
    """The class's own default learning rate if usual, else mid-range."""
    import inspect

    try:
        default = inspect.signature(type(opt).__init__).parameters["learning_rate"].default
        if isinstance(default, (int, float)) and lo <= default <= hi:
            return float(default)
    except (KeyError, TypeError, ValueError):
        pass
    # The geometric middle of the usual range, rounded to one significant digit.
    mid = math.sqrt(lo * hi)
    exponent = math.floor(math.log10(mid))
    return round(mid / 10**exponent) * 10**exponent


def _check_decayed_schedule(opt, schedule, initial: float, lo: float) -> List[F.Finding]:
    step = _iterations(opt)
    if not step:
        return []
    current = _to_float(lambda: schedule(step))
    if current is None or current >= lo / FAR_FACTOR or current >= initial:
        return []
    name = type(schedule).__name__
    return [
        _finding(
            opt, "learning_rate",
            f"{_class_name(opt)} learning-rate schedule {name} has decayed to "
            f"{current:g} at iteration {step} (it started at {initial:g}), far "
            f"below the usual minimum {lo:g}: further steps barely move the weights.",
            "slow the decay (larger `decay_steps`, a decay rate closer to 1), give "
            "the schedule a floor (e.g. `CosineDecay(..., alpha=0.01)`), or stop "
            "training once the schedule has run out.",
            current, lo / FAR_FACTOR, F.WARNING,
            iteration=step, initial_learning_rate=initial, schedule=name,
        )
    ]


def _check_decay_rates(opt: Any) -> List[F.Finding]:
    names = list(DECAY_RATE_NAMES)
    if getattr(opt, "use_ema", False):
        names.append("ema_momentum")
    found = []
    for setting in names:
        value = _to_float(getattr(opt, setting, None))
        if value is None or (math.isfinite(value) and 0.0 <= value < 1.0):
            continue
        effect = _decay_rate_effect(setting, value)
        typical = "0.999" if setting.endswith("beta_2") else "0.9"
        found.append(
            _finding(
                opt, setting,
                f"{_class_name(opt)} {setting}={value:g} is outside [0, 1): {effect}.",
                f"use `{setting}` in [0, 1), typically {typical}.",
                value, 0.0 if value < 0 else 1.0, F.ERROR,
            )
        )
    return found


def _decay_rate_effect(setting: str, value: float) -> str:
    """What a decay rate outside [0, 1) does to the update, in words."""
    if math.isfinite(value) and value < 0:
        return "a negative decay rate makes the moving average flip sign every step"
    if setting in ("momentum", "ema_momentum"):
        return "the velocity never decays, grows without bound and training diverges"
    return (
        "the moving average ignores every new gradient (weight 1 - "
        f"{setting} <= 0) and the bias correction divides by 1 - {setting}**t = 0, "
        "so updates are 0 or NaN"
    )


def _check_epsilon(opt: Any, dtype: np.dtype) -> List[F.Finding]:
    value = _to_float(getattr(opt, "epsilon", None))
    if value is None:
        return []
    if not math.isfinite(value) or value < 0:
        return [
            _finding(
                opt, "epsilon",
                f"{_class_name(opt)} epsilon={value:g} must be a finite number >= 0: "
                "it is added to the denominator of the update.",
                "use a small positive epsilon such as 1e-7 (the Keras default).",
                value, 0.0, F.ERROR,
            )
        ]
    if value > 0 and float(np.asarray(value, dtype=dtype)) == 0.0:
        tiny = float(np.finfo(dtype).smallest_subnormal)
        return [
            _finding(
                opt, "epsilon",
                f"{_class_name(opt)} epsilon={value:g} underflows to 0 in {dtype.name} "
                f"(smallest positive {dtype.name} is {tiny:g}): where the second "
                "moment is 0 the update divides by 0 and becomes inf or NaN.",
                f"use an epsilon representable in {dtype.name}, e.g. 1e-4 for "
                "float16, or keep the variables in float32 (mixed precision: "
                "`keras.mixed_precision.set_global_policy('mixed_float16')`).",
                value, tiny, F.WARNING, dtype=dtype.name,
            )
        ]
    return []


def _check_clipping(opt: Any) -> List[F.Finding]:
    found = []
    for setting in CLIP_NAMES:
        value = _to_float(getattr(opt, setting, None))
        if value is None or value > 0:
            continue
        found.append(
            _finding(
                opt, setting,
                f"{_class_name(opt)} {setting}={value:g}: clipping to a bound <= 0 "
                "turns every gradient into 0 (or NaN), so no weight moves.",
                f"use a positive `{setting}` (e.g. 1.0), or leave it unset.",
                value, 0.0, F.ERROR,
            )
        )
    return found


def _check_weight_decay(opt: Any) -> List[F.Finding]:
    value = _to_float(getattr(opt, "weight_decay", None))
    if value is None or (math.isfinite(value) and value >= 0):
        return []
    return [
        _finding(
            opt, "weight_decay",
            f"{_class_name(opt)} weight_decay={value:g} is negative or not finite: "
            "instead of shrinking the weights it makes them grow every step.",
            "use a weight decay >= 0 (e.g. 0.004, the AdamW default) or None.",
            value, 0.0, F.ERROR,
        )
    ]
