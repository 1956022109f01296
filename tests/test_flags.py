"""Tests of the absl guard flags."""

import keras
import pytest
from absl import flags
from absl.testing import flagsaver

from guardedopt import GuardedOptimizer
from guardedopt import flags as guard_flags
from guardedopt.optimizer import DEFAULTS


@pytest.fixture
def fv():
    values = flags.FlagValues()
    guard_flags.define_flags(values)
    return values


def parse(values, *args):
    values(["prog", *args])
    return values


def test_define_is_idempotent_and_defines_every_flag():
    values = flags.FlagValues()
    guard_flags.define_flags(values)
    guard_flags.define_flags(values)  # No DuplicateFlagError.
    for name in guard_flags.FLAG_NAMES:
        assert name in values
    assert set(guard_flags.FLAG_NAMES) >= {
        "guard_nonfinite", "guard_nonfinite_weights", "guard_zero_gradient",
        "guard_tiny_step", "guard_large_step", "guard_min_step", "guard_max_step",
        "guard_patience", "guard_check_every", "guard_weights_check_every",
        "guard_max_consecutive_skips", "guard_class_weight",
    }


def test_importing_the_module_defines_them_on_global_flags():
    assert "guard_nonfinite" in flags.FLAGS


def test_defaults_are_the_optimizer_defaults(fv):
    kwargs = guard_flags.guard_kwargs_from_flags(parse(fv))
    for argument, value in kwargs.items():
        if argument == "class_weight":
            assert value is None
        else:
            assert value == DEFAULTS[argument], argument


def test_command_line_values_reach_the_kwargs(fv):
    parse(
        fv, "--guard_nonfinite=raise", "--guard_zero_gradient=ignore", "--guard_min_step=1e-5",
        "--guard_max_step=0.5", "--guard_patience=3", "--guard_check_every=4",
        "--guard_max_consecutive_skips=2", "--guard_class_weight=balanced",
        "--guard_tiny_step=raise", "--guard_nonfinite_weights=warn",
        "--guard_weights_check_every=5",
    )
    kwargs = guard_flags.guard_kwargs_from_flags(fv)
    assert kwargs["nonfinite_gradient"] == "raise"
    assert kwargs["zero_gradient"] == "ignore"
    assert kwargs["min_step"] == 1e-5 and kwargs["max_step"] == 0.5
    assert kwargs["patience"] == 3 and kwargs["check_every"] == 4
    assert kwargs["weights_check_every"] == 5
    assert kwargs["max_consecutive_skips"] == 2
    assert kwargs["class_weight"] == "balanced"
    assert kwargs["tiny_step"] == "raise" and kwargs["nonfinite_weights"] == "warn"


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--guard_min_step=-1", r"flag --guard_min_step=-1: -1.0 is not a number in the range \[0.0, 1.0\]"),
        ("--guard_max_step=-0.5", r"--guard_max_step=-0.5"),
        ("--guard_patience=0", r"flag --guard_patience=0: 0 is not a positive integer"),
        ("--guard_check_every=-2", r"--guard_check_every=-2"),
        ("--guard_weights_check_every=0", r"--guard_weights_check_every=0"),
        ("--guard_max_consecutive_skips=0", r"--guard_max_consecutive_skips=0"),
        ("--guard_nonfinite=explode", r"value should be one of <ignore\|warn\|skip\|raise>"),
        ("--guard_zero_gradient=skip", r"value should be one of <ignore\|warn\|raise>"),
        ("--guard_class_weight=heavy", r"value should be one of <none\|observe\|auto\|balanced\|effective_number>"),
        ("--guard_step_epsilon=0", r"flag --guard_step_epsilon=0.0: `step_epsilon` must be a finite float > 0"),
        # Within the flags' bounds, outside what the constructor takes: caught
        # at parse time too, with the constructor's message.
        ("--guard_max_step=inf", r"flag --guard_max_step=inf: `max_step` must be a finite float > 0\. Received: max_step=inf"),
        ("--guard_step_epsilon=inf", r"`step_epsilon` must be a finite float > 0\. Received: step_epsilon=inf"),
        ("--guard_log_interval_seconds=nan", r"`log_interval_seconds` must be a finite float >= 0\. Received: log_interval_seconds=nan"),
        ("--guard_min_step=nan", r"`min_step` must be a finite float >= 0\. Received: min_step=nan"),
        ("--guard_patience=99999999999999999999", r"`patience` must be an integer >= 1 and <= 9223372036854775807"),
    ],
)
def test_bound_and_enum_violations_are_rejected_at_parse(fv, argument, message):
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        parse(fv, argument)


def test_max_step_must_exceed_min_step(fv):
    with pytest.raises(flags.IllegalFlagValueError, match="--guard_max_step must be greater than --guard_min_step"):
        parse(fv, "--guard_min_step=0.5", "--guard_max_step=0.1")


def test_guarded_optimizer_from_flags(fv):
    parse(fv, "--guard_nonfinite=raise", "--guard_min_step=1e-5", "--guard_patience=3")
    inner = keras.optimizers.SGD(learning_rate=0.1)
    opt = guard_flags.guarded_optimizer_from_flags(inner, flag_values=fv)
    assert isinstance(opt, GuardedOptimizer)
    assert opt.inner_optimizer is inner
    assert opt.nonfinite_gradient == "raise"
    assert opt.min_step == 1e-5 and opt.patience == 3
    assert opt.max_step == DEFAULTS["max_step"]


def test_overrides_win_over_flags(fv):
    parse(fv, "--guard_patience=3")
    opt = guard_flags.guarded_optimizer_from_flags("adam", flag_values=fv, patience=7)
    assert opt.patience == 7


def test_noguard_returns_the_inner_optimizer(fv):
    parse(fv, "--noguard")
    inner = keras.optimizers.Adam()
    assert guard_flags.guarded_optimizer_from_flags(inner, flag_values=fv) is inner


def test_missing_definitions_are_named():
    values = flags.FlagValues()
    with pytest.raises(ValueError, match=r"call `guardedopt.flags.define_flags\(flag_values\)`.*--guard_patience"):
        guard_flags.guard_kwargs_from_flags(values)


def test_unparsed_flags_raise(fv):
    with pytest.raises(flags.UnparsedFlagAccessError):
        guard_flags.guard_kwargs_from_flags(fv)


def test_flagsaver_on_global_flags():
    # An absl script: flags are parsed by app.run; here flagsaver sets them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(guard_tiny_step="raise", guard_max_step=2.0):
        opt = guard_flags.guarded_optimizer_from_flags(keras.optimizers.Adam())
        assert opt.tiny_step == "raise" and opt.max_step == 2.0
    assert flags.FLAGS.guard_tiny_step == DEFAULTS["tiny_step"]


def test_flagsaver_values_are_checked_like_command_line_ones():
    # The validators let None through: flagsaver(guard_patience=None) was
    # accepted and failed only when the optimizer was built.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    for name, value in (("guard_patience", None), ("guard_max_step", float("inf"))):
        with pytest.raises(flags.IllegalFlagValueError, match=f"flag --{name}={value}"):
            with flagsaver.flagsaver(**{name: value}):
                pass
    assert flags.FLAGS.guard_patience == DEFAULTS["patience"]


def test_flags_are_read_only_when_called(fv):
    # Changing a value after definition is seen by the next call (no import-time read).
    parse(fv)
    fv.guard_patience = 5
    assert guard_flags.guard_kwargs_from_flags(fv)["patience"] == 5
