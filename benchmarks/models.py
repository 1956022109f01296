"""The train-step benchmarks' models, on fixed synthetic data (one batch, repeated).

  mlp        784-512-512-10 dense network (0.67 M parameters), batch 128
  cnn        two 3x3 convolutions + dense head on 28x28x1 (1.2 M parameters), batch 32
  embedding  Embedding(20000, 64) -> mean -> dense (1.3 M parameters, sparse
             `IndexedSlices` gradients for the table), batch 128, 32 tokens
  resnet50   keras.applications.ResNet50(weights=None) on 32x32x3, 10 classes
             (23.6 M parameters in 214 trainable variables: 53 convolutions
             with biases, 53 BatchNorm scale/offset pairs, the dense head),
             batch 8: as many variables as real models have; not in the
             default list (its XLA compile takes about half a minute)

Used by `bench_train_step.py`, `bench_startup.py` and `profile_step.py`.
"""

from __future__ import annotations

NAMES = ("mlp", "cnn", "embedding")
# Built on request only (`--models=resnet50`).
OPTIONAL_NAMES = ("resnet50",)


def build_model(name, seed=0):
    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    if name == "mlp":
        model = keras.Sequential([
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ])
        x = rng.standard_normal((128, 784), dtype=np.float32)
        y = rng.integers(0, 10, 128)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    elif name == "cnn":
        model = keras.Sequential([
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ])
        x = rng.standard_normal((32, 28, 28, 1), dtype=np.float32)
        y = rng.integers(0, 10, 32)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    elif name == "embedding":
        model = keras.Sequential([
            keras.Input((32,), dtype="int32"),
            keras.layers.Embedding(20000, 64),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(1),
        ])
        x = rng.integers(0, 20000, (128, 32)).astype(np.int32)
        y = rng.integers(0, 2, (128, 1)).astype(np.float32)
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
    elif name == "resnet50":
        # weights=None: random initialisation, nothing is downloaded.
        model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
        x = rng.standard_normal((8, 32, 32, 3), dtype=np.float32)
        y = rng.integers(0, 10, 8)
        loss = keras.losses.SparseCategoricalCrossentropy()
    else:
        raise ValueError(f"unknown model {name!r}")
    data = tf.data.Dataset.from_tensors((tf.constant(x), tf.constant(y))).repeat()
    return model, loss, data


def compiled_variant(name, variant, jit, learning_rate=1e-3):
    """`(model, data, callbacks)`: model `name` compiled with the variant's optimizer.

    `variant` as in `common.guarded_optimizer`, or `guard_cb`: the guard plus
    a `GuardCallback` to pass to `fit`. The inner optimizer is
    Adam(learning_rate).
    """
    import keras

    import common

    kind, guardedopt = common.guard_module(variant)
    model, loss, data = build_model(name)
    inner = keras.optimizers.Adam(learning_rate)
    callbacks = []
    if kind == "guard_cb":
        optimizer = guardedopt.GuardedOptimizer(inner)
        callbacks.append(guardedopt.GuardCallback())
    else:
        optimizer = common.guarded_optimizer(variant, inner)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit)
    return model, data, callbacks
