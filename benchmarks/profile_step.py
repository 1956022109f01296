"""Where the guard's time goes: XLA:CPU kernel (thunk) times of one train step.

For each variant, a `tf.function(jit_compile=True)` train step of a model of
`models.py` (forward, `GradientTape`, `optimizer.apply`) is run under
`tf.profiler`. XLA:CPU records each kernel it runs (a "thunk": a fusion, a
matmul, a copy, a conditional) under its HLO instruction name, and the
optimized HLO maps each name to the TF op that made it. Each kernel is
counted as:

  model   forward, backward and loss
  update  the inner optimizer's own update (its name scope; under the guard
          that includes the masked writes)
  guard   everything else the guard adds: gradient sums, samples, checks, state
  other   kernels XLA made without a TF op (copies, split reductions)

and by the thread that ran it (`caller`: the thread that called the step;
`pool`: TF's intra-op pool, to which XLA:CPU's executor hands half of its
ready kernels when more are ready than its split threshold). The
variants are profiled in interleaved sessions (A B … B A …), so that the
machine's drift stays out of their comparison. The profiler adds its own
cost to each kernel, so the sums are larger than unprofiled steps; the
counts, the classes and the threads are what to read. Unprofiled wall
times of the same steps, interleaved, are printed beside them, with their
CPU time over wall time (about 1: one thread busy at a time).

    python benchmarks/profile_step.py --variants=bare,guard,guard_warn,abl_skip
    taskset -c 0 python benchmarks/profile_step.py          # one core
    python benchmarks/profile_step.py --threads=0           # TF's thread pools
"""

from __future__ import annotations

import collections
import functools
import glob
import os
import re
import shutil
import statistics
import sys
import tempfile

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "mlp", models.NAMES, "A model of models.py.")
flags.DEFINE_list("variants", ["bare", "guard", "guard_warn", "abl_skip"],
                  "bare, a guard variant of common.GUARD_VARIANTS or an ablation; the first is the baseline.")
flags.DEFINE_integer("steps", 300, "Profiled steps per variant.", lower_bound=10)
flags.DEFINE_integer("profile_rounds", 3, "Interleaved profiler sessions the steps are split into.",
                     lower_bound=1)
flags.DEFINE_integer("rounds", 15, "Interleaved rounds of unprofiled timing (0: none).", lower_bound=0)
flags.DEFINE_integer("threads", 1, "TF intra- and inter-op threads (0: TF default).", lower_bound=0)
flags.DEFINE_integer("top", 12, "Guard kernels listed per variant, longest first.", lower_bound=0)
flags.DEFINE_string("tag", "", "Suffix of the result files (results/profile_step<tag>.*).")

CLASSES = ("model", "update", "guard", "other")
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"')


def build_step(model_name, variant):
    """The compiled step, its inputs, and the optimizer's and inner optimizer's names."""
    import keras
    import tensorflow as tf

    model, loss_fn, data = models.build_model(model_name)
    x, y = next(iter(data))
    inner = keras.optimizers.Adam(1e-3)
    optimizer = common.guarded_optimizer(variant, inner)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return step, (x, y), optimizer.name, inner.name


def classify_instructions(hlo_text, outer, inner):
    """HLO instruction name -> class, from the TF op name in its metadata."""
    classes = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, op = match.groups()
        scopes = op.split("/")
        if scopes[0].startswith(inner) or (scopes[0].startswith(outer) and len(scopes) > 1
                                           and scopes[1].startswith(inner)):
            classes[name] = "update"
        elif scopes[0].startswith(outer) and outer != inner:
            classes[name] = "guard"
        elif op != "XLA_Args":
            classes[name] = "model"
    return classes


def profiled_kernels(step, args, steps, log_dir):
    """[(event name, thread, µs)] of `steps` profiled calls."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    tf.profiler.experimental.start(log_dir)
    for _ in range(steps):
        out = step(*args)
    float(out)
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    kernels = []
    for plane in space.planes:
        names = {key: value.name for key, value in plane.event_metadata.items()}
        for line in plane.lines:
            thread = "pool" if "Eigen" in line.name else "caller"
            for event in line.events:
                kernels.append((names.get(event.metadata_id, ""), thread, event.duration_ps / 1e6))
    return kernels


def prepare(model_name, variant):
    """The compiled, warmed-up step of `variant`, its inputs and its kernels' classes."""
    step, args, outer, inner = build_step(model_name, variant)
    for _ in range(30):  # compile, warm up
        out = step(*args)
    float(out)
    hlo = step.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
    entry = hlo[hlo.index("\nENTRY"):]
    return dict(step=step, args=args, classes=classify_instructions(hlo, outer, inner),
                instructions=set(re.findall(r"^\s*(?:ROOT )?%(\S+) = ", entry, re.M)))


def interleaved_profiles(prepared, steps, rounds):
    """Each variant's profiled kernels, `steps` calls in all, in `rounds` interleaved sessions.

    Profiling the variants A B … B A … instead of one after the other keeps
    the machine's drift out of their comparison.
    """
    kernels = {v: [] for v in prepared}
    names = list(prepared)
    for r in range(rounds):
        for v in (names if r % 2 == 0 else names[::-1]):
            log_dir = tempfile.mkdtemp(prefix="guardedopt_profile_")
            try:
                kernels[v] += profiled_kernels(prepared[v]["step"], prepared[v]["args"],
                                               steps // rounds, log_dir)
            finally:
                shutil.rmtree(log_dir, ignore_errors=True)
    return kernels


def kernel_row(model_name, variant, kernels, prepared, steps):
    """Per-step kernel count and µs by class and thread; the longest guard kernels."""
    classes, instructions = prepared["classes"], prepared["instructions"]
    by_class, by_thread, by_name, count = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for name, thread, us in kernels:
        # Host events (TFE_*, ThunkExecutor::Execute, "end: ...") name no
        # instruction; kernels of conditional branches are not in the entry
        # computation but carry a TF op name.
        if name not in instructions and name not in classes:
            continue
        count += 1
        by_class[classes.get(name, "other")] += us / steps
        by_thread[thread] += us / steps
        by_name[name] += us / steps
    guard_top = [(n, round(us, 1)) for n, us in by_name.most_common() if classes.get(n) == "guard"]
    return dict(model=model_name, variant=variant, kernels_per_step=round(count / steps, 1),
                kernel_us=round(sum(by_class.values()), 1),
                **{f"{c}_us": round(by_class[c], 1) for c in CLASSES},
                caller_us=round(by_thread["caller"], 1), pool_us=round(by_thread["pool"], 1),
                guard_top=guard_top[: FLAGS.top])


def main(argv):
    del argv
    common.quiet_tensorflow()
    threads = common.configure_threads(FLAGS.threads)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    prepared = {v: prepare(FLAGS.model, v) for v in FLAGS.variants}
    steps = FLAGS.steps // FLAGS.profile_rounds * FLAGS.profile_rounds
    kernels = interleaved_profiles(prepared, steps, FLAGS.profile_rounds)
    rows = [kernel_row(FLAGS.model, v, kernels[v], prepared[v], steps) for v in FLAGS.variants]
    if FLAGS.rounds:
        timed = common.interleaved(
            {v: functools.partial(p["step"], *p["args"]) for v, p in prepared.items()},
            baseline=FLAGS.variants[0], rounds=FLAGS.rounds, inner=40, warmup=0)
        for row in rows:
            wall = timed[row["variant"]]
            row.update(wall_ms=round(wall["median_ms"], 3), wall_ratio=round(wall["ratio_median"], 3),
                       cpu_per_wall=round(statistics.median(
                           c / w for c, w in zip(wall["cpu_ms"], wall["wall_ms"])), 2))
    headers = ["variant", "kernels/step", "kernel µs", "model", "update", "guard", "other",
               "caller", "pool", "wall ms", f"wall / {rows[0]['variant']}", "cpu / wall"]
    table = [[r["variant"], r["kernels_per_step"], r["kernel_us"], r["model_us"], r["update_us"],
              r["guard_us"], r["other_us"], r["caller_us"], r["pool_us"], r.get("wall_ms", "-"),
              r.get("wall_ratio", "-"), r.get("cpu_per_wall", "-")] for r in rows]
    text = common.print_table(
        headers, table,
        f"{FLAGS.model}: XLA:CPU kernel µs per profiled step, by class and thread "
        f"(threads {threads}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    for r in rows:
        if r["guard_top"]:
            line = f"{r['variant']} guard kernels: " + ", ".join(f"{n} {us}" for n, us in r["guard_top"])
            print(line)
            text += "\n\n" + line
    meta = dict(machine=common.machine_info(), threads=threads, argv=sys.argv,
                xla_flags=os.environ.get("XLA_FLAGS", ""), steps=steps,
                profile_rounds=FLAGS.profile_rounds, rounds=FLAGS.rounds)
    stem = "profile_step" + FLAGS.tag
    paths = common.write_rows(rows, stem, meta)
    paths["md"] = common.save_text(text, stem)
    print(f"\nwrote {', '.join(paths.values())}")


if __name__ == "__main__":
    app.run(main)
