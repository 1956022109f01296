"""`GuardCallback`: the host boundary of `model.fit`.

It reads the guard state once per batch end (the step itself never syncs with
the host), raises `GuardError` for checks with policy "raise", logs new
findings (once, then rate-limited) and adds the guard's figures to `logs`, so
they show in Keras' progress bar. A read is one op per packed state vector,
and a persistent finding is not rebuilt every batch (`GuardedOptimizer.check`),
so the per-batch cost stays flat over a long run (`benchmarks/bench_long_fit.py`).
With `compile(steps_per_execution=N)` Keras calls it once per N batches; the
checks inside the step run on every step regardless.
"""

from __future__ import annotations

import os
from typing import Optional

import keras
import numpy as np

from guardedopt.optimizer import GuardedOptimizer


def find_guard(optimizer) -> Optional[GuardedOptimizer]:
    """The `GuardedOptimizer` in a chain of wrappers (e.g. a LossScaleOptimizer)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, GuardedOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
        seen += 1
    return None


class GuardCallback(keras.callbacks.Callback):
    """Surfaces what the `GuardedOptimizer` of the model found during `fit`.

    Args:
        log_dir: If set, TensorBoard summaries (guard counters, per-variable
            effective step and gradient norm) are written there.
        summary_every: Write summaries every N steps (int >= 1): at the end of
            the first batch at or past each multiple of N, so with
            `steps_per_execution=k` once per N steps too (at the next multiple
            of k).
        histograms: Also write histograms of the per-variable step ratios.

    Raises:
        ValueError: At construction, for a bad argument; at
            `on_train_begin`, if the model's optimizer is not guarded.
    """

    def __init__(self, log_dir: Optional[str] = None, summary_every: int = 100, histograms: bool = False):
        super().__init__()
        from guardedopt.validation import check_int

        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(f"`log_dir` must be None or a path (str). Received: log_dir={log_dir!r}")
        if not isinstance(histograms, (bool, np.bool_)):
            raise ValueError(f"`histograms` must be a bool. Received: histograms={histograms!r}")
        self.log_dir = log_dir
        self.summary_every = check_int("summary_every", summary_every, minimum=1)
        self.histograms = bool(histograms)
        self._guard = None
        self._writer = None
        self._summary_block = 0  # guard_step // summary_every at the last write

    def on_train_begin(self, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        self._guard = find_guard(optimizer)
        if self._guard is None:
            raise ValueError(
                "GuardCallback needs a model compiled with a GuardedOptimizer, e.g. "
                "`model.compile(optimizer=guardedopt.GuardedOptimizer('adam'), ...)`. "
                f"Received: optimizer={type(getattr(self.model, 'optimizer', None)).__name__}"
            )
        # Under "mixed_float16" Keras wraps the guard in a LossScaleOptimizer:
        # let the guard read that scaler's scale for `loss_scale_at_floor`.
        self._guard._watch_outer(optimizer)
        if self.log_dir:
            from guardedopt import summaries

            self._writer = summaries.SummaryWriter(self.log_dir, histograms=self.histograms)
            step = int(self._guard.guard_step.numpy()) if self._guard.built else 0
            self._summary_block = step // self.summary_every

    def on_train_batch_end(self, batch, logs=None):
        guard = self._guard
        if guard is None or not guard.built:
            return
        guard.check()  # reads the state once; raises or logs what it found
        state = guard._last_state
        if logs is not None:
            logs["guard_skipped"] = int(state["skipped_steps_total"])
        # Once per multiple of `summary_every` passed: with
        # `steps_per_execution` the batch ends land on every k-th step only.
        block = int(state["guard_step"]) // self.summary_every
        if self._writer is not None and block > self._summary_block:
            self._summary_block = block
            self._writer.write(guard, state)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
