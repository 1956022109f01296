"""Small builders shared by the tests (real Keras models, fixed seeds)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def mlp(inputs: int = 6, hidden: int = 5, classes: int = 3, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(classes),
        ]
    )


def cnn(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )


def embedding_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(20, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
    )


def classification_data(n: int = 32, inputs: int = 6, classes: int = 3, seed: int = 0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, inputs).astype("float32")
    y = rng.randint(0, classes, n).astype("int32")
    return x, y


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def logged(caplog, text):
    """The messages logged so far that contain `text`."""
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def make_step(model, optimizer, x, y, mode: str, loss=LOSS):
    """A classic GradientTape step in `mode`: "eager", "graph" or "xla"."""

    def step():
        with tf.GradientTape() as tape:
            value = loss(y, model(x))
            scaled = optimizer.scale_loss(value)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return value

    if mode == "eager":
        return step
    return tf.function(step, jit_compile=(mode == "xla"))


def inner_of(optimizer):
    """The optimizer a guard wraps (other optimizers are returned as they are)."""
    import guardedopt

    if isinstance(optimizer, guardedopt.GuardedOptimizer):
        return optimizer.inner_optimizer
    return optimizer


def state_of(model, optimizer):
    """Weights and every inner-optimizer variable, as NumPy arrays."""
    inner = inner_of(optimizer)
    return [np.array(v.numpy()) for v in model.trainable_variables] + [
        np.array(keras.ops.convert_to_numpy(v)) for v in inner.variables
    ]


def max_abs_difference(first, second) -> float:
    assert len(first) == len(second)
    worst = 0.0
    for a, b in zip(first, second):
        assert a.shape == b.shape
        if a.size:
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst


def bitwise_equal(first, second) -> bool:
    return len(first) == len(second) and all(
        a.shape == b.shape and a.tobytes() == b.tobytes() for a, b in zip(first, second)
    )
