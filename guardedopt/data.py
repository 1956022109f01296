"""The bundled UCI optical digits dataset (8x8 handwritten digits, 10 classes).

`guardedopt/data/digits.csv.gz` is scikit-learn's bundled copy of the test set
of the UCI "Optical Recognition of Handwritten Digits" data (E. Alpaydin,
C. Kaynak; CC BY 4.0, see `data/DIGITS_LICENSE.rst`): 1797 rows without a
header, 64 pixel counts in 0..16, then the integer label. It is small enough
for the demo to train a real model in seconds on a laptop CPU.
"""

from __future__ import annotations

import gzip
import os
from typing import Tuple

import numpy as np

from guardedopt import validation

NUM_SAMPLES = 1797
NUM_FEATURES = 64
NUM_CLASSES = 10
# The raw features are counts of "on" pixels in 4x4 blocks: 0..16.
MAX_PIXEL = 16.0

_PATH = os.path.join(os.path.dirname(__file__), "data", "digits.csv.gz")

Arrays = Tuple[np.ndarray, np.ndarray]


def digits_path() -> str:
    """Path of the bundled `digits.csv.gz`."""
    return _PATH


def load_digits(*, normalize: bool = True) -> Arrays:
    """Loads all 1797 digits.

    Args:
        normalize: If True, features are divided by 16 so they lie in [0, 1];
            if False they are the raw counts 0..16.

    Returns:
        `(x, y)`: `x` float32 of shape `[1797, 64]` (row-major 8x8 images),
        `y` int32 of shape `[1797]` with labels 0..9.
    """
    with gzip.open(_PATH, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.shape != (NUM_SAMPLES, NUM_FEATURES + 1):
        raise ValueError(
            f"{_PATH} must hold {NUM_SAMPLES} rows of {NUM_FEATURES + 1} columns. "
            f"Received: shape={table.shape}"
        )
    x = table[:, :NUM_FEATURES].astype(np.float32)
    y = table[:, NUM_FEATURES].astype(np.int32)
    if normalize:
        x /= MAX_PIXEL
    return x, y


def load_digits_split(
    *, normalize: bool = True, test_fraction: float = 0.2, seed: int = 0
) -> Tuple[Arrays, Arrays]:
    """Loads the digits with a fixed, stratified train/test split.

    The split is stratified (each class keeps its share in both parts) and
    depends only on `seed`, so every run of the demo sees the same data.

    Args:
        normalize: See `load_digits`.
        test_fraction: Share of each class held out for testing, in (0, 1).
        seed: Seed of the shuffle.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, each part shuffled.
    """
    validation.check_float(
        "test_fraction", test_fraction, minimum=0.0, maximum=1.0,
        min_inclusive=False, max_inclusive=False,
    )
    validation.check_int("seed", seed, minimum=0)
    x, y = load_digits(normalize=normalize)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])
