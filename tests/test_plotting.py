"""Tests of `plot_report`: a real PNG of the expected size."""

import struct

import keras
import numpy as np
import pytest

from guardedopt import GuardCallback, GuardedOptimizer
from guardedopt import findings as F
from guardedopt.diagnose import diagnose
from guardedopt.plotting import DPI, FIGSIZE, plot_report

WIDTH, HEIGHT = int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_real_image(path):
    import matplotlib.image

    assert png_size(path) == (WIDTH, HEIGHT)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    # Not a blank canvas: lines, bands and text were drawn (colours on a grid).
    sample = pixels[::5, ::5].reshape(-1, pixels.shape[-1])
    assert len(np.unique(sample, axis=0)) > 20


def synthetic_report(steps=30, n_vars=3):
    rng = np.random.default_rng(0)
    ratio = 10.0 ** rng.uniform(-4, -2, size=(steps, n_vars))
    ratio[:, 0] = 1e-9  # A variable below min_step.
    ratio[5:8, 1] = np.nan  # Not measured.
    ratio[10:11, 2] = 0.0  # Did not move.
    nonfinite = np.zeros(steps, bool)
    nonfinite[[i for i in (3, 12) if i < steps]] = True
    history = dict(
        step=np.arange(1, steps + 1),
        step_ratio=ratio.astype(np.float32),
        grad_norm=np.ones((steps, n_vars), np.float32),
        skipped=np.cumsum(nonfinite),
        nonfinite=nonfinite,
    )
    return F.Report(
        findings=[F.Finding(code=F.TINY_STEP, message="m", hint="h", variables=("v0",))],
        steps=steps, skipped_steps=2,
        stats=dict(history=history, variable_paths=["v0", "v1", "v2"], min_step=1e-6, max_step=1.0),
    )


def test_synthetic_report(tmp_path):
    path = plot_report(synthetic_report(), str(tmp_path / "sub" / "report.png"))
    assert path.endswith("report.png")
    assert_real_image(path)


def test_report_plot_method_uses_it(tmp_path):
    path = synthetic_report().plot(str(tmp_path / "via_report.png"))
    assert png_size(path) == (WIDTH, HEIGHT)


def test_many_variables_and_empty_history(tmp_path):
    report = synthetic_report(steps=5, n_vars=14)
    report.stats["variable_paths"] = [f"v{i}" for i in range(14)]
    assert_real_image(plot_report(report, str(tmp_path / "many.png")))
    empty = synthetic_report(steps=0)
    assert_real_image(plot_report(empty, str(tmp_path / "empty.png")))


def test_report_without_history_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"no per-step history \(report.stats\['history'\]\)"):
        plot_report(F.Report(), str(tmp_path / "x.png"))


def tiny_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


def test_real_guard_report_with_skipped_nan_steps(tmp_path):
    model = tiny_model()
    opt = GuardedOptimizer(keras.optimizers.Adam(1e-2))
    # Eager steps: no tf.function trace needed for this test.
    model.compile(opt, "sparse_categorical_crossentropy", run_eagerly=True)
    x = np.random.default_rng(0).random((64, 4)).astype("float32")
    x[[5, 40]] = np.nan  # Two batches of 8 hold a NaN: skipped.
    y = np.arange(64) % 3
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[GuardCallback()])
    report = opt.report()
    assert report.skipped_steps == 2
    history = report.stats["history"]
    assert history["step_ratio"].shape == (8, 2)
    assert history["nonfinite"].sum() == 2
    assert_real_image(plot_report(report, str(tmp_path / "guard.png")))


def test_diagnose_report(tmp_path):
    model = tiny_model()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    x = np.random.default_rng(1).random((64, 4)).astype("float32")
    report = diagnose(model, (x, np.arange(64) % 3), steps=6)
    assert report.stats["history"]["step_ratio"].shape == (6, 2)
    assert_real_image(plot_report(report, str(tmp_path / "diagnose.png"), title="diagnose"))
