"""Train-step overhead: `model.fit` steps with GuardedOptimizer vs the bare optimizer.

The three small models of `models.py` (mlp, cnn, embedding; fixed synthetic
data, one batch repeated), each compiled with `jit_compile=False` and
`jit_compile=True`, and these variants:

  bare        Adam
  guard       GuardedOptimizer(Adam()), all checks on (defaults), check_every=1
  guard_ce10  the same with check_every=10
  guard_w1    the defaults, but weights_check_every=1 (all weights checked every
              step; not in the default list: --variants=...,guard_w1)
  guard_skipw the defaults, but nonfinite_weights="skip" (exact restore of a bad update)
  guard_warn  the defaults, but nonfinite_gradient="warn" (reported, not skipped;
              not in the default list)
  guard_cb    guard plus GuardCallback in fit (its per-batch host read included)
  abl_mask, abl_sums, abl_skip
              ablations of the guard's step (`ablations.py`; not in the default list)

Time per step is the interval between consecutive `on_train_batch_begin` calls
of a `fit(steps_per_epoch=inner + 1)` call (the whole fit loop: data, compiled
step, callbacks), median over the batches of one call. Variants are timed
interleaved, one `fit` call per variant per round (see `common.interleaved`).
With `--instances=N` each variant is built N times (N models, N optimizers,
N compiled steps), every instance is timed in every round, and a variant's
time in a round is the geometric mean of its instances': two identical bare
steps in one process can differ by about 3% for the whole run (README "Run
16"), which more rounds do not average away and more instances do. The
first-call table gives each variant's first instance.

    python benchmarks/bench_train_step.py
    python benchmarks/bench_train_step.py --quick
    python benchmarks/bench_train_step.py --models=mlp,cnn --modes=xla --instances=3 \
        --variants=bare,guard,guard_ce10 --rounds=21
"""

from __future__ import annotations

import gc
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(models.NAMES), "Models (models.py; also: " + ", ".join(models.OPTIONAL_NAMES) + ").")
flags.DEFINE_list("modes", ["graph", "xla"], "graph: jit_compile=False; xla: jit_compile=True.")
flags.DEFINE_list("variants", ["bare", "guard", "guard_ce10", "guard_cb"],
                  "Variants; a guard variant may name its package: guard@guardedopt_candidate.")
flags.DEFINE_integer("rounds", 9, "Interleaved rounds (one fit call per variant per round).")
flags.DEFINE_integer("steps", 0, "Timed steps per fit call (0: chosen from a ~0.3 s target).")
flags.DEFINE_float("block_s", 0.3, "Target duration of one fit call when --steps=0.")
flags.DEFINE_integer("instances", 1,
                     "Models built per variant, all timed interleaved; a variant's time in a round is the "
                     "geometric mean of its instances' (two identical steps in one process can differ by "
                     "about 3% for the whole run: README \"Run 16\").", lower_bound=1)
flags.DEFINE_integer("threads", 1, "TF intra- and inter-op threads (0: TF default).")
flags.DEFINE_bool("quick", False, "mlp under XLA only, bare/guard/guard_ce10, 3 rounds (< 1 minute).")
flags.DEFINE_string("tag", "", "Suffix of the result files (results/train_step<tag>.*).")


def run_group(model_name, mode, variants, rounds):
    import numpy as np

    jit = mode == "xla"
    keys = {v: [common.instance_key(v, i) for i in range(FLAGS.instances)] for v in variants}
    everything = [k for v in variants for k in keys[v]]
    built = {}
    compile_s = {}
    for variant in variants:
        for key in keys[variant]:
            t0 = time.perf_counter()
            model, data, callbacks = models.compiled_variant(model_name, variant, jit)
            common.fit_block(model, data, callbacks, 2)  # trace, compile, warm up
            compile_s[key] = time.perf_counter() - t0
            built[key] = (model, data, callbacks)
    if FLAGS.steps > 0:
        steps = FLAGS.steps
    else:
        slowest = max(common.fit_block(*built[k], 3)[0] for k in everything)
        steps = int(max(3, min(50, round(FLAGS.block_s * 1e3 / max(slowest, 1e-3)))))
    wall = {k: [] for k in everything}
    cpu = {k: [] for k in everything}
    for r in range(rounds):
        for k in common.round_order(everything, r):
            w, c = common.fit_block(*built[k], steps)
            wall[k].append(w)
            cpu[k].append(c)
    stats = common.summarize_instances(wall, cpu, "bare", keys)
    rows = []
    for v in variants:
        model = built[v][0]
        params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
        row = dict(model=model_name, mode=mode, variant=v, params=params, steps_per_block=steps,
                   compile_s=round(compile_s[v], 2), instances=FLAGS.instances)
        row.update(stats[v])
        rows.append(row)
    del built
    gc.collect()
    return rows, stats


def main(argv):
    del argv
    common.quiet_tensorflow()
    threads = common.configure_threads(FLAGS.threads)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    model_names, modes, variants, rounds = FLAGS.models, FLAGS.modes, FLAGS.variants, FLAGS.rounds
    if FLAGS.quick:
        model_names, modes, rounds, variants = ["mlp"], ["xla"], 3, ["bare", "guard", "guard_ce10"]
        FLAGS.block_s = min(FLAGS.block_s, 0.15)
    meta = dict(machine=common.machine_info(), threads=threads, argv=sys.argv, quick=FLAGS.quick,
                rounds=rounds)
    print(f"machine: {meta['machine'].get('Model name')} ({meta['machine'].get('CPU(s)')} CPUs), "
          f"TF {tf.__version__}, threads {threads}", flush=True)
    started = time.perf_counter()
    all_rows, groups = [], {}
    for mode in modes:
        for model_name in model_names:
            t0 = time.perf_counter()
            rows, stats = run_group(model_name, mode, variants, rounds)
            all_rows += rows
            groups[f"{model_name}/{mode}"] = stats
            print(f"  {model_name:10s} {mode:5s} bare {stats['bare']['median_ms']:8.3f} ms/step  " + "  ".join(
                f"{v} {common.fmt_ratio(stats[v])}" for v in variants if v != "bare")
                + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
            if FLAGS.instances > 1:
                print("    instance medians (ms): " + "  ".join(
                    f"{r['variant']} " + "/".join(f"{t:.2f}" for t in r["instance_median_ms"]) for r in rows))
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    stem = "train_step" + (FLAGS.tag or ("_quick" if FLAGS.quick else ""))
    paths = common.write_rows(all_rows, stem, meta)
    text = report(all_rows, variants)
    paths["md"] = common.save_text(text, stem)
    paths["png"] = common.ratio_chart(
        groups, os.path.join(common.RESULTS_DIR, stem + ".png"),
        "fit step time / bare Adam (median of interleaved rounds, IQR)",
        [v for v in variants if v != "bare"], bars=(1.01, 1.03))
    print(f"\nwrote {', '.join(p for p in paths.values() if p)}  ({meta['elapsed_s']} s)")


def report(rows, variants):
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["mode"]), {})[r["variant"]] = r
    headers = ["model", "mode", "params", "bare ms/step"] + [f"{v} ratio [IQR]" for v in variants if v != "bare"] \
        + [f"{v} cpu ratio" for v in variants if v != "bare"]
    table = []
    for (model, mode), vs in by.items():
        cells = [model, mode, f"{vs['bare']['params']:,}", f"{vs['bare']['median_ms']:.2f}"]
        cells += [common.fmt_ratio(vs.get(v)) for v in variants if v != "bare"]
        cells += [f"{vs[v]['cpu_ratio_median']:.3f}" if v in vs else "-" for v in variants if v != "bare"]
        table.append(cells)
    text = common.print_table(headers, table, "fit step time relative to bare Adam (wall, median of per-round ratios [IQR])")
    text += "\n" + first_call_table(by, variants)
    lines = []
    for (model, mode), vs in by.items():
        if mode != "xla" or model not in ("mlp", "cnn"):
            continue
        for variant, label, bar in (("guard", "check_every=1", 3), ("guard_ce10", "check_every=10", 1)):
            if variant in vs:
                lines.append(f"{model} xla {label}: {overhead_verdict(vs[variant], bar)}")
    if lines:
        print("\n".join(lines))
        text += "\n\n### Bar (train step, XLA)\n\n" + "\n".join("- " + x for x in lines)
    return text


def overhead_verdict(stats, bar_percent):
    """"+3.6% [96% CI +0.2..+7.1%] (bar <= 3%: ...)" for a variant's `summarize` stats (`common.bar_verdict`)."""
    low, high, coverage = stats["ratio_ci"]
    over = (stats["ratio_median"] - 1) * 100
    verdict = common.bar_verdict(stats["ratio_ci"], 1 + bar_percent / 100)
    return (f"{over:+.1f}% [{coverage:.0%} CI {(low - 1) * 100:+.1f}..{(high - 1) * 100:+.1f}%] "
            f"(bar <= {bar_percent}%: {verdict})")


def first_call_table(by, variants):
    """Seconds of each variant's first fit call (build, trace, compile, 2 steps), and / bare."""
    table = []
    for (model, mode), vs in by.items():
        bare = vs["bare"]["compile_s"]
        cells = [model, mode, f"{bare:.1f}"]
        cells += [common.fmt_first_call(vs[v]["compile_s"] if v in vs else None, bare)
                  for v in variants if v != "bare"]
        table.append(cells)
    return common.print_table(
        ["model", "mode", "bare s"] + [f"{v} s (/ bare)" for v in variants if v != "bare"], table,
        "first fit call: build, trace, compile and 2 steps (seconds, once per variant; not interleaved; one measurement each, so drift in the machine lands on single variants: bench_startup.py repeats fresh processes)")


if __name__ == "__main__":
    app.run(main)
