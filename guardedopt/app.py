"""guardedopt-demo: train a small model on the bundled digits, then say what broke.

    guardedopt-demo                         # healthy run: no findings
    guardedopt-demo --fault=missing_apply --mode=loop
    python -m guardedopt.app --fault=tiny_lr --epochs=3

Trains an MLP (64 -> Dense(128, relu) -> Dense(10, softmax)) on the UCI digits
bundled with guardedopt (features scaled to [0, 1], a fixed stratified split,
a fixed seed) with `GuardedOptimizer`, either with `model.fit` (`--mode=fit`)
or with the classic `tf.GradientTape` + `apply_gradients` loop in a
`tf.function` (`--mode=loop`, the code of the "why is my model not updating
its weights?" Q&A). Before training, `guardedopt.diagnose` runs a few steps
(and restores the model). It prints the diagnosis, Keras' progress bar, the
test accuracy and `print(opt.report())`.

`--fault` reproduces one cause of "the weights do not update" on the same data;
the printed reports name it by its finding code:

| --fault         | what is broken                                  | code(s)                   |
|-----------------|-------------------------------------------------|---------------------------|
| none            | nothing                                         | (none)                    |
| missing_apply   | the step never calls `apply_gradients`          | no_update                 |
| tiny_lr         | `Adam(learning_rate=1e-10)`                     | suspicious_hyperparameter, tiny_step |
| nan             | 0.5% of the training rows hold a NaN            | nonfinite_input, nonfinite_gradient |
| zero_grad       | dead ReLU layer (bias initialised to -100)      | zero_gradient             |
| unnormalized    | raw 0..255 pixel values                         | unnormalized_input        |
| imbalance       | digits 5-9 kept at 5%                           | class_imbalance           |
| frozen          | hidden layer frozen / left out of apply_gradients | frozen_variables        |
| wrong_loss      | no softmax, loss with from_logits=False         | loss_activation_mismatch  |
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from guardedopt import callback as guard_callback
from guardedopt import data
from guardedopt import flags as guard_flags
from guardedopt import plotting
from guardedopt import validation
from guardedopt.diagnose import diagnose
from guardedopt.optimizer import GuardedOptimizer, GuardError

FAULTS = (
    "none", "missing_apply", "tiny_lr", "nan", "zero_grad", "unnormalized",
    "imbalance", "frozen", "wrong_loss",
)
# The finding code(s) each fault must produce (any one of them names it).
EXPECTED_CODES: Dict[str, Tuple[str, ...]] = {
    "none": (),
    "missing_apply": ("no_update",),
    "tiny_lr": ("suspicious_hyperparameter", "tiny_step"),
    "nan": ("nonfinite_input", "nonfinite_gradient"),
    "zero_grad": ("zero_gradient",),
    "unnormalized": ("unnormalized_input",),
    "imbalance": ("class_imbalance",),
    "frozen": ("frozen_variables",),
    "wrong_loss": ("loss_activation_mismatch",),
}
OPTIMIZERS = ("adam", "adamw", "nadam", "rmsprop", "sgd", "adagrad", "lion")
TINY_LEARNING_RATE = 1e-10  # The Q&A's "inadvertently set the learning rate to 1e-10".
NAN_ROW_FRACTION = 0.005
RARE_CLASSES = (5, 6, 7, 8, 9)
RARE_FRACTION = 0.05
HIDDEN_UNITS = 128  # The Q&A's Dense(128, activation='relu').

_FAULT = flags.DEFINE_enum("fault", "none", list(FAULTS), "The training bug to reproduce.")
_MODE = flags.DEFINE_enum(
    "mode", "fit", ["fit", "loop"],
    "fit: model.fit; loop: tf.GradientTape + apply_gradients in a tf.function.",
)
_JIT = flags.DEFINE_bool("jit_compile", False, "Compile the training step with XLA.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", list(OPTIMIZERS), "The inner optimizer.")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", None, "Learning rate (default: the optimizer's Keras default).",
    lower_bound=0.0,
)
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Training epochs.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data split and the weights.", lower_bound=0)
_DIAGNOSE = flags.DEFINE_bool(
    "diagnose", True, "Run guardedopt.diagnose before training (the model is restored)."
)
_DIAGNOSE_STEPS = flags.DEFINE_integer(
    "diagnose_steps", 20, "Steps guardedopt.diagnose runs.", lower_bound=1
)
_PLOT = flags.DEFINE_string("plot", None, "Write the guard report's plot (PNG) to this path.")
_VERBOSE = flags.DEFINE_enum(
    "verbose", "1", ["0", "1", "2"], "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch."
)


@dataclasses.dataclass
class DemoResult:
    """What a demo run produced.

    Attributes:
        test_accuracy: Accuracy on the held-out digits.
        report: `opt.report()` after training (None with `--noguard`).
        diagnosis: What `guardedopt.diagnose` found before training, or None.
        error: The `GuardError` that stopped training, if any.
    """

    test_accuracy: float
    report: Any
    diagnosis: Any
    error: Optional[BaseException] = None

    @property
    def codes(self) -> List[str]:
        """Finding codes of the diagnosis and the guard report, without repeats."""
        codes = list(self.diagnosis.codes) if self.diagnosis is not None else []
        codes += list(self.report.codes) if self.report is not None else []
        return list(dict.fromkeys(codes))


# ---------------------------------------------------------------- the data
def make_data(fault: str, seed: int = 0):
    """The digits split, with the data fault applied.

    Returns:
        `((x_train, y_train), (x_test, y_test))`.
    """
    (x_train, y_train), (x_test, y_test) = data.load_digits_split(seed=seed)
    rng = np.random.default_rng(seed + 1)
    if fault == "unnormalized":
        # The same digits as raw 8-bit pixel values, as images usually arrive.
        x_train, x_test = x_train * 255.0, x_test * 255.0
    elif fault == "nan":
        rows = rng.choice(len(x_train), int(round(NAN_ROW_FRACTION * len(x_train))), replace=False)
        x_train = x_train.copy()
        x_train[rows, rng.integers(0, x_train.shape[1], len(rows))] = np.nan
    elif fault == "imbalance":
        rare = np.isin(y_train, RARE_CLASSES)
        keep = ~rare | (rng.random(len(y_train)) < RARE_FRACTION)
        x_train, y_train = x_train[keep], y_train[keep]
    return (x_train, y_train), (x_test, y_test)


# --------------------------------------------------------------- the model
def make_model(fault: str, mode: str, seed: int = 0):
    """The MLP, with the model fault applied (and the subclass for missing_apply)."""
    keras.utils.set_random_seed(seed)
    bias = keras.initializers.Constant(-100.0) if fault == "zero_grad" else "zeros"
    activation = None if fault == "wrong_loss" else "softmax"
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(
        HIDDEN_UNITS, activation="relu", bias_initializer=bias, name="hidden"
    )(inputs)
    outputs = keras.layers.Dense(10, activation=activation, name="output")(hidden)
    model_class = ForgetfulModel if fault == "missing_apply" and mode == "fit" else keras.Model
    model = model_class(inputs, outputs, name="digits_mlp")
    if fault == "frozen" and mode == "fit":
        model.get_layer("hidden").trainable = False
    return model


class ForgetfulModel(keras.Model):
    """A model whose custom `train_step` forgets `apply_gradients` (the bug)."""
    def train_step(self, batch):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        gradients = tape.gradient(loss, self.trainable_variables)  # noqa: F841
        # Missing: self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return self.compute_metrics(x, y, y_pred, sample_weight)


def make_optimizer(name: str, learning_rate: Optional[float], fault: str):
    """The inner Keras optimizer."""
    if fault == "tiny_lr":
        learning_rate = TINY_LEARNING_RATE
    optimizer = keras.optimizers.get(name)
    if learning_rate is not None:
        optimizer.learning_rate = learning_rate
    return optimizer


def make_loss():
    """The loss of every fault.

    For `wrong_loss` it is the model that is wrong: its output has no softmax
    while this loss keeps the default `from_logits=False`.
    """
    return keras.losses.SparseCategoricalCrossentropy()


# ---------------------------------------------------------- the loop mode
# Batches of any size share one trace (the last batch of an epoch is smaller).
_SIGNATURE = (tf.TensorSpec([None, 64], tf.float32), tf.TensorSpec([None], tf.int32))
# The steps have no Python control flow on tensors, so autograph has nothing to
# convert; like Keras' own train step, skip it (it would also convert the
# optimizer's code, which costs seconds per trace).
_STEP_OPTIONS = dict(input_signature=_SIGNATURE, autograph=False)


def make_train_step(model, optimizer, loss_fn, fault: str, jit_compile: bool):
    """The Q&A's `train_step(images, labels)`, with the loop-mode fault applied."""
    if fault == "missing_apply":

        @tf.function(jit_compile=jit_compile, **_STEP_OPTIONS)
        def train_step(images, labels):  # The Q&A's Example 2.
            with tf.GradientTape() as tape:
                predictions = model(images, training=True)
                loss = loss_fn(labels, predictions)
            gradients = tape.gradient(loss, model.trainable_variables)  # noqa: F841
            # Missing: optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            return loss

        return train_step

    if fault == "frozen":
        # The bug: only the output layer's weights are passed to the optimizer.
        variables = model.get_layer("output").trainable_variables
    else:
        variables = model.trainable_variables

    @tf.function(jit_compile=jit_compile, **_STEP_OPTIONS)
    def train_step(images, labels):  # The Q&A's Example 1 (and 3, with tiny_lr).
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            loss = loss_fn(labels, predictions)
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return loss

    return train_step


def _host_boundary(optimizer) -> Callable[[], None]:
    """What `GuardCallback` does after each batch of `fit`, for a custom loop.

    `check()` reads the guard state once (a point of the history behind the
    plot), logs new findings and raises `GuardError` for "raise" policies.
    """
    guard = guard_callback.find_guard(optimizer)

    def after_batch() -> None:
        if guard is not None and guard.built:
            guard.check()

    return after_batch


def _train_loop(model, optimizer, train_step, x, y, epochs, batch_size, seed, verbose):
    """The classic loop over a shuffled `tf.data.Dataset`, with Keras' progress bar."""
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
    )
    steps = int(np.ceil(len(x) / batch_size))
    after_batch = _host_boundary(optimizer)
    for epoch in range(epochs):
        if verbose:
            print(f"Epoch {epoch + 1}/{epochs}")
        progress = keras.utils.Progbar(steps, verbose=verbose)
        for batch, (images, labels) in enumerate(dataset):
            loss = train_step(images, labels)
            after_batch()
            progress.update(batch + 1, values=[("loss", float(loss))])


# ------------------------------------------------------------------ the run
def run_demo(
    *,
    fault: str = "none",
    mode: str = "fit",
    optimizer: str = "adam",
    learning_rate: Optional[float] = None,
    epochs: int = 10,
    batch_size: int = 32,
    jit_compile: bool = False,
    seed: int = 0,
    guard_kwargs: Optional[Dict[str, Any]] = None,
    guard: bool = True,
    diagnose_first: bool = True,
    diagnose_steps: int = 20,
    verbose: int = 1,
    plot: Optional[str] = None,
    out: Callable[[str], None] = print,
) -> DemoResult:
    """Trains the demo model with `fault` and prints what guardedopt found.

    Args:
        fault: One of `FAULTS`.
        mode: `"fit"` or `"loop"`.
        optimizer: Inner optimizer name, one of `OPTIMIZERS`.
        learning_rate: Learning rate (None: the optimizer's Keras default).
        epochs: Training epochs.
        batch_size: Batch size.
        jit_compile: Compile the training step with XLA.
        seed: Seed of the split, the faults and the initial weights.
        guard_kwargs: `GuardedOptimizer` arguments (e.g. from the flags).
        guard: Wrap the optimizer in `GuardedOptimizer`.
        diagnose_first: Run `guardedopt.diagnose` before training.
        diagnose_steps: Steps for `diagnose`.
        verbose: Keras verbosity (0, 1 or 2).
        plot: If set, write `plot_report` of the guard report there.
        out: Where the text goes.

    Returns:
        A `DemoResult`.

    Raises:
        ValueError: On an unknown fault, mode or optimizer.
    """
    validation.check_policy("fault", fault, FAULTS)
    validation.check_policy("mode", mode, ("fit", "loop"))
    validation.check_policy("optimizer", optimizer, OPTIMIZERS)
    (x_train, y_train), (x_test, y_test) = make_data(fault, seed)
    model = make_model(fault, mode, seed)
    inner = make_optimizer(optimizer, learning_rate, fault)
    opt = GuardedOptimizer(inner, **(guard_kwargs or {})) if guard else inner
    loss_fn = make_loss()
    if getattr(opt, "class_balancer", None) is not None:
        loss_fn = opt.weighted(loss_fn)
    out(_header(fault, mode, inner, epochs, len(x_train), len(x_test), jit_compile, guard))

    train_step = None
    if mode == "fit":
        model.compile(optimizer=opt, loss=loss_fn, metrics=["accuracy"], jit_compile=jit_compile)
    else:
        train_step = make_train_step(model, opt, loss_fn, fault, jit_compile)

    diagnosis = None
    if diagnose_first:
        diagnosis = diagnose(
            model, (x_train, y_train), train_step=train_step, optimizer=opt,
            loss=loss_fn, steps=diagnose_steps, batch_size=batch_size,
        )
        out(f"\n== guardedopt.diagnose(model, (x_train, y_train), ...): {diagnose_steps} "
            "steps, then the model was restored")
        out(str(diagnosis))

    out(f"\n== training ({mode}{', XLA' if jit_compile else ''})")
    error = None
    try:
        if mode == "fit":
            callbacks = [guard_callback.GuardCallback()] if guard else []
            model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size,
                      callbacks=callbacks, verbose=verbose, shuffle=True)
        else:
            _train_loop(model, opt, train_step, x_train, y_train, epochs, batch_size, seed, verbose)
    except GuardError as caught:
        error = caught
        out(f"\ntraining stopped: {caught}")

    # One eager call: the test set is small, and `predict` would trace a function.
    predictions = keras.ops.convert_to_numpy(model(x_test, training=False))
    accuracy = float(np.mean(np.argmax(predictions, axis=-1) == y_test))
    out(f"\ntest accuracy: {accuracy:.4f}")
    report = None
    if guard:
        report = opt.report()
        out("\n== print(opt.report())")
        out(str(report))
        if report.steps == 0:
            out("note: the guard saw no step at all: `apply_gradients` was never called "
                "(diagnose names it: no_update).")
        if plot:
            out(f"\nplot written to {plotting.plot_report(report, plot)}")
    return DemoResult(test_accuracy=accuracy, report=report, diagnosis=diagnosis, error=error)


def _header(fault, mode, inner, epochs, n_train, n_test, jit_compile, guard) -> str:
    lr = float(keras.ops.convert_to_numpy(inner.learning_rate))
    name = f"{type(inner).__name__}(learning_rate={lr:g})"
    scale = "raw 0..255" if fault == "unnormalized" else "scaled to [0, 1]"
    output = "no activation" if fault == "wrong_loss" else "softmax"
    return (
        f"guardedopt demo: fault={fault} mode={mode} epochs={epochs}"
        f"{' jit_compile' if jit_compile else ''}\n"
        f"data: UCI optical digits, {n_train} train / {n_test} test samples, 64 features {scale}\n"
        f"model: Dense({HIDDEN_UNITS}, relu) -> Dense(10, {output})\n"
        f"optimizer: {f'GuardedOptimizer({name})' if guard else name + ' (unguarded)'}"
    )


def main(argv: Sequence[str]) -> int:
    """absl entry point: runs the demo with the parsed flags.

    Returns:
        0 (the findings are the output, not an error).
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    run_demo(
        fault=_FAULT.value,
        mode=_MODE.value,
        optimizer=_OPTIMIZER.value,
        learning_rate=_LEARNING_RATE.value,
        epochs=_EPOCHS.value,
        batch_size=_BATCH_SIZE.value,
        jit_compile=_JIT.value,
        seed=_SEED.value,
        guard_kwargs=guard_flags.guard_kwargs_from_flags(),
        guard=flags.FLAGS["guard"].value,
        diagnose_first=_DIAGNOSE.value,
        diagnose_steps=_DIAGNOSE_STEPS.value,
        verbose=int(_VERBOSE.value),
        plot=_PLOT.value,
    )
    return 0


def run() -> None:
    """Console-script entry point (`guardedopt-demo`)."""
    app.run(main)


if __name__ == "__main__":
    run()
