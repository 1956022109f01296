"""absl flags for the guard: one import and one line in an absl script.

```python
from absl import app
import keras
from guardedopt import flags as guard_flags  # defines --guard_* flags

def main(argv):
    optimizer = guard_flags.guarded_optimizer_from_flags(keras.optimizers.Adam(1e-3))
    ...

app.run(main)
```

Importing this module defines the `--guard_*` flags on `absl.flags.FLAGS`
(absl's convention: flags exist once their module is imported, so `app.run`
can parse them). Their values are read only in `guard_kwargs_from_flags` /
`guarded_optimizer_from_flags`, never at import time. `define_flags` is
idempotent and takes any `FlagValues`, so tests can use a fresh one.
"""

from __future__ import annotations

from typing import Any, Dict

from absl import flags

from guardedopt.optimizer import DEFAULTS, GuardedOptimizer, validate_option
from guardedopt.validation import IGNORE, POLICIES, RAISE, WARN

FLAGS = flags.FLAGS

STEP_POLICIES = (IGNORE, WARN, RAISE)
CLASS_WEIGHT_OPTIONS = ("none", "observe", "auto", "balanced", "effective_number")

# name, GuardedOptimizer argument, allowed values, help
_POLICY_FLAGS = (
    ("guard_none_gradient", "none_gradient", STEP_POLICIES,
     "Policy for variables whose gradient is None (not connected to the loss)."),
    ("guard_zero_gradient", "zero_gradient", STEP_POLICIES,
     "Policy for a gradient that is exactly 0 for --guard_patience steps."),
    ("guard_nonfinite", "nonfinite_gradient", POLICIES,
     "Policy for NaN/Inf gradients: 'skip' leaves weights and optimizer state "
     "untouched for that step."),
    ("guard_nonfinite_weights", "nonfinite_weights", POLICIES,
     "Policy for an update that turns finite weights into NaN/Inf."),
    ("guard_tiny_step", "tiny_step", STEP_POLICIES,
     "Policy for an effective step ||dw||/||w|| below --guard_min_step."),
    ("guard_large_step", "large_step", STEP_POLICIES,
     "Policy for an effective step ||dw||/||w|| above --guard_max_step."),
)
_NUMBER_FLAGS = (
    # name, argument, DEFINE function name, help, bounds
    ("guard_min_step", "min_step", "DEFINE_float",
     "Effective step ||dw||/||w|| below which a step is tiny.",
     dict(lower_bound=0.0, upper_bound=1.0)),
    ("guard_max_step", "max_step", "DEFINE_float",
     "Effective step ||dw||/||w|| above which a step is large (> --guard_min_step).",
     dict(lower_bound=0.0)),
    ("guard_step_epsilon", "step_epsilon", "DEFINE_float",
     "Root-mean-square floor of the weights in the effective-step ratio (> 0).",
     dict(lower_bound=0.0)),
    ("guard_patience", "patience", "DEFINE_integer",
     "Consecutive steps before the zero-gradient and step-size checks fire.",
     dict(lower_bound=1)),
    ("guard_check_every", "check_every", "DEFINE_integer",
     "Measure the effective step every N steps (the NaN checks run every step).",
     dict(lower_bound=1)),
    ("guard_weights_check_every", "weights_check_every", "DEFINE_integer",
     "Under --guard_nonfinite_weights=warn, read all weights for NaN/Inf every N "
     "steps (a 1024-entry sample of each variable every step).",
     dict(lower_bound=1)),
    ("guard_max_consecutive_skips", "max_consecutive_skips", "DEFINE_integer",
     "Skipped steps in a row after which 'skip' escalates to 'raise'.",
     dict(lower_bound=1)),
    ("guard_log_interval_seconds", "log_interval_seconds", "DEFINE_float",
     "Log a finding once, then at most once per this many seconds.",
     dict(lower_bound=0.0)),
)
FLAG_NAMES = (
    ("guard", "guard_class_weight")
    + tuple(f[0] for f in _POLICY_FLAGS)
    + tuple(f[0] for f in _NUMBER_FLAGS)
)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the `--guard_*` flags on `flag_values` (again: no-op).

    Flags: `--[no]guard`, `--guard_none_gradient`, `--guard_zero_gradient`,
    `--guard_nonfinite`, `--guard_nonfinite_weights`, `--guard_tiny_step`,
    `--guard_large_step` (policies), `--guard_min_step`, `--guard_max_step`,
    `--guard_step_epsilon`, `--guard_patience`, `--guard_check_every`,
    `--guard_weights_check_every`, `--guard_max_consecutive_skips`,
    `--guard_log_interval_seconds` (bounded numbers; `--guard_max_step` must
    exceed `--guard_min_step`) and `--guard_class_weight` (`none`, `observe`,
    `auto`, `balanced`, `effective_number`). Defaults are `GuardedOptimizer`'s.

    Args:
        flag_values: Where to define them; `absl.flags.FLAGS` by default.
    """
    def missing(name: str) -> bool:
        return name not in flag_values

    if missing("guard"):
        flags.DEFINE_bool(
            "guard", True,
            "Wrap the optimizer in guardedopt.GuardedOptimizer (--noguard: train "
            "with the bare optimizer).",
            flag_values=flag_values,
        )
    for name, argument, allowed, help_text in _POLICY_FLAGS:
        if missing(name):
            flags.DEFINE_enum(
                name, DEFAULTS[argument], list(allowed), help_text, flag_values=flag_values
            )
    for name, argument, define, help_text, bounds in _NUMBER_FLAGS:
        if missing(name):
            getattr(flags, define)(
                name, DEFAULTS[argument], help_text, flag_values=flag_values, **bounds
            )
            # The constructor's own check, at parse time: the bounds above
            # are what `--help` shows, this catches the rest (inf, nan, > 0,
            # integers past int64).
            flags.register_validator(
                name, _option_validator(name, argument),
                message=f"--{name}: invalid value.", flag_values=flag_values,
            )
            if name == "guard_max_step":
                flags.register_multi_flags_validator(
                    ["guard_min_step", "guard_max_step"], _steps_ordered,
                    message="--guard_max_step must be greater than --guard_min_step.",
                    flag_values=flag_values,
                )
    if missing("guard_class_weight"):
        flags.DEFINE_enum(
            "guard_class_weight", "none", list(CLASS_WEIGHT_OPTIONS),
            "Automatic class weights ('observe' only counts labels for the "
            "class_imbalance finding). Needs the loss wrapped with opt.weighted(loss).",
            flag_values=flag_values,
        )


def _option_validator(name: str, argument: str):
    def valid(value: Any) -> bool:
        try:
            validate_option(argument, value)
        except ValueError as error:
            raise flags.ValidationError(str(error)) from None
        return True
    return valid


def _steps_ordered(values: Dict[str, Any]) -> bool:
    low, high = values["guard_min_step"], values["guard_max_step"]
    return low is None or high is None or high > low


def guard_kwargs_from_flags(flag_values: flags.FlagValues = FLAGS) -> Dict[str, Any]:
    """The `GuardedOptimizer` keyword arguments the parsed flags ask for.

    Args:
        flag_values: Parsed flags on which `define_flags` was called.

    Returns:
        A dict such as `{"nonfinite_gradient": "skip", "min_step": 1e-6, ...}`.

    Raises:
        ValueError: If the guard flags were not defined on `flag_values`.
        absl.flags.UnparsedFlagAccessError: If the flags were not parsed yet.
    """
    absent = [name for name in FLAG_NAMES if name not in flag_values]
    if absent:
        raise ValueError(
            "The guard flags are not defined: call "
            "`guardedopt.flags.define_flags(flag_values)` before parsing. Missing: "
            + ", ".join(f"--{name}" for name in absent)
        )
    # Attribute access raises UnparsedFlagAccessError before parsing.
    kwargs = {argument: getattr(flag_values, name) for name, argument, *_ in _POLICY_FLAGS}
    kwargs.update({argument: getattr(flag_values, name) for name, argument, *_ in _NUMBER_FLAGS})
    class_weight = flag_values.guard_class_weight
    kwargs["class_weight"] = None if class_weight == "none" else class_weight
    return kwargs


def guarded_optimizer_from_flags(
    inner: Any, flag_values: flags.FlagValues = FLAGS, **overrides: Any
) -> Any:
    """Wraps `inner` in a `GuardedOptimizer` configured by the `--guard_*` flags.

    Args:
        inner: The optimizer to guard (instance, name or config dict).
        flag_values: Parsed flags (`absl.flags.FLAGS` by default).
        **overrides: `GuardedOptimizer` arguments that win over the flags.

    Returns:
        The `GuardedOptimizer`, or `inner` itself when `--noguard` was given.
    """
    kwargs = guard_kwargs_from_flags(flag_values)
    if not flag_values.guard:
        return inner
    kwargs.update(overrides)
    return GuardedOptimizer(inner, **kwargs)


define_flags()
