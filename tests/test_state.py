"""PackedLayout: named fields of one flat state vector."""

import numpy as np
import pytest
import tensorflow as tf

from guardedopt.state import PackedLayout


def _layout():
    return PackedLayout([("step", (), 0), ("table", (2, 3), -1), ("ratio", (3,), 0.5)])


def test_initial_values_and_size():
    layout = _layout()
    assert layout.size == 1 + 6 + 3
    assert layout.names == ("step", "table", "ratio")
    np.testing.assert_array_equal(layout.initial(np.float32), [0] + [-1] * 6 + [0.5] * 3)


def test_views_and_pack_round_trip_in_a_compiled_step():
    layout = _layout()
    vector = tf.Variable(layout.initial(np.float32))

    @tf.function(jit_compile=True)
    def step():
        views = layout.views(vector.read_value())
        views["step"] = views["step"] + 1
        views["table"] = views["table"] * 2 + tf.reshape(tf.range(6.0), [2, 3])
        vector.assign(layout.pack(views, tf.float32))

    step()
    step()
    host = layout.numpy_views(vector.numpy())
    assert host["step"] == 2 and host["step"].shape == ()
    np.testing.assert_array_equal(host["table"], np.array([[-4, -1, 2], [5, 8, 11]]))
    np.testing.assert_array_equal(host["ratio"], [0.5] * 3)


def test_pack_rejects_missing_or_misshapen_fields():
    layout = _layout()
    views = layout.views(tf.constant(layout.initial(np.int64)))
    with pytest.raises(ValueError, match="Missing: \\['ratio'\\]"):
        layout.pack({k: v for k, v in views.items() if k != "ratio"}, tf.int64)
    with pytest.raises(ValueError, match="'table' must have 6 entries"):
        layout.pack(dict(views, table=tf.zeros([5], tf.int64)), tf.int64)


def test_names_must_be_distinct():
    with pytest.raises(ValueError, match="distinct names"):
        PackedLayout([("a", (), 0), ("a", (2,), 0)])
