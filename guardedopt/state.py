"""Packed guard state: many named counters and tables in one flat variable.

The compiled step pays a fixed cost for every resource variable it reads or
writes (measured on XLA:CPU, TF 2.21: about 7 µs each per call), so the guard
keeps its integer state in one int64 vector and its measurements in one
float32 vector. A `PackedLayout` names the fields of such a vector, gives their
initial values, and turns the vector into named views (in the step, or as
NumPy arrays on the host) and back.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import numpy as np
import tensorflow as tf

Field = Tuple[str, Tuple[int, ...], float]  # (name, shape, initial value)


class PackedLayout:
    """Named fields of a flat vector, in a fixed order.

    Args:
        fields: `(name, shape, initial)` per field; the order is the layout
            (and so the saved format).

    Raises:
        ValueError: If a name repeats.
    """

    def __init__(self, fields: Sequence[Field]):
        names = [name for name, _, _ in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"`fields` must have distinct names. Received: fields={names}")
        self.fields = [(name, tuple(shape), initial) for name, shape, initial in fields]
        self._slices: Dict[str, Tuple[int, int, Tuple[int, ...]]] = {}
        offset = 0
        for name, shape, _ in self.fields:
            size = int(np.prod(shape, dtype=np.int64))
            self._slices[name] = (offset, offset + size, shape)
            offset += size
        self.size = offset

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(name for name, _, _ in self.fields)

    def initial(self, dtype) -> np.ndarray:
        """The flat vector of every field's initial value."""
        parts = [np.full(int(np.prod(shape, dtype=np.int64)), initial) for _, shape, initial in self.fields]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros([0], dtype)

    def views(self, vector) -> Dict[str, tf.Tensor]:
        """Each field of the tensor `vector` as a tensor of its shape (static slices)."""
        return {
            name: tf.reshape(vector[start:stop], shape)
            for name, (start, stop, shape) in self._slices.items()
        }

    def numpy_views(self, vector: np.ndarray) -> Dict[str, np.ndarray]:
        """Each field of a NumPy `vector`, as an array of its shape."""
        return {
            name: np.asarray(vector[start:stop]).reshape(shape)
            for name, (start, stop, shape) in self._slices.items()
        }

    def pack(self, values: Mapping[str, tf.Tensor], dtype) -> tf.Tensor:
        """The flat vector of `values`, one tensor per field, cast to `dtype`.

        Raises:
            ValueError: If a field is missing or has another size.
        """
        missing = [name for name in self.names if name not in values]
        if missing:
            raise ValueError(f"`values` must hold every field. Missing: {missing}")
        parts = []
        for name, (start, stop, _) in self._slices.items():
            part = tf.reshape(tf.cast(values[name], dtype), [-1])
            if part.shape.num_elements() != stop - start:
                raise ValueError(
                    f"Field {name!r} must have {stop - start} entries. "
                    f"Received: {part.shape.num_elements()}"
                )
            parts.append(part)
        return tf.concat(parts, axis=0) if parts else tf.zeros([0], dtype)
