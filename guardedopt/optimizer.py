"""`GuardedOptimizer`: a transparent guard around any Keras 3 optimizer.

Design in one paragraph. The gradient flags (NaN/Inf, all zero) are read
before the update, from plain sums and a fixed sample of each large variable,
with the exact check in a conditional taken only when those cannot decide
(`checks`). The inner optimizer's `apply` then always runs, with its math
untouched and no `cond` around it under XLA or `tf.distribute` (keras#17429):
a step known to be skipped is skipped by masking every write the inner
optimizer makes (`_writes_masked`), which XLA fuses into the update's own
loops, so no copy of any weight or slot is kept. In a plain graph the update
runs in a `cond` branch instead. Only a skip decided after the update
(`nonfinite_weights="skip"`, "raise" of the step checks) and `tf.distribute`
keep the pre-update values and write them back (`_restore`). The step checks
compare a sample of each variable read just before the update with the same
entries after it.
All decisions and counters live in two packed optimizer variables; the host
reads them at boundaries (`GuardCallback`, `check()`, `report()`, the end of
`fit`).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras.src.optimizers import base_optimizer
from keras.src.utils import tracking

from guardedopt import checks
from guardedopt import findings as F
from guardedopt.state import PackedLayout
from guardedopt.validation import IGNORE, RAISE, SKIP, WARN, check_float, check_int, check_policy

# Rows of the per-variable event tables, in this order. Stable: they are saved.
EVENT_ROWS = (
    F.ZERO_GRADIENT,
    F.NONFINITE_GRADIENT,
    F.NONFINITE_WEIGHTS,
    F.TINY_STEP,
    F.LARGE_STEP,
    "below_resolution",
)
_ROW = {code: i for i, code in enumerate(EVENT_ROWS)}
# Rows of the consecutive-step table.
STREAK_ROWS = (F.ZERO_GRADIENT, F.TINY_STEP, F.LARGE_STEP)
_STREAK = {code: i for i, code in enumerate(STREAK_ROWS)}

_STEP_POLICIES = (IGNORE, WARN, RAISE)  # checks that cannot usefully skip

# The host keeps at most this many points of history (one per host read).
# When full, every second point is dropped: a long run keeps its whole span
# at a coarser resolution, and its memory and `report()` stay bounded.
_HISTORY_POINTS = 4096

DEFAULTS = dict(
    none_gradient=WARN,
    zero_gradient=WARN,
    nonfinite_gradient=SKIP,
    nonfinite_weights=WARN,
    tiny_step=WARN,
    large_step=WARN,
    min_step=1e-6,
    max_step=1.0,
    step_epsilon=1e-3,
    patience=10,
    max_consecutive_skips=10,
    check_every=1,
    weights_check_every=10,
    log_interval_seconds=60.0,
)

HINTS = {
    F.NONE_GRADIENT: (
        "these variables are not connected to the loss: check that they are used "
        "in the forward pass, that no `tf.stop_gradient`/`.numpy()`/NumPy op breaks "
        "the graph, and that the tape watches them"
    ),
    F.ZERO_GRADIENT: (
        "the gradient is exactly 0: look for dead ReLUs (try LeakyReLU or a "
        "smaller learning rate), `argmax`/`round`/`cast` or `stop_gradient` in the "
        "loss path, or a loss that does not fit the output activation"
    ),
    F.NONFINITE_GRADIENT: (
        "find the op that makes NaN/Inf: log/sqrt/division of 0, an overflowing "
        "exp, NaN in the inputs or labels; lower the learning rate or add "
        "`clipnorm`; in float16 use a LossScaleOptimizer"
    ),
    F.NONFINITE_WEIGHTS: (
        "the update itself overflowed: lower the learning rate, add `clipnorm`, "
        "raise the optimizer's `epsilon`, or keep the weights in float32"
    ),
    F.TINY_STEP: (
        "the weights barely move: raise the learning rate (typical Adam: 1e-4..1e-2, "
        "SGD: 1e-3..1e-1), check a learning-rate schedule that decayed to ~0, and "
        "normalise the inputs; with a usual rate the gradient itself is tiny (a "
        "converged fit, a vanishing gradient, or a bias before a normalization "
        "layer, which cancels it: `use_bias=False` there), and a larger rate is "
        "not the fix"
    ),
    F.LARGE_STEP: (
        "steps this large diverge: lower the learning rate, add warm-up or "
        "`clipnorm`, and normalise the inputs"
    ),
    F.LOSS_SCALE_AT_FLOOR: (
        "the gradients stay NaN/Inf however small the loss scale: this is a real "
        "NaN/Inf, not a float16 overflow. Look for log/sqrt/division of 0 or NaN "
        "in the inputs or labels; keep layers that overflow float16 (large logits, "
        "a final softmax) in float32 with `dtype='float32'`; lower the learning rate"
    ),
}

# A dynamic loss scale at or below this has stopped helping: the scaler keeps
# halving it because the gradients stay non-finite.
LOSS_SCALE_FLOOR = 1.0
# `check` reads the findings decided on the host (class balance, loss scale) at
# most this often (or every `log_interval_seconds`, if shorter).
_HOST_FINDINGS_EVERY_SECONDS = 1.0
# `ClassBalancer.build`: the class counts, the labels seen, the invalid-label
# count and the first invalid value.
_BALANCER_VARIABLES = 4


class GuardError(RuntimeError):
    """Raised at a host boundary when a check with policy `"raise"` fired.

    Attributes:
        findings: The findings that caused it.
        step: The guard step at which it fired.
    """

    def __init__(self, message: str, findings: Sequence[F.Finding] = (), step: int = 0):
        super().__init__(message)
        self.findings = list(findings)
        self.step = step


def _variable_path(variable) -> str:
    return getattr(variable, "path", None) or variable.name


def _unwrap_value(variable):
    """The backend `tf.Variable` behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def _accumulates_only(optimizer) -> Optional[tf.Tensor]:
    """Whether this call of `optimizer.apply` only accumulates (Keras' rule); None without accumulation."""
    steps = getattr(optimizer, "gradient_accumulation_steps", None)
    if not steps:
        return None
    calls = tf.convert_to_tensor(_unwrap_value(optimizer._iterations))  # pylint: disable=protected-access
    return tf.not_equal((calls + 1) % steps, 0)


def _stored_shapes(store) -> List[tuple]:
    """The shapes of a `save_own_variables` store's values, in order (h5py datasets or arrays)."""
    return [tuple(np.shape(store[str(i)])) for i in range(len(store.keys()))]


def _host_read(variable) -> np.ndarray:
    """A variable's value on the host, from one read op where that is exact.

    `GuardCallback` reads the two packed state vectors after every batch.
    `keras.ops.convert_to_numpy` runs a read and an identity op per variable
    and converts through `__array__`: about 130 µs for the two of them
    against 21 µs for a bare `ReadVariableOp` (TF 2.21, CPU). A distributed
    variable takes Keras' path, which knows how to read it.
    """
    value = _unwrap_value(variable)
    if isinstance(value, tf.Variable) and not isinstance(value, tf.distribute.DistributedValues):
        return tf.raw_ops.ReadVariableOp(resource=value.handle, dtype=value.dtype).numpy()
    return keras.ops.convert_to_numpy(variable)


def _in_xla_context() -> bool:
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))
    except (ImportError, AttributeError):  # pragma: no cover - private API moved
        return False


def _distributed() -> bool:
    """Whether the step runs under a strategy whose variables are distributed.

    A one-replica `MirroredStrategy` counts: its optimizer writes go to the
    component variables in a `merge_call`, past any mask on the mirrored
    variable. `OneDeviceStrategy` keeps plain variables and does not count.
    """
    if not tf.distribute.has_strategy():
        return False
    strategy = tf.distribute.get_strategy()
    return not isinstance(strategy, tf.distribute.OneDeviceStrategy)


def _strategy_classes(*paths):
    classes = []
    for path in paths:
        module = tf
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, type):
            classes.append(module)
    return tuple(classes)


_PARAMETER_SERVER_STRATEGIES = _strategy_classes(
    "distribute.experimental.ParameterServerStrategy",
    "compat.v1.distribute.experimental.ParameterServerStrategy",
)
_TPU_STRATEGIES = _strategy_classes(
    "distribute.TPUStrategy",
    "distribute.experimental.TPUStrategy",
    "compat.v1.distribute.experimental.TPUStrategy",
)


def _check_strategy_supported() -> None:
    """Rejects the `tf.distribute` strategies the guard does not support.

    Raises:
        ValueError: Under a ParameterServerStrategy (asynchronous updates: the
            workers cannot agree on a skip, and restoring a skipped step would
            overwrite other workers' updates) or a TPUStrategy (not tested on
            TPU hardware; see the README's "Distributed and mixed precision").
    """
    if not tf.distribute.has_strategy():
        return
    strategy = tf.distribute.get_strategy()
    name = type(strategy).__name__
    if _PARAMETER_SERVER_STRATEGIES and isinstance(strategy, _PARAMETER_SERVER_STRATEGIES):
        raise ValueError(
            f"GuardedOptimizer does not support {name}: parameter-server training "
            "applies each worker's update asynchronously, so the workers cannot agree "
            "on skipping a step, and restoring a skipped step would overwrite updates "
            "that other workers made meanwhile. Use MirroredStrategy or "
            "MultiWorkerMirroredStrategy (synchronous), or the bare inner optimizer."
        )
    if _TPU_STRATEGIES and isinstance(strategy, _TPU_STRATEGIES):
        raise ValueError(
            f"GuardedOptimizer does not support {name} yet: it has not been tested on "
            "TPU hardware (int64 guard state, per-replica agreement and the restore "
            "path are unverified there). Use the bare inner optimizer on TPU, or "
            "MirroredStrategy/MultiWorkerMirroredStrategy on GPUs/CPUs."
        )


def _reject_unknown_arguments(kwargs) -> None:
    """Raises the ValueError for keyword arguments `GuardedOptimizer` does not take.

    A base-optimizer argument (`clipnorm`, `learning_rate`, ...) belongs on the
    inner optimizer; anything else is named with the guard's options, and the
    closest of them when it looks like a misspelling.
    """
    base = set(inspect.signature(base_optimizer.BaseOptimizer.__init__).parameters) - {"self", "kwargs", "name"}
    misplaced = sorted(k for k in kwargs if k in base)
    if misplaced:
        raise ValueError(
            f"GuardedOptimizer does not take base-optimizer arguments {misplaced}: set "
            "them on the inner optimizer, e.g. "
            "`GuardedOptimizer(keras.optimizers.Adam(clipnorm=1.0))`."
        )
    options = [p for p in inspect.signature(GuardedOptimizer.__init__).parameters if p not in ("self", "kwargs")]
    unknown = sorted(kwargs)
    close = {k: difflib.get_close_matches(k, options, n=1) for k in unknown}
    hints = "".join(f" Did you mean `{m[0]}` for `{k}`?" for k, m in close.items() if m)
    raise ValueError(
        f"GuardedOptimizer got unknown argument(s) {unknown}.{hints} Allowed: "
        f"{', '.join(options)}; base-optimizer arguments go on the inner optimizer."
    )


def _nonfinite_where(flag, gradient):
    """`gradient` made NaN where the scalar `flag` holds (bits kept otherwise)."""
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values
        return tf.IndexedSlices(
            tf.where(flag, tf.constant(np.nan, values.dtype), values),
            gradient.indices,
            gradient.dense_shape,
        )
    return tf.where(flag, tf.constant(np.nan, gradient.dtype), gradient)


def _unchanged_delta(dtype, sign: float) -> tf.Tensor:
    """The delta that leaves every value's bits as they are: x + (-0.0), x - (+0.0)."""
    if tf.as_dtype(dtype).is_floating:
        return tf.constant(sign * 0.0, dtype)
    return tf.zeros([], dtype)


def _masked_write_methods(variable, skip, original):
    """Replacements for `variable`'s write methods that change nothing where `skip`.

    Each writes through `original[name]` what the caller asked for, except
    that under `skip` it writes the current value back (`assign`,
    `scatter_update`) or adds a signed zero that keeps every bit
    (`assign_add`, `scatter_add`: -0.0; `assign_sub`, `scatter_sub`: +0.0).
    Without `skip` the written value is the caller's, bit for bit.
    """
    dtype = variable.dtype

    def dense(value):
        return tf.convert_to_tensor(value, dtype_hint=dtype) if not isinstance(value, tf.Tensor) else value

    def sparse(delta, replace_values):
        return tf.IndexedSlices(replace_values, delta.indices, delta.dense_shape)

    def assign(value, *args, **kwargs):
        value = tf.cast(dense(value), dtype)
        return original["assign"](tf.where(skip, variable.read_value(), value), *args, **kwargs)

    def shifted(name, sign):
        def write(delta, *args, **kwargs):
            delta = tf.cast(dense(delta), dtype)
            return original[name](tf.where(skip, _unchanged_delta(dtype, sign), delta), *args, **kwargs)
        return write

    def scatter_update(delta, *args, **kwargs):
        current = tf.gather(variable, delta.indices)
        values = tf.where(skip, current, tf.cast(delta.values, dtype))
        return original["scatter_update"](sparse(delta, values), *args, **kwargs)

    def scatter_shifted(name, sign):
        def write(delta, *args, **kwargs):
            values = tf.where(skip, _unchanged_delta(dtype, sign), tf.cast(delta.values, dtype))
            return original[name](sparse(delta, values), *args, **kwargs)
        return write

    return {
        "assign": assign,
        "assign_add": shifted("assign_add", -1.0),
        "assign_sub": shifted("assign_sub", 1.0),
        "scatter_update": scatter_update,
        "scatter_add": scatter_shifted("scatter_add", -1.0),
        "scatter_sub": scatter_shifted("scatter_sub", 1.0),
    }


_MASKED_WRITES = ("assign", "assign_add", "assign_sub", "scatter_update", "scatter_add", "scatter_sub")


class _WriteMasks:
    """The masks open on one variable, and the dispatchers that apply them.

    While any mask is open the variable's write methods are shadowed by
    dispatchers. A write applies the innermost open mask made in its own
    scope (`_mask_scope`) and passes the rest through unmasked: another
    thread's writes, or another graph's trace, are not masked by this step.
    """

    def __init__(self, variable):
        self.variable = variable  # keeps `id(variable)` from being reused
        self.shadowed = {n: variable.__dict__[n] for n in _MASKED_WRITES if n in variable.__dict__}
        self.unmasked = {n: getattr(variable, n) for n in _MASKED_WRITES}
        self.open: List[_Mask] = []  # outermost first
        for name in _MASKED_WRITES:
            object.__setattr__(variable, name, _bound_below(self, None, name))

    def write_below(self, mask, name, *args, **kwargs):
        """Writes through the innermost mask of this scope opened before `mask` (None: any)."""
        scopes = _current_scopes()
        method = self.unmasked[name]
        with _MASKS_LOCK:
            index = len(self.open) if mask is None else next(
                i for i, m in enumerate(self.open) if m is mask)
            for opened in reversed(self.open[:index]):
                if opened.scope in scopes:  # graphs by identity, threads by id
                    method = opened.methods[name]
                    break
        return method(*args, **kwargs)

    def restore(self):
        for name in _MASKED_WRITES:
            self.variable.__dict__.pop(name, None)
        for name, method in self.shadowed.items():
            object.__setattr__(self.variable, name, method)


class _Mask:
    """One open `_writes_masked` block on one variable: its scope and write methods."""

    def __init__(self, scope):
        self.scope = scope
        self.methods = {}


_MASKS_LOCK = threading.RLock()
_OPEN_MASKS: Dict[int, _WriteMasks] = {}
_EAGER_SHARED = object()  # the scope of eager writes under a strategy (`_mask_scope`)


def _mask_scope():
    """What a mask made here applies to: the graph being traced; eagerly, this thread.

    Eagerly under a strategy the scope is shared: `MirroredStrategy` runs the
    replica function in a thread of its own and the optimizer's writes in a
    `merge_call` on the main thread. In a graph the merge call enters the
    replica's graph, so the graph is the scope there.
    """
    if not tf.executing_eagerly():
        return tf.compat.v1.get_default_graph()
    return _EAGER_SHARED if tf.distribute.has_strategy() else threading.get_ident()


def _current_scopes():
    """The scopes a write made here is in: this graph, the graphs it is nested in, this thread.

    A graph traced inside an eager block (a `tf.function` the inner optimizer
    calls) is in that block's scope too.
    """
    scopes = [_EAGER_SHARED, threading.get_ident()]
    graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
    while graph is not None:
        scopes.append(graph)
        graph = getattr(graph, "outer_graph", None)
    return scopes


@contextlib.contextmanager
def _writes_masked(variables, skip):
    """Within this block, this step's writes to `variables` keep the old values where `skip`.

    This is how a step known to be skipped before the update (non-finite
    gradients, a pending raise) is skipped in a compiled step: the inner
    optimizer runs unconditionally and every assignment it makes is masked
    where it is made. Under XLA the mask fuses into the update's own loop, and
    the optimizer's later reads (Adam reads `m` after writing it) see the
    masked value, so no pre-update copy of any variable is needed. A
    select after the update instead makes XLA recompute the new slots from
    copies of the old ones (measured: 2.8x bare Adam).

    Writes through the `tf.Variable` methods (which Keras' `Variable.assign*`,
    `Optimizer.assign*`, weight decay, EMA and the iteration counter all use)
    are masked; raw resource ops on the handle would not be. Instance
    attributes shadow the methods while any block is open on the variable;
    they mask only the writes of this block's scope (`_mask_scope`), so a
    second thread's writes, or a second guarded step traced at the same time
    in another thread, are not touched.
    """
    scope = _mask_scope()
    opened = []
    try:
        for variable in variables:
            variable = _unwrap_value(variable)
            with _MASKS_LOCK:
                masks = _OPEN_MASKS.get(id(variable))
                if masks is None:
                    masks = _OPEN_MASKS[id(variable)] = _WriteMasks(variable)
                if any(m is masks for m, _ in opened):
                    continue  # listed twice
                mask = _Mask(scope)
                below = {n: _bound_below(masks, mask, n) for n in _MASKED_WRITES}
                mask.methods = _masked_write_methods(variable, skip, below)
                masks.open.append(mask)
                opened.append((masks, mask))
        yield
    finally:
        with _MASKS_LOCK:
            for masks, mask in opened:
                masks.open = [m for m in masks.open if m is not mask]
                if not masks.open:
                    masks.restore()
                    del _OPEN_MASKS[id(masks.variable)]


def _bound_below(masks, mask, name):
    """`name` as written beneath `mask` (None: above every mask): through the masks opened before it, or unmasked."""
    def write(*args, **kwargs):
        return masks.write_below(mask, name, *args, **kwargs)
    return write


def _assign_all(pairs):
    """Assigns `value` to each `variable`, replica-safely under `tf.distribute`.

    Under a strategy the guard state and model variables are mirrored; they are
    updated through `extended.update` in a merge call, as Keras' own optimizer
    does, with identical values on every replica.
    """
    if not pairs:
        return
    if not _distributed() or tf.distribute.in_cross_replica_context():
        for variable, value in pairs:
            _unwrap_value(variable).assign(tf.cast(value, variable.dtype))
        return

    def merge_fn(distribution, values):
        for (variable, _), value in zip(pairs, values):
            distribution.extended.update(
                _unwrap_value(variable),
                lambda var, val: var.assign(tf.cast(val, var.dtype)),
                args=(value,),
                group=False,
            )

    tf.__internal__.distribute.interim.maybe_merge_call(
        merge_fn, tf.distribute.get_strategy(), [value for _, value in pairs]
    )


# Base-optimizer settings that, assigned on a constructed guard, go to the
# optimizer that applies them (`GuardedOptimizer.__setattr__`). Reading them on
# the guard gives the guard's own: its `build` reads them (an EMA of the guard
# would be a second copy of the weights).
_INNER_SETTINGS = frozenset((
    "use_ema", "ema_momentum", "ema_overwrite_frequency", "gradient_accumulation_steps",
))


def _forwarded_setting(name):
    """A base-optimizer setting read from and written to the optimizer that applies it.

    The guard's own step never reads it. Keras' constructor assigns its default
    before the inner optimizer exists; that assignment is dropped.
    """
    def read(self):
        return getattr(self._updating_optimizer, name) if "inner_optimizer" in self.__dict__ else None

    def write(self, value):
        if "inner_optimizer" in self.__dict__:
            setattr(self._updating_optimizer, name, value)

    return property(read, write, doc=f"The inner optimizer's `{name}` (get and set).")


# Keras 3.15+ (absent before): optimizers that dispatch variables to others.
_MULTI_OPTIMIZERS = tuple(
    c for c in (getattr(keras.optimizers, "MultiOptimizer", None),) if c is not None
)

# The guard's counters are int64 in the compiled step.
_MAX_COUNT = 2**63 - 1


def _check_count(name):
    return lambda value: check_int(name, value, minimum=1, maximum=_MAX_COUNT)


_OPTION_CHECKS = dict(
    none_gradient=lambda value: check_policy("none_gradient", value, _STEP_POLICIES),
    zero_gradient=lambda value: check_policy("zero_gradient", value, _STEP_POLICIES),
    nonfinite_gradient=lambda value: check_policy("nonfinite_gradient", value),
    nonfinite_weights=lambda value: check_policy("nonfinite_weights", value),
    tiny_step=lambda value: check_policy("tiny_step", value, _STEP_POLICIES),
    large_step=lambda value: check_policy("large_step", value, _STEP_POLICIES),
    min_step=lambda value: check_float("min_step", value, minimum=0.0),
    max_step=lambda value: check_float("max_step", value, minimum=0.0, min_inclusive=False),
    step_epsilon=lambda value: check_float("step_epsilon", value, minimum=0.0, min_inclusive=False),
    patience=_check_count("patience"),
    max_consecutive_skips=_check_count("max_consecutive_skips"),
    check_every=_check_count("check_every"),
    weights_check_every=_check_count("weights_check_every"),
    log_interval_seconds=lambda value: check_float("log_interval_seconds", value, minimum=0.0),
)


def validate_option(name: str, value: Any) -> Any:
    """Validates one of the guard's options alone; returns it normalised.

    Raises:
        ValueError: Naming the argument, what is allowed and the value received.
    """
    return _OPTION_CHECKS[name](value)


def validate_options(**options) -> Dict[str, Any]:
    """Validates the guard's options; returns them normalised.

    Raises:
        ValueError: Naming the argument, what is allowed and the value received.
    """
    valid = {name: validate_option(name, options[name]) for name in _OPTION_CHECKS}
    if valid["max_step"] <= valid["min_step"]:
        raise ValueError(
            "`max_step` must be greater than `min_step`. Received: "
            f"max_step={options['max_step']!r}, min_step={options['min_step']!r}"
        )
    return valid


def _state_layouts(n: int):
    """The packed layouts of the guard state for `n` variables: (counters, measurements).

    Counters (int64): step and skip counters, the pending raise (0 = none,
    else 1 + event row), and per-variable event tables (count, first and last
    step; -1 before the first event) and streaks. Measurements (float32): the
    last measured step ratio and gradient norm, and the extreme ratios seen
    (-1 = not measured).
    """
    rows = len(EVENT_ROWS)
    counters = PackedLayout(
        [(name, (), 0) for name in _SCALAR_COUNTERS]
        + [
            ("event_count", (rows, n), 0),
            ("event_first_step", (rows, n), -1),
            ("event_last_step", (rows, n), -1),
            ("streak", (len(STREAK_ROWS), n), 0),
        ]
    )
    measurements = PackedLayout(
        [
            ("last_step_ratio", (n,), -1.0),
            ("last_gradient_norm", (n,), -1.0),
            ("extreme_step_ratio", (2, n), -1.0),
        ]
    )
    return counters, measurements


_SCALAR_COUNTERS = (
    "guard_step", "skipped_steps_total", "skipped_steps_consecutive", "last_good_step",
    "pending_raise", "pending_raise_step", "loss_scale_overflow_steps",
)


def _state_view(name):
    """A read-only property: the current value of one packed state field."""

    def read(self):
        for layout, variable in self._packed_state():
            if name in layout.names:
                return layout.views(_unwrap_value(variable).read_value())[name]
        raise AttributeError(name)

    return property(read, doc=f"The guard's `{name}` (a tensor; read-only view of the packed state).")


@keras.saving.register_keras_serializable(package="guardedopt")
class GuardedOptimizer(keras.optimizers.Optimizer):
    """Wraps any Keras optimizer and checks every step from inside the step.

    With no fault present the weights and the inner optimizer's variables are
    bit-identical to the unguarded optimizer's (eager and `tf.function`; under
    XLA see the README's transparency table).

    Args:
        inner_optimizer: The optimizer to guard: an instance, a name such as
            `"adam"`, or a config dict (anything `keras.optimizers.get` takes).
        none_gradient: Policy for variables whose gradient is `None` (checked
            at trace time): `"ignore"`, `"warn"` or `"raise"`. All gradients
            `None` always raises `ValueError`.
        zero_gradient: Policy for a gradient that is exactly 0 for `patience`
            consecutive steps: `"ignore"`, `"warn"` or `"raise"`.
        nonfinite_gradient: Policy for NaN/Inf in any gradient: `"ignore"`,
            `"warn"` (apply anyway), `"skip"` (leave weights, slots and the
            inner `iterations` untouched) or `"raise"`. After
            `max_consecutive_skips` skipped steps in a row `"skip"` escalates
            to `"raise"`.
        nonfinite_weights: Policy for an update that turned finite weights into
            NaN/Inf (with finite gradients): `"ignore"`, `"warn"` (the default;
            see `weights_check_every`), `"skip"` (restore weights and slots
            exactly; checked in full every step) or `"raise"`. `"skip"` and `"raise"`
            decide after the update, so the step keeps every pre-update weight
            and slot until then: under XLA a transient copy of all of them
            (about 2x bare Adam's `apply` time at 10^6 parameters, measured).
            A non-finite gradient is skipped (`nonfinite_gradient`) without
            that cost, since it is known before the update.
        tiny_step: Policy for an effective step `‖Δw‖ / max(‖w‖, ε√n)` below
            `min_step` for `patience` consecutive measured steps, including
            updates below the weights' float resolution (`Δw == 0` while the
            gradient is not 0): `"ignore"`, `"warn"` or `"raise"`.
        large_step: Policy for an effective step above `max_step` for `patience`
            consecutive measured steps: `"ignore"`, `"warn"` or `"raise"`.
        min_step: Threshold of the tiny-step check (float >= 0).
        max_step: Threshold of the large-step check (float > `min_step`).
        step_epsilon: Root-mean-square floor ε of the weights in the
            effective-step ratio (float > 0), so zero-initialised biases do not
            divide by zero.
        patience: Consecutive steps (measured steps for the step checks) before
            the zero-gradient, tiny-step and large-step checks fire (int >= 1).
        max_consecutive_skips: Skipped steps in a row after which `"skip"`
            escalates to `"raise"` (int >= 1).
        check_every: Run the measuring checks (tiny and large step) every N
            steps (int >= 1). The gradient checks run every step.
        weights_check_every: Under `nonfinite_weights="warn"`, read all of
            each updated variable for NaN/Inf every N steps (int >= 1); the
            1024-entry sample of each variable (all of a smaller one) is
            checked every step. The whole-variable pass is the guard's
            largest single cost under XLA:CPU (one more read of every weight,
            about +0.1x of bare Adam's `apply`), and non-finite weights stay
            non-finite, so a NaN that the sample misses is reported at most
            N - 1 steps late. 1 checks everything every step. Under `"skip"`
            and `"raise"` every step is checked in full regardless, since the
            verdict decides the step.
        log_interval_seconds: A finding is logged once, then again at most
            once per this many seconds while it keeps happening (float >= 0).
        class_weight: Automatic class weights (see `ClassBalancer`): `None`
            (off), `"observe"` (count labels for the `class_imbalance` finding
            only), `"auto"`/`"balanced"`, `"effective_number"`, or a
            `ClassBalancer`. Labels reach it through `opt.weighted(loss)`.
        name: Optional name.

    Raises:
        ValueError: If an argument is invalid, or `inner_optimizer` is itself a
            `GuardedOptimizer`.
    """

    def __init__(
        self,
        inner_optimizer: Any = "adam",
        *,
        none_gradient: str = DEFAULTS["none_gradient"],
        zero_gradient: str = DEFAULTS["zero_gradient"],
        nonfinite_gradient: str = DEFAULTS["nonfinite_gradient"],
        nonfinite_weights: str = DEFAULTS["nonfinite_weights"],
        tiny_step: str = DEFAULTS["tiny_step"],
        large_step: str = DEFAULTS["large_step"],
        min_step: float = DEFAULTS["min_step"],
        max_step: float = DEFAULTS["max_step"],
        step_epsilon: float = DEFAULTS["step_epsilon"],
        patience: int = DEFAULTS["patience"],
        max_consecutive_skips: int = DEFAULTS["max_consecutive_skips"],
        check_every: int = DEFAULTS["check_every"],
        weights_check_every: int = DEFAULTS["weights_check_every"],
        log_interval_seconds: float = DEFAULTS["log_interval_seconds"],
        class_weight: Any = None,
        name: Optional[str] = None,
        **kwargs,
    ):
        if kwargs:
            _reject_unknown_arguments(kwargs)
        _check_strategy_supported()
        inner = self._resolve_inner(inner_optimizer)
        options = validate_options(
            none_gradient=none_gradient, zero_gradient=zero_gradient,
            nonfinite_gradient=nonfinite_gradient, nonfinite_weights=nonfinite_weights,
            tiny_step=tiny_step, large_step=large_step, min_step=min_step,
            max_step=max_step, step_epsilon=step_epsilon, patience=patience,
            max_consecutive_skips=max_consecutive_skips, check_every=check_every,
            weights_check_every=weights_check_every,
            log_interval_seconds=log_interval_seconds,
        )
        super().__init__(learning_rate=0.0, name=name)
        for option, value in options.items():
            setattr(self, option, value)
        self.inner_optimizer = inner
        self._set_class_balancer(class_weight)
        # What a file saved before the first step holds, guarded or bare
        # (`load_own_variables` skips such a file as Keras does).
        self._unbuilt_variable_counts = (len(self.variables), len(inner.variables))
        self._none_gradient_paths: Dict[tuple, int] = {}
        self._log_times: Dict[tuple, tuple] = {}
        self._history: List[Dict[str, Any]] = []
        self._variable_paths: List[str] = []
        self._setup_findings: List[F.Finding] = []

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _resolve_inner(inner_optimizer):
        try:
            inner = keras.optimizers.get(inner_optimizer)
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(
                "`inner_optimizer` must be a keras.optimizers.Optimizer, an optimizer "
                f"name or a config dict. Received: inner_optimizer={inner_optimizer!r} "
                f"({error})"
            ) from None
        # After `get`: a config dict of a guard deserializes to one.
        if isinstance(inner, GuardedOptimizer):
            raise ValueError(
                "`inner_optimizer` must not be a GuardedOptimizer: guarding a guard "
                "checks every step twice. Received: "
                f"inner_optimizer={inner.__class__.__name__}(name={inner.name!r})"
            )
        if not isinstance(inner, keras.optimizers.Optimizer):
            raise ValueError(
                "`inner_optimizer` must be a Keras 3 optimizer "
                "(keras.optimizers.Optimizer). Received: "
                f"inner_optimizer={type(inner).__name__}"
            )
        return inner

    def _set_class_balancer(self, class_weight):
        # Filled in by guardedopt.class_balance; kept optional so the core has
        # no dependency on it.
        self.class_weight = class_weight
        self.class_balancer = None
        if class_weight is None:
            return
        from guardedopt import class_balance

        self.class_balancer = class_balance.balancer_from_option(class_weight)
        # Counts created lazily (at the first loss call, possibly before this
        # optimizer is built) are still optimizer variables: checkpointed and
        # saved with it.
        self.class_balancer.set_variable_factory(self.add_variable)

    @property
    def _inner_is_loss_scale(self) -> bool:
        return isinstance(self.inner_optimizer, keras.optimizers.LossScaleOptimizer)

    @property
    def _updating_optimizer(self):
        """The optimizer that writes the weights: the inner one, or the one in its loss scaler."""
        inner = self.inner_optimizer
        return inner.inner_optimizer if isinstance(inner, keras.optimizers.LossScaleOptimizer) else inner

    @property
    def _updating_optimizers(self) -> list:
        """Those that write the weights: `_updating_optimizer`, or a MultiOptimizer's sub-optimizers."""
        inner = self._updating_optimizer
        return list(inner.optimizers) if isinstance(inner, _MULTI_OPTIMIZERS) else [inner]

    @property
    def optimizers(self):
        # A MultiOptimizer's sub-optimizers, where Keras' callbacks look for
        # them (LearningRateScheduler, ReduceLROnPlateau, SwapEMAWeights);
        # AttributeError otherwise, as on any other optimizer.
        inner = self.__dict__.get("inner_optimizer")
        if inner is None or not isinstance(self._updating_optimizer, _MULTI_OPTIMIZERS):
            raise AttributeError("optimizers")
        return self._updating_optimizer.optimizers

    def build(self, var_list):
        """Builds the inner optimizer and the guard's state variables."""
        if self.built:
            return
        _check_strategy_supported()
        var_list = list(var_list)
        # The inner build runs with attribute tracking on: optimizers such as
        # Nadam and Adafactor track variables they assign to attributes, and
        # building them inside `no_automatic_dependency_tracking` (as Keras'
        # LossScaleOptimizer does) loses those variables from `variables`.
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        self._build_guard_state(var_list)
        super().build(var_list)
        self._check_configuration(var_list)

    @tracking.no_automatic_dependency_tracking
    def _build_guard_state(self, var_list):
        n = len(var_list)
        self._variable_paths = [_variable_path(v) for v in var_list]
        self._var_positions = {self._var_key(v): i for i, v in enumerate(var_list)}
        self._var_sizes = [int(np.prod(v.shape)) for v in var_list]
        self._var_dtypes = [tf.as_dtype(v.dtype).name for v in var_list]
        self._resolution = [checks.relative_resolution(v.dtype) for v in var_list]

        def packed(name, layout, dtype):
            initial = layout.initial(dtype)
            return self.add_variable(
                shape=initial.shape, dtype=dtype,
                initializer=lambda shape, dtype=None: tf.constant(initial),
                aggregation="none", name=name,
            )

        # Two packed vectors instead of a variable per counter: each resource
        # variable costs the compiled step a fixed few microseconds.
        self._counter_layout, self._measurement_layout = _state_layouts(n)
        self._guard_counters = packed("guard_counters", self._counter_layout, "int64")
        self._guard_measurements = packed("guard_measurements", self._measurement_layout, "float32")
        # The dtype of the step checks' samples (`checks.stack_samples`).
        self._sample_dtype = tf.float64 if "float64" in self._var_dtypes else tf.float32
        if self.class_balancer is not None and self.class_balancer.num_classes:
            self.class_balancer.build(
                self.class_balancer.num_classes, add_variable=self.add_variable
            )

    @tf.autograph.experimental.do_not_convert
    def _check_configuration(self, var_list):
        """Runs the optimizer configuration checks once, when built."""
        try:
            from guardedopt import hyperparams
        except ImportError:  # pragma: no cover - module is part of the package
            return
        dtype = tf.as_dtype(var_list[0].dtype).name if var_list else "float32"
        # Build may run inside a trace; the checks read hyperparameter values,
        # so they run eagerly, once, outside the compiled step.
        with tf.init_scope():
            self._setup_findings = list(
                hyperparams.check_hyperparameters(self.inner_optimizer, variable_dtype=dtype)
            )
        for finding in self._setup_findings:
            self._log_once(finding, count=1)

    # Named, read-only views of the packed state (tensors).
    guard_step = _state_view("guard_step")
    skipped_steps_total = _state_view("skipped_steps_total")
    skipped_steps_consecutive = _state_view("skipped_steps_consecutive")
    last_good_step = _state_view("last_good_step")
    pending_raise = _state_view("pending_raise")
    pending_raise_step = _state_view("pending_raise_step")
    loss_scale_overflow_steps = _state_view("loss_scale_overflow_steps")
    event_count = _state_view("event_count")
    event_first_step = _state_view("event_first_step")
    event_last_step = _state_view("event_last_step")
    streak = _state_view("streak")
    last_step_ratio = _state_view("last_step_ratio")
    last_gradient_norm = _state_view("last_gradient_norm")
    extreme_step_ratio = _state_view("extreme_step_ratio")

    def _packed_state(self):
        return (
            (self._counter_layout, self._guard_counters),
            (self._measurement_layout, self._guard_measurements),
        )

    def _state_views(self) -> Dict[str, tf.Tensor]:
        """Every state field as a tensor, from one read of each packed variable."""
        views = {}
        for layout, variable in self._packed_state():
            views.update(layout.views(_unwrap_value(variable).read_value()))
        return views

    def _packed_updates(self, state, changes):
        """`(variable, value)` assignments that write `changes` over `state`."""
        merged = dict(state, **changes)
        return [
            (variable, layout.pack(merged, variable.dtype))
            for layout, variable in self._packed_state()
        ]

    # ------------------------------------------------------------- delegation
    @property
    def variables(self):
        # A fixed order whatever was built first: the guard's own state, the
        # class balancer's counts, then the inner optimizer's variables.
        balancer = self.class_balancer.variables if self.class_balancer is not None else []
        own = [v for v in self._variables if not any(v is b for b in balancer)]
        return own + balancer + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def _model_variables_moving_average(self):
        # Keras' SwapEMAWeights unwraps one optimizer level (a loss scaler):
        # under "mixed_float16" that is this guard, so it finds the EMA
        # optimizer's averages here. AttributeError without EMA, as Keras'.
        if "inner_optimizer" not in self.__dict__:
            raise AttributeError("_model_variables_moving_average")
        return self._updating_optimizer._model_variables_moving_average  # pylint: disable=protected-access

    @property
    def loss_scale_factor(self):
        inner = self.__dict__.get("inner_optimizer")
        return None if inner is None else inner.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # The inner optimizer scales and unscales; the guard holds no factor.
        # Keras' LossScaleOptimizer sets this to None on the optimizer it wraps
        # (so that the gradients are not unscaled twice): pass that on.
        inner = self.__dict__.get("inner_optimizer")
        if inner is None:  # the base constructor
            return
        if isinstance(inner, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "A GuardedOptimizer(LossScaleOptimizer(...)) must not be wrapped in "
                "another loss scaler: the loss would be scaled twice and the gradients "
                "unscaled twice. Keras' `model.compile` wraps the optimizer in a "
                "LossScaleOptimizer under the 'mixed_float16' policy: pass "
                "`auto_scale_loss=False` to `compile`, or guard the bare optimizer "
                "(`GuardedOptimizer(Adam())`) and let Keras wrap it. Received: "
                f"loss_scale_factor={value!r}"
            )
        inner.loss_scale_factor = value

    def __setattr__(self, name, value):
        if name == "loss_scale_factor":
            # Straight to the property: Keras' tracking skips an assignment of
            # the value the attribute already reads (None), and the setter
            # must see every one.
            type(self).loss_scale_factor.fset(self, value)
            return
        if name in _INNER_SETTINGS and "inner_optimizer" in self.__dict__:
            setattr(self._updating_optimizer, name, value)
            return
        super().__setattr__(name, value)

    clipnorm = _forwarded_setting("clipnorm")
    clipvalue = _forwarded_setting("clipvalue")
    global_clipnorm = _forwarded_setting("global_clipnorm")
    weight_decay = _forwarded_setting("weight_decay")

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """The inner optimizer's `exclude_from_weight_decay` (it applies the decay)."""
        self._updating_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise ValueError(
            "GuardedOptimizer does not support `stateless_apply`: on the TensorFlow "
            "backend Keras itself rejects it (incompatible with tf.distribute). Use "
            "`apply`/`apply_gradients`."
        )

    # Plain TF ops only: autograph would re-convert this on every user trace
    # (seconds per trace) for no benefit.
    @tf.autograph.experimental.do_not_convert
    def apply_gradients(self, grads_and_vars):
        grads_and_vars = list(grads_and_vars)
        if not grads_and_vars:
            return self.iterations
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables)
        return self.iterations

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)
        if self.built and tf.executing_eagerly():
            self._log_summary()

    # ------------------------------------------------------------------ apply
    # Plain TF ops only: autograph would re-convert this on every user trace
    # (seconds per trace) for no benefit.
    @tf.autograph.experimental.do_not_convert
    def apply(self, grads, trainable_variables=None):
        # NumPy arrays (which Keras' own apply accepts) as tensors: the checks
        # read static shapes.
        grads = [
            g if g is None or tf.is_tensor(g) or isinstance(g, tf.IndexedSlices) else tf.convert_to_tensor(g)
            for g in grads
        ]
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must "
                    "already be built. Call `optimizer.build(trainable_variables)` first."
                )
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(
                "`grads` and `trainable_variables` must have the same length. "
                f"Received: {len(grads)} gradients for {len(trainable_variables)} "
                "variables."
            )
        if not grads:
            return
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        self._check_variables_are_known(trainable_variables)
        pairs = self._drop_none_gradients(grads, trainable_variables)
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        with keras.name_scope(self.name, caller=self):
            self._guarded_step(grads, variables)
        if tf.executing_eagerly():
            # Eager steps are already synchronous, so the host can raise at once.
            self.check()

    def _check_variables_are_known(self, variables):
        for v in variables:
            if self._var_key(v) not in self._var_positions:
                raise ValueError(
                    f"Unknown variable {_variable_path(v)!r}: this GuardedOptimizer was "
                    f"built for {len(self._var_positions)} other variables. An "
                    "optimizer keeps the variables it was built for (Keras' own "
                    "refuse new ones too): for another model, or after making a "
                    "layer trainable and compiling again, create a new "
                    "GuardedOptimizer."
                )

    def _inner_apply(self, grads, variables):
        """The inner optimizer's `apply` of the pairs the guard kept.

        A `keras.optimizers.MultiOptimizer` takes one gradient per variable
        it was built on: the pairs dropped for a None gradient go back in as
        None, which its sub-optimizers skip, as they do unguarded.
        """
        inner = self.inner_optimizer
        if isinstance(inner, _MULTI_OPTIMIZERS):
            given = {inner._var_key(v): g for g, v in zip(grads, variables)}  # pylint: disable=protected-access
            variables = list(inner._trainable_variables)  # pylint: disable=protected-access
            grads = [given.get(inner._var_key(v)) for v in variables]  # pylint: disable=protected-access
        inner.apply(grads, variables)

    def _drop_none_gradients(self, grads, variables):
        """Static None-gradient check; returns the (gradient, variable) pairs kept."""
        missing = tuple(_variable_path(v) for g, v in zip(grads, variables) if g is None)
        if len(missing) == len(variables):
            raise ValueError(
                f"No gradient for any of the {len(variables)} variables "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): the "
                "loss does not depend on them. Compute the loss from the model's output "
                "inside the `tf.GradientTape` block (and pass `loss=` to `compile`)."
            )
        if missing and self.none_gradient != IGNORE:
            self._none_gradient_paths.setdefault(missing, 0)
            self._none_gradient_paths[missing] += 1
            message = (
                f"{len(missing)} of {len(variables)} variables got a None gradient "
                f"(not connected to the loss): {', '.join(missing)}."
            )
            if self.none_gradient == RAISE:
                raise ValueError(message + " Fix: " + HINTS[F.NONE_GRADIENT])
            self._log_once(self._none_finding(missing), count=1)
        return [(g, v) for g, v in zip(grads, variables) if g is not None]

    def _none_finding(self, paths) -> F.Finding:
        return F.Finding(
            code=F.NONE_GRADIENT,
            message=(
                f"{len(paths)} variable(s) got a None gradient at trace time: "
                f"{', '.join(paths)}; they are never updated."
            ),
            hint=HINTS[F.NONE_GRADIENT],
            variables=paths,
            value=float(len(paths)),
            severity=F.ERROR if self.none_gradient == RAISE else F.WARNING,
        )

    def _measuring(self) -> bool:
        return self.tiny_step != IGNORE or self.large_step != IGNORE

    def _restores_after_update(self) -> bool:
        """Whether a policy can skip a step on facts known only after the update.

        Such a skip (non-finite weights "skip"/"raise", "raise" of the step
        checks) must write back every pre-update value, so the step keeps them
        through the update: under XLA a transient copy of every weight and slot.
        """
        return self.nonfinite_weights in (SKIP, RAISE) or RAISE in (self.tiny_step, self.large_step)

    # Plain TF ops only: autograph would re-convert this on every user trace
    # (seconds per trace) for no benefit.
    @tf.autograph.experimental.do_not_convert
    def _guarded_step(self, grads, variables):
        n = len(self._variable_paths)
        positions = [self._var_positions[self._var_key(v)] for v in variables]
        present = tf.constant([i in set(positions) for i in range(n)], tf.bool)
        state = self._state_views()
        step = state["guard_step"] + 1

        # 1. Flags read from the gradients, before the update.
        nonfinite_k, zero_k = checks.screened_nonfinite_and_zero(grads)
        norms_k = None
        if self._measuring() and _distributed():
            # Each replica holds its own gradients: their norms travel in the
            # flags' all-reduce, so every replica records the same state.
            norms_k = checks.sampled_l2_norms(grads)
            nonfinite_k, zero_k, norms_k = self._agree_across_replicas(nonfinite_k, zero_k, norms_k)
        else:
            nonfinite_k, zero_k = self._agree_across_replicas(nonfinite_k, zero_k)
        nonfinite = checks.scatter_to_slots(nonfinite_k, positions, n, False)
        zero = checks.scatter_to_slots(zero_k, positions, n, False)
        any_nonfinite = tf.reduce_any(nonfinite)
        if self._inner_is_loss_scale:
            # Overflow steps are the loss scaler's business: it skips them and
            # halves its scale. Counting them as NaN bugs would be wrong, and
            # undoing them would undo the scale change.
            grad_skip = tf.constant(False)
            overflow = any_nonfinite
            nonfinite_event = tf.zeros_like(nonfinite)
        else:
            overflow = tf.constant(False)
            grad_skip = any_nonfinite if self.nonfinite_gradient in (SKIP, RAISE) else tf.constant(False)
            nonfinite_event = nonfinite if self.nonfinite_gradient != IGNORE else tf.zeros_like(nonfinite)

        # 2. Decisions known from the gradients alone, before the update.
        zero_streak = checks.update_streak(state["streak"][_STREAK[F.ZERO_GRADIENT]], zero, present)
        zero_event = tf.logical_and(present, zero_streak >= self.patience)
        if self.zero_gradient == IGNORE:
            zero_event = tf.zeros_like(zero_event)
        pending_before = state["pending_raise"]
        no_events = tf.zeros([n], tf.bool)
        raise_before = self._raise_code(nonfinite_event, no_events, zero_event, no_events, no_events)
        skip_before = tf.logical_or(grad_skip, pending_before > 0)
        skip_before = tf.logical_or(skip_before, raise_before > 0)

        # The step checks compare a sample of each variable read just before
        # the update with the same entries after it: the step measured is this
        # update alone, whatever wrote the weights between steps (set_weights,
        # a restore).
        previous = self._samples_before_update(variables, step) if self._measuring() else None
        accumulating = self._accumulating_only() if self._measuring() else None

        # 3. The update itself, exactly as unguarded.
        scale_state = self._loss_scale_state()
        inner_vars = [
            v for v in self.inner_optimizer.variables if not any(v is s for s in scale_state)
        ]
        scale_old = [tf.identity(_unwrap_value(v)) for v in scale_state]
        if scale_state and _distributed():
            # Keras' LossScaleOptimizer decides on the gradients it is given:
            # the local ones (MultiWorkerMirroredStrategy: replicas that
            # disagree take different branches around an all-reduce and hang)
            # or the first replica's (MirroredStrategy: an overflow elsewhere
            # reaches the weights). Every replica hands it non-finite
            # gradients when any replica has them; `where` keeps the others'
            # bits.
            grads = [_nonfinite_where(any_nonfinite, g) for g in grads]
        skip_without_snapshot = not _distributed() and not self._restores_after_update()
        if skip_without_snapshot:
            mask = skip_before
            if previous is not None:
                # `previous` joins the mask (the second term is never true:
                # `step` >= 1) so that XLA orders those reads before the
                # in-place update instead of copying the weights to keep them.
                # One entry does it: the writes then take the whole matrix,
                # one fusion, as an operand. `reduce_any` over it added three
                # kernels that every write waited for (about 50 µs of the
                # MLP's 7 ms step; profile_step).
                mask = tf.logical_or(
                    mask, tf.logical_and(tf.math.is_nan(previous[0, 0]), step < 0)
                )
            self._apply_unless(mask, grads, variables)
        else:
            written = self._written_weights(variables)
            weights_old = [tf.identity(_unwrap_value(v)) for v in written]
            inner_old = [tf.identity(_unwrap_value(v)) for v in inner_vars]
            self._inner_apply(grads, variables)

        # 4. Checks on the result.
        weights_new = [_unwrap_value(v).read_value() for v in variables]
        samples_new = self._samples_of(weights_new)
        weights_bad = no_events
        if self.nonfinite_weights in (SKIP, RAISE):
            # Every step: the verdict decides whether the step is undone.
            weights_bad = self._weights_nonfinite(weights_new, samples_new, positions, any_nonfinite)
        elif self.nonfinite_weights == WARN:
            weights_bad = self._weights_nonfinite_seen(
                step, weights_new, samples_new, positions, any_nonfinite, state
            )
        unmeasured = tf.logical_or(grad_skip, any_nonfinite)
        if accumulating is not None:
            unmeasured = tf.logical_or(unmeasured, accumulating)
        measured = self._measure(
            step, grads, previous, samples_new, positions, present, zero,
            unmeasured, state, norms_k=norms_k,
        )
        any_weights_bad = tf.reduce_any(weights_bad)

        # 5. Decisions that need the updated weights.
        raise_after = self._raise_code(
            no_events, weights_bad, no_events, measured["tiny_event"], measured["large_event"]
        )
        raise_now = tf.where(raise_before > 0, raise_before, raise_after)
        skip_after = raise_after > 0
        if self.nonfinite_weights in (SKIP, RAISE):
            skip_after = tf.logical_or(skip_after, any_weights_bad)
        skip = tf.logical_or(skip_before, skip_after)
        if not skip_without_snapshot:
            # An overflow step leaves the weights and the slots as they were:
            # the loss scaler skipped it. Under a strategy Keras'
            # LossScaleOptimizer decides on the first replica's gradients
            # only, so an overflow on another replica would reach the weights;
            # the guard restores them and halves the scale itself, as the
            # scaler does on an overflow.
            self._restore(
                tf.logical_or(skip_before, overflow),
                skip_after,
                list(zip(written, weights_old)) + list(zip(inner_vars, inner_old)),
            )
        scale_updates = self._loss_scale_updates(scale_state, scale_old, skip, overflow)

        # 6. Counters.
        consecutive = tf.where(skip, state["skipped_steps_consecutive"] + 1, tf.zeros([], tf.int64))
        escalate = tf.logical_and(
            tf.logical_and(skip, any_nonfinite),
            consecutive >= self.max_consecutive_skips,
        )
        if self.nonfinite_gradient == SKIP and not self._inner_is_loss_scale:
            raise_now = tf.where(
                tf.logical_and(escalate, raise_now == 0),
                tf.constant(1 + _ROW[F.NONFINITE_GRADIENT], tf.int64),
                raise_now,
            )
        pending = tf.where(pending_before > 0, pending_before, raise_now)
        pending_step = tf.where(
            tf.logical_and(pending_before == 0, raise_now > 0), step, state["pending_raise_step"]
        )
        events = tf.stack(
            [zero_event, nonfinite_event, weights_bad, measured["tiny_event"],
             measured["large_event"], measured["below_resolution"]]
        )
        count, first, last = checks.record_events(
            state["event_count"], state["event_first_step"], state["event_last_step"], events, step
        )
        changes = dict(
            guard_step=step,
            skipped_steps_total=state["skipped_steps_total"] + tf.cast(skip, tf.int64),
            skipped_steps_consecutive=consecutive,
            last_good_step=tf.where(skip, state["last_good_step"], step),
            pending_raise=pending,
            pending_raise_step=pending_step,
            loss_scale_overflow_steps=state["loss_scale_overflow_steps"] + tf.cast(overflow, tf.int64),
            event_count=count,
            event_first_step=first,
            event_last_step=last,
            streak=tf.stack([zero_streak, measured["tiny_streak"], measured["large_streak"]]),
            **measured["changes"],
        )
        updates = self._packed_updates(state, changes)
        updates += scale_updates
        _assign_all(updates)

    def _written_weights(self, variables) -> list:
        """The weights the inner update may write: `variables`, and what Keras' EMA overwrites.

        With `use_ema` and `ema_overwrite_frequency` Keras overwrites every
        variable the optimizer was built on with its moving average, also
        those without a gradient in this step (a frozen layer, a head not
        trained this step): a skipped step must leave them as they were too.
        """
        given = {self._var_key(v) for v in variables}
        return list(variables) + [
            v
            for optimizer in self._updating_optimizers
            if getattr(optimizer, "use_ema", False) and getattr(optimizer, "ema_overwrite_frequency", None)
            for v in optimizer._trainable_variables  # pylint: disable=protected-access
            if self._var_key(v) not in given
        ]

    def _apply_unless(self, skip, grads, variables):
        """The inner update, leaving every weight and inner variable as it was where `skip`.

        Under XLA and eagerly: the inner optimizer runs unconditionally with
        its writes masked (`_writes_masked`); XLA fuses the mask into the
        update's loops. In a plain (non-XLA) graph each masked write would be
        one more kernel over the whole array, so there the update runs in a
        `cond` branch that is taken only on steps that are not skipped: the
        same kernels as unguarded, so the same bits.
        """
        if tf.executing_eagerly() or _in_xla_context():
            with _writes_masked(self._written_weights(variables) + self.inner_optimizer.variables, skip):
                self._inner_apply(grads, variables)
            return

        def update():
            self._inner_apply(grads, variables)
            return tf.constant(True)

        tf.cond(skip, lambda: tf.constant(False), update)

    def _samples_of(self, variables) -> tf.Tensor:
        """`checks.stack_samples` of variables (or their values), in float32 (float64 if any is)."""
        values = [
            _unwrap_value(v).read_value() if isinstance(v, (keras.Variable, tf.Variable)) else v
            for v in variables
        ]
        return checks.stack_samples(values, self._sample_dtype)

    def _samples_before_update(self, variables, step):
        """`_samples_of(variables)` as read before the update, for use after it.

        A division by 1 (exact; `step` is never 0 here, which XLA cannot
        know) is an op XLA will not recompute in each consumer: otherwise the
        later fusions re-read these (cheap) slices from the weights after the
        in-place update, and XLA copies the weights for that.
        """
        one = tf.cast(tf.not_equal(step, 0), self._sample_dtype)
        return self._samples_of(variables) / one

    def _weights_nonfinite(self, weights_new, samples_new, positions, any_nonfinite):
        """Per-variable "the update made finite weights NaN/Inf" flags, all entries read."""
        n = len(self._variable_paths)
        bad_k = checks.screened_nonfinite(weights_new, samples_new)
        bad = checks.scatter_to_slots(bad_k, positions, n, False)
        # Non-finite gradients explain non-finite weights: that is their finding.
        return tf.logical_and(bad, tf.logical_not(any_nonfinite))

    def _weights_nonfinite_seen(self, step, weights_new, samples_new, positions, any_nonfinite, state):
        """The "warn" weights check: each sample every step, all entries every `weights_check_every`.

        A NaN/Inf weight found between the whole-variable passes is explained
        by a non-finite gradient anywhere in the window since the last pass
        (the weights keep a NaN once they have one).
        """
        every = self.weights_check_every
        if every == 1:
            return self._weights_nonfinite(weights_new, samples_new, positions, any_nonfinite)
        n = len(self._variable_paths)
        bad_k = tf.cond(
            tf.equal(step % every, 0),
            # Kept a real conditional: as selects the sums would run every step.
            lambda: checks.keep_conditional(
                tf.cast(checks.nonfinite_by_products(weights_new, samples_new), tf.float32)
            ) > 0,
            lambda: checks.nonfinite_in_samples(samples_new),
        )
        bad = checks.scatter_to_slots(bad_k, positions, n, False)
        gradient_seen = state["event_last_step"][_ROW[F.NONFINITE_GRADIENT]]  # -1: never
        since = tf.maximum(step - every, tf.zeros([], step.dtype))
        explained = tf.logical_or(any_nonfinite, tf.reduce_any(gradient_seen > since))
        return tf.logical_and(bad, tf.logical_not(explained))

    def _loss_scale_state(self):
        """The inner LossScaleOptimizer's `(step_counter, dynamic_scale)`, or `()`."""
        if not self._inner_is_loss_scale:
            return ()
        inner = self.inner_optimizer
        return (inner.step_counter, inner.dynamic_scale)

    @staticmethod
    def _loss_scale_updates(scale_state, scale_old, skip, overflow):
        """The loss scaler's state after the step: halved on an overflow."""
        if not scale_state:
            return []
        (counter, scale), (counter_old, scale_old_value) = scale_state, scale_old
        counter_new = _unwrap_value(counter).read_value()
        scale_new = _unwrap_value(scale).read_value()
        counter_value = tf.where(
            overflow, tf.zeros_like(counter_old), tf.where(skip, counter_old, counter_new)
        )
        scale_value = tf.where(
            overflow,
            scale_old_value * tf.constant(0.5, scale_old_value.dtype),
            tf.where(skip, scale_old_value, scale_new),
        )
        return [(counter, counter_value), (scale, scale_value)]

    def _agree_across_replicas(self, nonfinite_k, zero_k, norms_k=None):
        """Makes every replica take the same decision.

        Keras all-reduces the gradients inside the inner `apply`, so a NaN on one
        replica reaches all of them. The flag vectors are all-reduced here (one
        small vector) so that each replica decides on the same facts:
        non-finite on any replica, zero on all replicas. `norms_k`, if given,
        are summed over the replicas in the same all-reduce (the sum of the
        local gradient norms bounds the norm of the applied, summed gradient,
        and equals it when the replicas' gradients point the same way); it is
        then returned third.
        """
        if not _distributed() or not nonfinite_k.shape[0]:
            return (nonfinite_k, zero_k) if norms_k is None else (nonfinite_k, zero_k, norms_k)
        k = nonfinite_k.shape[0]
        values = [tf.cast(nonfinite_k, tf.float32), tf.cast(tf.logical_not(zero_k), tf.float32)]
        if norms_k is not None:
            values.append(tf.cast(norms_k, tf.float32))
        total = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.concat(values, axis=0)
        )
        nonfinite, zero = total[:k] > 0, tf.logical_not(total[k:2 * k] > 0)
        if norms_k is None:
            return nonfinite, zero
        return nonfinite, zero, total[2 * k:]

    def _accumulating_only(self) -> Optional[tf.Tensor]:
        """Whether the inner optimizer's update of this step only accumulates the gradients.

        With `gradient_accumulation_steps=k` Keras moves the weights on every
        k-th call (when `(_iterations + 1) % k == 0`, `_iterations` counting
        the calls; the public `iterations` counts the updates); the other steps
        are not measured, or the still weights would read as tiny steps. Under
        a MultiOptimizer each variable follows its sub-optimizer: a [slots]
        vector. None when nothing accumulates (the step's graph is then as
        before).
        """
        inner = self._updating_optimizer
        if not isinstance(inner, _MULTI_OPTIMIZERS):
            return _accumulates_only(inner)
        flags = [_accumulates_only(optimizer) for optimizer in inner.optimizers]
        if all(flag is None for flag in flags):
            return None
        by_slot = [tf.constant(False)] * len(self._variable_paths)
        for variable in inner._trainable_variables:  # pylint: disable=protected-access
            flag = flags[inner._var_to_optimizer_idx[inner._var_key(variable)]]  # pylint: disable=protected-access
            if flag is not None:
                by_slot[self._var_positions[self._var_key(variable)]] = flag
        return tf.stack(by_slot)

    def _measure(self, step, grads, previous, samples_new, positions, present, zero,
                 unmeasured_step, state, norms_k=None):
        """The measuring checks (tiny, large, below resolution).

        The effective step `‖Δw‖/max(‖w‖, ε√n)` is computed on each variable's
        `checks.flat_sample` (all of a variable up to `checks.SAMPLE_SIZE`
        entries): `previous` is the sample read just before this update and
        `samples_new` the one after it. `unmeasured_step`: the update was
        skipped, non-finite or only accumulated. `state`: the state views read
        at the start of the step. `norms_k`: the gradient norms
        when already computed (and agreed across replicas).

        Returns:
            A dict of the events, the streaks, and `changes`: the new values
            of the measurement fields of the packed state.
        """
        n = len(self._variable_paths)
        no_events = tf.zeros([n], tf.bool)
        tiny_streak_old = state["streak"][_STREAK[F.TINY_STEP]]
        large_streak_old = state["streak"][_STREAK[F.LARGE_STEP]]
        result = dict(
            tiny_event=no_events, large_event=no_events, below_resolution=no_events,
            tiny_streak=tiny_streak_old, large_streak=large_streak_old, changes={},
        )
        if not self._measuring():
            return result

        unmeasured = tf.fill([n], -1.0)

        def measure_values():
            sizes = [checks.sample_size(self._var_sizes[i]) for i in positions]
            ratios = checks.row_relative_steps(previous, samples_new, sizes, self.step_epsilon)
            floored_k = checks.rows_under_floor(previous, sizes, self.step_epsilon)
            norms = norms_k if norms_k is not None else checks.sampled_l2_norms(grads)
            ratio = checks.scatter_to_slots(ratios, positions, n, -1.0)
            norm = checks.scatter_to_slots(norms, positions, n, -1.0)
            return ratio, norm, checks.scatter_to_slots(floored_k, positions, n, False)

        if self.check_every == 1:
            measure_now = tf.constant(True)
            ratio, norm, floored = measure_values()
        else:
            measure_now = tf.equal(step % self.check_every, 0)

            def measure_kept():
                ratio, norm, floored = measure_values()
                return checks.keep_conditional(ratio), norm, floored

            ratio, norm, floored = tf.cond(
                measure_now, measure_kept, lambda: (unmeasured, unmeasured, no_events)
            )
        active = tf.logical_and(present, measure_now)
        active = tf.logical_and(active, tf.logical_not(unmeasured_step))
        # A zero gradient is reported by its own check; it is not a tiny step.
        moving = tf.logical_and(active, tf.logical_not(zero))
        # Nor is a zero step measured where the gradient missed the sample: a
        # sparse (`IndexedSlices`) gradient updates rows the table's sample
        # rarely holds, and a dense one can be zero at every sampled entry (the
        # few active rows of a large input layer). The sampled gradient's norm
        # is 0 there (-1 where not measured).
        sparse = checks.scatter_to_slots(
            [isinstance(g, tf.IndexedSlices) for g in grads], positions, n, False
        )
        moving = tf.logical_and(moving, tf.logical_and(norm > 0, tf.logical_not(sparse)))
        # A relative step below the dtype's precision rounds away in most
        # entries: w + Δw == w. Cheaper than comparing every entry, and the
        # same verdict for the 1e-10 learning rate. Not where the weights are
        # below the ratio's floor (a bias near 0): nothing rounds away there.
        below = tf.logical_and(moving, ratio < tf.constant(self._resolution, tf.float32))
        below = tf.logical_and(below, tf.logical_not(floored))
        tiny_streak = checks.update_streak(tiny_streak_old, ratio < self.min_step, moving)
        large_streak = checks.update_streak(large_streak_old, ratio > self.max_step, active)
        tiny_event = tf.logical_and(moving, tiny_streak >= self.patience)
        large_event = tf.logical_and(active, large_streak >= self.patience)
        if self.tiny_step == IGNORE:
            tiny_event = below = no_events
        if self.large_step == IGNORE:
            large_event = no_events
        extreme = state["extreme_step_ratio"]
        smallest = tf.where(
            tf.logical_and(moving, tf.logical_or(extreme[0] < 0, ratio < extreme[0])), ratio, extreme[0]
        )
        largest = tf.where(tf.logical_and(active, ratio > extreme[1]), ratio, extreme[1])
        result.update(
            tiny_event=tiny_event, large_event=large_event, below_resolution=below,
            tiny_streak=tiny_streak, large_streak=large_streak,
            changes=dict(
                last_step_ratio=tf.where(active, ratio, state["last_step_ratio"]),
                last_gradient_norm=tf.where(active, norm, state["last_gradient_norm"]),
                extreme_step_ratio=tf.stack([smallest, largest]),
            ),
        )
        return result

    def _raise_code(self, nonfinite, weights_bad, zero, tiny, large):
        """1 + event row of the first check whose policy is "raise" and that fired."""
        code = tf.zeros([], tf.int64)
        ordered = [
            (self.nonfinite_gradient, F.NONFINITE_GRADIENT, nonfinite),
            (self.nonfinite_weights, F.NONFINITE_WEIGHTS, weights_bad),
            (self.zero_gradient, F.ZERO_GRADIENT, zero),
            (self.tiny_step, F.TINY_STEP, tiny),
            (self.large_step, F.LARGE_STEP, large),
        ]
        for policy, row_code, fired in reversed(ordered):
            if policy == RAISE and not (
                row_code == F.NONFINITE_GRADIENT and self._inner_is_loss_scale
            ):
                code = tf.where(tf.reduce_any(fired), tf.constant(1 + _ROW[row_code], tf.int64), code)
        return code

    def _restore(self, skip_before, skip_after, snapshot):
        """Writes the pre-update values back on a skipped step (the snapshot path).

        Used when a policy can skip on facts known only after the update, and
        under `tf.distribute`; otherwise `_apply_unless` skips without a
        snapshot. `skip_before` is known from the gradients alone; eagerly and
        under XLA it restores through a select. `skip_after` needs the updated
        weights (non-finite weights, "raise" of the step checks); it is
        written as a `cond`, which XLA turns into selects, so under XLA the
        old weights and slots are copied before the update (measured; see the
        README's "Performance"). In a non-XLA graph both are one `cond`. Under
        `tf.distribute` both are selects, because a `cond` whose branch merges
        replicas fails there (keras#17429).
        """
        pairs = [(v, old) for v, old in snapshot]

        def select(skip):
            return [(v, tf.where(skip, old, _unwrap_value(v).read_value())) for v, old in pairs]

        def restore_if(skip):
            def restore():
                _assign_all(pairs)
                return tf.constant(True)

            tf.cond(skip, restore, lambda: tf.constant(False))

        if tf.executing_eagerly() or _distributed():
            _assign_all(select(tf.logical_or(skip_before, skip_after)))
        elif _in_xla_context():
            _assign_all(select(skip_before))
            restore_if(tf.logical_and(skip_after, tf.logical_not(skip_before)))
        else:
            restore_if(tf.logical_or(skip_before, skip_after))

    # ------------------------------------------------------------- host side
    def _read_state(self) -> Dict[str, np.ndarray]:
        """Reads the guard state once (a host boundary) and extends the history."""
        state = {}
        for layout, variable in self._packed_state():
            state.update(layout.numpy_views(_host_read(variable)))
        # Not a tracked attribute: host-side data, never saved.
        self.__dict__["_last_state"] = state
        step = int(state["guard_step"])
        if not self._history or self._history[-1]["step"] < step:
            nonfinite_row = state["event_last_step"][_ROW[F.NONFINITE_GRADIENT]]
            self._history.append(
                dict(
                    step=step,
                    step_ratio=np.where(state["last_step_ratio"] < 0, np.nan, state["last_step_ratio"]),
                    grad_norm=np.where(state["last_gradient_norm"] < 0, np.nan, state["last_gradient_norm"]),
                    skipped=int(state["skipped_steps_total"]),
                    nonfinite=bool((nonfinite_row == step).any()),
                )
            )
            if len(self._history) > _HISTORY_POINTS:
                # Keeps the newest point and every second one before it.
                del self._history[-2::-2]
        return state

    # Host-side bookkeeping of `_read_state`, `_may_log` and `_host_findings_due`.
    _HOST_BOOKKEEPING = ("_last_state", "_active_when_built", "_built_at", "_host_checked_at")

    def _begin_diagnosis(self) -> Dict[str, Any]:
        """Starts the guard's state afresh for `diagnose`'s steps; returns what `_end_diagnosis` puts back.

        `diagnose` snapshots every variable before its steps and assigns them
        back after, so the state vectors come back on their own. Starting them
        from a fresh build's values lets the report hold only what those steps
        found, stamped with their own step numbers (not a finding of the
        training before, as if it were theirs). The host-side log record comes
        back too, so what the diagnosis logged is logged again when training
        meets it.
        """
        saved = {key: self.__dict__[key] for key in self._HOST_BOOKKEEPING if key in self.__dict__}
        saved["_log_times"] = dict(self._log_times)
        _assign_all([
            (self._guard_counters, self._counter_layout.initial(self._guard_counters.dtype)),
            (self._guard_measurements, self._measurement_layout.initial(self._guard_measurements.dtype)),
        ])
        return saved

    def _end_diagnosis(self, saved: Dict[str, Any]) -> None:
        """Puts back the host-side record `_begin_diagnosis` returned."""
        saved = dict(saved)
        self._log_times.clear()
        self._log_times.update(saved.pop("_log_times"))
        for key in self._HOST_BOOKKEEPING:
            self.__dict__.pop(key, None)
        self.__dict__.update(saved)

    def _may_log(self, state) -> bool:
        """Whether `check` must build findings: one is new, or its repeat may be due.

        Building them every batch would cost `GuardCallback` a report per batch
        for as long as a finding persists (a 1e-10 learning rate, an
        unconnected variable). Logging needs it only when a (check, variable)
        pair fires for the first time, or `log_interval_seconds` after the
        last build, the earliest a rate-limited repeat can be logged.
        """
        active = state["event_count"] > 0
        if not active.any() and not self._none_gradient_paths:
            return False
        seen = self.__dict__.get("_active_when_built")
        is_new = seen is None or seen.shape != active.shape or bool((active & ~seen).any())
        now = time.monotonic()
        if not is_new and now - self.__dict__.get("_built_at", -np.inf) < self.log_interval_seconds:
            return False
        # Host-side bookkeeping, never tracked or saved (like `_last_state`).
        self.__dict__["_active_when_built"] = active
        self.__dict__["_built_at"] = now
        return True

    def _host_findings_due(self) -> bool:
        """Whether `check` reads the class balancer and the loss scaler now: at most once a second.

        Their findings (`class_imbalance`, invalid labels, `loss_scale_at_floor`)
        are decided on the host, not in the event table that `_may_log` reads.
        Reading them costs about as much as `check` itself (48-56 µs against
        24-41 µs in two runs on a 2-core CPU), too much for every batch of `fit`.
        """
        if (self.class_balancer is None or not self.class_balancer.built) and self._loss_scale_optimizer() is None:
            return False
        now = time.monotonic()
        every = min(_HOST_FINDINGS_EVERY_SECONDS, self.log_interval_seconds)
        if now - self.__dict__.get("_host_checked_at", -np.inf) < every:
            return False
        self.__dict__["_host_checked_at"] = now  # host-side bookkeeping, like `_built_at`
        return True

    def _host_decided_findings(self, state, stats) -> List[F.Finding]:
        """The loss scaler's and the class balancer's findings, decided on the host; `stats` gains the loss scale.

        Raises:
            ValueError: invalid labels were met (`ClassBalancer.check`).
        """
        findings = self._loss_scale_findings(state, stats)
        if self.class_balancer is not None and self.class_balancer.built:
            findings += self.class_balancer.findings(step=int(state["guard_step"]))
        return findings

    def check(self) -> None:
        """The host boundary of a custom loop: reads the guard state once.

        Raises `GuardError` if a check with policy "raise" fired, logs new
        findings (once, then rate-limited) and records a point of the history
        that `report().plot()` draws. Call it every N steps or once per epoch;
        `GuardCallback` calls it after every batch of `fit`. It clears the
        pending raise, so training can continue if the caller catches the
        error. Invalid labels met by the class balancer raise at once; the
        other findings decided on the host (class imbalance, a loss scale at
        its floor) are read at most once a second.

        Raises:
            GuardError: With the step, the check, the variables and values.
            ValueError: The class balancer met invalid labels.
        """
        if not self.built:
            return
        state = self._read_state()
        if self.class_balancer is not None and self.class_balancer.built:
            # Invalid labels stop training at the first boundary: one small read (about 20 µs).
            self.class_balancer.check()
        pending = int(state["pending_raise"])
        if pending == 0:
            if self._may_log(state):
                self._report_from(state, with_history=False)  # logs new findings once, then rate-limited
            elif self._host_findings_due():
                for finding in self._host_decided_findings(state, {}):
                    self._log_once(finding, count=finding.count)
            return
        report = self._report_from(state, with_history=False)
        code = EVENT_ROWS[pending - 1]
        step = int(state["pending_raise_step"])
        related = report.by_code(code)
        self._clear_pending_raise()
        detail = " ".join(str(f) for f in related) or f"check {code} fired."
        escalated = (
            code == F.NONFINITE_GRADIENT and self.nonfinite_gradient == SKIP
        )
        reason = (
            f"{self.max_consecutive_skips} consecutive steps were skipped for "
            "non-finite gradients (policy 'skip' escalates to 'raise')"
            if escalated
            else f"check {code!r} has policy 'raise'"
        )
        raise GuardError(
            f"GuardedOptimizer stopped training at step {step}: {reason}. The "
            f"faulty step was not applied. {detail}",
            findings=related,
            step=step,
        )

    def _clear_pending_raise(self) -> None:
        layout = self._counter_layout
        counters = np.array(_host_read(self._guard_counters))
        views = layout.numpy_views(counters)
        views["pending_raise"] = np.zeros([], counters.dtype)
        _assign_all([(self._guard_counters, layout.pack(views, counters.dtype))])

    def report(self) -> F.Report:
        """The findings so far, read from the guard state (a host boundary).

        New findings are also logged through absl logging (once, then
        rate-limited).

        Returns:
            A `Report`.
        """
        if not self.built:
            findings, stats = self._static_findings_and_stats()
            return F.Report(findings=findings, stats=stats)
        return self._report_from(self._read_state())

    def _static_findings_and_stats(self):
        """What is known without reading the state: set-up and trace-time findings."""
        findings = list(self._setup_findings)
        findings += [self._none_finding(paths) for paths in self._none_gradient_paths]
        stats: Dict[str, Any] = dict(
            variable_paths=list(self._variable_paths),
            min_step=self.min_step,
            max_step=self.max_step,
        )
        return findings, stats

    def _report_from(self, state, with_history: bool = True) -> F.Report:
        """The report for a state already read by `_read_state`.

        `with_history=False` leaves out `stats["history"]` (O(points) to build),
        for `check`, which only logs and raises.
        """
        findings, stats = self._static_findings_and_stats()
        findings += self._step_findings(state)
        findings += self._host_decided_findings(state, stats)
        if self.class_balancer is not None and self.class_balancer.built:
            stats["class_weights"] = self.class_balancer.class_weights()
        if with_history:
            stats["history"] = self._history_arrays()
        stats["loss_scale_overflow_steps"] = int(state["loss_scale_overflow_steps"])
        stats["last_good_step"] = int(state["last_good_step"])
        for finding in findings:
            self._log_once(finding, count=finding.count)
        return F.Report(
            findings=findings,
            steps=int(state["guard_step"]),
            skipped_steps=int(state["skipped_steps_total"]),
            stats=stats,
        )

    def _loss_scale_optimizer(self):
        """The LossScaleOptimizer around the inner optimizer, if any.

        The inner one (`GuardedOptimizer(LossScaleOptimizer(...))`), else an
        outer one registered with `_watch_outer` (Keras' `compile` wraps the
        guard in one under "mixed_float16").
        """
        if self._inner_is_loss_scale:
            return self.inner_optimizer
        outer = self.__dict__.get("_outer_optimizer_ref")
        outer = outer() if outer is not None else None
        while outer is not None and outer is not self:
            if isinstance(outer, keras.optimizers.LossScaleOptimizer):
                return outer
            outer = getattr(outer, "inner_optimizer", None)
        return None

    def _watch_outer(self, optimizer) -> None:
        """Registers the model's optimizer when it wraps this guard.

        `report()` then also reads an outer LossScaleOptimizer's scale. Held by
        a weak reference: the guard must not track (or save) its wrapper.
        """
        if optimizer is None or optimizer is self:
            return
        self.__dict__["_outer_optimizer_ref"] = weakref.ref(optimizer)

    def _loss_scale_findings(self, state, stats) -> List[F.Finding]:
        """`loss_scale_at_floor` when the dynamic loss scale collapsed (host side)."""
        lso = self._loss_scale_optimizer()
        if lso is None or not lso.built:
            return []
        scale = float(keras.ops.convert_to_numpy(lso.dynamic_scale))
        stats["loss_scale"] = scale
        if scale > LOSS_SCALE_FLOOR:
            return []
        overflow = int(state["loss_scale_overflow_steps"])
        counted = (
            f" after {overflow} overflow step(s) out of {int(state['guard_step'])}"
            if self._inner_is_loss_scale
            else ""
        )
        return [
            F.Finding(
                code=F.LOSS_SCALE_AT_FLOOR,
                message=(
                    f"The dynamic loss scale of {lso.name!r} fell to {scale:.3g} (at or "
                    f"below {LOSS_SCALE_FLOOR:g}){counted}: the scaler skips every step "
                    "whose gradients are NaN/Inf and halves the scale, and they stay "
                    "non-finite even unscaled, so training has stopped."
                ),
                hint=HINTS[F.LOSS_SCALE_AT_FLOOR],
                value=scale,
                threshold=LOSS_SCALE_FLOOR,
                severity=F.ERROR,
                count=max(overflow, 1),
                details=dict(loss_scale=scale, overflow_steps=overflow),
            )
        ]

    def plot(self, path: str) -> str:
        """Writes the report's picture to `path` (see `Report.plot`)."""
        return self.report().plot(path)

    def _history_arrays(self) -> Dict[str, np.ndarray]:
        n = len(self._variable_paths)
        rows = self._history
        return dict(
            step=np.array([r["step"] for r in rows], np.int64),
            step_ratio=np.array([r["step_ratio"] for r in rows], np.float32).reshape(len(rows), n),
            grad_norm=np.array([r["grad_norm"] for r in rows], np.float32).reshape(len(rows), n),
            skipped=np.array([r["skipped"] for r in rows], np.int64),
            nonfinite=np.array([r["nonfinite"] for r in rows], bool),
        )

    def _learning_rate_value(self) -> Optional[float]:
        try:
            return float(keras.ops.convert_to_numpy(self.learning_rate))
        except (TypeError, ValueError, AttributeError):
            # AttributeError: a MultiOptimizer has a rate per sub-optimizer.
            return None

    def _step_findings(self, state) -> List[F.Finding]:
        result = []
        lr = self._learning_rate_value()
        lr_text = f" (learning rate {lr:.3g})" if lr is not None else ""
        paths = np.array(self._variable_paths, dtype=object)
        count, first, last = state["event_count"], state["event_first_step"], state["event_last_step"]

        def rows_for(code):
            row = _ROW[code]
            hit = count[row] > 0
            return row, hit, list(paths[hit])

        for code in (F.NONFINITE_GRADIENT, F.NONFINITE_WEIGHTS, F.ZERO_GRADIENT, F.TINY_STEP, F.LARGE_STEP):
            row, hit, names = rows_for(code)
            if not names:
                continue
            steps = int(count[row][hit].max())
            first_step, last_step = int(first[row][hit].min()), int(last[row][hit].max())
            value, threshold, message = self._describe(code, state, hit, names, steps, lr_text)
            policy = self._policy_for(code)
            result.append(
                F.Finding(
                    code=code,
                    message=f"{message} First seen at step {first_step}, last at step {last_step}.",
                    hint=HINTS[code],
                    variables=tuple(names),
                    first_step=first_step,
                    last_step=last_step,
                    value=value,
                    threshold=threshold,
                    severity=F.ERROR if policy in (SKIP, RAISE) or code.startswith("nonfinite") else F.WARNING,
                    count=steps,
                    details=self._details(code, state, hit, count),
                )
            )
        return result

    def _policy_for(self, code):
        return {
            F.NONFINITE_GRADIENT: self.nonfinite_gradient,
            F.NONFINITE_WEIGHTS: self.nonfinite_weights,
            F.ZERO_GRADIENT: self.zero_gradient,
            F.TINY_STEP: self.tiny_step,
            F.LARGE_STEP: self.large_step,
        }[code]

    def _details(self, code, state, hit, count):
        details = {}
        if code == F.TINY_STEP:
            below = count[_ROW["below_resolution"]][hit]
            details["below_resolution_steps"] = dict(zip(np.array(self._variable_paths)[hit], below.tolist()))
        return details

    def _describe(self, code, state, hit, names, steps, lr_text):
        who = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        if code == F.NONFINITE_GRADIENT:
            action = {SKIP: "skipped", RAISE: "stopped", WARN: "applied anyway", IGNORE: ""}[
                self.nonfinite_gradient
            ]
            return (float(steps), None,
                    f"NaN/Inf gradient for {who} on {steps} step(s); the step was {action}.")
        if code == F.NONFINITE_WEIGHTS:
            action = (
                "restored" if self.nonfinite_weights in (SKIP, RAISE)
                else "left as they are (nonfinite_weights='skip' restores them exactly, "
                "at the cost of keeping the pre-update weights and slots through every step)"
            )
            cadence = (
                f" Checked in full every {self.weights_check_every} steps and on a "
                "sample in between, so it may have happened up to "
                f"{self.weights_check_every - 1} steps before the step named "
                "(weights_check_every=1 names the exact step)."
                if self.nonfinite_weights == WARN and self.weights_check_every > 1
                else ""
            )
            return (float(steps), None,
                    f"The update turned finite weights of {who} into NaN/Inf on {steps} "
                    f"step(s){lr_text}; the weights were {action}.{cadence}")
        if code == F.ZERO_GRADIENT:
            return (float(self.patience + steps - 1), float(self.patience),
                    f"The gradient of {who} was exactly 0 for at least {self.patience} "
                    "consecutive steps.")
        if code == F.TINY_STEP:
            ratio = float(state["extreme_step_ratio"][0][hit].min())
            below = int(state["event_count"][_ROW["below_resolution"]][hit].max())
            resolution = (
                f" On {below} step(s) the relative step was below the "
                f"{self._var_dtypes[int(np.argmax(hit))]} precision "
                f"({self._resolution[int(np.argmax(hit))]:.2g}) although the gradient "
                "was not 0: the update is below the resolution of the weights, so "
                "w + Δw rounds back to w."
                if below
                else ""
            )
            return (ratio, self.min_step,
                    f"The effective step ‖Δw‖/‖w‖ of {who} stayed below min_step="
                    f"{self.min_step:g} for {self.patience}+ measured steps (smallest "
                    f"{ratio:.3g}){lr_text}.{resolution}")
        ratio = float(state["extreme_step_ratio"][1][hit].max())
        return (ratio, self.max_step,
                f"The effective step ‖Δw‖/‖w‖ of {who} stayed above max_step="
                f"{self.max_step:g} for {self.patience}+ measured steps (largest "
                f"{ratio:.3g}){lr_text}: training may diverge.")

    def _log_once(self, finding: F.Finding, count: int) -> None:
        """Logs a finding once, then at most once per `log_interval_seconds`."""
        key = (finding.code, finding.variables)
        now = time.monotonic()
        logged = self._log_times.get(key)
        if logged is None:
            self._log_times[key] = (now, count)
            log = logging.error if finding.severity == F.ERROR else logging.warning
            log("guardedopt: %s", finding)
            return
        last_time, last_count = logged
        if count > last_count and now - last_time >= self.log_interval_seconds:
            self._log_times[key] = (now, count)
            logging.warning(
                "guardedopt: [%s] still happening for %s (%d steps so far).",
                finding.code, ", ".join(finding.variables) or "the optimizer", count,
            )

    def _log_summary(self) -> None:
        report = self.report()
        if report.findings:
            logging.warning(
                "guardedopt summary after %d steps (%d skipped): %s. Call "
                "`optimizer.report()` for details and fixes.",
                report.steps, report.skipped_steps,
                "; ".join(f"{f.code} ({len(f.variables)} variable(s))" for f in report.findings),
            )

    # ---------------------------------------------------------- class weights
    def weighted(self, loss):
        """Wraps `loss` so the labels feed the guard's class balancer.

        Args:
            loss: A Keras loss (instance, name or function).

        Returns:
            A `keras.losses.Loss` that weights each sample by its class weight.

        Raises:
            ValueError: If the guard was built without `class_weight`.
        """
        if self.class_balancer is None:
            raise ValueError(
                "`weighted()` needs class weights: construct the guard with "
                "`class_weight='auto'` (or 'observe' to only count labels). "
                "Received: class_weight=None"
            )
        return self.class_balancer.weighted(loss, add_variable=self._balancer_variable_factory())

    def _balancer_variable_factory(self):
        return self.add_variable

    # ---------------------------------------------------------- serialization
    def load_own_variables(self, store):
        """Loads the optimizer state saved by `save_own_variables` (`.keras` files).

        A store saved from the bare inner optimizer (the inner optimizer's
        variables, shape for shape) is loaded into the inner optimizer; the
        guard's own state then starts afresh. An unbuilt optimizer, an empty
        store or a store saved before the first step (by this guard or the bare
        inner optimizer: as many scalars as either holds unbuilt, iterations
        and learning rates) keeps Keras' behaviour (a warning, nothing loaded).

        Raises:
            ValueError: If the store matches neither this guard nor its inner
                optimizer (Keras would skip it with only a warning).
        """
        saved = len(store.keys())
        expected = len(self.variables)
        if not self.built or saved in (0, expected) or self._build_balancer_from(store):
            return super().load_own_variables(store)
        old_table = self._old_sample_table_index(store) if saved == expected + 1 else None
        if old_table is not None:
            # Files of earlier 0.1.0 builds held the step checks' sample
            # table, which the step no longer keeps: the rest loads as it was.
            logging.info("guardedopt: dropping the sample table of an older %r file.", self.name)
            kept = [store[str(i)] for i in range(saved) if i != old_table]
            return super().load_own_variables({str(i): value for i, value in enumerate(kept)})
        inner_count = len(self.inner_optimizer.variables)
        shapes = _stored_shapes(store)
        if shapes == [tuple(v.shape) for v in self.inner_optimizer.variables]:
            logging.warning(
                "guardedopt: loading a saved %s state (%d variables, no guard state) "
                "into the inner optimizer of %r; the guard's counters start at 0. "
                "(Keras may then warn that it skips loading %r: a bare-optimizer file "
                "has no separate copy of it.)",
                type(self.inner_optimizer).__name__, saved, self.name,
                self.inner_optimizer.name,
            )
            self.inner_optimizer.load_own_variables(store)
            return
        if saved in self._unbuilt_variable_counts and all(shape == () for shape in shapes):
            logging.warning(
                "guardedopt: skipping the optimizer state of %r: the file holds %d "
                "variables, what this guard or its inner %s holds before its first "
                "step (saved before training), so there is no state to load; this "
                "guard has %d.",
                self.name, saved, type(self.inner_optimizer).__name__, expected,
            )
            return
        raise ValueError(
            f"Cannot load the optimizer state into GuardedOptimizer {self.name!r}: "
            f"the file holds {saved} optimizer variables, but this guard has "
            f"{expected} ({expected - inner_count} of its own and {inner_count} of its "
            f"inner {type(self.inner_optimizer).__name__}) and a bare "
            f"{type(self.inner_optimizer).__name__} would have {inner_count}. The file "
            "was saved with a different optimizer, other guard options (e.g. "
            "class_weight) or a different model. Recreate the optimizer the file was "
            "saved with, or load only the weights (`model.load_weights` of a "
            "`.weights.h5` saved without the optimizer, or `skip_mismatch=True`)."
        )

    def set_weights(self, weights) -> None:
        """Sets every variable of `variables` from `weights`, in that order.

        That is the guard's own state, the class balancer's counts and the
        inner optimizer's variables: the list `[v.numpy() for v in
        opt.variables]` gives. Keras' `set_weights` zips only the
        optimizer's own variables with `weights`, so on a wrapper it set the
        guard's counters and silently left the inner optimizer's slots and
        iteration count as they were (Keras' `LossScaleOptimizer` does the
        same). Nothing is assigned unless every array fits.

        Args:
            weights: One array per variable of `variables`.

        Raises:
            ValueError: The optimizer is not built, or `weights` differs from
                `variables` in number or in a shape.
        """
        if not self.built:
            return super().set_weights(weights)  # Keras' "not yet been built" error
        weights = list(weights)
        self._build_balancer_from({str(i): w for i, w in enumerate(weights)})
        variables = self.variables
        if len(weights) != len(variables):
            raise ValueError(
                f"`set_weights` of {self.name!r} needs {len(variables)} arrays, one per variable of "
                f"`variables` ({len(self.inner_optimizer.variables)} of them the inner "
                f"{type(self.inner_optimizer).__name__}'s). Received: {len(weights)} arrays."
            )
        for variable, weight in zip(variables, weights):
            if tuple(variable.shape) != tuple(np.shape(weight)):
                raise ValueError(
                    f"`set_weights` of {self.name!r}: variable {variable.path} has shape "
                    f"{tuple(variable.shape)}. Received: an array of shape {tuple(np.shape(weight))}."
                )
        for variable, weight in zip(variables, weights):
            variable.assign(weight)
        return None

    def _build_balancer_from(self, store) -> bool:
        """Builds a class balancer not built yet from a store that holds its state.

        Without `num_classes` its variables are made at the first loss call,
        so a guard built only for loading (`optimizer.build`, then
        `load_weights`) has none yet. A file saved after training holds them
        where `variables` puts them, after the guard's own: a
        `[num_classes]` vector and three scalars.
        """
        balancer = self.class_balancer
        if balancer is None or balancer.built or len(store.keys()) != len(self.variables) + _BALANCER_VARIABLES:
            return False
        first = len(self.variables) - len(self.inner_optimizer.variables)
        shapes = _stored_shapes(store)[first:first + _BALANCER_VARIABLES]
        if len(shapes[0]) != 1 or shapes[0][0] < 2 or shapes[1:] != [()] * (_BALANCER_VARIABLES - 1):
            return False
        balancer.build(shapes[0][0], add_variable=self.add_variable)
        return True

    def _old_sample_table_index(self, store) -> Optional[int]:
        """Where a store with one variable too many keeps an older file's sample table, if there.

        The `[variables, 1024]` table followed the packed measurements among
        the guard's own variables.
        """
        index = next(i for i, v in enumerate(self.variables) if v is self._guard_measurements) + 1
        if str(index) not in store:
            return None
        shape = tuple(np.shape(store[str(index)]))
        return index if shape == (len(self._variable_paths), checks.SAMPLE_SIZE) else None

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """The checkpoint layout: the inner optimizer's, plus the guard's state.

        `tf.train.Checkpoint` finds variables by attribute path. The guard's own
        `iterations`/`learning_rate` are unused placeholders (the inner
        optimizer's count), so the inner optimizer's children take their names:
        a checkpoint of the bare inner optimizer restores into a guarded one and
        the reverse, instead of restoring the placeholders (learning rate 0)
        into the bare optimizer or failing on mismatched dtypes. The guard's
        own variable list is saved as `_guard_variables`.
        """
        children = dict(super()._trackable_children(save_type, **kwargs))
        inner = self.__dict__.get("inner_optimizer")
        if inner is None:
            return children
        own_variables = children.pop("_variables", None)
        inner_children = inner._trackable_children(save_type, **kwargs)
        if own_variables is not None:
            children["_guard_variables"] = own_variables
        for name in ("_iterations", "_learning_rate", "_trainable_variables",
                     "_trainable_variables_indices"):
            children.pop(name, None)
        if "inner_optimizer" in inner_children:
            children.pop("inner_optimizer", None)
        children.update(inner_children)
        return children

    def _lookup_dependency(self, name, cached_dependencies=None):
        if cached_dependencies is None:
            cached_dependencies = self._trackable_children()
        return cached_dependencies.get(name)

    def get_config(self):
        config = {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
        }
        for option in DEFAULTS:
            config[option] = getattr(self, option)
        if self.class_balancer is not None:
            # Serialized twice: inside a `.keras` save (Keras'
            # ObjectSharingScope) the second call marks the balancer as shared
            # in the config it returns, which Keras copies into the file; the
            # loss of `opt.weighted(loss)` gets the same mark, so after loading
            # both hold one balancer again. Elsewhere the two calls are equal.
            keras.saving.serialize_keras_object(self.class_balancer)
            config["class_weight"] = keras.saving.serialize_keras_object(self.class_balancer)
        else:
            config["class_weight"] = None
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        class_weight = config.pop("class_weight", None)
        if isinstance(class_weight, dict):
            class_weight = keras.saving.deserialize_keras_object(
                class_weight, custom_objects=custom_objects
            )
        return cls(inner, class_weight=class_weight, **config)
