"""Shared helpers of the guardedopt benchmarks: threads, interleaved timing, stats, output.

Timing method. All the variants of one comparison live in one process, are
compiled and warmed up first, then timed interleaved: every round runs each
variant for `inner` steps, in an order that rotates from round to round, so
slow periods of a shared machine hit all variants alike. Each round gives a
per-step wall time and a per-step process CPU time for each variant, and a
per-round ratio variant/baseline (same round). We report the median time, the
median of the per-round ratios and their interquartile range (IQR). The bar
verdicts also use a distribution-free confidence interval of that median
of at least 95% (from 6 rounds on; 75% from 3 rounds)
(`median_interval`): a bar is "met" only when the whole interval is within
it. The interval covers the rounds of one process only: two identical
steps built in one process can differ by several percent for a whole run,
and processes by more (README "Run 16"). `instances_of` averages several
instances of each variant to shrink the first.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------- set-up
def configure_threads(threads: int) -> Dict[str, int]:
    """Fixes TF's thread pools (call before any TF op runs). 0 keeps TF's default."""
    import tensorflow as tf

    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    return dict(
        intra_op=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op=tf.config.threading.get_inter_op_parallelism_threads(),
    )


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def machine_info() -> Dict[str, object]:
    """CPU model, cores, memory, versions: what the README's Performance section cites."""
    info: Dict[str, object] = dict(python=platform.python_version(), platform=platform.platform())
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
                       "L2 cache", "L3 cache", "Hypervisor vendor"):
                info[key] = value
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["MemTotal"] = f.readline().split(":")[1].strip()
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    import keras
    import tensorflow as tf

    try:
        import hashlib

        import guardedopt

        package = os.path.dirname(os.path.abspath(guardedopt.__file__))
        info["guardedopt_path"] = package
        with open(os.path.join(package, "optimizer.py"), "rb") as f:
            info["optimizer_py_sha1"] = hashlib.sha1(f.read()).hexdigest()[:12]
        info["git_head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True,
            check=False).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        pass
    info["tensorflow"] = tf.__version__
    info["keras"] = keras.__version__
    info["numpy"] = np.__version__
    return info


# The GuardedOptimizer options of the guard variants every benchmark knows.
GUARD_VARIANTS = {
    "guard": {},  # the defaults: every check on, check_every=1
    "guard_ce10": dict(check_every=10),
    "guard_w1": dict(weights_check_every=1),  # all of every weight checked every step
    "guard_skipw": dict(nonfinite_weights="skip"),  # exact restore of a bad update
    # NaN/Inf gradients reported, not skipped: no write waits for the
    # gradient sums (ablations.py measures that wait alone)
    "guard_warn": dict(nonfinite_gradient="warn"),
}


def guard_module(variant: str):
    """`(kind, module)` of a variant name `kind[@module]`.

    `guard@guardedopt_candidate` uses `guardedopt_candidate.GuardedOptimizer`: a
    renamed copy of the package (on PYTHONPATH) to A/B a candidate change
    against the installed one in the same process.
    """
    import importlib

    kind, _, module = variant.partition("@")
    return kind, importlib.import_module(module or "guardedopt")


def guarded_optimizer(variant: str, inner):
    """The optimizer of a variant: `inner` itself ("bare"), or a guard around it.

    Args:
        variant: "bare", a key of `GUARD_VARIANTS` or an ablation of
            `ablations.PARTS`, optionally naming its package (`guard@module`).
        inner: The inner Keras optimizer.

    Raises:
        ValueError: `variant` is none of these.
    """
    import ablations

    kind, module = guard_module(variant)
    if kind == "bare":
        return inner
    if kind in ablations.PARTS:
        return ablations.make(kind, module, inner)
    if kind in GUARD_VARIANTS:
        return module.GuardedOptimizer(inner, **GUARD_VARIANTS[kind])
    raise ValueError(f"`variant` must be bare, one of {sorted(GUARD_VARIANTS)} or "
                     f"{ablations.PARTS}. Received: variant={variant!r}")


# --------------------------------------------------------------------- timing
def random_parameters(size: int, nvars: int, seed: int = 0):
    """`(variables, gradients)`: `size` float32 weights split into `nvars` variables, and fixed gradients.

    The last variable takes the remainder. Weights are N(0, 0.1^2), gradients
    N(0, 1e-6), both from `numpy.random.default_rng(seed)`.
    """
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    per = [size // nvars] * nvars
    per[-1] += size - sum(per)
    variables, grads = [], []
    for i, n in enumerate(per):
        variables.append(keras.Variable(rng.standard_normal(n, dtype=np.float32) * 0.1, name=f"w{i}"))
        grads.append(tf.constant(rng.standard_normal(n, dtype=np.float32) * 1e-3))
    return variables, grads


def _sync(value) -> None:
    """Waits for a step's result (a tensor, a structure of tensors or None)."""
    if value is None:
        return
    if hasattr(value, "numpy"):
        value.numpy()
    elif isinstance(value, (list, tuple)):
        for v in value:
            _sync(v)
    elif isinstance(value, dict):
        for v in value.values():
            _sync(v)


def interleaved(
    steps: Dict[str, Callable[[], object]],
    baseline: str,
    rounds: int,
    inner: int,
    warmup: int = 2,
    budget_s: Optional[float] = None,
    instances_of: Optional[Dict[str, List[str]]] = None,
) -> Dict[str, Dict[str, object]]:
    """Times `steps` (name -> zero-argument step) interleaved; see the module docstring.

    Args:
        steps: The variants; each call runs one step and returns something to sync on.
        baseline: The name of the variant the ratios are taken against.
        rounds: Number of rounds (each round times every variant once).
        inner: Steps per variant per round.
        warmup: Untimed calls of each variant before the first round.
        budget_s: If set, stop after the round in which this many seconds were
            spent (at least 3 rounds run).
        instances_of: If set, variant -> the names in `steps` of its
            instances (`instance_key`); each variant's time in a round is
            then `instance_means` of its instances', and the result has one
            entry per variant, with `instance_median_ms`: each instance's
            median time.

    Returns:
        name -> dict(wall_ms, cpu_ms: per-round per-step times (lists),
        median_ms, median_cpu_ms, ratio: per-round wall ratios to the baseline,
        ratio_median, ratio_q25, ratio_q75, cpu_ratio_median, cpu_ratio_q25,
        cpu_ratio_q75, ratio_ci: `median_interval` of the ratios as
        `[low, high, coverage]`, rounds).
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            _sync(steps[name]())
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        for name in round_order(names, r):
            fn = steps[name]
            t0, c0 = time.perf_counter(), time.process_time()
            out = None
            for _ in range(inner):
                out = fn()
            _sync(out)
            wall[name].append((time.perf_counter() - t0) / inner * 1e3)
            cpu[name].append((time.process_time() - c0) / inner * 1e3)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    if not instances_of:
        return summarize(wall, cpu, baseline)
    return summarize_instances(wall, cpu, baseline, instances_of)


def round_order(names: Sequence[str], round_index: int) -> List[str]:
    """The order of `names` in round `round_index`: rotated by one each round, reversed every other."""
    shift = round_index % len(names)
    order = list(names[shift:]) + list(names[:shift])
    return order[::-1] if round_index % 2 else order


def summarize_instances(wall, cpu, baseline, instances_of) -> Dict[str, Dict[str, object]]:
    """`summarize` of each variant's `instance_means`, plus `instance_median_ms`: each instance's median time."""
    stats = summarize(instance_means(wall, instances_of), instance_means(cpu, instances_of), baseline)
    for variant, keys in instances_of.items():
        stats[variant]["instance_median_ms"] = [float(np.median(wall[k])) for k in keys]
    return stats


def instance_key(variant: str, index: int) -> str:
    """The name instance `index` of a variant is timed under: `guard`, `guard#2`, ..."""
    return variant if index == 0 else f"{variant}#{index + 1}"


def instance_means(times: Dict[str, List[float]], instances_of: Dict[str, List[str]]) -> Dict[str, List[float]]:
    """Per variant, the per-round geometric mean of its instances' times.

    Two identical steps built in one process can differ by several percent
    for a whole run (README "Run 16"); averaging N instances of each variant
    shrinks that offset, which more rounds do not. A variant of one instance
    keeps its times as they are (no `exp(log(t))` rounding).
    """
    return {v: list(times[keys[0]]) if len(keys) == 1
            else np.exp(np.mean(np.log([times[k] for k in keys]), axis=0)).tolist()
            for v, keys in instances_of.items()}


def summarize(wall, cpu, baseline) -> Dict[str, Dict[str, object]]:
    base_w = np.asarray(wall[baseline])
    base_c = np.asarray(cpu[baseline])
    out = {}
    for name in wall:
        w, c = np.asarray(wall[name]), np.asarray(cpu[name])
        rw, rc = w / base_w, c / np.maximum(base_c, 1e-9)
        out[name] = dict(
            wall_ms=w.round(4).tolist(), cpu_ms=c.round(4).tolist(), ratio=rw.round(4).tolist(),
            median_ms=float(np.median(w)), median_cpu_ms=float(np.median(c)),
            ratio_median=float(np.median(rw)), ratio_q25=float(np.percentile(rw, 25)),
            ratio_q75=float(np.percentile(rw, 75)),
            cpu_ratio_median=float(np.median(rc)), cpu_ratio_q25=float(np.percentile(rc, 25)),
            cpu_ratio_q75=float(np.percentile(rc, 75)),
            ratio_ci=list(median_interval(rw)),  # low, high, coverage
            rounds=len(w),
        )
    return out


def median_interval(values: Sequence[float], confidence: float = 0.95):
    """A distribution-free confidence interval of the median of `values`.

    The order statistics `x_(j+1)` and `x_(n-j)` (sorted, 1-based) for the
    largest `j` with `P(Binomial(n, 1/2) <= j) <= (1 - confidence) / 2`. For
    independent values they cover the true median with probability
    `1 - 2 P(Binomial(n, 1/2) <= j) >= confidence`, whatever the
    distribution. With too few values for that (fewer than 6 at 95%) the
    interval is `(min, max)` and its coverage is lower; it is returned too.

    Returns:
        `(low, high, coverage)`.
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        raise ValueError("`values` must not be empty.")
    tail = (1.0 - confidence) / 2
    # `outside`: the count of outcomes with at most `j` values below the median (its sum of binomial terms).
    j, outside, running = 0, 1, 0  # j = 0, the (min, max) fallback, unless a larger rank qualifies
    for i in range(n):
        running += math.comb(n, i)
        if running / 2.0**n > tail:
            break
        j, outside = i, running
    return float(x[j]), float(x[n - 1 - j]), 1.0 - 2.0 * outside / 2.0**n


def bar_verdict(interval: Sequence[float], limit: float) -> str:
    """"met", "NOT met" or "undecided" for a bar `median <= limit`, from the median's `interval`.

    `interval` is `median_interval(...)` (`low, high[, coverage]`), the one
    the report prints beside the verdict. "met" when all of it is at or
    below `limit`, "NOT met" when all of it is above.
    """
    low, high = interval[0], interval[1]
    if high <= limit:
        return "met"
    if low > limit:
        return "NOT met"
    return "undecided: the interval straddles the bar"


def fmt_ratio(stats) -> str:
    if stats is None:
        return "-"
    return f"{stats['ratio_median']:.3f} [{stats['ratio_q25']:.2f}-{stats['ratio_q75']:.2f}]"


# --------------------------------------------------------------------- memory
# --------------------------------------------------------------------- output
def write_rows(rows: List[Dict[str, object]], stem: str, meta: Dict[str, object]) -> Dict[str, str]:
    """Writes `rows` to RESULTS_DIR/<stem>.csv and .json (with `meta`). Returns the paths."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    json_path = os.path.join(RESULTS_DIR, stem + ".json")
    csv_path = os.path.join(RESULTS_DIR, stem + ".csv")
    with open(json_path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=_json_default)
    flat_keys: List[str] = []
    for row in rows:
        for key, value in row.items():
            if not isinstance(value, (list, dict)) and key not in flat_keys:
                flat_keys.append(key)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=flat_keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in flat_keys})
    return dict(json=json_path, csv=csv_path)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    """Prints (and returns) a Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n### {title}\n")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def fmt_first_call(seconds, bare_seconds) -> str:
    """`"12.3 (4.56x)"`: a first call's seconds and their ratio to the bare variant's."""
    if seconds is None or not bare_seconds:
        return "-"
    return f"{seconds:.1f} ({seconds / bare_seconds:.2f}x)"


def save_text(text: str, stem: str) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, stem + ".md")
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


def ratio_chart(groups: Dict[str, Dict[str, Dict[str, object]]], path: str, title: str,
                variants: Sequence[str], bars: Sequence[float] = ()) -> Optional[str]:
    """Bar chart: one group of bars per configuration, one bar per variant.

    Bar height is the median per-round ratio to the baseline; whiskers are the IQR.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return None
    labels = list(groups)
    variants = [v for v in variants if any(groups[label].get(v) for label in labels)]
    if not labels or not variants:
        return None
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels) * max(1, len(variants)) / 2.5), 4.8))
    xs = np.arange(len(labels))
    for i, variant in enumerate(variants):
        med, lo, hi = [], [], []
        for label in labels:
            s = groups[label].get(variant)
            if s is None:
                med.append(np.nan)
                lo.append(0)
                hi.append(0)
                continue
            med.append(s["ratio_median"])
            lo.append(max(s["ratio_median"] - s["ratio_q25"], 0))
            hi.append(max(s["ratio_q75"] - s["ratio_median"], 0))
        ax.bar(xs + (i - (len(variants) - 1) / 2) * width, med, width, yerr=[lo, hi],
               capsize=2, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    for bar in bars:
        ax.axhline(bar, color="red", linestyle="--", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("time / bare (median, IQR whiskers)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class StepTimer:
    """Keras callback: intervals between consecutive batch begins (seconds)."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.marks = []
                self.cpu = []

            def on_train_batch_begin(self, batch, logs=None):
                self.marks.append(time.perf_counter())
                self.cpu.append(time.process_time())

        return _Timer()


def fit_block(model, data, callbacks, steps):
    """One fit call of steps+1 batches; per-step wall and CPU ms (median over batches)."""
    timer = StepTimer()
    model.fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[timer] + callbacks)
    wall = np.diff(timer.marks) * 1e3
    cpu = np.diff(timer.cpu) * 1e3
    return float(np.median(wall)), float(np.median(cpu))
