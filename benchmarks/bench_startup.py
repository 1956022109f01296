"""Start-up cost: the first `model.fit` call (trace, compile, one step), guarded vs bare.

Each measurement runs in a fresh process (the first call of a process,
with nothing else built before it, as a user's script has it), repeated
`--reps` times with the variants in an order that rotates from repetition
to repetition; the table gives medians. The first-call tables of the other
benchmarks measure each variant once, in one process after the variants
built before it, so one drift of the machine (ResNet50 there: bare 28.9 s,
guard 76.9 s; fresh processes here 38.6-47.5 s and 68.1-82.1 s) lands on
one variant. Each worker builds the model of `models.py`, compiles it with
the variant's optimizer and times its first `fit` call of one step (wall
and process CPU time), then a second one-step call (the step itself, to
tell the step from the compile).

    python benchmarks/bench_startup.py                          # mlp, cnn, embedding
    python benchmarks/bench_startup.py --models=resnet50 --reps=3

`--threads` defaults to 0 (TensorFlow's own thread pools), which is what
users start with; the other benchmarks default to one thread for steadier
step times.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(models.NAMES), "Models (models.py; also: " + ", ".join(models.OPTIONAL_NAMES) + ").")
flags.DEFINE_list("modes", ["xla"], "xla: jit_compile=True; graph: jit_compile=False.")
flags.DEFINE_list("variants", ["bare", "guard", "guard_ce10"],
                  "Variants; a guard variant may name its package: guard@guardedopt_candidate.")
flags.DEFINE_integer("reps", 2, "Fresh processes per model, mode and variant.", lower_bound=1)
flags.DEFINE_integer("threads", 0, "TF intra- and inter-op threads (0: TF default).", lower_bound=0)
flags.DEFINE_bool("quick", False, "mlp only, bare and guard, one repetition.")
flags.DEFINE_string("tag", "", "Suffix of the result files (results/startup<tag>.*).")
flags.DEFINE_string("worker", "", "Internal: measure one model,mode,variant and print a JSON line.")


def measure(model_name, mode, variant):
    """Seconds (wall, CPU) of the first and the second one-step `fit` call."""
    model, data, callbacks = models.compiled_variant(model_name, variant, mode == "xla")
    result = dict(model=model_name, mode=mode, variant=variant)
    for name in ("first", "second"):
        wall, cpu = time.perf_counter(), time.process_time()
        model.fit(data, epochs=1, steps_per_epoch=1, verbose=0, callbacks=callbacks)
        result[f"{name}_wall_s"] = time.perf_counter() - wall
        result[f"{name}_cpu_s"] = time.process_time() - cpu
    return result


def run_worker(model_name, mode, variant):
    cmd = [sys.executable, os.path.abspath(__file__), f"--threads={FLAGS.threads}",
           f"--worker={model_name},{mode},{variant}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise RuntimeError(f"start-up worker failed: {model_name} {mode} {variant}")
    return json.loads(lines[-1])


def summarize(results, model_names, modes, variants):
    """Rows of medians per (model, mode, variant), with ratios to bare's medians."""
    rows = []
    for model_name, mode in ((m, mode) for m in model_names for mode in modes):
        medians = {}
        for variant in variants:
            runs = [r for r in results if (r["model"], r["mode"], r["variant"]) == (model_name, mode, variant)]
            medians[variant] = {k: statistics.median(r[k] for r in runs)
                                for k in ("first_wall_s", "first_cpu_s", "second_wall_s")}
            medians[variant]["runs_first_wall_s"] = [round(r["first_wall_s"], 2) for r in runs]
        for variant in variants:
            m = medians[variant]
            rows.append(dict(model=model_name, mode=mode, variant=variant, reps=len(m["runs_first_wall_s"]),
                             first_wall_s=round(m["first_wall_s"], 2), first_cpu_s=round(m["first_cpu_s"], 2),
                             second_wall_s=round(m["second_wall_s"], 3),
                             first_wall_ratio=round(m["first_wall_s"] / medians["bare"]["first_wall_s"], 3),
                             extra_wall_s=round(m["first_wall_s"] - medians["bare"]["first_wall_s"], 2),
                             runs_first_wall_s=m["runs_first_wall_s"]))
    return rows


def report(rows, variants):
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["mode"]), {})[r["variant"]] = r
    table = []
    for (model_name, mode), vs in by.items():
        bare = vs["bare"]
        cells = [model_name, mode, f"{bare['first_wall_s']:.1f} (cpu {bare['first_cpu_s']:.1f})"]
        for v in variants:
            if v != "bare":
                r = vs[v]
                cells.append(f"{common.fmt_first_call(r['first_wall_s'], bare['first_wall_s'])} "
                             f"{r['extra_wall_s']:+.1f} s (cpu {r['first_cpu_s']:.1f})")
        cells.append(" / ".join(f"{vs[v]['second_wall_s'] * 1e3:.0f}" for v in variants))
        table.append(cells)
    headers = (["model", "mode", "bare s"] + [f"{v} s (/ bare) extra" for v in variants if v != "bare"]
               + ["2nd call ms (" + " / ".join(variants) + ")"])
    return common.print_table(
        headers, table, "first fit call (trace, compile, one step), median over fresh processes")


def main(argv):
    del argv
    if FLAGS.worker:
        common.quiet_tensorflow()
        common.configure_threads(FLAGS.threads)
        model_name, mode, variant = FLAGS.worker.split(",")
        print(json.dumps(measure(model_name, mode, variant)), flush=True)
        return
    model_names, modes, variants, reps = FLAGS.models, FLAGS.modes, FLAGS.variants, FLAGS.reps
    if FLAGS.quick:
        model_names, modes, variants, reps = ["mlp"], ["xla"], ["bare", "guard"], 1
    meta = dict(machine=common.machine_info(), threads=FLAGS.threads, argv=sys.argv, quick=FLAGS.quick, reps=reps)
    started = time.perf_counter()
    results = []
    for rep in range(reps):
        order = variants[rep % len(variants):] + variants[: rep % len(variants)]
        for model_name in model_names:
            for mode in modes:
                for variant in order:
                    r = run_worker(model_name, mode, variant)
                    results.append(r)
                    print(f"  rep {rep} {model_name:10s} {mode:5s} {variant:12s} first {r['first_wall_s']:6.1f} s "
                          f"(cpu {r['first_cpu_s']:6.1f})  second {r['second_wall_s'] * 1e3:7.1f} ms", flush=True)
    rows = summarize(results, model_names, modes, variants)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    stem = "startup" + (FLAGS.tag or ("_quick" if FLAGS.quick else ""))
    paths = common.write_rows(rows, stem, meta)
    paths["md"] = common.save_text(report(rows, variants), stem)
    print(f"\nwrote {', '.join(p for p in paths.values() if p)}  ({meta['elapsed_s']} s)")


if __name__ == "__main__":
    app.run(main)
