"""Tests of the optimizer configuration checks (`suspicious_hyperparameter`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from guardedopt import GuardedOptimizer
from guardedopt import findings as F
from guardedopt.hyperparams import FAR_FACTOR, check_hyperparameters, usual_learning_rate

ALL_DEFAULTS = [
    keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.Adamax,
    keras.optimizers.Nadam, keras.optimizers.RMSprop, keras.optimizers.SGD,
    keras.optimizers.Adagrad, keras.optimizers.Adadelta, keras.optimizers.Ftrl,
    keras.optimizers.Lion, keras.optimizers.Lamb, keras.optimizers.Adafactor,
]


def only(findings, parameter):
    matches = [f for f in findings if f.details.get("parameter") == parameter]
    assert len(matches) == 1, [str(f) for f in findings]
    return matches[0]


@pytest.mark.parametrize("cls", ALL_DEFAULTS, ids=lambda c: c.__name__)
def test_keras_defaults_are_not_flagged(cls):
    assert check_hyperparameters(cls()) == []


def test_qa_learning_rate_1e_10_for_adam():
    finding = only(check_hyperparameters(keras.optimizers.Adam(learning_rate=1e-10)), "learning_rate")
    assert finding.code == F.SUSPICIOUS_HYPERPARAMETER
    assert finding.value == pytest.approx(1e-10)
    assert finding.threshold == pytest.approx(1e-6)  # 1e-5 / FAR_FACTOR
    assert finding.severity == F.WARNING
    assert "learning_rate=1e-10 is far below the usual range 1e-05..0.01 for Adam" in finding.message
    assert "Adam(learning_rate=0.001)" in finding.hint
    assert finding.variables == ("adam/learning_rate",) or finding.variables[0].endswith("/learning_rate")


@pytest.mark.parametrize("lr", [0.0, -0.01])
def test_nonpositive_learning_rate_is_an_error(lr):
    finding = only(check_hyperparameters(keras.optimizers.SGD(learning_rate=lr)), "learning_rate")
    assert finding.severity == F.ERROR
    assert "not a positive finite number" in finding.message


def test_far_above_range():
    finding = only(check_hyperparameters(keras.optimizers.SGD(learning_rate=50.0)), "learning_rate")
    assert "far above the usual range 0.0001..1 for SGD" in finding.message
    assert finding.threshold == pytest.approx(1.0 * FAR_FACTOR)


def test_edges_of_usual_range_are_fine():
    assert check_hyperparameters(keras.optimizers.Adam(learning_rate=1e-5)) == []
    assert check_hyperparameters(keras.optimizers.Adam(learning_rate=0.05)) == []


def test_ranges_are_per_optimizer_class_and_inherited():
    assert usual_learning_rate(keras.optimizers.Lion()) == (1e-6, 1e-3)
    assert usual_learning_rate(keras.optimizers.SGD()) == (1e-4, 1.0)

    class MyAdam(keras.optimizers.Adam):
        pass

    assert usual_learning_rate(MyAdam()) == usual_learning_rate(keras.optimizers.Adam())
    # 0.1 is fine for SGD but far above Lion's usual range.
    assert check_hyperparameters(keras.optimizers.SGD(learning_rate=0.1)) == []
    assert only(check_hyperparameters(keras.optimizers.Lion(learning_rate=0.1)), "learning_rate")


@pytest.mark.parametrize(
    "optimizer, parameter",
    [
        (lambda: keras.optimizers.Adam(beta_1=1.0), "beta_1"),
        (lambda: keras.optimizers.Adam(beta_2=1.5), "beta_2"),
        (lambda: keras.optimizers.SGD(momentum=1.0), "momentum"),
        (lambda: keras.optimizers.RMSprop(momentum=-0.5), "momentum"),
        (lambda: keras.optimizers.RMSprop(rho=1.0), "rho"),
    ],
)
def test_decay_rates_outside_unit_interval(optimizer, parameter):
    finding = only(check_hyperparameters(optimizer()), parameter)
    assert finding.severity == F.ERROR
    assert "is outside [0, 1)" in finding.message
    assert f"use `{parameter}` in [0, 1)" in finding.hint


def test_beta_1_equal_one_really_freezes_adam():
    # The reproduction: with beta_1=1 the first moment stays 0 and the weights
    # never move (or turn NaN), as the finding says.
    w = keras.Variable(np.ones(3, np.float32))
    opt = keras.optimizers.Adam(learning_rate=0.1, beta_1=1.0)
    for _ in range(3):
        opt.apply_gradients([(tf.ones(3), w)])
    assert not np.any(np.isfinite(w.numpy()) & (w.numpy() != 1.0))


def test_epsilon_underflow_in_float16():
    opt = keras.optimizers.Adam(epsilon=1e-8)
    finding = only(check_hyperparameters(opt, variable_dtype="float16"), "epsilon")
    assert "epsilon=1e-08 underflows to 0 in float16" in finding.message
    assert check_hyperparameters(opt, variable_dtype="float32") == []
    assert check_hyperparameters(opt, variable_dtype=tf.bfloat16) == []
    assert np.float16(1e-8) == 0  # The premise.
    # The Keras default 1e-7 is representable (subnormal) in float16.
    assert check_hyperparameters(keras.optimizers.Adam(), variable_dtype=np.float16) == []


def test_negative_epsilon():
    finding = only(check_hyperparameters(keras.optimizers.Adam(epsilon=-1e-7)), "epsilon")
    assert finding.severity == F.ERROR


@pytest.mark.parametrize("setting", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_clipping_to_zero(setting):
    finding = only(check_hyperparameters(keras.optimizers.SGD(**{setting: 0.0})), setting)
    assert "turns every gradient into 0" in finding.message


def test_negative_weight_decay():
    finding = only(check_hyperparameters(keras.optimizers.AdamW(weight_decay=-0.1)), "weight_decay")
    assert finding.severity == F.ERROR


def test_schedule_decayed_to_zero_at_current_iteration():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps=10, decay_rate=0.1)
    opt = keras.optimizers.Adam(learning_rate=schedule)
    assert check_hyperparameters(opt) == []  # At iteration 0 it is 1e-3.
    opt.iterations.assign(100)
    finding = only(check_hyperparameters(opt), "learning_rate")
    assert "schedule ExponentialDecay has decayed to 1e-13 at iteration 100" in finding.message
    assert finding.details["initial_learning_rate"] == pytest.approx(1e-3)
    assert finding.value == pytest.approx(1e-13, rel=1e-3)


def test_schedule_with_bad_initial_rate():
    schedule = keras.optimizers.schedules.CosineDecay(1e-10, decay_steps=100)
    finding = only(check_hyperparameters(keras.optimizers.Adam(learning_rate=schedule)), "learning_rate")
    assert "(schedule at step 0, its highest of steps 0, 1, 10, 100, 1000, 10000)=1e-10" in finding.message


def test_warmup_schedule_from_zero_is_judged_by_its_peak():
    # Keras' documented warm-up starts at 0: read at step 0 alone it was an
    # ERROR ("no step moves the weights") on a model that trains.
    warmup = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=1000, warmup_target=1e-3, warmup_steps=20
    )
    assert check_hyperparameters(keras.optimizers.Adam(learning_rate=warmup)) == []
    # A warm-up to a target that is itself far too small is still named, at its peak.
    tiny = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=1000, warmup_target=1e-10, warmup_steps=20
    )
    finding = only(check_hyperparameters(keras.optimizers.Adam(learning_rate=tiny)), "learning_rate")
    assert finding.severity == F.WARNING
    peak = float(tiny(100))  # past the warm-up, decaying from 1e-10
    assert f"(schedule at step 100, its highest of steps 0, 1, 10, 100, 1000, 10000)={peak:g}" in finding.message
    assert finding.value == pytest.approx(peak)


def test_callable_learning_rate():
    opt = keras.optimizers.Adam(learning_rate=lambda: 1e-9)
    assert only(check_hyperparameters(opt), "learning_rate").value == pytest.approx(1e-9)


def test_unwraps_loss_scale_and_guarded_optimizers():
    inner = keras.optimizers.Adam(learning_rate=1e-10, beta_1=1.0)
    scaled = keras.optimizers.LossScaleOptimizer(inner)
    codes = {f.details["parameter"] for f in check_hyperparameters(scaled)}
    assert codes == {"learning_rate", "beta_1"}
    guarded = GuardedOptimizer(keras.optimizers.SGD(learning_rate=0.0))
    assert only(check_hyperparameters(guarded), "learning_rate").details["optimizer"] == "SGD"


def test_findings_have_distinct_variables_so_reports_keep_them_all():
    findings = check_hyperparameters(keras.optimizers.Adam(learning_rate=1e-10, beta_1=1.0))
    assert len({f.variables for f in findings}) == 2
    report = F.Report().merged(findings)
    assert len(report.findings) == 2


def test_works_inside_tf_function_trace():
    opt = keras.optimizers.Adam(learning_rate=1e-10)

    @tf.function
    def traced():
        return len(check_hyperparameters(opt))

    assert int(traced()) == 1


def test_guard_reports_it_at_build():
    guarded = GuardedOptimizer(keras.optimizers.Adam(learning_rate=1e-10))
    guarded.build([keras.Variable(np.ones(2, np.float32))])
    assert F.SUSPICIOUS_HYPERPARAMETER in guarded.report().codes
