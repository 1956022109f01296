"""Findings and reports: what the guard (or `diagnose`) found, and how to fix it.

A `Finding` is plain host-side data. The guard builds findings from its state
variables at a host boundary (`GuardedOptimizer.report()`, `GuardCallback`, the
end of `fit`); `guardedopt.diagnose` builds them from what it observes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

# Stable finding codes. Renaming one is a breaking change.
NONE_GRADIENT = "none_gradient"
ZERO_GRADIENT = "zero_gradient"
NONFINITE_GRADIENT = "nonfinite_gradient"
NONFINITE_WEIGHTS = "nonfinite_weights"
TINY_STEP = "tiny_step"
LARGE_STEP = "large_step"
NO_UPDATE = "no_update"
FROZEN_VARIABLES = "frozen_variables"
LOSS_NOT_DECREASING = "loss_not_decreasing"
NONFINITE_INPUT = "nonfinite_input"
UNNORMALIZED_INPUT = "unnormalized_input"
CLASS_IMBALANCE = "class_imbalance"
LOSS_ACTIVATION_MISMATCH = "loss_activation_mismatch"
SUSPICIOUS_HYPERPARAMETER = "suspicious_hyperparameter"
LOSS_SCALE_AT_FLOOR = "loss_scale_at_floor"

ALL_CODES = (
    NONE_GRADIENT,
    ZERO_GRADIENT,
    NONFINITE_GRADIENT,
    NONFINITE_WEIGHTS,
    TINY_STEP,
    LARGE_STEP,
    NO_UPDATE,
    FROZEN_VARIABLES,
    LOSS_NOT_DECREASING,
    NONFINITE_INPUT,
    UNNORMALIZED_INPUT,
    CLASS_IMBALANCE,
    LOSS_ACTIVATION_MISMATCH,
    SUSPICIOUS_HYPERPARAMETER,
    LOSS_SCALE_AT_FLOOR,
)

# Severity orders findings in a report: errors first.
ERROR = "error"
WARNING = "warning"
INFO = "info"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem found in training.

    Attributes:
        code: Stable identifier, one of `ALL_CODES`.
        message: One sentence naming what was measured, for whom and when.
        hint: The concrete fix to try first.
        variables: Keras paths of the variables concerned (may be empty).
        first_step: First optimizer step at which it was seen (None: static).
        last_step: Last optimizer step at which it was seen (None: static).
        value: The measured value (ratio, count, learning rate, ...).
        threshold: The threshold `value` was compared against, if any.
        severity: `"error"`, `"warning"` or `"info"`.
        count: How many steps (or batches) showed it.
        details: Extra machine-readable data (per-class counts, ...).
    """

    code: str
    message: str
    hint: str
    variables: Tuple[str, ...] = ()
    first_step: Optional[int] = None
    last_step: Optional[int] = None
    value: Optional[float] = None
    threshold: Optional[float] = None
    severity: str = WARNING
    count: int = 1
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.code not in ALL_CODES:
            raise ValueError(
                f"`code` must be one of {ALL_CODES}. Received: code={self.code!r}"
            )
        object.__setattr__(self, "variables", tuple(self.variables))

    @property
    def step(self) -> Tuple[Optional[int], Optional[int]]:
        """`(first_step, last_step)`."""
        return (self.first_step, self.last_step)

    def __str__(self) -> str:
        return f"[{self.code}] {self.message} Fix: {self.hint}"


_SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}


def _format_number(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int,)) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def _format_steps(finding: Finding) -> str:
    if finding.first_step is None:
        return "static"
    if finding.first_step == finding.last_step:
        return str(finding.first_step)
    return f"{finding.first_step}-{finding.last_step}"


def _shorten(paths: Sequence[str], limit: int = 3) -> str:
    if not paths:
        return "-"
    shown = ", ".join(paths[:limit])
    if len(paths) > limit:
        shown += f" (+{len(paths) - limit} more)"
    return shown


@dataclasses.dataclass
class Report:
    """What a guarded run (or a diagnosis) found.

    Attributes:
        findings: The findings, errors first.
        steps: Optimizer steps observed.
        skipped_steps: Steps the guard skipped.
        stats: Extra figures (losses, class weights, per-variable series for
            `plot`, ...). Keys are documented where they are produced.
    """

    findings: List[Finding] = dataclasses.field(default_factory=list)
    steps: int = 0
    skipped_steps: int = 0
    stats: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.findings = sorted(
            self.findings, key=lambda f: (_SEVERITY_ORDER.get(f.severity, 9),)
        )

    @property
    def codes(self) -> List[str]:
        """The finding codes, in report order, without repeats."""
        return list(dict.fromkeys(f.code for f in self.findings))

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    def by_code(self, code: str) -> List[Finding]:
        """The findings with this code."""
        return [f for f in self.findings if f.code == code]

    def merged(self, findings: Iterable[Finding]) -> "Report":
        """A new report with `findings` added (same code and variables: kept once)."""
        seen = {(f.code, f.variables) for f in self.findings}
        extra = [f for f in findings if (f.code, f.variables) not in seen]
        return Report(
            findings=self.findings + extra,
            steps=self.steps,
            skipped_steps=self.skipped_steps,
            stats=dict(self.stats),
        )

    def plot(self, path: str) -> str:
        """Writes a PNG: effective step per variable over steps, and skips.

        Needs matplotlib (`pip install guardedopt[plot]`).

        Args:
            path: Where to write the PNG.

        Returns:
            `path`.
        """
        from guardedopt import plotting

        return plotting.plot_report(self, path)

    def __str__(self) -> str:
        header = (
            f"guardedopt report: {self.steps} steps, "
            f"{self.skipped_steps} skipped, {len(self.findings)} finding(s)"
        )
        if not self.findings:
            return header + "\n  no problems found"
        rows = [("code", "steps", "value", "threshold", "variables")]
        for f in self.findings:
            rows.append(
                (
                    f.code,
                    _format_steps(f),
                    _format_number(f.value),
                    _format_number(f.threshold),
                    _shorten(list(f.variables)),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [header]
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]
            lines.append("  " + "  ".join(cells).rstrip())
        lines.append("")
        for i, f in enumerate(self.findings, 1):
            lines.append(f"  {i}. [{f.code}] {f.message}")
            lines.append(f"     fix: {f.hint}")
        return "\n".join(lines)
