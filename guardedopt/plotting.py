"""`plot_report`: a picture of how far each variable moved at each step.

Top panel: the effective step `‖Δw‖/‖w‖` of each variable per step, on a log
scale, with the bands below `min_step` (tiny: the model looks frozen) and above
`max_step` (large: it may diverge) shaded. A step that did not move a variable
at all is drawn at the bottom edge. Bottom panel: the cumulative number of
skipped steps and a mark at each step with a non-finite gradient.

matplotlib is an optional dependency (`pip install guardedopt[plot]`); it is
imported only when a plot is drawn. The figure is rendered by the Agg canvas
directly, without pyplot: no display is needed and the user's pyplot backend
and state (e.g. in a notebook) are left alone.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np

# Figure size in inches and resolution: the PNG is 1000 x 700 pixels.
FIGSIZE = (10.0, 7.0)
DPI = 100
# At most this many variables get their own legend entry.
MAX_LEGEND = 10


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "guardedopt's plots need matplotlib, an optional dependency: "
            "`pip install 'guardedopt[plot]'` (or `pip install matplotlib`)."
        ) from None
    return matplotlib, Figure, FigureCanvasAgg


def plot_report(report: Any, path: str, *, title: Optional[str] = None) -> str:
    """Writes a PNG of the report's per-step series to `path`.

    Args:
        report: A `Report` whose `stats` hold `history` (per-step series:
            `step` [T], `step_ratio` [T, n_vars], `skipped` [T], `nonfinite`
            [T]), `variable_paths`, `min_step` and `max_step`, as produced by
            `GuardedOptimizer.report()` and `guardedopt.diagnose`.
        path: Where to write the PNG (parent directories are created).
        title: Figure title (default: the report's one-line summary).

    Returns:
        `path`.

    Raises:
        ValueError: If the report holds no per-step history.
        ImportError: If matplotlib is not installed.
    """
    history = (getattr(report, "stats", None) or {}).get("history")
    if history is None:
        raise ValueError(
            "`report` has no per-step history (report.stats['history']): plot a report "
            "from `GuardedOptimizer.report()` or `guardedopt.diagnose`. Received: "
            f"stats keys {sorted((getattr(report, 'stats', None) or {}).keys())}"
        )
    series = _series(history)
    stats = report.stats
    paths = list(stats.get("variable_paths") or [])
    paths += [f"variable {i}" for i in range(len(paths), series["step_ratio"].shape[1])]
    matplotlib, figure_class, canvas_class = _matplotlib()
    fig = figure_class(figsize=FIGSIZE, dpi=DPI)
    canvas_class(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=[3, 1]))
    colors = matplotlib.colormaps["tab10"]
    _draw_ratios(top, series, paths, stats.get("min_step"), stats.get("max_step"), colors)
    _draw_timeline(bottom, series)
    fig.suptitle(title or _summary(report))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _series(history: Dict[str, Any]) -> Dict[str, np.ndarray]:
    ratio = np.asarray(history.get("step_ratio", np.zeros((0, 0))), np.float64)
    if ratio.ndim == 1:
        ratio = ratio.reshape(-1, 1)
    t = ratio.shape[0]
    step = np.asarray(history.get("step", np.arange(1, t + 1)), np.float64).reshape(-1)
    skipped = np.asarray(history.get("skipped", np.zeros(t)), np.float64).reshape(-1)
    nonfinite = np.asarray(history.get("nonfinite", np.zeros(t, bool)), bool).reshape(-1)
    return dict(step=step, step_ratio=ratio, skipped=skipped, nonfinite=nonfinite)


def _summary(report: Any) -> str:
    codes = ", ".join(getattr(report, "codes", [])) or "no findings"
    return f"guardedopt: {report.steps} steps, {report.skipped_steps} skipped: {codes}"


def _floor(ratio: np.ndarray, min_step: Optional[float]) -> float:
    """Where to draw "no change" (ratio 0) on the log axis: below everything."""
    positive = ratio[np.isfinite(ratio) & (ratio > 0)]
    candidates = [float(positive.min())] if positive.size else []
    if min_step:
        candidates.append(float(min_step))
    low = min(candidates) if candidates else 1e-8
    return 10.0 ** (math.floor(math.log10(low)) - 1)


def _draw_ratios(ax, series, paths: Sequence[str], min_step, max_step, cmap) -> None:
    step, ratio = series["step"], series["step_ratio"]
    floor = _floor(ratio, min_step)
    for i in range(ratio.shape[1]):
        values = ratio[:, i]
        measured = np.isfinite(values)
        if not measured.any():
            continue
        shown = np.where(values > 0, values, floor)
        label = paths[i] if i < MAX_LEGEND else None
        ax.plot(step[measured], shown[measured], lw=1.2, marker=".", ms=3,
                color=cmap(i % 10), label=label, alpha=0.9)
    finite = ratio[np.isfinite(ratio)]
    top = max(floor * 10, float(finite.max()) if finite.size else 0.0)
    if max_step:
        top = max(top, float(max_step))
        ax.axhspan(float(max_step), top * 10, color="tab:red", alpha=0.12,
                   label=f"large step > max_step={max_step:g}")
        ax.axhline(float(max_step), color="tab:red", lw=0.8, ls="--")
    if min_step:
        ax.axhspan(floor, float(min_step), color="tab:orange", alpha=0.15,
                   label=f"tiny step < min_step={min_step:g}")
        ax.axhline(float(min_step), color="tab:orange", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, top * 10)
    ax.set_ylabel("update / weight  ‖Δw‖/‖w‖")
    ax.text(0.005, 0.01, f"no change drawn at {floor:g}", transform=ax.transAxes,
            fontsize=7, color="gray", va="bottom")
    if ratio.shape[0] == 0:
        ax.text(0.5, 0.5, "no steps recorded", transform=ax.transAxes, ha="center", va="center")
    handles, labels = ax.get_legend_handles_labels()
    if ratio.shape[1] > MAX_LEGEND:
        labels.append(f"(+{ratio.shape[1] - MAX_LEGEND} more variables)")
        handles.append(ax.plot([], [], color="none")[0])
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper right", ncol=2)
    ax.grid(True, which="major", alpha=0.3)


def _draw_timeline(ax, series) -> None:
    step, skipped, nonfinite = series["step"], series["skipped"], series["nonfinite"]
    if step.size:
        ax.step(step, skipped, where="post", color="tab:purple", label="skipped steps (cumulative)")
        bad = step[nonfinite]
        if bad.size:
            ax.scatter(bad, np.zeros_like(bad), marker="x", color="tab:red", zorder=3,
                       label="non-finite gradient")
        ax.set_ylim(-0.5, max(1.0, float(skipped.max()) * 1.15 + 0.5))
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("step")
    ax.set_ylabel("skipped")
    ax.grid(True, alpha=0.3)
