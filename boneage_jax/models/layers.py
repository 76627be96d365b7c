"""Layers and helpers shared by the model families."""

from __future__ import annotations

import numpy as np
from flax import nnx


class WeightMismatchError(ValueError):
    """A weight file does not fit the model: names the first mismatching layer and shapes."""


def assign(variable: nnx.Variable, value: np.ndarray, name: str) -> None:
    """Copies ``value`` into a parameter or batch statistic, checking its shape first."""
    value = np.asarray(value)
    current = variable.get_value()
    if tuple(current.shape) != tuple(value.shape):
        raise WeightMismatchError(
            f"layer {name}: the model expects shape {tuple(current.shape)}, the file has {tuple(value.shape)}"
        )
    variable.set_value(value.astype(current.dtype))
