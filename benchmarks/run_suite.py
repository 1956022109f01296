"""Runs the whole benchmark suite: optimizer-only, train step, memory.

    python benchmarks/run_suite.py                 # full suite
    python benchmarks/run_suite.py --quick         # about a minute
    python benchmarks/run_suite.py --tag=_run2     # results/*_run2.*

Each benchmark runs in its own process (one after the other, never in
parallel: they time the same CPUs). The Markdown tables of all three are
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
flags.DEFINE_list("only", ["optimizer", "train_step", "memory"], "Benchmarks to run.")

SCRIPTS = dict(optimizer="bench_optimizer.py", train_step="bench_train_step.py", memory="bench_memory.py")


def main(argv):
    del argv
    here = os.path.dirname(os.path.abspath(__file__))
    suffix = FLAGS.tag or ("_quick" if FLAGS.quick else "")
    started = time.perf_counter()
    parts = []
    for name in FLAGS.only:
        cmd = [sys.executable, os.path.join(here, SCRIPTS[name]), f"--threads={FLAGS.threads}"]
        if FLAGS.quick:
            cmd.append("--quick")
        if FLAGS.tag:
            cmd.append(f"--tag={FLAGS.tag}")
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        rc = subprocess.call(cmd, env=env)
        elapsed = time.perf_counter() - t0
        print(f"=== {name}: exit {rc}, {elapsed:.0f} s", flush=True)
        md = os.path.join(common.RESULTS_DIR, f"{name}{suffix}.md")
        if os.path.exists(md):
            parts.append(f"## {name} ({elapsed:.0f} s)\n\n" + open(md).read())
    total = time.perf_counter() - started
    path = os.path.join(common.RESULTS_DIR, f"suite{suffix}.md")
    with open(path, "w") as f:
        f.write(f"# guardedopt benchmark suite{suffix} ({total:.0f} s)\n\n" + "\n\n".join(parts))
    print(f"\nsuite done in {total:.0f} s: {path}")


if __name__ == "__main__":
    app.run(main)
