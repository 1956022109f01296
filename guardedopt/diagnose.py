"""`diagnose`: run a few training steps and say why the weights do not update.

`diagnose(model, data)` looks at a model, its optimizer, its loss and a few
batches of data, runs the user's own training step for a few steps, watches
from outside what happened (did `optimizer.iterations` advance, which weights
changed and by how much, did the loss go down) and returns a `Report` whose
findings name the cause and the fix. With a `GuardedOptimizer` it also merges
what the guard measured inside the step.

The model is never changed permanently: every variable of the model (weights,
non-trainable statistics such as BatchNorm moving means, dropout seed state,
metric state) and of the optimizer (`iterations`, slots, the guard's state) is
snapshotted as NumPy arrays before the first step and assigned back, bit for
bit, in a `finally` block, also when a step raises. Two things are kept on
purpose, as `fit` would do them too: an unbuilt model or optimizer is built
(the optimizer on `model.trainable_variables`), and a compiled model keeps the
train function Keras traced for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from guardedopt import findings as F
from guardedopt import hyperparams
from guardedopt import validation
from guardedopt.callback import find_guard

# Input-scale check: the 99th percentile of |x| per feature is robust to a few
# outlier rows; a first layer initialised for unit-scale inputs saturates (and
# its effective learning rate is off by the same factor) once features reach
# the hundreds, e.g. raw 0..255 pixels.
DEFAULT_INPUT_SCALE = 100.0
INPUT_SCALE_PERCENTILE = 99.0
# Class imbalance: majority/minority label count ratio at which it is reported.
DEFAULT_IMBALANCE_RATIO = 10.0
# Loss: relative improvement between the first and last pass over the same
# batches below which the loss counts as not decreasing.
DEFAULT_MIN_IMPROVEMENT = 1e-3
# A loss already this small has nothing left to decrease.
_LOSS_FLOOR = 1e-6
# Rows used for data statistics, so large arrays stay cheap to check.
_MAX_STAT_ROWS = 20000
# The root-mean-square floor of the weights in the effective-step ratio, as in
# `GuardedOptimizer(step_epsilon=...)`, so zero-initialised biases are fine.
_STEP_EPSILON = 1e-3

# First layers that make raw input scale irrelevant.
_NORMALIZING_LAYERS = (
    "Rescaling", "Normalization", "BatchNormalization", "LayerNormalization",
    "GroupNormalization", "UnitNormalization", "Embedding", "StringLookup",
    "IntegerLookup", "TextVectorization", "CategoryEncoding", "Hashing",
    "HashedCrossing", "Discretization",
)
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid", "log_softmax")

NO_UPDATE_HINT = (
    "call `optimizer.apply_gradients(zip(grads, model.trainable_variables))` "
    "inside the step (in a custom `Model.train_step`: "
    "`self.optimizer.apply_gradients(...)`)"
)


@dataclasses.dataclass
class _Batch:
    x: Any
    y: Any = None
    sample_weight: Any = None
    raw: Any = None  # The batch as the user's data yielded it.


@dataclasses.dataclass
class _Trace:
    """What the diagnosed steps did, observed from outside."""

    steps: int = 0
    losses: List[float] = dataclasses.field(default_factory=list)
    iterations_before: Optional[int] = None
    iterations_after: Optional[int] = None
    changed: Optional[np.ndarray] = None  # [n_vars] bool: ever changed
    ratios: Optional[np.ndarray] = None  # [steps, n_vars]
    skipped: List[int] = dataclasses.field(default_factory=list)  # cumulative, per step
    nonfinite_loss: List[bool] = dataclasses.field(default_factory=list)  # per step
    nonfinite_weights_step: Optional[int] = None
    nonfinite_weights: Tuple[str, ...] = ()
    # Per step, under gradient accumulation: whether the step updated the
    # weights (None: every step does).
    update_steps: Optional[List[bool]] = None
    error: Optional[BaseException] = None


def diagnose(
    model: Any,
    data: Any,
    *,
    train_step: Optional[Callable[..., Any]] = None,
    optimizer: Any = None,
    loss: Any = None,
    steps: int = 20,
    batch_size: int = 32,
    num_batches: int = 4,
    min_step: float = 1e-6,
    max_step: float = 1.0,
    input_scale: float = DEFAULT_INPUT_SCALE,
    imbalance_ratio: float = DEFAULT_IMBALANCE_RATIO,
    min_improvement: float = DEFAULT_MIN_IMPROVEMENT,
) -> F.Report:
    """Runs a few training steps and reports why the weights do (not) update.

    Two ways to train are supported:

    * A compiled Keras model (`train_step=None`): each step is one step of
      `fit` (`model.train_function` on one batch, also for a model compiled
      with `steps_per_execution` > 1), so a custom `Model.train_step` is
      exercised too. The optimizer and loss are the
      compiled ones.
    * A custom step: `train_step(batch)` (or `train_step(x, y)` when it takes
      one positional argument per batch element), eager or `tf.function`.
      Pass `optimizer=` (else `model.optimizer` is used, if any) so
      `optimizer.iterations` can be watched, and `loss=` (e.g.
      `keras.losses.SparseCategoricalCrossentropy()`) for the loss/activation
      check and the loss curve when the step does not return its loss. A step
      may return the loss as a scalar, a per-sample vector or `{"loss": ...}`.

    The same `num_batches` batches are cycled for `steps` steps, so the loss of
    the last pass is comparable with the first. Data statistics (non-finite
    values, input scale, class balance) use all of `data` when it is arrays,
    else the batches taken.

    The model and optimizer are restored bit for bit afterwards (see the module
    docstring), also when a step raises.

    Args:
        model: The Keras model whose weights should update.
        data: `(x, y)` or `(x, y, sample_weight)` arrays (or `x` alone), a
            `tf.data.Dataset` of batches, or any iterable of batches.
        train_step: The custom training step, or None for `train_on_batch`.
        optimizer: The optimizer the step applies gradients with (default:
            `model.optimizer`).
        loss: The loss of a custom step (default: the compiled loss).
        steps: Training steps to run (int >= 1; with an optimizer's
            `gradient_accumulation_steps=k`, >= 2k: only every k-th step
            updates the weights, and only those steps are measured).
        batch_size: Batch size when `data` is arrays (int >= 1).
        num_batches: Distinct batches to cycle through (int >= 1).
        min_step: Effective step `‖Δw‖/‖w‖` below which a step is tiny (for
            optimizers that are not guarded; the guard uses its own).
        max_step: Effective step above which a step is large (> min_step).
        input_scale: Feature scale (99th percentile of |x|) above which inputs
            count as unnormalized (float > 0).
        imbalance_ratio: Majority/minority class count ratio from which labels
            count as imbalanced (float > 1).
        min_improvement: Relative loss decrease between the first and the last
            pass over the batches below which the loss is not decreasing.

    Returns:
        A `Report`: `steps` is the number of steps run, `skipped_steps` those
        the guard skipped; `stats` holds `losses` (per step), `history`
        (the guard's layout, for `plot_report`: `step` [T], `step_ratio`
        [T, n_vars] measured from outside, `grad_norm` (NaN: not observable),
        `skipped` [T] cumulative guard skips, `nonfinite` [T] non-finite loss),
        `variable_paths`, `min_step`, `max_step`,
        `iterations_before`/`iterations_after` (how often the optimizer was
        applied: under `gradient_accumulation_steps` Keras' public
        `iterations` counts only the updates), `changed_variables`, and
        `step_error` if a step raised.

    Raises:
        ValueError: On invalid arguments, or a model that is neither compiled
            nor given a `train_step`.
        Exception: Whatever a step raised, if no finding explains it.
    """
    steps, batch_size, num_batches = _check_counts(steps, batch_size, num_batches)
    thresholds = _check_thresholds(min_step, max_step, input_scale, imbalance_ratio, min_improvement)
    _check_training(model, train_step)
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    if loss is None and train_step is None:
        loss = getattr(model, "loss", None)
    _check_steps_cover_updates(steps, optimizer)

    batches, x_all, y_all, weights_all = _take_batches(data, batch_size, num_batches)
    _ensure_built(model, optimizer, batches[0], compiled=train_step is None)
    found = _static_findings(model, optimizer, loss, batches, x_all, y_all, weights_all, thresholds)
    trace, gradient_kinds, guard_report, skipped = _observe(
        model, optimizer, train_step, loss, batches, steps
    )

    guard_findings = list(guard_report.findings) if guard_report is not None else []
    paths = [_path(v) for v in model.trainable_variables]
    found += _update_findings(
        trace, paths, optimizer, guard_findings, found, gradient_kinds,
        skipped, thresholds["min_step"], thresholds["max_step"],
    )
    found += _loss_findings(trace, len(batches), thresholds["min_improvement"], found + guard_findings)
    if trace.error is not None and not any(f.severity == F.ERROR for f in found + guard_findings):
        raise trace.error

    report = F.Report(findings=found, steps=trace.steps, skipped_steps=max(skipped, 0))
    report = report.merged(guard_findings)
    report.stats.update(
        losses=list(trace.losses),
        history=_history(trace, len(paths)),
        variable_paths=paths,
        min_step=thresholds["min_step"],
        max_step=thresholds["max_step"],
        iterations_before=trace.iterations_before,
        iterations_after=trace.iterations_after,
        changed_variables=[p for p, c in zip(paths, _changed(trace, len(paths))) if c],
    )
    if trace.error is not None:
        report.stats["step_error"] = f"{type(trace.error).__name__}: {trace.error}"
    if guard_report is not None:
        report.stats["guard"] = {k: v for k, v in guard_report.stats.items() if k != "history"}
    return report


def _check_counts(steps: Any, batch_size: Any, num_batches: Any) -> Tuple[int, int, int]:
    return (
        validation.check_int("steps", steps, minimum=1),
        validation.check_int("batch_size", batch_size, minimum=1),
        validation.check_int("num_batches", num_batches, minimum=1),
    )


def _check_steps_cover_updates(steps: int, optimizer: Any) -> None:
    """Under gradient accumulation only every k-th step updates: `steps` must hold two updates."""
    accumulation = _accumulation_steps(optimizer)
    if accumulation and steps < 2 * accumulation:
        raise ValueError(
            f"`steps` must be an integer >= {2 * accumulation} (two updates) for an "
            f"optimizer with gradient_accumulation_steps={accumulation}: the other "
            f"steps only accumulate and leave the weights as they are. Received: steps={steps}"
        )


def _check_thresholds(min_step, max_step, input_scale, imbalance_ratio, min_improvement) -> Dict[str, float]:
    values = dict(
        min_step=validation.check_float("min_step", min_step, minimum=0.0),
        max_step=validation.check_float("max_step", max_step, minimum=0.0, min_inclusive=False),
        input_scale=validation.check_float("input_scale", input_scale, minimum=0.0, min_inclusive=False),
        imbalance_ratio=validation.check_float(
            "imbalance_ratio", imbalance_ratio, minimum=1.0, min_inclusive=False
        ),
        min_improvement=validation.check_float("min_improvement", min_improvement, minimum=0.0),
    )
    if values["max_step"] <= values["min_step"]:
        raise ValueError(
            "`max_step` must be greater than `min_step`. Received: "
            f"max_step={max_step!r}, min_step={min_step!r}"
        )
    return values


def _check_training(model: Any, train_step: Any) -> None:
    if train_step is not None and not callable(train_step):
        raise ValueError(f"`train_step` must be callable or None. Received: train_step={train_step!r}")
    if train_step is None and not getattr(model, "compiled", False):
        raise ValueError(
            "`diagnose` needs a compiled model (`model.compile(optimizer, loss)`) or "
            "your training step: `diagnose(model, data, train_step=step, "
            "optimizer=optimizer, loss=loss_fn)`. Received: an uncompiled "
            f"{type(model).__name__} and train_step=None"
        )


def _static_findings(model, optimizer, loss, batches, x_all, y_all, weights_all, thresholds) -> List[F.Finding]:
    """What can be seen without training: data, loss/activation, frozen layers, optimizer."""
    predictions = _probe_outputs(model, batches[0].x)
    found = check_inputs(x_all, model=model, threshold=thresholds["input_scale"])
    found += check_loss_activation(model, loss, y_all, predictions=predictions)
    found += check_labels(
        y_all, loss=loss, outputs=predictions, ratio=thresholds["imbalance_ratio"], sample_weight=weights_all
    )
    found += check_frozen_layers(model)
    if optimizer is not None:
        found += hyperparams.check_hyperparameters(optimizer, variable_dtype=_weights_dtype(model))
    return found


def _observe(model, optimizer, train_step, loss, batches, steps):
    """Runs the steps between a snapshot and its restore.

    Returns:
        `(trace, gradient_kinds, guard_report, guard_skipped_steps)`.
    """
    guard = find_guard(optimizer)
    trainable = list(model.trainable_variables)
    snapshot = _Snapshot(model, optimizer)
    guard_history = list(getattr(guard, "_history", [])) if guard is not None else None
    balancer = getattr(guard, "class_balancer", None)
    balancer_was_built = balancer is not None and balancer.built
    # A built guard's report covers only the diagnosed steps (its state is in the snapshot).
    host_record = guard._begin_diagnosis() if guard is not None and guard.built else None  # pylint: disable=protected-access
    try:
        trace = _run_steps(model, optimizer, train_step, loss, batches, steps, trainable)
        gradient_kinds = None
        if trace.changed is not None and not trace.changed.all():
            gradient_kinds = _gradient_kinds(model, train_step, loss, batches[0], trainable)
        guard_report = guard.report() if guard is not None and guard.built else None
        skipped = _guard_skipped(guard)
    finally:
        snapshot.restore()
        if host_record is not None:
            guard._end_diagnosis(host_record)  # pylint: disable=protected-access
        if balancer is not None and not balancer_was_built and balancer.built:
            # Its counts were created by the diagnosed steps, after the
            # snapshot: zero them, so training starts from no labels seen.
            balancer.reset_state()
        if guard_history is not None:
            # The guard's host-side series must not keep the diagnosed steps.
            guard._history[:] = guard_history  # pylint: disable=protected-access
    return trace, gradient_kinds, guard_report, skipped


# --------------------------------------------------------------------- data
def _leading_dim(value: Any) -> Optional[int]:
    leaves = tf.nest.flatten(value)
    if not leaves or not hasattr(leaves[0], "shape") or len(leaves[0].shape) == 0:
        return None
    return int(leaves[0].shape[0])


def _take_batches(data: Any, batch_size: int, num_batches: int):
    """Returns `(batches, x_for_stats, y_for_stats, sample_weight_for_stats)`."""
    if _looks_like_arrays(data):
        parts = tuple(data) if isinstance(data, (tuple, list)) else (data,)
        parts = parts + (None,) * (3 - len(parts))
        x, y, sw = parts
        n = _leading_dim(x)
        if not n:
            raise ValueError(f"`data` holds no samples. Received: x with shape {getattr(x, 'shape', None)}")
        # A fixed-seed subset: data sorted by class would otherwise give
        # batches of a single class. The global random state is not touched.
        order = np.random.default_rng(0).permutation(n)[: batch_size * num_batches]
        batches = []
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start:start + batch_size])
            take = functools.partial(_gather, idx=idx)
            bx, by, bsw = (tf.nest.map_structure(take, p) if p is not None else None for p in (x, y, sw))
            raw = tuple(p for p in (bx, by, bsw) if p is not None)
            batches.append(_Batch(bx, by, bsw, raw if len(raw) > 1 else bx))
        stat_rows = np.random.default_rng(1).permutation(n)[:_MAX_STAT_ROWS]
        x_stats = tf.nest.map_structure(functools.partial(_gather, idx=np.sort(stat_rows)), x)
        y_stats, sw_stats = (
            None if p is None else tf.nest.map_structure(functools.partial(_gather, idx=np.sort(stat_rows)), p)
            for p in (y, sw)
        )
        return batches, x_stats, y_stats, sw_stats

    if isinstance(data, tf.data.Dataset):
        iterator = iter(data.take(num_batches))
    else:
        try:
            iterator = iter(data)
        except TypeError:
            raise ValueError(
                "`data` must be (x, y) arrays, a tf.data.Dataset or an iterable of "
                f"batches. Received: {type(data).__name__}"
            ) from None
    batches = []
    for raw in iterator:
        batches.append(_unpack(raw))
        if len(batches) >= num_batches:
            break
    if not batches:
        raise ValueError("`data` yielded no batches.")
    x_stats = _concat([b.x for b in batches])
    y_stats = _concat([b.y for b in batches]) if all(b.y is not None for b in batches) else None
    sw_stats = (
        _concat([b.sample_weight for b in batches])
        if all(b.sample_weight is not None for b in batches) else None
    )
    return batches, x_stats, y_stats, sw_stats


def _looks_like_arrays(data: Any) -> bool:
    """True for `x`, `(x, y)` or `(x, y, sw)` with array leaves of equal length."""
    if isinstance(data, tf.data.Dataset):
        return False
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        return True
    if not isinstance(data, tuple) or not 1 <= len(data) <= 3:
        return False
    lengths = set()
    for part in data:
        if part is None:
            continue
        leaves = tf.nest.flatten(part)
        if not leaves or not all(hasattr(leaf, "shape") and len(leaf.shape) >= 1 for leaf in leaves):
            return False
        lengths.update(int(leaf.shape[0]) for leaf in leaves)
    return len(lengths) == 1


def _gather(array: Any, idx: np.ndarray) -> Any:
    if isinstance(array, np.ndarray):
        return array[idx]
    return tf.gather(array, idx)


def _unpack(raw: Any) -> _Batch:
    if isinstance(raw, (tuple, list)):
        parts = list(raw) + [None] * (3 - len(raw))
        return _Batch(parts[0], parts[1], parts[2], raw)
    return _Batch(raw, None, None, raw)


def _concat(parts: Sequence[Any]) -> Any:
    return tf.nest.map_structure(lambda *leaves: np.concatenate([_numpy(l) for l in leaves]), *parts)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value)


# ------------------------------------------------------------ model helpers
def _path(variable: Any) -> str:
    return getattr(variable, "path", None) or variable.name


def _weights_dtype(model: Any) -> str:
    weights = model.trainable_variables
    return str(weights[0].dtype) if weights else "float32"


def _guard_skipped(guard: Any) -> int:
    if guard is None or not guard.built:
        return 0
    return int(_numpy(guard.skipped_steps_total))


def _ensure_built(model: Any, optimizer: Any, batch: _Batch, compiled: bool) -> None:
    """Builds what `fit` would build, so the snapshot covers every variable.

    For a compiled model Keras' own symbolic build also creates the compiled
    metrics and loss state before the first trace; a step function that
    creates variables while being traced is traced twice by `tf.function`.
    """
    symbolic_build = getattr(model, "_symbolic_build", None)
    if compiled and callable(symbolic_build):
        try:
            symbolic_build(data_batch=(batch.x, batch.y, batch.sample_weight))
        except Exception:  # pylint: disable=broad-except
            pass  # The first step raises the same error, where it is reported.
    if not model.built:
        model(batch.x, training=False)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)


def _probe_outputs(model: Any, x: Any) -> Optional[np.ndarray]:
    """The model's output on one batch (inference mode: no state changes)."""
    try:
        out = model(x, training=False)
    except Exception:  # pylint: disable=broad-except
        return None
    if isinstance(out, (list, tuple, dict)):
        return None  # Several outputs: the per-output checks do not apply.
    return _numpy(out).astype(np.float64)


def _all_variables(model: Any, optimizer: Any) -> List[Any]:
    found, seen = [], set()
    groups = [model.variables, getattr(model, "metrics_variables", [])]
    opt = optimizer
    for _ in range(8):
        if opt is None:
            break
        groups.append(opt.variables)
        opt = getattr(opt, "inner_optimizer", None)
    for group in groups:
        for v in group:
            if id(v) not in seen:
                seen.add(id(v))
                found.append(v)
    return found


class _Snapshot:
    """NumPy copies of every model and optimizer variable, to assign back."""

    def __init__(self, model: Any, optimizer: Any):
        self._model = model
        self._values = [(v, np.array(_numpy(v), copy=True)) for v in _all_variables(model, optimizer)]

    def restore(self) -> None:
        reset = getattr(self._model, "reset_metrics", None)
        if callable(reset):
            # Metric variables created during the diagnosis start from zero,
            # as they would at the start of `fit`; older ones are restored.
            reset()
        for variable, value in self._values:
            variable.assign(value)


# --------------------------------------------------------------- the steps
def _call_step(train_step: Callable[..., Any], batch: _Batch) -> Any:
    raw = batch.raw
    if isinstance(raw, (tuple, list)) and _positional_arity(train_step) >= len(raw) > 1:
        return train_step(*raw)
    return train_step(raw)


class _CompiledSteps:
    """Steps of `fit` on the cycled batches: `model.train_function(iterator)`.

    This is the path `fit` takes (a `tf.data` iterator, batches of unknown
    size, `(x, y)` without sample weights), so a custom `Model.train_step`
    doing `x, y = data` works, and the step traced here is usually the very
    one `fit` reuses afterwards. (`train_on_batch` passes `(x, y, None)` and
    traces a different function.) One iterator serves all steps.
    """

    def __init__(self, model: Any, batches: Sequence[_Batch], steps: int):
        parts = []
        for b in batches:
            data = tuple(p for p in (b.x, b.y, b.sample_weight) if p is not None)
            # As in Keras' data adapters: a list of inputs is a structure,
            # not one tensor to stack.
            data = keras.tree.lists_to_tuples(data if len(data) > 1 else data[0])
            size = _leading_dim(b.x) or 1
            parts.append(tf.data.Dataset.from_tensor_slices(data).batch(size).repeat())
        order = tf.data.Dataset.range(steps).map(lambda i: i % len(parts))
        dataset = tf.data.Dataset.choose_from_datasets(parts, order)
        self._iterator = iter(dataset)
        self._model = model

    def __call__(self) -> Any:
        self._model.make_train_function()
        self._model.reset_metrics()
        return self._model.train_function(self._iterator)


@contextlib.contextmanager
def _one_batch_per_call(model: Any):
    """Makes `model.train_function` take one batch a call, then puts the model's own back.

    A model compiled with `steps_per_execution=k` would take k batches per
    call: the steps would no longer be the ones `steps` counts, and the
    iterator of `steps` batches would run dry.
    """
    steps_per_execution = getattr(model, "steps_per_execution", 1)
    if steps_per_execution == 1:
        yield
        return
    train_function = model.train_function
    model.steps_per_execution = 1
    model.train_function = None
    try:
        yield
    finally:
        model.steps_per_execution = steps_per_execution
        model.train_function = train_function


def _positional_arity(fn: Callable[..., Any]) -> int:
    """How many positional arguments `fn` takes (a large number for *args)."""
    target = getattr(fn, "python_function", fn)  # tf.function
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return 1
    count = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return 1 << 20
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


def _scalar_loss(value: Any) -> Optional[float]:
    if isinstance(value, dict):
        value = value.get("loss")
    if value is None or isinstance(value, (tuple, list, str)):
        return None
    try:
        array = _numpy(value).astype(np.float64)
    except (TypeError, ValueError):
        return None
    return float(array.mean()) if array.size else None


def _batch_loss(model: Any, loss: Any, batch: _Batch) -> Optional[float]:
    """`loss(y, model(x))` on `batch`, for steps that do not return their loss."""
    fn = _loss_callable(loss)
    if fn is None or batch.y is None:
        return None
    try:
        return _scalar_loss(fn(batch.y, model(batch.x, training=False)))
    except Exception:  # pylint: disable=broad-except
        return None


def _loss_callable(loss: Any) -> Optional[Callable[..., Any]]:
    if loss is None:
        return None
    if isinstance(loss, str):
        try:
            return keras.losses.get(loss)
        except ValueError:
            return None
    return loss if callable(loss) else None


def _run_steps(model, optimizer, train_step, loss, batches, steps, trainable) -> _Trace:
    guard = find_guard(optimizer)
    skipped_before = _guard_skipped(guard)
    trace = _Trace()
    trace.iterations_before = _iterations(optimizer)
    initial = [_numpy(v).copy() for v in trainable]
    previous = initial
    changed = np.zeros(len(trainable), bool)
    ratios = []
    compiled_step = _CompiledSteps(model, batches, steps) if train_step is None else None
    batch_per_call = _one_batch_per_call(model) if compiled_step is not None else contextlib.nullcontext()
    accumulation = _accumulation_steps(optimizer)
    if accumulation:
        trace.update_steps = []
    with batch_per_call:
        for step in range(steps):
            batch = batches[step % len(batches)]
            if accumulation:
                calls = _iterations(optimizer)
                trace.update_steps.append(calls is not None and (calls + 1) % accumulation == 0)
            try:
                if compiled_step is not None:
                    out = compiled_step()
                else:
                    out = _call_step(train_step, batch)
            except Exception as error:  # pylint: disable=broad-except
                trace.error = error
                break
            value = _scalar_loss(out)
            if value is None:
                value = _batch_loss(model, loss, batch)
            if value is not None:
                trace.losses.append(value)
            trace.nonfinite_loss.append(value is not None and not math.isfinite(value))
            trace.skipped.append(_guard_skipped(guard) - skipped_before)
            current = [_numpy(v) for v in trainable]
            ratios.append([_relative_step(a, b) for a, b in zip(previous, current)])
            changed |= np.array(
                [not np.array_equal(a, b, equal_nan=True) for a, b in zip(initial, current)], bool
            )
            if trace.nonfinite_weights_step is None:
                bad = [p for p, c in zip(trainable, current) if not np.all(np.isfinite(c))]
                if bad:
                    trace.nonfinite_weights_step = step + 1
                    trace.nonfinite_weights = tuple(_path(v) for v in bad)
            previous = current
            trace.steps = step + 1
    trace.iterations_after = _iterations(optimizer)
    trace.changed = changed
    trace.ratios = np.array(ratios, np.float64).reshape(len(ratios), len(trainable))
    return trace


def _updating_optimizer(optimizer: Any) -> Any:
    """The optimizer that writes the weights: the one inside a guard or a loss scaler."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def _accumulation_steps(optimizer: Any) -> int:
    """The updating optimizer's `gradient_accumulation_steps` (0: off)."""
    return int(getattr(_updating_optimizer(optimizer), "gradient_accumulation_steps", None) or 0)


def _iterations(optimizer: Any) -> Optional[int]:
    """How many times the optimizer was applied.

    Keras' `_iterations`: under gradient accumulation the public
    `iterations` counts only the updates, and a step that accumulates still
    calls `apply_gradients`.
    """
    if optimizer is None:
        return None
    updating = _updating_optimizer(optimizer)
    try:
        return int(_numpy(getattr(updating, "_iterations", updating.iterations)))
    except Exception:  # pylint: disable=broad-except
        return None


def _relative_step(old: np.ndarray, new: np.ndarray) -> float:
    """`‖Δw‖ / max(‖w‖, ε√n)`, the guard's effective step, in float64."""
    old = old.astype(np.float64)
    new = new.astype(np.float64)
    if old.size == 0:
        return float("nan")
    floor = _STEP_EPSILON * math.sqrt(old.size)
    return float(np.linalg.norm(new - old) / max(float(np.linalg.norm(old)), floor))


def _gradient_kinds(model, train_step, loss, batch, trainable) -> Optional[Dict[str, str]]:
    """Per variable path: "none", "zero" or "nonzero" gradient on one batch.

    Used to tell a weight that is left out of `apply_gradients` (its gradient
    is not zero) from one that has nothing to learn from (None or 0). Needs the
    loss: the compiled one, or `loss=` for a custom step.
    """
    if batch.y is None:
        return None
    fn = None if train_step is None else _loss_callable(loss)
    if train_step is not None and fn is None:
        return None
    try:
        with tf.GradientTape() as tape:
            pred = model(batch.x, training=True)
            if fn is not None:
                value = tf.reduce_mean(fn(batch.y, pred))
            else:
                value = model.compute_loss(
                    x=batch.x, y=batch.y, y_pred=pred, sample_weight=batch.sample_weight
                )
        grads = tape.gradient(value, trainable)
    except Exception:  # pylint: disable=broad-except
        return None
    kinds = {}
    for v, g in zip(trainable, grads):
        if g is None:
            kinds[_path(v)] = "none"
        else:
            values = g.values if isinstance(g, tf.IndexedSlices) else g
            kinds[_path(v)] = "zero" if not np.any(_numpy(values)) else "nonzero"
    return kinds


def _changed(trace: _Trace, n: int) -> np.ndarray:
    return trace.changed if trace.changed is not None else np.zeros(n, bool)


def _history(trace: _Trace, n: int) -> Dict[str, np.ndarray]:
    ratios = trace.ratios if trace.ratios is not None else np.zeros((0, n))
    t = ratios.shape[0]
    return dict(
        step=np.arange(1, t + 1, dtype=np.int64),
        step_ratio=ratios.astype(np.float32),
        grad_norm=np.full((t, n), np.nan, np.float32),  # Not observable from outside.
        skipped=np.array(trace.skipped[:t], np.int64).reshape(t),
        nonfinite=np.array(trace.nonfinite_loss[:t], bool).reshape(t),
    )


# ----------------------------------------------------------- update checks
def _update_findings(
    trace: _Trace, paths, optimizer, guard_findings, static_findings,
    gradient_kinds, skipped, min_step, max_step,
) -> List[F.Finding]:
    """no_update, frozen_variables, nonfinite_weights and (unguarded) step size."""
    if trace.steps == 0 or not paths:
        return []
    changed = _changed(trace, len(paths))
    before, after = trace.iterations_before, trace.iterations_after
    advanced = None if before is None or after is None else after > before
    guard_codes = {f.code for f in guard_findings}
    explained_by_guard = {
        p for f in guard_findings
        if f.code in (F.NONE_GRADIENT, F.ZERO_GRADIENT, F.TINY_STEP, F.NONFINITE_GRADIENT)
        for p in f.variables
    }
    out: List[F.Finding] = []

    if trace.nonfinite_weights_step is not None and F.NONFINITE_WEIGHTS not in guard_codes:
        out.append(F.Finding(
            code=F.NONFINITE_WEIGHTS,
            message=(
                f"Weights became NaN/Inf at diagnosed step {trace.nonfinite_weights_step}: "
                f"{_names(trace.nonfinite_weights)}."
            ),
            hint=(
                "find the first non-finite gradient (wrap the optimizer in "
                "`GuardedOptimizer`, which skips such steps), lower the learning "
                "rate, add `clipnorm`, and check the inputs for NaN"
            ),
            variables=trace.nonfinite_weights,
            first_step=trace.nonfinite_weights_step,
            severity=F.ERROR,
        ))

    if not changed.any() and advanced is not True:
        if skipped or F.NONFINITE_GRADIENT in guard_codes:
            return out  # Every step was skipped for a reason the guard names.
        out.append(_no_update_finding(trace, len(paths), advanced))
        return out

    ratios = trace.ratios
    if trace.update_steps is not None:
        # Gradient accumulation: the other steps leave the weights as they are.
        ratios = ratios[np.array(trace.update_steps[:len(ratios)], bool)]
    moving = [i for i, c in enumerate(changed) if c]
    medians = {i: _median(ratios[:, i]) for i in moving}
    normal = [i for i in moving if medians[i] >= min_step]
    unchanged = [i for i, c in enumerate(changed) if not c and paths[i] not in explained_by_guard]
    lr_suspect = any(
        f.code == F.SUSPICIOUS_HYPERPARAMETER and f.details.get("parameter") == "learning_rate"
        for f in static_findings
    )
    guarded = bool(guard_findings) or find_guard(optimizer) is not None

    if unchanged and (normal or not lr_suspect):
        out.extend(_frozen_dynamic(trace, paths, unchanged, bool(normal), gradient_kinds))
    if not guarded:
        tiny = [i for i in moving if medians[i] < min_step]
        if tiny and not normal:
            tiny += [i for i in unchanged if not normal and lr_suspect]
            out.append(_tiny_finding(
                paths, tiny, medians, min_step, bool(unchanged) and lr_suspect, trace.steps
            ))
        large = [i for i in moving if medians[i] > max_step]
        if large:
            out.append(_large_finding(paths, large, medians, max_step, trace.steps))
    return out


def _median(values: np.ndarray) -> float:
    """Median of the finite values (NaN when there are none)."""
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


def _names(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _no_update_finding(trace: _Trace, n_vars: int, advanced: Optional[bool]) -> F.Finding:
    if advanced is None:
        what = (
            f"{trace.steps} training steps ran and none of the {n_vars} trainable "
            "weights changed (no optimizer was given, so `optimizer.iterations` "
            "could not be watched)"
        )
    else:
        what = (
            f"{trace.steps} training steps ran but `optimizer.iterations` stayed at "
            f"{trace.iterations_before} and none of the {n_vars} trainable weights changed"
        )
    return F.Finding(
        code=F.NO_UPDATE,
        message=(
            f"{what}: the step computes gradients but never calls "
            "`optimizer.apply_gradients` (the missing apply_gradients call)."
        ),
        hint=NO_UPDATE_HINT,
        first_step=1,
        last_step=trace.steps,
        value=float(trace.steps),
        severity=F.ERROR,
        count=trace.steps,
        details={"iterations": trace.iterations_before},
    )


def _frozen_dynamic(trace, paths, unchanged, others_move, gradient_kinds) -> List[F.Finding]:
    """Trainable weights that never changed, split by what their gradient was."""
    groups: Dict[str, List[str]] = {"nonzero": [], "zero": [], "none": [], "unknown": []}
    for i in unchanged:
        kind = (gradient_kinds or {}).get(paths[i], "unknown")
        groups[kind].append(paths[i])
    context = (
        "while the other weights did" if others_move
        else "although `optimizer.iterations` advanced"
    )
    steps = trace.steps
    # kind -> (code, message ending, hint), in report order.
    explanations = {
        "nonzero": (
            F.FROZEN_VARIABLES,
            f"never changed in {steps} steps {context}, although the loss's gradient "
            "for them is not 0 (computed again through the model and the loss): "
            "{names}. The step leaves them out of the variable list passed to "
            "`apply_gradients`, or computes their part of the forward pass outside "
            "its `GradientTape` (or through `tf.stop_gradient`), so that its own "
            "gradient for them is None.",
            "pass every trainable weight: "
            "`optimizer.apply_gradients(zip(grads, model.trainable_variables))` "
            "with `grads = tape.gradient(loss, model.trainable_variables)`, and run "
            "the whole forward pass inside the `tf.GradientTape` block",
        ),
        "zero": (
            F.ZERO_GRADIENT,
            f"never changed in {steps} steps because their gradient is exactly 0: "
            "{names}.",
            "look for dead ReLUs (bias or inputs that keep every unit negative; "
            "try LeakyReLU, He initialisation, normalised inputs), or a "
            "`stop_gradient`/`argmax`/`round` in the loss path",
        ),
        "none": (
            F.NONE_GRADIENT,
            "never changed because the loss does not depend on them (None gradient): "
            "{names}.",
            "use these weights in the forward pass, or mark their layer "
            "`trainable=False` if they are not meant to learn",
        ),
        "unknown": (
            F.FROZEN_VARIABLES,
            f"never changed in {steps} steps {context}: " "{names}.",
            "make sure they are in the list passed to `apply_gradients` (use "
            "`model.trainable_variables`) and that the loss depends on them; pass "
            "`loss=` to `diagnose` to tell the two apart",
        ),
    }
    out = []
    for kind, (code, ending, hint) in explanations.items():
        names = groups[kind]
        if not names:
            continue
        out.append(F.Finding(
            code=code,
            message=f"{len(names)} trainable weight(s) " + ending.format(names=_names(names)),
            hint=hint,
            variables=tuple(names), first_step=1, last_step=steps,
            value=float(len(names)), severity=F.WARNING, count=steps,
        ))
    return out


def _tiny_finding(paths, idx, medians, min_step, some_unchanged, steps) -> F.Finding:
    values = [medians[i] for i in idx if i in medians]
    smallest = min(values) if values else 0.0
    extra = (
        " Some weights did not change at all: the update is below their float "
        "resolution." if some_unchanged else ""
    )
    return F.Finding(
        code=F.TINY_STEP,
        message=(
            f"The effective step ‖Δw‖/‖w‖ of {_names([paths[i] for i in idx])} stayed "
            f"below min_step={min_step:g} (median {smallest:.3g} per step).{extra}"
        ),
        hint=(
            "raise the learning rate (Adam: 1e-4..1e-2, SGD: 1e-3..1e-1), check "
            "that a learning-rate schedule has not decayed to ~0, and normalise the inputs"
        ),
        variables=tuple(paths[i] for i in idx),
        first_step=1,
        last_step=steps,
        value=smallest,
        threshold=min_step,
        severity=F.WARNING,
    )


def _large_finding(paths, idx, medians, max_step, steps) -> F.Finding:
    largest = max(medians[i] for i in idx)
    return F.Finding(
        code=F.LARGE_STEP,
        message=(
            f"The effective step ‖Δw‖/‖w‖ of {_names([paths[i] for i in idx])} stayed "
            f"above max_step={max_step:g} (median {largest:.3g} per step): training "
            "may diverge."
        ),
        hint="lower the learning rate, add warm-up or `clipnorm`, and normalise the inputs",
        variables=tuple(paths[i] for i in idx),
        first_step=1,
        last_step=steps,
        value=largest,
        threshold=max_step,
        severity=F.WARNING,
    )


# -------------------------------------------------------------- loss curve
def _loss_findings(trace: _Trace, n_batches: int, min_improvement: float, others) -> List[F.Finding]:
    """`loss_not_decreasing`: each batch's last loss vs its first.

    Batches are cycled, so the comparison is always on the same data; a batch
    seen only once does not count, so at least `n_batches + 1` steps are needed.
    """
    losses = np.array(trace.losses, np.float64)
    if len(trace.losses) != trace.steps or trace.steps <= n_batches:
        return []
    repeated = [b for b in range(n_batches) if b + n_batches < trace.steps]
    last_seen = [b + n_batches * ((trace.steps - 1 - b) // n_batches) for b in repeated]
    first, last = losses[repeated], losses[last_seen]
    finite = np.isfinite(first) & np.isfinite(last)
    if finite.any():
        start, end = float(first[finite].mean()), float(last[finite].mean())
        if abs(start) < _LOSS_FLOOR:
            return []
        improvement = (start - end) / abs(start)
        if improvement >= min_improvement:
            return []
        what = (
            f"The loss went from {start:.4g} to {end:.4g} over {trace.steps} steps on "
            f"the same {len(repeated)} batch(es) (relative change {end / start - 1:+.2%})"
        )
    elif np.isfinite(first).any():
        # Every batch's last loss is NaN/Inf, though it started finite: a
        # divergence, which the mean of finite pairs above cannot see.
        improvement = float("-inf")
        what = (
            f"The loss went from {float(first[np.isfinite(first)].mean()):.4g} to NaN/Inf over "
            f"{trace.steps} steps on the same {len(repeated)} batch(es)"
        )
    else:
        improvement = float("nan")
        what = f"The loss was NaN/Inf on every repeated batch ({trace.steps} steps)"
    causes = [f for f in others if f.severity in (F.ERROR, F.WARNING) and f.code != F.CLASS_IMBALANCE]
    causes.sort(key=lambda f: f.severity != F.ERROR)  # Errors first, stable.
    if causes:
        codes = list(dict.fromkeys(f.code for f in causes))
        message = f"{what}; likely cause: {', '.join(codes)}."
        hint = causes[0].hint
    else:
        message = f"{what}; no other finding explains it."
        hint = (
            "try a 10x larger learning rate, check that labels match the inputs "
            "(shuffle x and y together) and that the loss fits the output "
            "activation, then diagnose with more steps"
        )
    return [F.Finding(
        code=F.LOSS_NOT_DECREASING,
        message=message,
        hint=hint,
        first_step=1,
        last_step=trace.steps,
        value=improvement,
        threshold=min_improvement,
        severity=F.WARNING,
        count=trace.steps,
        details={"likely_causes": [f.code for f in causes]},
    )]


# ------------------------------------------------------------ data checks
def _first_layers(model: Any) -> List[Any]:
    """The first layers the inputs go through (nested Sequentials opened)."""
    layers = [l for l in getattr(model, "layers", []) if type(l).__name__ != "InputLayer"]
    if not layers:
        return []
    first = layers[0]
    if hasattr(first, "layers") and getattr(first, "layers"):
        return _first_layers(first)
    # A functional model may feed several inputs to different first layers.
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) > 1:
        return layers[: len(inputs)]
    return [first]


def _normalizes_inputs(model: Any) -> bool:
    return any(type(l).__name__ in _NORMALIZING_LAYERS for l in _first_layers(model))


def check_inputs(x: Any, *, model: Any = None, threshold: float = DEFAULT_INPUT_SCALE) -> List[F.Finding]:
    """Checks input features: `nonfinite_input` and `unnormalized_input`.

    The scale of a feature is the 99th percentile of its absolute value over the
    samples (robust to a few outlier rows); inputs are unnormalized when the
    largest feature scale exceeds `threshold`. Integer inputs (token ids) and
    models whose first layer rescales or embeds (`Rescaling`, `Normalization`,
    `BatchNormalization`, `Embedding`, lookups) are not scale-checked.

    Args:
        x: Input arrays (a nest of arrays for several inputs).
        model: The model, to skip the scale check when it normalises itself.
        threshold: Feature scale above which inputs count as unnormalized.

    Returns:
        The findings.
    """
    out = []
    normalizes = model is not None and _normalizes_inputs(model)
    for position, leaf in enumerate(tf.nest.flatten(x)):
        array = _numpy(leaf)
        if array.dtype.kind not in "fc" or array.ndim == 0 or array.size == 0:
            continue
        name = "inputs" if len(tf.nest.flatten(x)) == 1 else f"input {position}"
        bad = ~np.isfinite(array)
        if bad.any():
            rows = int(bad.reshape(len(array), -1).any(axis=1).sum())
            features = np.flatnonzero(bad.reshape(len(array), -1).any(axis=0))
            out.append(F.Finding(
                code=F.NONFINITE_INPUT,
                message=(
                    f"{name}: {int(bad.sum())} NaN/Inf value(s) in {rows} of {len(array)} "
                    f"sample(s) (features {features[:8].tolist()}"
                    f"{' ...' if len(features) > 8 else ''}); every batch holding one "
                    "gives a NaN loss and NaN gradients."
                ),
                hint=(
                    "clean the data before training: drop or impute those rows, e.g. "
                    "`x = np.nan_to_num(x)` or `keep = np.isfinite(x).all(axis=1)`; "
                    "`GuardedOptimizer` skips the NaN steps meanwhile"
                ),
                value=float(rows),
                severity=F.ERROR,
                count=rows,
                details={"rows": rows, "features": features.tolist()},
            ))
        if normalizes or array.dtype.kind == "c":
            continue
        flat = np.abs(array.reshape(len(array), -1).astype(np.float64))
        flat = np.where(np.isfinite(flat), flat, np.nan)
        with np.errstate(all="ignore"):
            scales = np.nanpercentile(flat, INPUT_SCALE_PERCENTILE, axis=0)
        if not np.isfinite(scales).any():
            continue
        scale = float(np.nanmax(scales))
        if scale <= threshold:
            continue
        count = int(np.sum(scales > threshold))
        out.append(F.Finding(
            code=F.UNNORMALIZED_INPUT,
            message=(
                f"{name}: {count} of {scales.size} feature(s) have a scale (99th "
                f"percentile of |x|) above {threshold:g}, up to {scale:.4g} (median "
                f"feature scale {float(np.nanmedian(scales)):.3g}): first-layer "
                "activations saturate and the effective learning rate is off by the "
                "same factor."
            ),
            hint=(
                "scale the inputs to about [-1, 1]: divide raw 0..255 pixels by 255, "
                "standardise tabular features ((x - mean) / std), or put "
                "`keras.layers.Rescaling(1/255)` or an adapted "
                "`keras.layers.Normalization()` first in the model"
            ),
            value=scale,
            threshold=threshold,
            severity=F.WARNING,
            count=count,
            details={"feature_scales_max": scale, "features_above": count},
        ))
    return out


# --------------------------------------------------------- loss and labels
@dataclasses.dataclass(frozen=True)
class _LossInfo:
    kind: Optional[str]  # "categorical", "sparse", "binary" or None (other)
    from_logits: bool
    name: str


_LOSS_KINDS = {
    "categoricalcrossentropy": "categorical",
    "categoricalfocalcrossentropy": "categorical",
    "cce": "categorical",
    "sparsecategoricalcrossentropy": "sparse",
    "binarycrossentropy": "binary",
    "binaryfocalcrossentropy": "binary",
    "bce": "binary",
}


def _loss_info(loss: Any) -> Optional[_LossInfo]:
    """What kind of crossentropy `loss` is, and whether it takes logits."""
    if loss is None or isinstance(loss, (list, tuple, dict)):
        return None
    from_logits = False
    if isinstance(loss, str):
        name = loss
    elif isinstance(loss, functools.partial):
        name = getattr(loss.func, "__name__", "")
        from_logits = bool(loss.keywords.get("from_logits", False))
    elif inspect.isfunction(loss) or inspect.isbuiltin(loss):
        name = loss.__name__
    else:
        name = type(loss).__name__
        from_logits = bool(getattr(loss, "from_logits", False))
        try:
            from_logits = bool(loss.get_config().get("from_logits", from_logits))
        except Exception:  # pylint: disable=broad-except
            pass
    kind = _LOSS_KINDS.get(name.replace("_", "").lower())
    return _LossInfo(kind, from_logits, name)


def _output_layer(model: Any) -> Any:
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    last = layers[-1]
    if hasattr(last, "layers") and getattr(last, "layers"):
        return _output_layer(last)
    return last


def _activation_name(model: Any) -> Optional[str]:
    """Name of the output activation ("softmax", "linear", ...) or None."""
    layer = _output_layer(model)
    if layer is None:
        return None
    cls = type(layer).__name__
    if cls == "Softmax":
        return "softmax"
    if cls in ("ReLU", "LeakyReLU", "ELU", "PReLU"):
        return cls.lower()
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return name.lower()


def _output_kind(activation: Optional[str], predictions: Optional[np.ndarray]) -> Optional[str]:
    """"probabilities", "logits" or None (unknown)."""
    if activation in _PROBABILITY_ACTIVATIONS[:2]:
        return "probabilities"
    if activation == "linear":
        return "logits"
    if activation is None and predictions is not None and predictions.size:
        if np.all((predictions >= 0) & (predictions <= 1)):
            return "probabilities"
        return "logits"
    return None


def _label_form(y: Optional[np.ndarray], units: Optional[int]) -> Optional[str]:
    """"sparse" (class ids), "one_hot", or None (not class labels)."""
    if y is None or y.size == 0 or y.dtype.kind not in "biuf":
        return None
    if not np.all(np.isfinite(y)):
        return None
    integral = np.all(np.equal(np.mod(y, 1), 0))
    if y.ndim >= 2 and y.shape[-1] > 1:
        rows = y.reshape(-1, y.shape[-1])
        if np.all(rows >= 0) and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3):
            return "one_hot"
        return None
    if integral and (y.ndim == 1 or y.shape[-1] == 1):
        return "sparse"
    return None


def check_loss_activation(
    model: Any, loss: Any, y: Any = None, *, predictions: Optional[np.ndarray] = None
) -> List[F.Finding]:
    """`loss_activation_mismatch`: the loss does not fit the output or labels.

    Detects a 1-unit softmax (always 1.0, zero gradients), probabilities fed to
    a `from_logits=True` loss, raw scores fed to a `from_logits=False`
    crossentropy, a sigmoid output with categorical crossentropy, class-id
    labels with `CategoricalCrossentropy`, one-hot labels with
    `SparseCategoricalCrossentropy`, labels outside [0, 1] for binary
    crossentropy and class ids beyond the output width.

    Args:
        model: The model (its last layer's activation is inspected).
        loss: The loss: a name, a `keras.losses.Loss`, a function or a
            `functools.partial` of one. Other losses are not checked.
        y: Labels (array), for the label checks.
        predictions: The model's output on a few samples, used when the output
            activation cannot be read (subclassed models).

    Returns:
        The findings.
    """
    activation = _activation_name(model)
    units = _output_units(model, predictions)
    out = []
    if units == 1 and activation == "softmax":
        out.append(_mismatch(
            "The output layer is a softmax over 1 unit: it outputs 1.0 for "
            "every input, so its predictions carry no information and a loss computed "
            "from them is constant with zero gradients (Keras' crossentropy may train "
            "the logits behind it, but the model still predicts 1.0).",
            "for two classes use `Dense(1, activation='sigmoid')` with "
            "`BinaryCrossentropy`, or `Dense(2, activation='softmax')` with "
            "`SparseCategoricalCrossentropy`",
            F.ERROR, activation=activation, units=units,
        ))
    info = _loss_info(loss)
    if info is None or info.kind is None:
        return out
    output = _output_kind(activation, predictions)
    shown = activation or "unknown"
    if output == "probabilities" and info.from_logits and not (units == 1 and activation == "softmax"):
        out.append(_mismatch(
            f"The output layer applies {shown} (probabilities) but the loss "
            f"{info.name} has from_logits=True, which applies it again: gradients "
            "shrink and the loss cannot reach 0 (Keras undoes this only for its own "
            "softmax/sigmoid in some code paths, with a warning).",
            "remove the activation from the last layer (keep logits, numerically "
            "safer) or construct the loss with `from_logits=False`",
            F.WARNING, activation=shown, loss=info.name, from_logits=True,
        ))
    if output == "logits" and not info.from_logits:
        out.append(_mismatch(
            f"The output layer has no {'softmax' if info.kind != 'binary' else 'sigmoid'} "
            f"(activation {shown}: raw scores) but the loss {info.name} has "
            "from_logits=False, so it treats the scores as probabilities and clips "
            "them to [1e-7, 1-1e-7]: negative scores get no gradient and training stalls.",
            "construct the loss with `from_logits=True` (e.g. "
            "`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`), or add "
            f"`activation='{'sigmoid' if info.kind == 'binary' else 'softmax'}'` to the last layer",
            F.ERROR, activation=shown, loss=info.name, from_logits=False,
        ))
    if activation == "sigmoid" and info.kind in ("categorical", "sparse") and (units or 0) > 1:
        out.append(_mismatch(
            f"The output layer is a sigmoid over {units} units but the loss {info.name} "
            "expects a softmax: the outputs do not sum to 1, so the classes do not "
            "compete and the loss is not the true crossentropy.",
            "use `activation='softmax'` for one class per sample (or "
            "`BinaryCrossentropy` for multi-label outputs)",
            F.WARNING, activation=activation, loss=info.name,
        ))
    out += _label_loss_findings(_as_label_array(y), info, units)
    return out


def _as_label_array(y: Any) -> Optional[np.ndarray]:
    if y is None:
        return None
    leaves = tf.nest.flatten(y)
    if len(leaves) != 1:
        return None
    try:
        return _numpy(leaves[0])
    except (TypeError, ValueError):
        return None


def _output_units(model: Any, predictions: Optional[np.ndarray]) -> Optional[int]:
    if predictions is not None and predictions.ndim >= 1:
        return int(predictions.shape[-1]) if predictions.ndim >= 2 else 1
    layer = _output_layer(model)
    units = getattr(layer, "units", None)
    return int(units) if isinstance(units, int) else None


def _label_loss_findings(y: Optional[np.ndarray], info: _LossInfo, units: Optional[int]) -> List[F.Finding]:
    form = _label_form(y, units)
    if form is None:
        return []
    out = []
    if info.kind == "categorical" and form == "sparse" and (units or 0) > 1:
        out.append(_mismatch(
            f"The labels are class ids (shape {tuple(y.shape)}) but {info.name} expects "
            f"one-hot labels of width {units}: the ids are broadcast against the "
            f"{units} outputs, so the loss is wrong (or raises a shape error).",
            "use `keras.losses.SparseCategoricalCrossentropy` (or one-hot encode: "
            f"`keras.utils.to_categorical(y, {units})`)",
            F.ERROR, loss=info.name, labels="sparse",
        ))
    if info.kind == "sparse" and form == "one_hot":
        out.append(_mismatch(
            f"The labels are one-hot (shape {tuple(y.shape)}) but {info.name} expects "
            "class ids.",
            "use `keras.losses.CategoricalCrossentropy`, or pass `y.argmax(-1)`",
            F.ERROR, loss=info.name, labels="one_hot",
        ))
    if info.kind == "binary" and (np.min(y) < 0 or np.max(y) > 1):
        out.append(_mismatch(
            f"{info.name} needs labels in [0, 1] but they range over "
            f"{np.min(y):g}..{np.max(y):g}.",
            "for more than two classes use a softmax output with "
            "`SparseCategoricalCrossentropy`; for two, map the labels to 0 and 1",
            F.ERROR, loss=info.name,
        ))
    if info.kind == "sparse" and form == "sparse" and units and units > 1 and np.max(y) >= units:
        out.append(_mismatch(
            f"The labels go up to {int(np.max(y))} but the output has only {units} "
            "units (class ids must be < units).",
            f"give the last layer {int(np.max(y)) + 1} units, or remap the labels to 0..{units - 1}",
            F.ERROR, loss=info.name,
        ))
    return out


def _mismatch(message: str, hint: str, severity: str, **details) -> F.Finding:
    return F.Finding(
        code=F.LOSS_ACTIVATION_MISMATCH, message=message, hint=hint,
        severity=severity, details=details,
    )


def check_labels(
    y: Any, *, loss: Any = None, outputs: Optional[np.ndarray] = None,
    ratio: float = DEFAULT_IMBALANCE_RATIO, sample_weight: Any = None,
) -> List[F.Finding]:
    """Checks labels: `nonfinite_input` (NaN labels) and `class_imbalance`.

    Class ids (sparse, `(n,)` or `(n, 1)`), one-hot rows and 0/1 binary labels
    are counted; targets of a non-classification loss are not. With an unknown
    loss only integer-typed or one-hot labels count as classes.

    Args:
        y: Labels.
        loss: The loss, to tell classification from regression.
        outputs: Model outputs on a few samples (their width = number of classes).
        ratio: Majority/minority count ratio from which to report imbalance.
        sample_weight: Per-sample weights, as `fit` takes them. The ratio is
            then that of the weighted class masses (each class's summed
            weights): labels already balanced by their weights are no finding.

    Returns:
        The findings.
    """
    labels = _as_label_array(y)
    if labels is None or labels.size == 0 or labels.dtype.kind not in "biuf":
        return []
    out = []
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        rows = int((~np.isfinite(labels)).reshape(len(labels), -1).any(axis=1).sum())
        out.append(F.Finding(
            code=F.NONFINITE_INPUT,
            message=f"labels: {rows} of {len(labels)} sample(s) have a NaN/Inf label.",
            hint="drop or fix those rows before training",
            value=float(rows), severity=F.ERROR, count=rows,
            details={"rows": rows, "labels": True},
        ))
        return out
    info = _loss_info(loss)
    units = None if outputs is None or outputs.ndim < 2 else int(outputs.shape[-1])
    form = _label_form(labels, units)
    classification = info is not None and info.kind is not None
    if info is None or (info.kind is None and loss is None):
        classification = labels.dtype.kind in "biu" or form == "one_hot"
    if not classification or form is None:
        return out
    ids = labels.reshape(-1, labels.shape[-1]).argmax(axis=1) if form == "one_hot" else labels.reshape(-1)
    ids = ids.astype(np.int64)
    if ids.min() < 0:
        return out
    counts = np.bincount(ids)
    present = counts[counts > 0]
    if len(present) < 2:
        return out
    majority, minority = int(present.max()), int(present.min())
    value = majority / minority
    masses = _class_masses(ids, sample_weight, len(counts))
    if masses is not None:
        seen = np.flatnonzero(counts)
        heavy, light = int(seen[np.argmax(masses[seen])]), int(seen[np.argmin(masses[seen])])
        value = float(masses[heavy] / masses[light]) if masses[light] > 0 else float("inf")
    if value < ratio:
        return out
    share = {int(c): int(n) for c, n in enumerate(counts) if n > 0}
    if masses is None:
        spread = (
            f"Class counts range from {majority} (class {int(counts.argmax())}) to "
            f"{minority} (class {int(np.flatnonzero(counts == minority)[0])}) over "
            f"{len(ids)} labels"
        )
    else:
        spread = (
            f"Class masses (sample weights summed per class) range from {masses[heavy]:.4g} "
            f"(class {heavy}) to {masses[light]:.4g} (class {light}) over {len(ids)} labels"
        )
    out.append(F.Finding(
        code=F.CLASS_IMBALANCE,
        message=(
            f"{spread}, a ratio of {value:.3g}: the gradient is dominated by "
            "the majority class and the minority classes barely learn."
        ),
        hint=(
            "weight the classes: `GuardedOptimizer(inner, class_weight='balanced')` "
            "with `loss=opt.weighted(loss)`, or `model.fit(..., "
            "class_weight={class: n_samples / (n_classes * count)})`; or resample "
            "the minority classes"
        ),
        value=value,
        threshold=ratio,
        severity=F.WARNING,
        details={"counts": share, "label_form": form, **(
            {} if masses is None else {"masses": {c: float(masses[c]) for c in share}}
        )},
    ))
    return out


def _class_masses(ids: np.ndarray, sample_weight: Any, n_classes: int) -> Optional[np.ndarray]:
    """Each class's summed sample weights, or None without one weight per label."""
    if sample_weight is None:
        return None
    weights = np.asarray(_numpy(sample_weight), np.float64).reshape(-1)
    if weights.shape != ids.shape or not np.all(np.isfinite(weights)):
        return None
    return np.bincount(ids, weights=weights, minlength=n_classes)


# ------------------------------------------------------------ frozen layers
def _frozen_layers(layer: Any) -> List[Any]:
    """Top-most sublayers with `trainable=False` that own weights."""
    out = []
    children = getattr(layer, "_layers", None)
    if children is None:
        children = getattr(layer, "layers", [])
    for child in children:
        if not getattr(child, "trainable", True):
            if _meant_trainable(child):
                out.append(child)
        else:
            out.extend(_frozen_layers(child))
    return out


def _meant_trainable(layer: Any) -> List[Any]:
    """Weights of a frozen layer that would be trained if it were not frozen.

    Keras keeps a layer's learnable weights in `_trainable_variables` (and sets
    their `.trainable` to False when the layer is frozen); statistics such as
    BatchNorm moving means live elsewhere and are excluded.
    """
    weights = []
    for sub in layer._flatten_layers(include_self=True) if hasattr(layer, "_flatten_layers") else [layer]:
        weights.extend(getattr(sub, "_trainable_variables", []))
    return weights


def check_frozen_layers(model: Any) -> List[F.Finding]:
    """`frozen_variables` found statically: layers with `trainable=False`.

    A model with no trainable weight at all is an error; frozen layers in an
    otherwise trainable model are reported as `info` (freezing is how transfer
    learning works), so the user sees which weights will never update.

    Args:
        model: The model.

    Returns:
        The findings.
    """
    weights = getattr(model, "weights", [])
    if not weights:
        return []
    if not model.trainable_weights:
        frozen = tuple(_path(v) for v in weights)
        return [F.Finding(
            code=F.FROZEN_VARIABLES,
            message=(
                f"The model has no trainable weights: all {len(frozen)} weights are "
                f"frozen{' (model.trainable is False)' if not model.trainable else ''}, "
                "so training cannot change anything."
            ),
            hint=(
                "set `model.trainable = True` (or `layer.trainable = True` for the "
                "layers to train) and call `model.compile(...)` again"
            ),
            variables=frozen,
            value=float(len(frozen)),
            severity=F.ERROR,
        )]
    layers = _frozen_layers(model)
    if not layers:
        return []
    variables = tuple(_path(v) for layer in layers for v in _meant_trainable(layer))
    names = [layer.name for layer in layers]
    return [F.Finding(
        code=F.FROZEN_VARIABLES,
        message=(
            f"{len(names)} layer(s) have trainable=False, so their {len(variables)} "
            f"weight(s) are never updated: {_names(names)}."
        ),
        hint=(
            "if you meant to train them, set "
            f"`model.get_layer({names[0]!r}).trainable = True` and compile again "
            "(freezing is intended when fine-tuning a pretrained base)"
        ),
        variables=variables,
        value=float(len(variables)),
        severity=F.INFO,
        details={"layers": names},
    )]
