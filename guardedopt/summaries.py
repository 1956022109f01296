"""TensorBoard summaries of the guard state, written at host boundaries."""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf


def _tag(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", path)


class SummaryWriter:
    """Writes guard counters and per-variable figures as TensorBoard scalars.

    Args:
        log_dir: The TensorBoard log directory.
        histograms: Also write a histogram of the per-variable step ratios.
    """

    def __init__(self, log_dir: str, histograms: bool = False):
        try:
            import tensorboard  # noqa: F401  (tf.summary needs it to write)
        except ImportError:
            raise ImportError(
                "GuardCallback(log_dir=...) writes TensorBoard summaries and needs "
                "the tensorboard package: pip install 'guardedopt[tensorboard]'"
            ) from None
        self._writer = tf.summary.create_file_writer(log_dir)
        self._histograms = histograms

    def write(self, guard, state) -> None:
        step = int(state["guard_step"])
        with self._writer.as_default(step=step):
            tf.summary.scalar("guard/skipped_steps_total", int(state["skipped_steps_total"]))
            tf.summary.scalar("guard/skipped_steps_consecutive", int(state["skipped_steps_consecutive"]))
            tf.summary.scalar("guard/findings", int((state["event_count"] > 0).any(axis=1).sum()))
            ratios = state["last_step_ratio"]
            norms = state["last_gradient_norm"]
            for path, ratio, norm in zip(guard._variable_paths, ratios, norms):
                if ratio >= 0:
                    tf.summary.scalar(f"step_ratio/{_tag(path)}", float(ratio))
                if norm >= 0:
                    tf.summary.scalar(f"gradient_norm/{_tag(path)}", float(norm))
            if self._histograms and (ratios >= 0).any():
                tf.summary.histogram("guard/step_ratio", np.log10(np.maximum(ratios[ratios >= 0], 1e-30)))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
