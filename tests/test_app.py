"""Tests of the demo app: every fault is named, in both modes; healthy is clean."""

import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from guardedopt import app
from guardedopt import findings as F

FAST = dict(epochs=1, verbose=0, diagnose_steps=12)


def run(**kwargs):
    lines = []
    result = app.run_demo(out=lines.append, **{**FAST, **kwargs})
    return result, "\n".join(lines)


@pytest.mark.parametrize("mode", ["fit", "loop"])
@pytest.mark.parametrize("fault", app.FAULTS)
def test_each_fault_is_named_in_each_mode(fault, mode):
    # Unguarded, so this matrix stays fast: `diagnose` alone must name the cause.
    result, text = run(fault=fault, mode=mode, guard=False)
    expected = app.EXPECTED_CODES[fault]
    if not expected:
        assert result.diagnosis.ok, text
        assert "no problems found" in text
        assert result.test_accuracy > 0.7
    else:
        assert set(expected) & set(result.diagnosis.codes), text
        assert any(f"[{code}]" in text for code in expected)
    assert "test accuracy:" in text


def test_default_run_is_healthy_and_prints_the_guard_report():
    result, text = run()
    assert result.report is not None and result.report.ok, text
    assert result.diagnosis.ok
    assert result.report.steps == 45  # One epoch of 1438 samples in batches of 32.
    assert "== print(opt.report())" in text
    assert "guardedopt report: 45 steps, 0 skipped, 0 finding(s)" in text
    assert "optimizer: GuardedOptimizer(Adam(learning_rate=0.001))" in text


def test_nan_rows_are_skipped_by_the_guard_in_the_loop():
    result, text = run(fault="nan", mode="loop")
    assert F.NONFINITE_INPUT in result.diagnosis.codes
    assert F.NONFINITE_GRADIENT in result.report.codes
    assert 0 < result.report.skipped_steps <= 7  # 7 NaN rows: at most 7 bad batches.
    assert result.test_accuracy > 0.7  # Skipping kept the weights finite.
    assert "[nonfinite_gradient]" in text


def test_tiny_learning_rate_is_named_by_the_guard_in_fit():
    result, text = run(fault="tiny_lr", mode="fit")
    assert {F.SUSPICIOUS_HYPERPARAMETER, F.TINY_STEP} <= set(result.report.codes), text
    assert "learning_rate=1e-10" in text
    assert result.test_accuracy < 0.3  # It really does not learn.


def test_data_faults_change_the_data_as_described():
    (x, y), (xt, _) = app.make_data("unnormalized")
    assert x.max() == 255.0 and xt.max() == 255.0
    (x, _), _ = app.make_data("nan")
    assert np.isnan(x).any(axis=1).sum() == 7
    (_, y), _ = app.make_data("imbalance")
    counts = np.bincount(y)
    assert counts[:5].min() > 100 and counts[5:].max() < 20


def test_unknown_fault_is_rejected():
    with pytest.raises(ValueError, match=r"`fault` must be one of 'none', 'missing_apply'"):
        app.run_demo(fault="bogus", out=lambda _: None)


def test_main_reads_the_flags(capsys):
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(fault="wrong_loss", mode="loop", epochs=1, verbose="0",
                             diagnose_steps=6, guard=False):
        assert app.main(["guardedopt-demo"]) == 0
    out = capsys.readouterr().out
    assert "fault=wrong_loss mode=loop" in out
    assert "[loss_activation_mismatch]" in out


def test_main_rejects_positional_arguments():
    with pytest.raises(app.app.UsageError, match="Unexpected arguments: extra"):
        app.main(["guardedopt-demo", "extra"])


def test_app_flags_validate_values():
    for name, value in (("fault", "bogus"), ("mode", "eager"), ("epochs", "0")):
        with pytest.raises(flags.IllegalFlagValueError):
            flags.FLAGS[name].parse(value)
    assert "guard_nonfinite" in flags.FLAGS  # The guard flags come with the app.


def test_command_line_entry_point():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "guardedopt.app", "--epochs=1", "--verbose=0",
         "--fault=missing_apply", "--mode=loop", "--diagnose_steps=6", "--noguard"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[no_update]" in proc.stdout
    assert "optimizer: Adam(learning_rate=0.001) (unguarded)" in proc.stdout
