"""Tests of the bundled digits loader."""

import os

import numpy as np
import pytest

from guardedopt import data


def test_load_digits_shapes_ranges_and_labels():
    x, y = data.load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    counts = np.bincount(y)
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_raw_digits_are_pixel_counts_0_to_16():
    x, _ = data.load_digits(normalize=False)
    assert x.max() == 16.0
    assert np.all(x == np.round(x))
    np.testing.assert_array_equal(x / 16.0, data.load_digits()[0])


def test_first_row_matches_the_csv():
    x, y = data.load_digits(normalize=False)
    # The first line of digits.csv.gz: a "0".
    assert x[0, :8].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]
    assert y[0] == 0


def test_split_is_fixed_stratified_and_disjoint():
    (x_train, y_train), (x_test, y_test) = data.load_digits_split()
    assert len(x_train) + len(x_test) == 1797
    assert len(x_test) == 359
    # Stratified: every class keeps ~20% in the test part.
    share = np.bincount(y_test) / (np.bincount(y_test) + np.bincount(y_train))
    assert np.all(np.abs(share - 0.2) < 0.01)
    # No row in both parts (the digits have few exact duplicates, so compare
    # rows as bytes and allow only those duplicates).
    train_rows = {row.tobytes() for row in x_train}
    overlap = sum(row.tobytes() in train_rows for row in x_test)
    assert overlap <= 5
    (x_again, y_again), _ = data.load_digits_split()
    np.testing.assert_array_equal(x_again, x_train)
    np.testing.assert_array_equal(y_again, y_train)


def test_split_depends_on_seed():
    (_, y0), _ = data.load_digits_split(seed=0)
    (_, y1), _ = data.load_digits_split(seed=1)
    assert not np.array_equal(y0, y1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, float("nan")])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"`test_fraction` must be a finite float > 0 and < 1"):
        data.load_digits_split(test_fraction=fraction)


def test_license_file_has_attribution():
    path = os.path.join(os.path.dirname(data.digits_path()), "DIGITS_LICENSE.rst")
    text = open(path, encoding="utf-8").read()
    for needle in ("E. Alpaydin", "C. Kaynak", "UCI Machine Learning Repository",
                   "CC BY 4.0", "scikit-learn"):
        assert needle in text
