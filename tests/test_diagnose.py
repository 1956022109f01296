"""Tests of `guardedopt.diagnose`: healthy models pass, each cause is named.

Every cause has a small real reproduction on the bundled digits.
"""

import logging
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from guardedopt import GuardCallback
from guardedopt import GuardedOptimizer
from guardedopt import data
from guardedopt import findings as F
from guardedopt.diagnose import (
    check_frozen_layers, check_inputs, check_labels, check_loss_activation, diagnose,
)
from helpers import logged

L = keras.layers


@pytest.fixture(scope="module")
def digits():
    (x, y), _ = data.load_digits_split()
    return x, y


def mlp(activation="softmax", units=10, hidden=16, **hidden_kwargs):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((64,)),
        L.Dense(hidden, activation="relu", name="hidden", **hidden_kwargs),
        L.Dense(units, activation=activation, name="out"),
    ])


def sparse_ce(**kwargs):
    return keras.losses.SparseCategoricalCrossentropy(**kwargs)


def all_state(model, optimizer):
    variables = list(model.variables) + list(getattr(model, "metrics_variables", []))
    variables += list(optimizer.variables)
    return [(v.path, np.array(v.numpy(), copy=True)) for v in variables]


def assert_bit_identical(before, after):
    assert [p for p, _ in before] == [p for p, _ in after]
    for (path, a), (_, b) in zip(before, after):
        assert a.dtype == b.dtype, path
        assert a.tobytes() == b.tobytes(), path


# ------------------------------------------------------------ healthy models
def test_healthy_mlp_has_no_findings(digits):
    model = mlp()
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    report = diagnose(model, digits)
    assert report.ok, str(report)
    assert report.steps == 20
    losses = report.stats["losses"]
    assert len(losses) == 20 and np.mean(losses[-4:]) < np.mean(losses[:4])
    assert report.stats["iterations_after"] - report.stats["iterations_before"] == 20
    assert len(report.stats["changed_variables"]) == 4


def test_healthy_cnn_with_batchnorm_and_dropout_has_no_findings(digits):
    x, y = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        L.Conv2D(8, 3, activation="relu"),
        L.BatchNormalization(),
        L.Dropout(0.2),
        L.Flatten(),
        L.Dense(10, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    report = diagnose(model, (x.reshape(-1, 8, 8, 1), y))
    assert report.ok, str(report)


def test_healthy_embedding_model_has_no_findings():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 1000, size=(512, 20))  # Token ids in the hundreds: not "unnormalized".
    labels = (tokens[:, 0] > 500).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((20,), dtype="int32"),
        L.Embedding(1000, 16),
        L.GlobalAveragePooling1D(),
        L.Dense(1, activation="sigmoid"),
    ])
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    assert diagnose(model, (tokens, labels)).ok


def qa_step(model, optimizer, loss_fn, apply=True):
    """The Q&A's train_step(images, labels), with or without apply_gradients."""

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            loss = loss_fn(labels, predictions)
        gradients = tape.gradient(loss, model.trainable_variables)
        if apply:
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    return train_step


def test_qa_example_1_correct_loop_has_no_findings(digits):
    model, opt, loss_fn = mlp(), keras.optimizers.Adam(learning_rate=0.001), sparse_ce()
    report = diagnose(model, digits, train_step=qa_step(model, opt, loss_fn), optimizer=opt, loss=loss_fn)
    assert report.ok, str(report)
    # The step returns nothing: the loss comes from `loss=`.
    assert len(report.stats["losses"]) == 20


# ----------------------------------------------------------- no_update etc.
def test_qa_example_2_missing_apply_gradients(digits):
    model, opt, loss_fn = mlp(), keras.optimizers.Adam(learning_rate=0.001), sparse_ce()
    step = qa_step(model, opt, loss_fn, apply=False)
    report = diagnose(model, digits, train_step=step, optimizer=opt, loss=loss_fn)
    (finding,) = report.by_code(F.NO_UPDATE)
    assert finding.severity == F.ERROR
    assert "`optimizer.iterations` stayed at 0" in finding.message
    assert "never calls `optimizer.apply_gradients` (the missing apply_gradients call)" in finding.message
    assert finding.hint.startswith(
        "call `optimizer.apply_gradients(zip(grads, model.trainable_variables))` inside the step"
    )
    (loss,) = report.by_code(F.LOSS_NOT_DECREASING)
    assert "likely cause: no_update" in loss.message


def test_missing_apply_without_optimizer_is_still_found(digits):
    model, opt, loss_fn = mlp(), keras.optimizers.Adam(), sparse_ce()
    report = diagnose(model, digits, train_step=qa_step(model, opt, loss_fn, apply=False), steps=4)
    (finding,) = report.by_code(F.NO_UPDATE)
    assert "no optimizer was given" in finding.message


def test_custom_model_train_step_without_apply(digits):
    class Forgetful(keras.Model):
        def train_step(self, batch):
            x, y = batch  # The common unpacking; diagnose feeds batches like fit.
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            tape.gradient(loss, self.trainable_variables)
            return {"loss": loss}

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    model = Forgetful(inputs, L.Dense(10, activation="softmax")(inputs))
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
    assert report_codes(diagnose(model, digits, steps=6)) >= {F.NO_UPDATE}


def report_codes(report):
    return set(report.codes)


def test_qa_example_3_learning_rate_1e_10(digits):
    model, opt, loss_fn = mlp(), keras.optimizers.Adam(learning_rate=1e-10), sparse_ce()
    report = diagnose(model, digits, train_step=qa_step(model, opt, loss_fn), optimizer=opt, loss=loss_fn)
    assert report.codes == [F.SUSPICIOUS_HYPERPARAMETER, F.TINY_STEP, F.LOSS_NOT_DECREASING]
    (tiny,) = report.by_code(F.TINY_STEP)
    assert tiny.value < 1e-6 and tiny.threshold == 1e-6
    (loss,) = report.by_code(F.LOSS_NOT_DECREASING)
    assert "likely cause: suspicious_hyperparameter, tiny_step" in loss.message
    assert "learning rate" in loss.hint


def test_a_loss_that_diverges_to_nan_is_named_a_divergence():
    """SGD at 10 on a regression: every batch's first loss is finite, its last
    NaN/Inf. The message said "NaN/Inf on every repeated batch"."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype("float32")
    y = rng.normal(size=(256, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), L.Dense(8, activation="relu"), L.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(10.0), loss="mse")
    report = diagnose(model, (x, y))
    losses = np.asarray(report.stats["losses"])
    assert np.isfinite(losses[0]) and not np.isfinite(losses[-1])
    (loss,) = report.by_code(F.LOSS_NOT_DECREASING)
    assert re.search(r"The loss went from [0-9.e+]+ to NaN/Inf over \d+ steps", loss.message), loss.message
    assert "every repeated batch" not in loss.message
    assert loss.value == float("-inf")


def test_diagnosis_of_a_guarded_model_holds_only_its_own_steps(caplog):
    """A guard that found a dead layer in training, then the layer fixed:
    the diagnosis reported that `zero_gradient` from the training's steps
    (merged from the guard's cumulative report). It now covers only the
    diagnosed steps; after it the guard's record is as before, and what
    the diagnosis logged is logged again when training meets it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype("float32")
    y = rng.normal(size=(256, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    dead = keras.initializers.Constant(-100.0)
    model = keras.Sequential([
        keras.Input((6,)), L.Dense(8, activation="relu", bias_initializer=dead, name="h"), L.Dense(1, name="o")
    ])
    guard = GuardedOptimizer(keras.optimizers.Adam(1e-3))
    model.compile(optimizer=guard, loss="mse")
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    (trained,) = guard.report().by_code(F.ZERO_GRADIENT)
    assert trained.last_step == 16

    assert report_codes(diagnose(model, (x, y))) & {F.ZERO_GRADIENT}  # still dead: found in its own steps
    kernel, bias = model.get_layer("h").get_weights()
    model.get_layer("h").set_weights([kernel, np.zeros_like(bias)])
    report = diagnose(model, (x, y))
    assert F.ZERO_GRADIENT not in report.codes
    (after,) = guard.report().by_code(F.ZERO_GRADIENT)
    assert (after.first_step, after.last_step) == (trained.first_step, trained.last_step)
    assert int(guard.guard_step.numpy()) == 16


    # A guard whose first finding came from the diagnosis logs it again in training.
    keras.utils.set_random_seed(0)
    fresh = keras.Sequential([
        keras.Input((6,)), L.Dense(8, activation="relu", bias_initializer=dead, name="h"), L.Dense(1, name="o")
    ])
    fresh.compile(optimizer=GuardedOptimizer(keras.optimizers.Adam(1e-3)), loss="mse")
    with caplog.at_level(logging.WARNING):
        assert F.ZERO_GRADIENT in diagnose(fresh, (x, y)).codes
        caplog.clear()
        fresh.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[GuardCallback()])
    assert logged(caplog, "guardedopt: [zero_gradient]")


# ------------------------------------------------------------------ frozen
def test_frozen_layer_in_fit(digits):
    model = mlp()
    model.get_layer("hidden").trainable = False
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
    report = diagnose(model, digits)
    (finding,) = report.findings
    assert finding.code == F.FROZEN_VARIABLES and finding.severity == F.INFO
    assert set(finding.variables) == {"sequential/hidden/kernel", "sequential/hidden/bias"} or all(
        "hidden" in v for v in finding.variables)
    assert "model.get_layer('hidden').trainable = True" in finding.hint


@pytest.mark.filterwarnings("ignore:The model does not have any trainable weights")
def test_model_without_trainable_weights(digits):
    model = mlp()
    model.trainable = False
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
    (finding,) = check_frozen_layers(model)
    assert finding.severity == F.ERROR and "no trainable weights" in finding.message
    assert F.FROZEN_VARIABLES in diagnose(model, digits, steps=3).codes


def test_variables_left_out_of_apply_gradients(digits):
    model, opt, loss_fn = mlp(), keras.optimizers.Adam(), sparse_ce()

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        head = model.get_layer("out").trainable_variables  # The bug: only the head.
        opt.apply_gradients(zip(tape.gradient(loss, head), head))
        return loss

    report = diagnose(model, digits, train_step=step, optimizer=opt, loss=loss_fn)
    (finding,) = report.findings
    assert finding.code == F.FROZEN_VARIABLES and finding.severity == F.WARNING
    assert [v.split("/")[-2:] for v in finding.variables] == [["hidden", "kernel"], ["hidden", "bias"]]
    assert "although the loss's gradient for them is not 0" in finding.message
    assert "leaves them out of the variable list passed to `apply_gradients`" in finding.message


def test_layer_run_outside_the_tape_is_named_among_the_causes(digits):
    """Every variable is passed, but the first layer runs before the tape
    opens: its gradient in the step is None. diagnose computes the gradient
    again through the model, finds it nonzero, and said only "left out of the
    variable list"; the message now names the tape as well."""
    model, opt, loss_fn = mlp(), keras.optimizers.Adam(), sparse_ce()

    @tf.function
    def step(images, labels):
        hidden = model.get_layer("hidden")(images)  # The bug: outside the tape.
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model.get_layer("out")(hidden))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    report = diagnose(model, digits, train_step=step, optimizer=opt, loss=loss_fn)
    (finding,) = report.by_code(F.FROZEN_VARIABLES)
    assert [v.split("/")[-2:] for v in finding.variables] == [["hidden", "kernel"], ["hidden", "bias"]]
    assert "outside its `GradientTape`" in finding.message
    assert "run the whole forward pass inside the `tf.GradientTape` block" in finding.hint


# ---------------------------------------------------------- zero gradients
def test_dead_relu_gives_zero_gradient(digits):
    model = mlp(bias_initializer=keras.initializers.Constant(-100.0))
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
    report = diagnose(model, digits)
    (finding,) = report.by_code(F.ZERO_GRADIENT)
    assert {v.split("/", 1)[1] for v in finding.variables} == {"hidden/kernel", "hidden/bias", "out/kernel"}
    assert "dead ReLU" in finding.hint


def test_guarded_optimizer_findings_are_merged_and_its_history_kept(digits):
    model = mlp(bias_initializer=keras.initializers.Constant(-100.0))
    opt = GuardedOptimizer(keras.optimizers.Adam(), patience=5)
    model.compile(opt, "sparse_categorical_crossentropy", run_eagerly=True)
    history_before = len(opt._history)  # pylint: disable=protected-access
    report = diagnose(model, digits, steps=8)
    (finding,) = report.by_code(F.ZERO_GRADIENT)
    assert "for at least 5 consecutive steps" in finding.message  # The guard's own finding.
    assert len(opt._history) == history_before  # pylint: disable=protected-access
    assert opt.report().steps == 0  # The guard state was restored too.


# ------------------------------------------------------------------- data
def test_nan_inputs(digits):
    x, y = digits
    x = x.copy()
    x[::100, 7] = np.nan
    model = mlp()
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
    report = diagnose(model, (x, y), steps=8)
    (finding,) = report.by_code(F.NONFINITE_INPUT)
    assert finding.severity == F.ERROR and finding.details["features"] == [7]
    assert finding.value == len(range(0, len(x), 100))
    assert F.NONFINITE_WEIGHTS in report.codes  # What the NaN did to the unguarded Adam.


def test_nan_labels():
    (finding,) = check_labels(np.array([0.0, np.nan, 1.0]))
    assert finding.code == F.NONFINITE_INPUT and "label" in finding.message


def test_unnormalized_pixels(digits):
    x, y = digits
    model = mlp()
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
    report = diagnose(model, (x * 255.0, y), steps=6)
    (finding,) = report.by_code(F.UNNORMALIZED_INPUT)
    assert finding.value == pytest.approx(255.0)
    assert finding.threshold == 100.0
    assert "divide raw 0..255 pixels by 255" in finding.hint


def test_input_scale_statistic_is_robust_and_respects_rescaling(digits):
    x, _ = digits
    assert check_inputs(x) == []  # [0, 1]
    assert check_inputs(x * 16) == []  # Raw counts 0..16 are fine.
    spiky = x.copy()
    spiky[:5] = 1e6  # Five outlier rows (< 1%) do not make the data unnormalized.
    assert check_inputs(spiky) == []
    one_feature = x.copy()
    one_feature[:, 3] = np.random.default_rng(0).normal(2000, 50, len(x))  # e.g. a year column.
    (finding,) = check_inputs(one_feature)
    assert finding.count == 1
    keras.utils.set_random_seed(0)
    rescaled = keras.Sequential([keras.Input((64,)), L.Rescaling(1 / 255), L.Dense(10)])
    assert check_inputs(x * 255, model=rescaled) == []
    assert check_inputs(np.arange(640).reshape(10, 64)) == []  # Integer ids are not scaled.


def test_class_imbalance_sparse_and_one_hot(digits):
    x, y = digits
    rare = np.isin(y, [5, 6, 7, 8, 9])
    keep = ~rare | (np.random.default_rng(0).random(len(y)) < 0.05)
    model = mlp()
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
    report = diagnose(model, (x[keep], y[keep]), steps=4)
    (finding,) = report.by_code(F.CLASS_IMBALANCE)
    counts = np.bincount(y[keep])
    assert finding.value == pytest.approx(counts.max() / counts.min())
    assert finding.details["counts"] == {i: int(c) for i, c in enumerate(counts)}
    assert "class_weight" in finding.hint
    one_hot = keras.utils.to_categorical(y[keep], 10)
    (again,) = check_labels(one_hot, loss="categorical_crossentropy")
    assert again.value == pytest.approx(finding.value)
    # Balanced digits and regression targets are not reported.
    assert check_labels(y, loss="sparse_categorical_crossentropy") == []
    assert check_labels(np.r_[np.zeros(100), np.ones(3)], loss="mse") == []


def test_class_imbalance_counts_the_users_sample_weights(digits):
    """Labels already balanced by `sample_weight` (sklearn's "balanced"
    weights) were reported as imbalanced, with the fix "weight the classes"."""
    x, y = digits
    rare = np.isin(y, [5, 6, 7, 8, 9])
    keep = ~rare | (np.random.default_rng(0).random(len(y)) < 0.05)
    x, y = x[keep], y[keep]
    counts = np.bincount(y)
    balanced = (len(y) / (10 * counts))[y].astype("float32")
    assert check_labels(y, loss="sparse_categorical_crossentropy", sample_weight=balanced) == []
    model = mlp()
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
    assert F.CLASS_IMBALANCE not in diagnose(model, (x, y, balanced), steps=4).codes
    # Weights that make it worse are measured too: the ratio of the masses.
    heavier = np.where(rare[keep], 1.0, 2.0).astype("float32")
    (finding,) = check_labels(y, loss="sparse_categorical_crossentropy", sample_weight=heavier)
    masses = np.bincount(y, weights=heavier)
    assert finding.value == pytest.approx(masses.max() / masses.min())
    assert finding.message.startswith("Class masses (sample weights summed per class) range from")
    assert finding.details["masses"] == {i: pytest.approx(m) for i, m in enumerate(masses)}


# ---------------------------------------------------------- loss/activation
def test_linear_output_with_probability_loss(digits):
    model = mlp(activation=None)
    model.compile(keras.optimizers.Adam(), sparse_ce())
    report = diagnose(model, digits, steps=6)
    (finding,) = report.by_code(F.LOSS_ACTIVATION_MISMATCH)
    assert finding.severity == F.ERROR
    assert "from_logits=False" in finding.message
    assert "SparseCategoricalCrossentropy(from_logits=True)" in finding.hint


def test_softmax_output_with_from_logits_true():
    model = mlp()
    (finding,) = check_loss_activation(model, sparse_ce(from_logits=True), np.arange(10))
    assert finding.severity == F.WARNING and "from_logits=True" in finding.message


def test_one_unit_softmax_reproduction(digits):
    x, y = digits
    binary = (y > 4).astype("float32")
    model = mlp(units=1)
    model.compile(keras.optimizers.Adam(), "binary_crossentropy")
    with pytest.warns(UserWarning, match="softmax over axis -1"):
        report = diagnose(model, (x, binary), steps=6)
    (finding,) = report.by_code(F.LOSS_ACTIVATION_MISMATCH)
    assert "softmax over 1 unit" in finding.message and finding.severity == F.ERROR
    # The reproduction: whatever the weights, the model predicts 1.0.
    with pytest.warns(UserWarning):
        predictions = model(x[:50], training=False).numpy()
    np.testing.assert_allclose(predictions, 1.0, atol=1e-6)


def test_sigmoid_output_with_categorical_crossentropy():
    model = mlp(activation="sigmoid")
    labels = keras.utils.to_categorical(np.arange(20) % 10, 10)
    (finding,) = check_loss_activation(model, keras.losses.CategoricalCrossentropy(), labels)
    assert "sigmoid over 10 units" in finding.message


def test_integer_labels_with_categorical_crossentropy(digits):
    x, y = digits
    model = mlp()
    model.compile(keras.optimizers.Adam(), "categorical_crossentropy")
    # Keras rejects (n, 1) labels against (n, 10) outputs at the first step;
    # diagnose reports why instead of only re-raising.
    report = diagnose(model, (x, y.reshape(-1, 1)), steps=3)
    (finding,) = report.by_code(F.LOSS_ACTIVATION_MISMATCH)
    assert "class ids" in finding.message and "SparseCategoricalCrossentropy" in finding.hint
    assert "step_error" in report.stats


def test_label_checks_for_binary_and_out_of_range():
    model = mlp(activation="sigmoid", units=1)
    (finding,) = check_loss_activation(model, "binary_crossentropy", np.arange(10))
    assert "labels in [0, 1]" in finding.message
    (finding,) = check_loss_activation(mlp(), sparse_ce(), np.arange(11))
    assert "labels go up to 10 but the output has only 10 units" in finding.message
    (finding,) = check_loss_activation(mlp(), sparse_ce(), keras.utils.to_categorical(np.arange(10)))
    assert "one-hot" in finding.message


def test_loss_functions_and_partials_are_recognised():
    import functools

    model = mlp(activation=None)
    fn = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)
    assert check_loss_activation(model, fn, np.arange(10)) == []
    assert len(check_loss_activation(model, keras.losses.sparse_categorical_crossentropy, np.arange(10))) == 1
    assert check_loss_activation(model, "mse", np.arange(10)) == []


# ------------------------------------------------------------- restoration
def test_restores_weights_optimizer_and_metrics_bit_exactly(digits):
    x, y = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)), L.Dense(16, activation="relu"), L.BatchNormalization(),
        L.Dropout(0.3), L.Dense(10, activation="softmax"),
    ])
    opt = keras.optimizers.Adam(1e-3)
    model.compile(opt, "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:64], y[:64], epochs=1, batch_size=32, verbose=0)  # Non-trivial state.
    before = all_state(model, opt)
    iterations = int(opt.iterations.numpy())
    report = diagnose(model, (x, y), steps=10)
    assert report.stats["iterations_after"] == iterations + 10  # It did train...
    assert_bit_identical(before, all_state(model, opt))  # ...and undid it.
    assert int(opt.iterations.numpy()) == iterations


def test_restores_an_unbuilt_optimizer_to_its_fresh_state(digits):
    model, opt, loss_fn = mlp(), keras.optimizers.Adam(), sparse_ce()
    step = qa_step(model, opt, loss_fn)
    weights = [w.numpy().copy() for w in model.weights]
    diagnose(model, digits, train_step=step, optimizer=opt, loss=loss_fn, steps=5)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(weights, model.weights))
    # Built by diagnose (as fit would), with zero slots and iterations.
    assert opt.built and int(opt.iterations.numpy()) == 0
    assert all(not np.any(v.numpy()) for v in opt.variables if "momentum" in v.name or "velocity" in v.name)


def test_restores_when_the_step_raises(digits):
    model, opt, loss_fn = mlp(), keras.optimizers.Adam(), sparse_ce()
    opt.build(model.trainable_variables)
    calls = []

    def step(images, labels):
        calls.append(1)
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        if len(calls) == 3:
            raise RuntimeError("user bug")

    before = all_state(model, opt)
    with pytest.raises(RuntimeError, match="user bug"):
        diagnose(model, digits, train_step=step, optimizer=opt, loss=loss_fn)
    assert_bit_identical(before, all_state(model, opt))


# ------------------------------------------------------------------ inputs
def test_dataset_and_iterable_of_batches(digits):
    x, y = digits
    model = mlp()
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(512, seed=0).batch(32)
    assert diagnose(model, dataset, steps=8).ok
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    assert diagnose(model, batches, steps=8).ok


def test_train_step_taking_one_batch_argument_and_returning_a_dict(digits):
    model, opt, loss_fn = mlp(), keras.optimizers.Adam(), sparse_ce()

    @tf.function
    def step(batch):
        images, labels = batch
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return {"loss": loss}

    report = diagnose(model, digits, train_step=step, optimizer=opt, steps=8)
    assert report.ok and len(report.stats["losses"]) == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), r"`steps` must be an integer >= 1. Received: steps=0"),
        (dict(batch_size=-1), r"`batch_size` must be an integer >= 1"),
        (dict(min_step=0.5, max_step=0.1), r"`max_step` must be greater than `min_step`"),
        (dict(imbalance_ratio=1.0), r"`imbalance_ratio` must be a finite float > 1"),
        (dict(train_step=3), r"`train_step` must be callable or None"),
    ],
)
def test_argument_validation(digits, kwargs, message):
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=message):
        diagnose(model, digits, **kwargs)


def test_uncompiled_model_without_train_step_is_rejected(digits):
    with pytest.raises(ValueError, match=r"needs a compiled model .* or your training step"):
        diagnose(mlp(), digits)


def test_diagnose_leaves_no_label_counts_in_a_lazily_built_class_balancer():
    import guardedopt

    rng = np.random.RandomState(0)
    x = rng.randn(64, 6).astype("float32")
    y = rng.randint(0, 3, 64).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    opt = guardedopt.GuardedOptimizer("adam", class_weight="auto")
    model.compile(optimizer=opt, loss=opt.weighted(keras.losses.SparseCategoricalCrossentropy(from_logits=True)))
    guardedopt.diagnose(model, (x, y), steps=3)
    assert opt.class_balancer.built
    np.testing.assert_array_equal(opt.class_balancer.counts(), np.zeros(3))


# ------------------------------------------- model set-ups fit takes as well
@pytest.mark.parametrize("wrap", (False, True), ids=("bare", "guarded"))
def test_steps_per_execution_model_is_diagnosed_one_batch_a_step(digits, wrap):
    # Compiled with steps_per_execution=4, each train_function call took four
    # batches: the iterator of `steps` batches ran dry (StopIteration).
    x, y = digits
    model = mlp()
    optimizer = GuardedOptimizer(keras.optimizers.Adam(1e-3)) if wrap else keras.optimizers.Adam(1e-3)
    model.compile(optimizer, "sparse_categorical_crossentropy", steps_per_execution=4)
    model.fit(x, y, epochs=1, verbose=0)
    before = all_state(model, optimizer)
    report = diagnose(model, digits, steps=12)
    assert report.ok, str(report)
    assert report.steps == 12
    assert report.stats["iterations_after"] - report.stats["iterations_before"] == 12
    assert_bit_identical(before, all_state(model, optimizer))
    assert model.steps_per_execution == 4
    iterations = int(optimizer.iterations.numpy())
    model.fit(x[:128], y[:128], batch_size=32, epochs=1, verbose=0)
    assert int(optimizer.iterations.numpy()) == iterations + 4


def test_inputs_given_as_a_list_are_a_structure_not_one_tensor(digits):
    # `[x1, x2]` was stacked into one tensor: "Can't convert non-rectangular
    # Python sequence to Tensor".
    x, y = digits
    keras.utils.set_random_seed(0)
    left, right = keras.Input((40,)), keras.Input((24,))
    hidden = L.Dense(16, activation="relu")(L.Concatenate()([left, right]))
    model = keras.Model([left, right], L.Dense(10, activation="softmax")(hidden))
    model.compile(GuardedOptimizer(keras.optimizers.Adam(1e-3)), "sparse_categorical_crossentropy")
    report = diagnose(model, ([x[:, :40], x[:, 40:]], y))
    assert report.ok, str(report)
    assert report.steps == 20


def test_model_without_trainable_weights_is_frozen_not_a_crash(digits):
    # With a guard, the history of zero variables failed to reshape.
    model = keras.Sequential([keras.Input((64,)), L.Dense(10, activation="softmax", trainable=False)])
    model.compile(GuardedOptimizer(keras.optimizers.Adam(1e-3)), "sparse_categorical_crossentropy")
    report = diagnose(model, digits, steps=3)
    assert F.FROZEN_VARIABLES in report.codes
    assert report.by_code(F.FROZEN_VARIABLES)[0].severity == F.ERROR


def test_gradient_accumulation_is_not_a_tiny_step(digits):
    # Three of four steps only accumulate and leave the weights as they are:
    # their zero steps made the median a tiny step.
    model = mlp()
    model.compile(keras.optimizers.Adam(1e-3, gradient_accumulation_steps=4), "sparse_categorical_crossentropy")
    report = diagnose(model, digits, steps=20)
    assert report.ok, str(report)
    # Counted in applications, not in Keras' updates (5).
    assert report.stats["iterations_after"] - report.stats["iterations_before"] == 20


def test_gradient_accumulation_longer_than_the_steps_is_a_value_error(digits):
    # 20 steps of 32-step accumulation update nothing: once read as a missing
    # apply_gradients call, then as a loss that does not decrease.
    model = mlp()
    model.compile(keras.optimizers.Adam(1e-3, gradient_accumulation_steps=32), "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"`steps` must be an integer >= 64 \(two updates\) .*Received: steps=20"):
        diagnose(model, digits, steps=20)
