"""Normalisation: uint8 images to the float32 inputs a network expects."""

from __future__ import annotations

import numpy as np

from boneage_jax.ops import register_preprocess

__all__ = ["zscore", "value_range"]


@register_preprocess("zscore")
def zscore(image: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    """Per-image zero mean and unit variance, float32."""
    image = image.astype(np.float32)
    return (image - image.mean()) / (image.std() + eps)


@register_preprocess("value_range")
def value_range(image: np.ndarray, *, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Scales uint8 [0, 255] linearly to [low, high], float32."""
    return image.astype(np.float32) * ((high - low) / 255.0) + low
