"""Transparency: with no fault, the guard computes exactly what the inner optimizer does."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import guardedopt
from helpers import (
    bitwise_equal,
    classification_data,
    make_step,
    max_abs_difference,
    mlp,
    state_of,
)

O = keras.optimizers
BUILT_IN = {
    "sgd": lambda: O.SGD(0.05),
    "sgd_momentum": lambda: O.SGD(0.05, momentum=0.9),
    "sgd_nesterov": lambda: O.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: O.Adam(1e-2),
    "adamw": lambda: O.AdamW(1e-2),
    "adamax": lambda: O.Adamax(1e-2),
    "nadam": lambda: O.Nadam(1e-2),
    "rmsprop": lambda: O.RMSprop(1e-2),
    "rmsprop_centered": lambda: O.RMSprop(1e-2, centered=True),
    "adagrad": lambda: O.Adagrad(5e-2),
    "adadelta": lambda: O.Adadelta(1.0),
    "ftrl": lambda: O.Ftrl(5e-2),
    "lion": lambda: O.Lion(1e-3),
    "lamb": lambda: O.Lamb(1e-2),
    "adafactor": lambda: O.Adafactor(1e-2),
    "muon": lambda: O.Muon(1e-2),
}
STEPS = 20


class MomentumOnlyUpdate(keras.optimizers.Optimizer):
    """A user optimizer that overrides only `build` and `update_step`."""

    def __init__(self, learning_rate=0.05, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)

    def build(self, variables):
        super().build(variables)
        self.velocities = [self.add_variable_from_reference(v, "velocity") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        velocity = self.velocities[self._get_variable_index(variable)]
        lr = tf.cast(learning_rate, variable.dtype)
        self.assign(velocity, 0.8 * velocity - lr * gradient)
        self.assign_add(variable, velocity)


ALL = dict(BUILT_IN)
ALL["user_subclass"] = lambda: MomentumOnlyUpdate()
ALL["loss_scale_inside"] = lambda: O.LossScaleOptimizer(O.Adam(1e-2))


def _train(optimizer, mode):
    model = mlp()
    x, y = classification_data()
    step = make_step(model, optimizer, tf.constant(x), tf.constant(y), mode)
    for _ in range(STEPS):
        step()
    return state_of(model, optimizer)


@pytest.mark.parametrize("name", sorted(ALL))
def test_bit_identical_eager_and_tf_function(name):
    for mode in ("eager", "graph"):
        bare = _train(ALL[name](), mode)
        guarded = _train(guardedopt.GuardedOptimizer(ALL[name]()), mode)
        assert bitwise_equal(bare, guarded), (
            f"{name} in {mode}: max deviation {max_abs_difference(bare, guarded)}"
        )


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_xla_within_xla_own_deviation(name):
    """Under XLA, the guard deviates no more than XLA's own rounding does.

    XLA's reference deviation is bare XLA against bare `tf.function` on the same
    run. The measured figures are in the README's transparency table.
    """
    bare_graph = _train(BUILT_IN[name](), "graph")
    bare_xla = _train(BUILT_IN[name](), "xla")
    guarded_xla = _train(guardedopt.GuardedOptimizer(BUILT_IN[name]()), "xla")
    xla_own = max_abs_difference(bare_graph, bare_xla)
    guard = max_abs_difference(bare_xla, guarded_xla)
    print(f"{name}: guard-vs-bare under XLA {guard:.3g}, XLA-vs-graph {xla_own:.3g}")
    # Bare XLA and guarded XLA each deviate from the non-XLA result by up to
    # XLA's own rounding; two such results can be apart by up to twice that.
    assert guard <= 2 * xla_own, (name, guard, xla_own)


def test_loss_scale_optimizer_outside_the_guard_is_transparent():
    bare = _train(O.LossScaleOptimizer(O.Adam(1e-2)), "graph")
    outer = O.LossScaleOptimizer(guardedopt.GuardedOptimizer(O.Adam(1e-2)))
    model = mlp()
    x, y = classification_data()
    step = make_step(model, outer, tf.constant(x), tf.constant(y), "graph")
    for _ in range(STEPS):
        step()
    guarded = [np.array(v.numpy()) for v in model.trainable_variables] + [
        np.array(keras.ops.convert_to_numpy(v))
        for v in outer.inner_optimizer.inner_optimizer.variables
    ]
    bare_model_and_adam = bare[: len(model.trainable_variables)] + bare[-len(outer.inner_optimizer.inner_optimizer.variables):]
    assert bitwise_equal(bare_model_and_adam, guarded)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_is_transparent(jit_compile):
    x, y = classification_data(64)
    results = []
    for optimizer in (O.Adam(1e-2), guardedopt.GuardedOptimizer(O.Adam(1e-2))):
        model = mlp()
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit_compile)
        model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0)
        results.append(state_of(model, optimizer))
    assert bitwise_equal(*results), max_abs_difference(*results)
