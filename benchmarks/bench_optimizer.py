"""Optimizer-only overhead: `apply` of GuardedOptimizer vs the bare optimizer and its peers.

One step is `optimizer.apply(grads, variables)` inside `tf.function` (plain, or
`jit_compile=True`), with fixed random gradients passed as arguments. For each
configuration (parameter count x number of variables x compile mode x inner
optimizer) the variants are compiled, warmed up and timed interleaved in one
process (see `common.interleaved`):

  bare            the inner optimizer alone (the baseline)
  guard           GuardedOptimizer(inner), all checks on (defaults), check_every=1
  guard_ce10      the same with check_every=10
  guard_w1        the defaults, but weights_check_every=1 (all of every weight
                  checked for NaN/Inf every step, not every 10th)
  guard_skipw     the defaults, but nonfinite_weights="skip" (exact restore of a bad update)
  guard_warn      the defaults, but nonfinite_gradient="warn" (reported, not skipped;
                  not in the default list)
  lso             keras.optimizers.LossScaleOptimizer(inner): one finite check + a cond
  check_numerics  the bare optimizer traced under tf.debugging.enable_check_numerics()
                  (not supported under XLA: reported, not run)
  abl_mask, abl_sums, abl_skip
                  ablations of the guard's step (`ablations.py`; not in the default list)

A second part times each check alone (all others "ignore") at one size.

    python benchmarks/bench_optimizer.py            # full suite
    python benchmarks/bench_optimizer.py --quick    # < 1 minute
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import os
import re
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["10000", "1000000", "10000000"], "Parameter counts (floats).")
flags.DEFINE_list("nvars", ["1", "10", "100"], "Number of variables the parameters are split into.")
flags.DEFINE_bool("full", False,
                  "Every size x variable count x inner optimizer, in both modes, with the variants of "
                  "FULL_VARIANTS too unless --variants is given (about 35 minutes before README run 17). Default: Adam at "
                  "every size in 1 and 10 variables plus 1e6 in 100 variables (under XLA only: a "
                  "100-variable cell takes a minute to compile in each mode), SGD at 1e6 in 10 variables.")
flags.DEFINE_list("modes", ["xla", "graph"], "xla: tf.function(jit_compile=True); graph: plain tf.function.")
flags.DEFINE_list("inners", ["adam", "sgd"], "Inner optimizers.")
flags.DEFINE_list("variants", ["bare", "guard", "guard_ce10", "lso", "check_numerics"],
                  "Variants compared in each configuration (--full adds FULL_VARIANTS). A guard variant "
                  "may name the package to take GuardedOptimizer from: guard@guardedopt_candidate (on "
                  "PYTHONPATH).")
flags.DEFINE_bool("checks_alone", True, "Also time each check alone (others 'ignore').")
flags.DEFINE_integer("alone_size", 1_000_000, "Parameter count of the each-check-alone part.")
flags.DEFINE_integer("alone_nvars", 10, "Variables of the each-check-alone part.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds per configuration.")
flags.DEFINE_float("block_ms", 40.0, "Target time of one timed block (sets the steps per block).")
flags.DEFINE_integer("max_inner", 50, "At most this many steps per timed block.")
flags.DEFINE_float("group_budget_s", 30.0, "Stop a configuration's rounds after this long (>= 3 rounds).")
flags.DEFINE_integer("instances", 1,
                     "Optimizers (each with its own slots and compiled step; all share the weights) built per variant, all timed "
                     "interleaved; a variant's time in a round is the geometric mean of its instances' "
                     "(two bare instances differed by 7% for a whole run: README \"Run 16\").", lower_bound=1)
flags.DEFINE_integer("threads", 1, "TF intra- and inter-op threads (0: TF default).")
flags.DEFINE_integer("compile_workers", 2,
                     "Steps of one configuration compiled at a time, in threads (XLA's compile releases the "
                     "GIL; tracing does not, so every step is traced first, one by one). 1: one by one, "
                     "so that the first-call table gives each compile alone.", lower_bound=1)
flags.DEFINE_bool("quick", False, "Small run (< 1 minute): 1e4 and 1e6 params in 1 variable, Adam, 3 rounds, no "
                  "each-check-alone part.")
flags.DEFINE_string("tag", "", "Suffix of the result files (results/optimizer<tag>.*).")
flags.DEFINE_integer("seed", 0, "Random seed of weights and gradients.")

# Not in the default run (the matrix), but in --full: every weight read
# every step, and the exact restore of a bad update (README "Performance").
FULL_VARIANTS = ("guard_w1", "guard_skipw")
CHECKS = ("zero_gradient", "nonfinite_gradient", "nonfinite_weights", "tiny_step", "large_step")
ALL_IGNORE = {c: "ignore" for c in CHECKS}


def check_alone_options(kind):
    """Options of the each-check-alone variants (guard_off, only_<check>), or None."""
    if kind == "guard_off":
        return dict(ALL_IGNORE, none_gradient="ignore")
    if kind.startswith("only_"):
        check = kind[len("only_"):]
        options = dict(ALL_IGNORE, none_gradient="ignore")
        options[check] = "warn"
        return options
    return None


def make_inner(name):
    import keras

    if name == "adam":
        return keras.optimizers.Adam(learning_rate=1e-3)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=1e-2)
    if name == "sgdm":
        return keras.optimizers.SGD(learning_rate=1e-2, momentum=0.9)
    raise ValueError(f"unknown inner optimizer {name!r}")


def make_optimizer(variant, inner_name):
    import keras

    inner = make_inner(inner_name)
    kind, module = common.guard_module(variant)
    if kind == "check_numerics":
        return inner  # the bare optimizer, traced under enable_check_numerics
    if kind == "lso":
        return keras.optimizers.LossScaleOptimizer(inner)
    options = check_alone_options(kind)
    if options is not None:
        return module.GuardedOptimizer(inner, **options)
    return common.guarded_optimizer(variant, inner)


def trace_step(variant, inner_name, variables, grads, jit):
    """The step of a variant, traced but not compiled: (step or None, seconds, error text).

    `check_numerics` is traced under `enable_check_numerics`, which
    instruments the graph as it is built; its first call then needs no flag.
    """
    import tensorflow as tf

    optimizer = make_optimizer(variant, inner_name)
    optimizer.build(variables)

    @tf.function(jit_compile=jit)
    def step(g):
        optimizer.apply(g, variables)
        return optimizer.iterations.value if hasattr(optimizer.iterations, "value") else optimizer.iterations

    numerics = variant.partition("@")[0] == "check_numerics"
    if numerics:
        tf.debugging.enable_check_numerics()
    t0 = time.perf_counter()
    try:
        step.get_concrete_function(grads)
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        return None, time.perf_counter() - t0, describe_error(error)
    finally:
        if numerics:
            tf.debugging.disable_check_numerics()
    return step, time.perf_counter() - t0, ""


def describe_error(error) -> str:
    """One line for a step that does not run, naming the ops XLA could not compile."""
    message = str(error)
    ops = sorted(set(re.findall(r"\b(Debug\w+|CheckNumerics\w*)", message)))
    text = f"{type(error).__name__}: {message.strip().splitlines()[0][:120]}"
    if ops:
        text += f" (ops not compilable by XLA: {', '.join(ops)})"
    return text


def first_calls(steps, grads, workers):
    """Compiles and runs each traced step once, `workers` at a time: name -> (seconds, error text)."""
    def call(step):
        t0 = time.perf_counter()
        try:
            step(grads).numpy()
        except Exception as error:  # noqa: BLE001 - reported, not hidden
            return time.perf_counter() - t0, describe_error(error)
        return time.perf_counter() - t0, ""

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(call, step) for name, step in steps.items()}
        return {name: future.result() for name, future in futures.items()}


# (variant, mode) -> why it does not run: it is not compiled again for every configuration.
_UNSUPPORTED = {}


def choose_inner(steps, block_ms, max_inner):
    """Steps per timed block: enough that the slowest variant's block takes ~block_ms."""
    slowest = 0.0
    for fn in steps.values():
        t0 = time.perf_counter()
        common._sync(fn())
        slowest = max(slowest, (time.perf_counter() - t0) * 1e3)
    return int(max(1, min(max_inner, round(block_ms / max(slowest, 1e-3)))))


def run_group(size, nvars, mode, inner_name, variants, rounds, tag):
    import keras

    jit = mode == "xla"
    variables, grads = common.random_parameters(size, nvars, FLAGS.seed)
    rows, traced, instances_of = {}, {}, {}
    for variant in variants:
        row = dict(part=tag, size=size, nvars=nvars, mode=mode, inner=inner_name, variant=variant,
                   compile_s=None, status="ok", error="", instances=FLAGS.instances)
        rows[variant] = row
        known = _UNSUPPORTED.get((variant, mode))
        if known:
            row.update(status="unsupported", error=known)
            continue
        instances_of[variant] = [variant] + [common.instance_key(variant, i) for i in range(1, FLAGS.instances)]
        for key in instances_of[variant]:
            step, trace_s, error = trace_step(variant, inner_name, variables, grads, jit)
            if key == variant:
                row["trace_s"] = trace_s
            if step is None:
                row.update(status="unsupported", error=error)
                break
            traced[key] = step
    # The first instance's first call is the one the first-call table reports.
    called = first_calls(traced, grads, FLAGS.compile_workers)
    for variant, row in rows.items():
        if variant in called:
            seconds, error = called[variant]
            row["compile_s"] = round(row["trace_s"] + seconds, 3)
            if error:
                row.update(status="unsupported", error=error)
        if row["status"] != "ok":
            _UNSUPPORTED[(variant, mode)] = row["error"]
            instances_of.pop(variant, None)
    steps = {key: functools.partial(traced[key], grads) for keys in instances_of.values() for key in keys}
    inner = choose_inner(steps, FLAGS.block_ms, FLAGS.max_inner)
    stats = common.interleaved(steps, baseline="bare", rounds=rounds, inner=inner, warmup=1,
                               budget_s=FLAGS.group_budget_s, instances_of=instances_of)
    rows = list(rows.values())
    for row in rows:
        s = stats.get(row["variant"])
        row["inner_steps"] = inner
        if s is not None:
            row.update(s)
    del steps, traced, variables, grads
    gc.collect()
    keras.backend.clear_session()
    return rows, stats


def main(argv):
    del argv
    common.quiet_tensorflow()
    threads = common.configure_threads(FLAGS.threads)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    sizes = [int(float(s)) for s in FLAGS.sizes]
    nvars_list = [int(n) for n in FLAGS.nvars]
    inners, modes, variants, rounds = FLAGS.inners, FLAGS.modes, FLAGS.variants, FLAGS.rounds
    alone_size, alone_nvars = FLAGS.alone_size, FLAGS.alone_nvars
    if FLAGS.quick:
        sizes, nvars_list, inners, rounds = [10_000, 1_000_000], [1], ["adam"], 3
        FLAGS.checks_alone = False
    if FLAGS.full and not FLAGS["variants"].present:
        variants = variants[:3] + list(FULL_VARIANTS) + variants[3:]
    meta = dict(machine=common.machine_info(), threads=threads, argv=sys.argv, quick=FLAGS.quick,
                rounds=rounds, block_ms=FLAGS.block_ms, compile_workers=FLAGS.compile_workers)
    print(f"machine: {meta['machine'].get('Model name')} ({meta['machine'].get('CPU(s)')} CPUs), "
          f"TF {tf.__version__}, threads {threads}", flush=True)
    started = time.perf_counter()
    all_rows, groups = [], {}
    configs = [(inner_name, size, nvars) for inner_name in inners for size in sizes for nvars in nvars_list]
    if not FLAGS.full and not FLAGS.quick:
        configs = [c for c in configs if c[0] == "adam" and (c[2] != 100 or c[1] == 1_000_000)
                   or c == ("sgd", 1_000_000, 10)]
    for mode in modes:
        for inner_name, size, nvars in configs:
            if mode == "graph" and nvars == 100 and not FLAGS.full:
                continue  # a minute of compiling for a mode the bars do not use
            t0 = time.perf_counter()
            rows, stats = run_group(size, nvars, mode, inner_name, variants, rounds, "matrix")
            all_rows += rows
            label = f"{mode}/{inner_name}/{size:.0e}/{nvars}v"
            groups[label] = stats
            bare = stats.get("bare", {}).get("median_ms", float("nan"))
            print(f"  {label:28s} bare {bare:8.3f} ms  " + "  ".join(
                f"{v} {common.fmt_ratio(stats.get(v))}" for v in variants if v != "bare")
                + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    alone_groups = {}
    if FLAGS.checks_alone:
        alone = ["bare", "guard_off"] + [f"only_{c}" for c in CHECKS] + ["guard", "guard_ce10"]
        for mode in modes:
            rows, stats = run_group(alone_size, alone_nvars, mode, "adam", alone, rounds, "alone")
            all_rows += rows
            alone_groups[f"{mode}/adam/{alone_size:.0e}/{alone_nvars}v"] = stats
            print(f"  alone {mode}: " + "  ".join(
                f"{v} {common.fmt_ratio(stats.get(v))}" for v in alone if v != "bare"), flush=True)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    stem = "optimizer" + (FLAGS.tag or ("_quick" if FLAGS.quick else ""))
    paths = common.write_rows(all_rows, stem, meta)

    # ---- tables
    text = report(all_rows, variants, alone_groups, meta)
    paths["md"] = common.save_text(text, stem)
    chart_variants = [v for v in variants if v != "bare"]
    xla_groups = {k: v for k, v in groups.items() if k.startswith("xla")}
    graph_groups = {k: v for k, v in groups.items() if k.startswith("graph")}
    for name, g in (("xla", xla_groups), ("graph", graph_groups)):
        if g:
            paths[f"png_{name}"] = common.ratio_chart(
                g, os.path.join(common.RESULTS_DIR, f"{stem}_{name}.png"),
                f"apply() time / bare optimizer, {name} (median of interleaved rounds, IQR)",
                chart_variants, bars=(1.25,))
    if alone_groups:
        paths["png_alone"] = common.ratio_chart(
            alone_groups, os.path.join(common.RESULTS_DIR, f"{stem}_alone.png"),
            "each check alone (others 'ignore'), Adam", [v for v in alone if v != "bare"], bars=(1.25,))
    print(f"\nwrote {', '.join(p for p in paths.values() if p)}  ({meta['elapsed_s']} s)")


def report(rows, variants, alone_groups, meta):
    by = {}
    for r in rows:
        by.setdefault((r["part"], r["mode"], r["inner"], r["size"], r["nvars"]), {})[r["variant"]] = r
    headers = ["mode", "inner", "params", "vars", "bare ms"] + [f"{v} ratio [IQR]" for v in variants if v != "bare"]
    table_rows = []
    for (part, mode, inner, size, nvars), vs in by.items():
        if part != "matrix":
            continue
        cells = [mode, inner, f"{size:.0e}", nvars, f"{vs['bare'].get('median_ms', float('nan')):.3f}"]
        for v in variants:
            if v == "bare":
                continue
            r = vs.get(v)
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                cells.append(common.fmt_ratio(r))
        table_rows.append(cells)
    text = common.print_table(headers, table_rows, "apply() time relative to the bare optimizer (wall, median of per-round ratios [IQR])")
    # CPU-time view of the same (less sensitive to other processes on the machine)
    cpu_rows = []
    for (part, mode, inner, size, nvars), vs in by.items():
        if part != "matrix":
            continue
        cells = [mode, inner, f"{size:.0e}", nvars, f"{vs['bare'].get('median_cpu_ms', float('nan')):.3f}"]
        for v in variants:
            if v == "bare":
                continue
            r = vs.get(v)
            cells.append("-" if r is None or r["status"] != "ok" else
                         f"{r['cpu_ratio_median']:.3f} [{r['cpu_ratio_q25']:.2f}-{r['cpu_ratio_q75']:.2f}]")
        cpu_rows.append(cells)
    text += "\n" + common.print_table(
        ["mode", "inner", "params", "vars", "bare cpu ms"] + [f"{v} cpu ratio" for v in variants if v != "bare"],
        cpu_rows, "same, process CPU time")
    first_rows = []
    for (part, mode, inner, size, nvars), vs in by.items():
        if part != "matrix":
            continue
        bare = vs["bare"]["compile_s"]
        first_rows.append([mode, inner, f"{size:.0e}", nvars, f"{bare:.2f}"] + [
            common.fmt_first_call(vs[v]["compile_s"] if v in vs else None, bare) for v in variants if v != "bare"])
    text += "\n" + common.print_table(
        ["mode", "inner", "params", "vars", "bare s"] + [f"{v} s (/ bare)" for v in variants if v != "bare"],
        first_rows, f"first call of the step: trace (one at a time) and compile ({meta['compile_workers']} at a time, "
        "--compile_workers) (seconds, once per variant; not interleaved; one measurement each, so drift in "
        "the machine lands on single variants: bench_startup.py repeats fresh processes)")
    if alone_groups:
        alone_rows = []
        for label, stats in alone_groups.items():
            for v, s in stats.items():
                alone_rows.append([label, v, f"{s['median_ms']:.3f}", common.fmt_ratio(s),
                                   f"{s['cpu_ratio_median']:.3f}"])
        text += "\n" + common.print_table(["config", "variant", "median ms", "ratio [IQR]", "cpu ratio"],
                                          alone_rows, "each check alone (others 'ignore')")
    # unsupported variants
    errors = {(r["mode"], r["variant"]): r["error"] for r in rows if r["status"] != "ok"}
    for (mode, variant), error in sorted(errors.items()):
        line = f"\n{variant} under {mode}: not supported -> {error}"
        print(line)
        text += "\n" + line
    # the bar
    verdicts = []
    for (part, mode, inner, size, nvars), vs in by.items():
        if part != "matrix" or mode != "xla" or inner != "adam" or size < 1_000_000:
            continue
        g, lso = vs.get("guard"), vs.get("lso")
        if not g or "ratio_median" not in g:
            continue
        low, high, coverage = g["ratio_ci"]
        line = (f"xla adam {size:.0e} {nvars}v: guard {g['ratio_median']:.3f}x [{coverage:.0%} CI {low:.3f}-{high:.3f}] "
                f"(bar <= 1.25: {common.bar_verdict(g['ratio_ci'], 1.25)})")
        if lso and "ratio_median" in lso:
            # Per round: both ratios share that round's bare time.
            excess = [a - b for a, b in zip(g["ratio"], lso["ratio"])]
            line += (f"; lso {lso['ratio_median']:.3f}x (bar guard <= lso + 0.10, per round: "
                     f"{common.bar_verdict(common.median_interval(excess), 0.10)})")
        verdicts.append(line)
    if verdicts:
        text += "\n\n### Bar (optimizer-only, XLA, Adam, >= 1e6 params)\n\n" + "\n".join("- " + v for v in verdicts)
        print("\n".join(verdicts))
    return text


if __name__ == "__main__":
    app.run(main)
