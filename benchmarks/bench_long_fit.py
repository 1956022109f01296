"""Long `fit` runs with `GuardCallback`: does the per-batch cost grow with the steps?

`GuardCallback` reads the guard state after every batch. This benchmark runs
the MLP of `models.py` for `--steps` batches and reports the step time in
each tenth of the run, relative to bare Adam in the same tenth, for two
learning rates: 1e-3 (no finding) and 1e-10 (a tiny-step finding that
persists for the whole run, the case the library exists for). The run is cut
into ten `fit` calls per variant, interleaved (bare, guard, ... in an order
that rotates each tenth); the optimizer and its host-side history carry over
from one call to the next. A cost that grows with the steps shows as a ratio
that grows from the first tenth to the last.

    python benchmarks/bench_long_fit.py                  # 5,000 steps
    python benchmarks/bench_long_fit.py --quick          # 1,000 steps
    PYTHONPATH=/tmp/base python benchmarks/bench_long_fit.py \\
        --variants=bare,guard_cb,guard_cb@guardedopt_base   # A/B a renamed copy
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 5_000, "Batches per variant and learning rate.", lower_bound=100)
flags.DEFINE_list("learning_rates", ["1e-3", "1e-10"], "Adam learning rates (1e-10: a persistent tiny-step finding).")
flags.DEFINE_list("variants", ["bare", "guard", "guard_cb"],
                  "Variants (bare is the baseline); a guard variant may name its package: guard_cb@guardedopt_base.")
flags.DEFINE_string("model", "mlp", "Model of models.py.")
flags.DEFINE_integer("threads", 1, "TF intra- and inter-op threads (0: TF default).", lower_bound=0)
flags.DEFINE_bool("quick", False, "1,000 steps.")
flags.DEFINE_string("tag", "", "Suffix of the result files (results/long_fit<tag>.*).")

TENTHS = 10


def run(learning_rate, variants, steps):
    """Per-tenth median ms/step of each variant, and the guard's history length."""
    built = {v: models.compiled_variant(FLAGS.model, v, True, learning_rate) for v in variants}
    for v in variants:
        common.fit_block(*built[v], 2)  # trace, compile, warm up
    chunk = steps // TENTHS
    ms = {v: [] for v in variants}
    for tenth in range(TENTHS):
        order = variants[tenth % len(variants):] + variants[: tenth % len(variants)]
        for v in order:
            ms[v].append(common.fit_block(*built[v], chunk - 1)[0])
    history = {v: len(getattr(built[v][0].optimizer, "_history", [])) for v in variants}
    return ms, history


def main(argv):
    del argv
    common.quiet_tensorflow()
    threads = common.configure_threads(FLAGS.threads)
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # the 1e-10 run's finding is logged once; keep the output short
    steps = 1_000 if FLAGS.quick else FLAGS.steps
    variants = FLAGS.variants
    if "bare" not in variants:
        raise app.UsageError("--variants must include bare, the baseline")
    meta = dict(machine=common.machine_info(), threads=threads, argv=sys.argv, steps=steps)
    started = time.perf_counter()
    rows, table = [], []
    for lr_text in FLAGS.learning_rates:
        ms, history = run(float(lr_text), variants, steps)
        for v in variants:
            ratios = [m / b for m, b in zip(ms[v], ms["bare"])]
            rows.append(dict(model=FLAGS.model, learning_rate=float(lr_text), variant=v, steps=steps,
                             ms_per_tenth=ms[v], ratio_per_tenth=ratios, history_points=history[v]))
            table.append([lr_text, v, f"{ms[v][0]:.2f}", f"{ms[v][-1]:.2f}",
                          " ".join(f"{r:.2f}" for r in ratios), history[v] if v != "bare" else "-"])
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    text = common.print_table(
        ["learning rate", "variant", "ms/step, first tenth", "ms/step, last tenth",
         "/ bare, tenth by tenth", "history points kept"], table,
        f"{FLAGS.model} under XLA, {steps:,} steps in ten interleaved fit calls per variant "
        f"(median ms/step of each tenth; ratio to bare Adam in the same tenth)")
    stem = "long_fit" + (FLAGS.tag or ("_quick" if FLAGS.quick else ""))
    paths = common.write_rows(rows, stem, meta)
    paths["md"] = common.save_text(text, stem)
    print(f"\nwrote {', '.join(paths.values())}  ({meta['elapsed_s']} s)")


if __name__ == "__main__":
    app.run(main)
