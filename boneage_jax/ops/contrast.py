"""Contrast and denoising: CLAHE, histogram equalisation, enhancement, gamma, filters (uint8 in, uint8 out)."""

from __future__ import annotations

import threading

import cv2
import numpy as np

from boneage_jax.ops import as_2d, register_preprocess, require_uint8

__all__ = ["clahe"]

_thread_local = threading.local()


def _clahe(clip_limit: float, tile_grid: int) -> cv2.CLAHE:
    """One CLAHE object per thread and setting: OpenCV's CLAHE is not thread-safe."""
    cache = getattr(_thread_local, "clahe", None)
    if cache is None:
        cache = _thread_local.clahe = {}
    key = (float(clip_limit), int(tile_grid))
    if key not in cache:
        cache[key] = cv2.createCLAHE(clipLimit=key[0], tileGridSize=(key[1], key[1]))
    return cache[key]


@register_preprocess("clahe")
def clahe(image: np.ndarray, *, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 grey image."""
    return _clahe(clip_limit, tile_grid).apply(require_uint8(as_2d(image), "clahe"))
