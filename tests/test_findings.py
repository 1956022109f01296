"""Finding and Report: validation, ordering, the readable table."""

import pytest

from guardedopt import findings as F


def _finding(code=F.TINY_STEP, severity=F.WARNING, variables=("dense/kernel",)):
    return F.Finding(
        code=code, message="m", hint="h", variables=variables, first_step=3,
        last_step=9, value=1e-9, threshold=1e-6, severity=severity,
    )


def test_unknown_code_is_rejected():
    with pytest.raises(ValueError, match="`code` must be one of"):
        F.Finding(code="slow", message="m", hint="h")


def test_report_orders_errors_first_and_lists_codes_once():
    report = F.Report(findings=[_finding(), _finding(F.NONFINITE_GRADIENT, F.ERROR), _finding()])
    assert [f.code for f in report.findings][0] == F.NONFINITE_GRADIENT
    assert report.codes == [F.NONFINITE_GRADIENT, F.TINY_STEP]
    assert not report.ok and F.Report().ok


def test_str_is_a_table_with_steps_values_and_fixes():
    text = str(F.Report(findings=[_finding()], steps=9, skipped_steps=1))
    assert "9 steps, 1 skipped, 1 finding(s)" in text
    assert "tiny_step" in text and "3-9" in text and "1e-09" in text and "1e-06" in text
    assert "dense/kernel" in text and "fix: h" in text
    assert "no problems found" in str(F.Report(steps=3))


def test_merged_keeps_one_finding_per_code_and_variables():
    report = F.Report(findings=[_finding()]).merged([_finding(), _finding(variables=("b",))])
    assert len(report.findings) == 2
