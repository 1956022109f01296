"""Ablations: the guard's compiled step with all but one part removed.

They answer "where does the guard's time go?" with interleaved timings
instead of guesses. Each is a `GuardedOptimizer` (of the package a variant
names, `abl_skip@guardedopt_candidate`) whose step keeps only:

  abl_mask  the inner update with its writes masked by a flag read from the
            guard's state: the cost of masking alone (no check).
  abl_sums  one plain sum per gradient (`checks.propagating_sum`),
            recorded in the state, with the update masked by the state
            flag as in abl_mask: the sums' own cost, without making the
            update wait for them.
  abl_skip  the exact NaN/Inf skip alone: the same sums, with the update
            masked by their verdict. Every exact skip of a whole step pays
            this: no write may start before every gradient has been read.

They override a private method of the package and are not for training:
only `abl_skip` is safe (it skips non-finite steps and checks nothing else).
"""

from __future__ import annotations

PARTS = ("abl_mask", "abl_sums", "abl_skip")


def make(part: str, module, inner):
    """An ablation optimizer of `module` (a guardedopt package) around `inner`.

    Raises:
        ValueError: `part` is not one of `PARTS`.
    """
    if part not in PARTS:
        raise ValueError(f"`part` must be one of {PARTS}. Received: part={part!r}")
    return _ablation_class(module)(inner, _ablation_part=part)


def _ablation_class(module):
    import tensorflow as tf

    assign_all = module.optimizer._assign_all
    gradient_values = module.checks.gradient_values  # IndexedSlices: the rows they carry
    # The library's own sum (a dot with ones); a package from before it: reduce_sum.
    propagating_sum = getattr(module.checks, "propagating_sum", tf.reduce_sum)

    class AblatedGuard(module.GuardedOptimizer):
        def __init__(self, inner, _ablation_part, **options):
            super().__init__(inner, **options)
            self._ablation_part = _ablation_part

        @tf.autograph.experimental.do_not_convert
        def _guarded_step(self, grads, variables):
            state = self._state_views()
            changes = dict(guard_step=state["guard_step"] + 1)
            skip = state["pending_raise"] > 0  # never true here: nothing raises
            if self._ablation_part != "abl_mask":
                finite = tf.reduce_all(
                    tf.stack([tf.math.is_finite(propagating_sum(gradient_values(g))) for g in grads])
                )
                nonfinite = tf.logical_not(finite)
                changes["skipped_steps_total"] = state["skipped_steps_total"] + tf.cast(
                    nonfinite, tf.int64
                )
                if self._ablation_part == "abl_skip":
                    skip = nonfinite
            self._apply_unless(skip, grads, variables)
            assign_all(self._packed_updates(state, changes))

    return AblatedGuard
