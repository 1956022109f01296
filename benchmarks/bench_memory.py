"""Memory overhead of GuardedOptimizer: its own state, and transient copies during a step.

Three measurements, as a function of the parameter count and the number of
variables:

1. Guard state: bytes of the guard's own variables (not the inner optimizer's
   slots), counted from the built optimizer. It should grow with the number of
   variables only, not with their size.
2. XLA transient memory: `XLA_FLAGS=--xla_dump_to=...` buffer assignment of the
   compiled `apply` step (a subprocess, so the flag takes effect). From the
   `*memory-usage-report.txt` of each module (the worker compiles while part 3
   runs here: neither is timed, and each process has its own allocator): the "preallocated-temp"
   allocation, i.e. the scratch memory the step needs beyond its parameters
   (variables, slots, gradients) and outputs (aliased to the variables). We
   report it in bytes and in "copies of the parameters" (temp / 4·params).
3. Peak allocator bytes during steps (XLA and plain `tf.function`): TF's
   CPU allocator (a BFC allocator; XLA:CPU takes its temporaries from it
   too) counts the bytes it hands out. `tf.config.experimental.
   reset_memory_stats("CPU:0")` after two warm-up steps, then five steps;
   the peak of `get_memory_info("CPU:0")` minus the bytes in use before
   them is the memory the step needs beyond what the process already holds
   (for 10^7 float32 parameters in 1 and 10 variables: 40 MB per array).
   It sees what part 2 predicts for the compiled step, e.g. the copies of
   `nonfinite_weights="skip"`, and what plain graphs allocate, which part 2
   does not cover. The allocator gives a large array a whole region when
   splitting it would leave less than the array (a 40 MB array of a fresh
   64 MiB region counts 64 MiB), so a figure can be up to twice the
   bytes asked for: memory the process does hold. Peak RSS, measured here before,
   read 0 for every variant: the allocator reuses what the warm-up freed.

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --quick
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["10000", "100000", "1000000", "10000000"], "Parameter counts of part 2.")
flags.DEFINE_list("nvars", ["1", "10", "100"], "Variable counts (parts 1 and 2 at --nvars_size).")
flags.DEFINE_integer("nvars_size", 1_000_000, "Parameter count of the variable-count sweep.")
flags.DEFINE_list("variants", ["bare", "guard", "guard_ce10", "guard_skipw", "lso"], "Variants.")
flags.DEFINE_integer("peak_size", 10_000_000, "Parameter count of part 3, peak allocator bytes (0: skip it).")
flags.DEFINE_integer("threads", 1, "TF threads.")
flags.DEFINE_bool("quick", False, "bare and guard only, 1e6 parameters in 1 variable, no part 3.")
flags.DEFINE_string("tag", "", "Suffix of the result files (results/memory<tag>.*).")
flags.DEFINE_string("worker", "", "Internal: run the XLA-dump worker with this JSON spec.")


def _optimizer(variant):
    import keras

    inner = keras.optimizers.Adam(1e-3)
    if variant == "lso":
        return keras.optimizers.LossScaleOptimizer(inner)
    return common.guarded_optimizer(variant, inner)


def guard_state_bytes(optimizer):
    """(count, bytes) of the guard's own variables (excluding the inner optimizer's)."""
    import numpy as np

    inner_ids = {id(v) for v in optimizer.inner_optimizer.variables}
    own = [v for v in optimizer.variables if id(v) not in inner_ids]
    total = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in own)
    return len(own), total


def _step_fn(opt, variables, name):
    def step(g):
        opt.apply(g, variables)
        return opt.iterations

    step.__name__ = name
    return step


# ------------------------------------------------------------------ part 1
def part_state(nvars_list, sizes):
    import keras

    rows = []
    for size in sizes:
        for nvars in nvars_list:
            variables, _ = common.random_parameters(size, nvars)
            opt = _optimizer("guard")
            opt.build(variables)
            count, nbytes = guard_state_bytes(opt)
            inner_bytes = sum(int(v.numpy().nbytes) for v in opt.inner_optimizer.variables)
            rows.append(dict(part="state", size=size, nvars=nvars, guard_variables=count,
                             guard_state_bytes=nbytes, bytes_per_variable=round(nbytes / nvars, 1),
                             param_bytes=4 * size, inner_slot_bytes=inner_bytes,
                             fraction_of_params=nbytes / (4 * size)))
            del variables, opt
            keras.backend.clear_session()
    return rows


# ------------------------------------------------------------------ part 2
def worker(spec):
    """Compiles one `apply` step per (size, nvars, variant) under XLA; dumps go to XLA_FLAGS."""
    import tensorflow as tf

    common.quiet_tensorflow()
    common.configure_threads(1)
    for size, nvars, variant in spec["configs"]:
        variables, grads = common.random_parameters(size, nvars)
        opt = _optimizer(variant)
        opt.build(variables)
        name = f"memstep_{variant}_{size}_{nvars}"

        fn = tf.function(_step_fn(opt, variables, name), jit_compile=True)
        fn(grads)
        print("compiled", name, flush=True)


def parse_reports(dump_dir):
    """module function name -> dict(total_bytes, temp_bytes) from the memory-usage reports."""
    out = {}
    for path in glob.glob(os.path.join(dump_dir, "*memory-usage-report.txt")):
        match = re.search(r"a_inference_(memstep_[a-z0-9_]+?)_\d+__", os.path.basename(path))
        if not match:
            continue
        text = open(path).read()
        total = re.search(r"Total bytes used: (\d+)", text)
        temp = re.search(r"allocation \d+: size ([\d.]+)([KMG]?i?B), preallocated-temp", text)
        temp_bytes = 0
        if temp:
            value, unit = float(temp.group(1)), temp.group(2)
            temp_bytes = int(value * {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit])
        out[match.group(1)] = dict(total_bytes=int(total.group(1)) if total else None, temp_bytes=temp_bytes)
    return out


def start_part_xla(configs):
    """Starts the XLA-dump worker on `configs` and returns at once: (process, dump dir, log file).

    The worker compiles with one thread, so `main` runs part 3 meanwhile:
    neither part is timed, and each process's allocator is its own.
    """
    dump = tempfile.mkdtemp(prefix="guardedopt_hlo_")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(dict(configs=configs))]
    # A file, not a pipe: nobody reads a pipe while part 3 runs, and a full one would stall the worker.
    log = tempfile.TemporaryFile(mode="w+")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), dump, log


def finish_part_xla(started, configs):
    """Waits for the worker of `start_part_xla` and returns part 2's rows."""
    proc, dump, log = started
    if proc.wait() != 0:
        log.seek(0)
        print(log.read()[-6000:], file=sys.stderr)
        raise RuntimeError("XLA dump worker failed")
    reports = parse_reports(dump)
    rows = []
    for size, nvars, variant in configs:
        r = reports.get(f"memstep_{variant}_{size}_{nvars}", {})
        temp = r.get("temp_bytes")
        rows.append(dict(part="xla_buffers", size=size, nvars=nvars, variant=variant,
                         total_bytes=r.get("total_bytes"), temp_bytes=temp,
                         temp_param_copies=None if temp is None else round(temp / (4 * size), 3)))
    return rows


def stop_part_xla(started):
    """Kills the worker of `start_part_xla` if it still runs (main failed first); removes its files."""
    proc, dump, log = started
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()
    shutil.rmtree(dump, ignore_errors=True)


# ------------------------------------------------------------------ part 3
def allocator_bytes():
    """(bytes in use, peak bytes in use) of TF's CPU allocator, or None if TF does not report them."""
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:  # a TF whose CPU allocator keeps no statistics
        return None
    return info["current"], info["peak"]


def peak_extra_bytes(step, grads, steps=5):
    """Peak allocator bytes during `steps` calls of `step(grads)` beyond those in use before; None if unknown."""
    import tensorflow as tf

    if allocator_bytes() is None:
        return None
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = allocator_bytes()
    for _ in range(steps):
        step(grads).numpy()
    return allocator_bytes()[1] - before[0]


def part_peak(size, nvars_list, variants):
    import gc

    import keras
    import tensorflow as tf

    rows = []
    for mode in ("graph", "xla"):
        for nvars in nvars_list:
            for variant in variants:
                variables, grads = common.random_parameters(size, nvars)
                opt = _optimizer(variant)
                opt.build(variables)
                step = tf.function(_step_fn(opt, variables, "peak_step"), jit_compile=(mode == "xla"))
                for _ in range(2):
                    step(grads).numpy()
                gc.collect()
                extra = peak_extra_bytes(step, grads)
                rows.append(dict(part="peak", mode=mode, size=size, nvars=nvars, variant=variant,
                                 peak_extra_bytes=extra,
                                 peak_param_copies=None if extra is None else round(extra / (4 * size), 3)))
                del step, opt, variables, grads
                gc.collect()
                keras.backend.clear_session()
    return rows


def main(argv):
    del argv
    if FLAGS.worker:
        worker(json.loads(FLAGS.worker))
        return
    common.quiet_tensorflow()
    threads = common.configure_threads(FLAGS.threads)
    sizes = [int(float(s)) for s in FLAGS.sizes]
    nvars_list = [int(n) for n in FLAGS.nvars]
    peak_size = FLAGS.peak_size
    variants = FLAGS.variants
    if FLAGS.quick:
        sizes, nvars_list, variants, peak_size = [1_000_000], [1], ["bare", "guard"], 0
    meta = dict(machine=common.machine_info(), threads=threads, argv=sys.argv, quick=FLAGS.quick)
    started = time.perf_counter()

    configs = [(s, 1, v) for s in sizes for v in variants]
    configs += [(FLAGS.nvars_size, n, v) for n in nvars_list if n != 1 for v in variants]
    worker_started = start_part_xla(configs)
    try:
        rows, text, xla_rows = _measure(worker_started, configs, sizes, nvars_list, variants, peak_size)
    finally:
        stop_part_xla(worker_started)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    stem = "memory" + (FLAGS.tag or ("_quick" if FLAGS.quick else ""))
    paths = common.write_rows(rows, stem, meta)
    paths["md"] = common.save_text(text, stem)
    paths["png"] = chart(xla_rows, os.path.join(common.RESULTS_DIR, stem + ".png"))
    print(f"\nwrote {', '.join(p for p in paths.values() if p)}  ({meta['elapsed_s']} s)")


def _measure(worker_started, configs, sizes, nvars_list, variants, peak_size):
    """Parts 1 and 3 here while part 2's worker compiles; returns (rows, Markdown text, part 2's rows)."""
    rows = part_state(nvars_list, [FLAGS.nvars_size])
    text = common.print_table(
        ["params", "vars", "guard variables", "guard state bytes", "bytes / variable", "inner slot bytes"],
        [[f"{r['size']:.0e}", r["nvars"], r["guard_variables"], f"{r['guard_state_bytes']:,}",
          r["bytes_per_variable"], f"{r['inner_slot_bytes']:,}"] for r in rows],
        "1. guard state (permanent): bytes of the guard's own variables")
    small = part_state([1], sizes)
    text += "\n" + common.print_table(
        ["params", "vars", "guard state bytes", "param bytes"],
        [[f"{r['size']:.0e}", r["nvars"], f"{r['guard_state_bytes']:,}", f"{r['param_bytes']:,}"] for r in small],
        "1b. guard state vs parameter count (1 variable)")
    rows += small

    peak_rows = part_peak(peak_size, [1, 10], variants) if peak_size else []
    xla_rows = finish_part_xla(worker_started, configs)
    rows += xla_rows + peak_rows
    text += "\n" + common.print_table(
        ["params", "vars", "variant", "XLA temp bytes", "temp / param bytes", "total bytes"],
        [[f"{r['size']:.0e}", r["nvars"], r["variant"], f"{r['temp_bytes']:,}" if r["temp_bytes"] is not None else "-",
          r["temp_param_copies"], f"{r['total_bytes']:,}" if r["total_bytes"] else "-"] for r in xla_rows],
        "2. XLA transient memory of one apply() step (buffer assignment, preallocated temp)")
    if peak_rows:
        text += "\n" + common.print_table(
            ["mode", "params", "vars", "variant", "peak bytes beyond those held", "/ param bytes"],
            [[r["mode"], f"{r['size']:.0e}", r["nvars"], r["variant"],
              f"{r['peak_extra_bytes'] / 2**20:.1f} MiB" if r["peak_extra_bytes"] is not None else "-",
              r["peak_param_copies"]] for r in peak_rows],
            "3. peak of TF's CPU allocator over 5 steps (after warm-up), beyond the bytes in use before them")
    return rows, text, xla_rows


def chart(xla_rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in sorted({r["variant"] for r in xla_rows}):
        pts = sorted((r["size"], r["temp_param_copies"]) for r in xla_rows
                     if r["variant"] == variant and r["nvars"] == 1 and r["temp_param_copies"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (1 variable)")
    ax.set_ylabel("XLA temp buffer / parameter bytes")
    ax.set_title("transient memory of one apply() step (XLA buffer assignment)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    app.run(main)
