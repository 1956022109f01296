"""Runs the whole benchmark suite: optimizer-only (with 1 thread and with TF's
default threads), train step, memory.

    python benchmarks/run_suite.py                 # full suite
    python benchmarks/run_suite.py --quick         # about a minute
    python benchmarks/run_suite.py --tag=_run2     # results/*_run2.*

Each benchmark runs in its own process (one after the other, never in
parallel: they time the same CPUs). The Markdown tables of all parts are
collected in results/suite<tag>.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Quick versions of every benchmark.")
flags.DEFINE_string("tag", "", "Suffix of the result files.")
flags.DEFINE_integer("threads", 1, "TF intra- and inter-op threads.")
flags.DEFINE_list("only", ["optimizer", "optimizer_tf_threads", "train_step", "memory"],
                  "Benchmarks to run (also, not in the default list: startup, the first fit call in fresh "
                  "processes, about 2 minutes for the three small models; long_fit, GuardCallback over "
                  "5,000 steps, about 5 minutes; train_step_bars, the two models of the train-step bar "
                  "with 3 instances per variant and 21 rounds, about 4 minutes: README \"Run 16\").")

# name: (script, result-file suffix, arguments). `optimizer_tf_threads`
# repeats the optimizer-only XLA Adam matrix with TensorFlow's default thread
# pools (`--threads=0`, what a user runs; it overrides `--threads`): with one
# intra-op thread XLA:CPU runs the bare update on the caller and one pool
# thread, but the guarded one, which waits on its gradient check first, on the
# pool thread alone (README "Threads").
PARTS = dict(
    optimizer=("bench_optimizer.py", "", []),
    optimizer_tf_threads=("bench_optimizer.py", "_tf_threads", [
        "--threads=0", "--modes=xla", "--inners=adam", "--sizes=1000000,10000000",
        "--nvars=1,10,100", "--variants=bare,guard,lso", "--checks_alone=false"]),
    train_step=("bench_train_step.py", "", []),
    memory=("bench_memory.py", "", []),
    startup=("bench_startup.py", "", ["--threads=0"]),  # what users start with
    long_fit=("bench_long_fit.py", "", []),
    # One instance per variant cannot decide a 3% bar: two identical bare
    # steps differed by 2.9% for a whole run (README "Run 16"). Three
    # instances average that offset down; they decided the MLP's bar in two
    # of three runs there.
    train_step_bars=("bench_train_step.py", "_bars", [
        "--models=mlp,cnn", "--modes=xla", "--variants=bare,guard,guard_ce10", "--instances=3",
        "--rounds=21"]),
)


def main(argv):
    del argv
    here = os.path.dirname(os.path.abspath(__file__))
    suffix = FLAGS.tag or ("_quick" if FLAGS.quick else "")
    started = time.perf_counter()
    parts = []
    names = FLAGS.only
    if FLAGS.quick and not FLAGS["only"].present:
        # Its quick matrix (one variable) has nothing to show; the minute is tight.
        names = [n for n in names if n != "optimizer_tf_threads"]
    for name in names:
        script, part_suffix, arguments = PARTS[name]
        cmd = [sys.executable, os.path.join(here, script), f"--threads={FLAGS.threads}"] + arguments
        if FLAGS.quick:
            cmd.append("--quick")
        if part_suffix or FLAGS.tag:
            cmd.append(f"--tag={part_suffix}{suffix}")
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        rc = subprocess.call(cmd, env=env)
        elapsed = time.perf_counter() - t0
        print(f"=== {name}: exit {rc}, {elapsed:.0f} s", flush=True)
        md = os.path.join(common.RESULTS_DIR, f"{script[len('bench_'):-len('.py')]}{part_suffix}{suffix}.md")
        if os.path.exists(md):
            parts.append(f"## {name} ({elapsed:.0f} s)\n\n" + open(md).read())
    total = time.perf_counter() - started
    path = os.path.join(common.RESULTS_DIR, f"suite{suffix}.md")
    with open(path, "w") as f:
        f.write(f"# guardedopt benchmark suite{suffix} ({total:.0f} s)\n\n" + "\n\n".join(parts))
    print(f"\nsuite done in {total:.0f} s: {path}")


if __name__ == "__main__":
    app.run(main)
