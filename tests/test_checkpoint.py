"""Checkpoints of a guarded model (issue 6).

* Kill and resume: one epoch here, then a NEW process restores the
  `tf.train.Checkpoint` (before the optimizer is built: deferred) and the
  `.keras` file written by `ModelCheckpoint`, and trains the second epoch. The
  weights, the inner optimizer's slots and the guard's counters must equal an
  uninterrupted two-epoch run bit for bit (CPU).
* Bare <-> guarded: a checkpoint of the bare inner optimizer loads into a
  guarded model and the reverse, or fails with a clear message; variables are
  never skipped silently.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import guardedopt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _checkpoint_resume as resume  # noqa: E402

RESUME_TIMEOUT_S = 300


def _bits(values):
    return [np.asarray(keras.ops.convert_to_numpy(v)).tobytes() for v in values]


def test_kill_and_resume_continues_exactly(tmp_path):
    full = resume.train(resume.make_model(), epochs=2)
    expected = resume.state(full)
    guard = full.optimizer
    assert int(guard.guard_step.numpy()) == 2 * resume.BATCHES
    assert int(guard.skipped_steps_total.numpy()) == 2  # one NaN batch per epoch
    assert int(guard.iterations.numpy()) == 2 * resume.BATCHES - 2

    keras_path = str(tmp_path / "epoch.keras")
    prefix = str(tmp_path / "ckpt" / "guarded")
    first = resume.make_model()
    resume.train(first, callbacks=[keras.callbacks.ModelCheckpoint(keras_path)])
    tf.train.Checkpoint(model=first, optimizer=first.optimizer).write(prefix)
    del first  # the "killed" process keeps nothing for the resume

    out = tmp_path / "resumed.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_checkpoint_resume.py"), prefix, keras_path, str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RESUME_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = np.load(out)
    for kind in ("tf_deferred", "keras"):
        keys = sorted(k[len(kind) + 1:] for k in resumed.files if k.startswith(kind + "/"))
        assert keys == sorted(expected), kind
        differ = [
            k for k in keys if resumed[f"{kind}/{k}"].tobytes() != np.asarray(expected[k]).tobytes()
        ]
        assert differ == [], f"{kind}: differs from the uninterrupted run: {differ}"


# ------------------------------------------------------------ bare <-> guarded
def _bare_adam():
    return keras.optimizers.Adam(1e-2)


def _trained(optimizer):
    return resume.train(resume.make_model(optimizer), clean=True)


def test_keras_file_of_bare_optimizer_loads_into_guard(tmp_path, caplog):
    bare = _trained(_bare_adam())
    path = str(tmp_path / "bare.weights.h5")
    bare.save_weights(path)

    guarded = resume.make_model()
    guarded.optimizer.build(guarded.trainable_variables)
    with caplog.at_level(logging.WARNING):
        guarded.load_weights(path)
    guard = guarded.optimizer
    assert _bits(guard.inner_optimizer.variables) == _bits(bare.optimizer.variables)
    assert int(guard.guard_step.numpy()) == 0
    assert "into the inner optimizer" in caplog.text

    # Both continue identically: the slots and iterations really were loaded.
    resume.train(bare, clean=True)
    resume.train(guarded, clean=True)
    assert _bits(bare.weights) == _bits(guarded.weights)


def test_weights_file_with_an_online_class_balancer_loads_into_a_guard_built_for_loading(tmp_path):
    """`class_weight="auto"` without `num_classes` makes the balancer's variables at the first
    loss call; a guard built only to load (`optimizer.build`, `load_weights`) must make them from
    the file."""
    rs = np.random.RandomState(0)
    x = rs.randn(64, 6).astype("float32")
    y = np.where(rs.rand(64) < 0.8, 0, rs.randint(1, 3, 64)).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
        guard = guardedopt.GuardedOptimizer(keras.optimizers.Adam(1e-2), class_weight="auto")
        model.compile(optimizer=guard, loss=guard.weighted(loss))
        return model

    trained = make()
    trained.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "balanced.weights.h5")
    trained.save_weights(path)
    loaded = make()
    loaded.optimizer.build(loaded.trainable_variables)
    loaded.load_weights(path)
    assert _bits(loaded.optimizer.variables) == _bits(trained.optimizer.variables)
    np.testing.assert_array_equal(loaded.optimizer.class_balancer.counts(), np.bincount(y, minlength=3))
    # Both go on identically: the loss weights the next batches from the restored counts.
    for model in (trained, loaded):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert _bits(loaded.weights) == _bits(trained.weights)
    assert _bits(loaded.optimizer.variables) == _bits(trained.optimizer.variables)


@pytest.mark.parametrize("saved_with", ("guard", "bare"))
def test_keras_file_saved_before_the_first_step_loads(tmp_path, caplog, saved_with):
    # An "epoch 0" snapshot holds the optimizer unbuilt (4 variables guarded,
    # 2 bare). Loaded into a built guard it was refused as "a different
    # optimizer"; Keras loads such a file into the bare optimizer with a
    # warning and no optimizer state.
    unbuilt = guardedopt.GuardedOptimizer(_bare_adam()) if saved_with == "guard" else _bare_adam()
    path = str(tmp_path / "epoch0.keras")
    resume.make_model(unbuilt).save(path)

    with caplog.at_level(logging.WARNING):
        loaded = keras.models.load_model(path) if saved_with == "guard" else None
        if loaded is None:
            loaded = resume.make_model()
            loaded.optimizer.build(loaded.trainable_variables)
            loaded.load_weights(path)
    guard = loaded.optimizer
    assert isinstance(guard, guardedopt.GuardedOptimizer)
    assert "saved before training" in caplog.text
    assert int(guard.guard_step.numpy()) == 0 and int(guard.iterations.numpy()) == 0
    # It trains as a fresh guard does, bit for bit.
    fresh = resume.make_model()
    resume.train(fresh, clean=True)
    resume.train(loaded, clean=True)
    assert _bits(loaded.weights) == _bits(fresh.weights)
    assert _bits(guard.inner_optimizer.variables) == _bits(fresh.optimizer.inner_optimizer.variables)


def _dense_model(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def test_store_that_only_counts_like_an_unbuilt_one_is_refused(tmp_path):
    # A trained SGD(momentum) of one Dense layer saves 4 variables, as many as
    # an unbuilt guard: that count alone must not make it "saved before
    # training" (it would load nothing, with only a warning).
    x, y = np.ones((8, 3), np.float32), np.ones((8, 1), np.float32)
    bare = _dense_model(keras.optimizers.SGD(0.05, momentum=0.9))
    bare.fit(x, y, verbose=0)
    path = str(tmp_path / "sgd.weights.h5")
    bare.save_weights(path)
    guarded = _dense_model(guardedopt.GuardedOptimizer(_bare_adam()))
    guarded.optimizer.build(guarded.trainable_variables)
    assert len(bare.optimizer.variables) in guarded.optimizer._unbuilt_variable_counts
    with pytest.raises(ValueError, match="Cannot load the optimizer state"):
        guarded.load_weights(path)


def test_unbuilt_guard_file_whose_count_equals_the_built_inner_loads(tmp_path):
    # The unbuilt guard's 4 scalars counted as a bare SGD(momentum) file of
    # the built inner optimizer (also 4): the scalars went into the momentum
    # slots and loading failed on their shapes.
    path = str(tmp_path / "epoch0.keras")
    _dense_model(guardedopt.GuardedOptimizer(keras.optimizers.SGD(0.05, momentum=0.9))).save(path)
    loaded = keras.models.load_model(path)
    inner = loaded.optimizer.inner_optimizer
    assert [tuple(v.shape) for v in inner.variables[2:]] == [(3, 1), (1,)]
    assert all(not np.any(v.numpy()) for v in inner.variables[2:])
    np.testing.assert_allclose(float(inner.learning_rate.numpy()), 0.05, rtol=1e-6)


def test_keras_file_of_guard_into_bare_optimizer_warns(tmp_path):
    """Keras' own optimizer loading skips a store of another size with a
    warning; the README says how to drop the guard (load it guarded, then
    recompile with `guard.inner_optimizer`)."""
    guarded = _trained(guardedopt.GuardedOptimizer(_bare_adam()))
    path = str(tmp_path / "guarded.weights.h5")
    guarded.save_weights(path)
    bare = resume.make_model(_bare_adam())
    bare.optimizer.build(bare.trainable_variables)
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        bare.load_weights(path)

    # The documented way: load guarded, keep the inner optimizer.
    loaded = resume.make_model()
    loaded.optimizer.build(loaded.trainable_variables)
    loaded.load_weights(path)
    inner = loaded.optimizer.inner_optimizer
    loaded.compile(optimizer=inner, loss="sparse_categorical_crossentropy")
    assert _bits(inner.variables) == _bits(guarded.optimizer.inner_optimizer.variables)


def test_store_of_an_older_guard_with_a_sample_table_loads():
    """Files written before the step-check sample table was dropped hold one
    more variable, `[variables, 1024]`, after the packed measurements: the
    rest loads, bit for bit."""
    guarded = _trained(guardedopt.GuardedOptimizer(_bare_adam()))
    guard = guarded.optimizer
    values = [np.asarray(keras.ops.convert_to_numpy(v)) for v in guard.variables]
    at = next(i for i, v in enumerate(guard.variables) if v is guard._guard_measurements) + 1
    table = np.ones((len(guarded.trainable_variables), guardedopt.checks.SAMPLE_SIZE), np.float32)
    older = values[:at] + [table] + values[at:]

    fresh = resume.make_model()
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.optimizer.load_own_variables({str(i): v for i, v in enumerate(older)})
    assert _bits(fresh.optimizer.variables) == _bits(values)
    # A store with an extra variable of another shape is still refused.
    wrong = values[:at] + [np.ones(3, np.float32)] + values[at:]
    with pytest.raises(ValueError, match="Cannot load the optimizer state"):
        fresh.optimizer.load_own_variables({str(i): v for i, v in enumerate(wrong)})


def test_set_weights_rolls_back_the_guard_and_the_inner_optimizer():
    """`opt.set_weights([v.numpy() for v in opt.variables])` restores all of
    the state: Keras' own zipped only the wrapper's variables with the
    arrays, and left the inner optimizer's slots and iteration count at the
    later step, with no error."""
    model = _trained(guardedopt.GuardedOptimizer(_bare_adam()))
    guard = model.optimizer
    weights = model.get_weights()
    saved = [np.asarray(keras.ops.convert_to_numpy(v)) for v in guard.variables]
    iterations = int(guard.iterations.numpy())
    resume.train(model, clean=True)
    later = _bits(guard.variables)
    assert int(guard.iterations.numpy()) == 2 * iterations

    model.set_weights(weights)
    guard.set_weights(saved)
    assert _bits(guard.variables) == _bits(saved)
    assert int(guard.iterations.numpy()) == iterations
    # The rolled-back optimizer repeats the second epoch bit for bit.
    resume.train(model, clean=True)
    assert _bits(guard.variables) == later


def test_set_weights_with_a_wrong_count_or_shape_raises_and_assigns_nothing():
    model = _trained(guardedopt.GuardedOptimizer(_bare_adam()))
    guard = model.optimizer
    values = [np.asarray(keras.ops.convert_to_numpy(v)) for v in guard.variables]
    before = _bits(guard.variables)
    with pytest.raises(ValueError, match=rf"needs {len(values)} arrays.*Received: {len(values) - 1} arrays"):
        guard.set_weights(values[:-1])
    reshaped = values[:-1] + [np.zeros(values[-1].shape + (2,), values[-1].dtype)]
    with pytest.raises(ValueError, match=r"has shape .*Received: an array of shape"):
        guard.set_weights([v + 1 for v in values[:-1]] + reshaped[-1:])
    assert _bits(guard.variables) == before


def test_set_weights_builds_an_online_class_balancer_for_its_counts():
    """A guard built for loading has no balancer variables until the first
    loss call; the arrays of a trained one (4 more) build them, as a weights
    file does."""
    x, y = resume.data()
    x = np.nan_to_num(x)

    def make():
        keras.utils.set_random_seed(7)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
        guard = guardedopt.GuardedOptimizer(_bare_adam(), class_weight="auto")
        model.compile(optimizer=guard, loss=guard.weighted("sparse_categorical_crossentropy"))
        return model

    trained = make()
    trained.fit(x, y, batch_size=resume.BATCH, epochs=1, shuffle=False, verbose=0)
    values = [np.asarray(keras.ops.convert_to_numpy(v)) for v in trained.optimizer.variables]
    fresh = make()
    fresh.optimizer.build(fresh.trainable_variables)
    assert len(fresh.optimizer.variables) == len(values) - 4
    fresh.optimizer.set_weights(values)
    assert _bits(fresh.optimizer.variables) == _bits(values)
    assert fresh.optimizer.class_balancer.counts().tolist() == trained.optimizer.class_balancer.counts().tolist()


def test_keras_file_of_other_optimizer_raises(tmp_path):
    guarded = _trained(guardedopt.GuardedOptimizer(_bare_adam()))
    path = str(tmp_path / "adam.weights.h5")
    guarded.save_weights(path)
    other = resume.make_model(guardedopt.GuardedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)))
    other.optimizer.build(other.trainable_variables)
    with pytest.raises(ValueError, match="Cannot load the optimizer state") as info:
        other.load_weights(path)
    message = str(info.value)
    saved = len(guarded.optimizer.variables)
    assert f"the file holds {saved} optimizer variables" in message
    assert f"this guard has {len(other.optimizer.variables)}" in message


INNER = {
    "adam": _bare_adam,
    "loss_scale": lambda: keras.optimizers.LossScaleOptimizer(_bare_adam(), initial_scale=64.0),
}


_CHECKPOINTS = {}


def _checkpoints(inner, tmp_path_factory):
    """A bare and a guarded model trained one epoch, and their checkpoints."""
    if inner not in _CHECKPOINTS:
        folder = tmp_path_factory.mktemp(f"ckpt_{inner}")
        bare = _trained(INNER[inner]())
        guarded = _trained(guardedopt.GuardedOptimizer(INNER[inner]()))
        bare_prefix = tf.train.Checkpoint(model=bare, optimizer=bare.optimizer).write(
            str(folder / "bare" / "ckpt"))
        guarded_prefix = tf.train.Checkpoint(model=guarded, optimizer=guarded.optimizer).write(
            str(folder / "guarded" / "ckpt"))
        _CHECKPOINTS[inner] = (bare, bare_prefix, guarded, guarded_prefix)
    return _CHECKPOINTS[inner]


@pytest.mark.parametrize("built", [True, False], ids=["built", "deferred"])
@pytest.mark.parametrize("inner", sorted(INNER))
def test_tf_checkpoint_bare_and_guarded_are_interchangeable(tmp_path_factory, inner, built):
    """The guard's checkpoint layout is its inner optimizer's plus its own
    state, so either loads into the other (placeholders are never restored:
    a bare optimizer must not get learning rate 0 or iterations 0)."""
    bare, bare_prefix, guarded, guarded_prefix = _checkpoints(inner, tmp_path_factory)

    def restore(model, prefix):
        if built:
            model.optimizer.build(model.trainable_variables)
        status = tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(prefix)
        if not built:  # (Keras' LossScaleOptimizer.build is not idempotent)
            model.optimizer.build(model.trainable_variables)
        return status

    into_guard = resume.make_model(guardedopt.GuardedOptimizer(INNER[inner]()))
    restore(into_guard, bare_prefix).expect_partial()
    guard = into_guard.optimizer
    assert _bits(guard.inner_optimizer.variables) == _bits(bare.optimizer.variables)
    assert _bits(into_guard.weights) == _bits(bare.weights)
    assert int(guard.guard_step.numpy()) == 0  # not in a bare checkpoint

    into_bare = resume.make_model(INNER[inner]())
    status = restore(into_bare, guarded_prefix)
    status.assert_existing_objects_matched()
    guarded_inner = guarded.optimizer.inner_optimizer
    assert _bits(into_bare.optimizer.variables) == _bits(guarded_inner.variables)
    assert float(into_bare.optimizer.learning_rate.numpy()) == pytest.approx(1e-2)
    assert int(into_bare.optimizer.iterations.numpy()) == resume.BATCHES
