"""Contrast and denoising: CLAHE, histogram equalisation, enhancement, gamma, filters (uint8 in, uint8 out)."""

from __future__ import annotations

import functools
import threading

import cv2
import numpy as np

from boneage_jax.ops import as_2d, register_preprocess, require_uint8

__all__ = ["clahe", "hist_eq", "enhance", "gamma", "bilateral", "gaussian_blur"]

_thread_local = threading.local()


def _clahe(clip_limit: float, tile_grid: int) -> cv2.CLAHE:
    """One CLAHE object per thread and tile grid: OpenCV's CLAHE is not thread-safe.

    The clip limit is set on each call, so random clip limits (augment.clahe_or_gamma) reuse
    the object instead of growing the cache; the object never leaves its thread."""
    cache = getattr(_thread_local, "clahe", None)
    if cache is None:
        cache = _thread_local.clahe = {}
    key = int(tile_grid)
    if key not in cache:
        cache[key] = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(key, key))
    cache[key].setClipLimit(float(clip_limit))
    return cache[key]


@register_preprocess("clahe")
def clahe(image: np.ndarray, *, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 grey image."""
    return _clahe(clip_limit, tile_grid).apply(require_uint8(as_2d(image), "clahe"))


@register_preprocess("hist_eq")
@register_preprocess("equalize")
def hist_eq(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of a uint8 grey image (``cv2.equalizeHist``; Lee et al.)."""
    return cv2.equalizeHist(require_uint8(as_2d(image), "hist_eq"))


# ----------------------------------------------------------------------------- PIL's ImageEnhance


def _blend_lut(base: int, factor: float) -> np.ndarray:
    """Grey level v -> PIL's ``Image.blend(uniform image of value base, image, factor)``.

    Pillow's ImagingBlend (src/libImaging/Blend.c) computes in float32, ``base + alpha * (v - base)``
    with ``alpha = (float)factor``, then truncates towards zero (it does not round) and clips to
    0..255. Factors 0 and 1 (Pillow's copy shortcuts) give the same values."""
    base32 = np.float32(base)
    out = base32 + np.float32(factor) * (np.arange(256, dtype=np.float32) - base32)
    return np.clip(np.trunc(out), 0, 255).astype(np.uint8)


def apply_lut(image: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """cv2.LUT on any uint8 shape ((H, W), (H, W, 1), (H, W, 3)), keeping the shape."""
    return cv2.LUT(np.ascontiguousarray(image), lut).reshape(image.shape)


def _pil_grey_mean(image: np.ndarray) -> int:
    """``int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)``, as ImageEnhance.Contrast takes it.

    A 3-channel image is taken as RGB and converted with Pillow's integer luma,
    ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``."""
    if image.ndim == 3 and image.shape[2] == 3:
        rgb = image.astype(np.uint32)
        image = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return int(float(image.mean(dtype=np.float64)) + 0.5)


def brighten(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL's ``ImageEnhance.Brightness(image).enhance(factor)``: blend with black, trunc(v * factor)."""
    return image if factor == 1.0 else apply_lut(image, _blend_lut(0, factor))


def contrast_stretch(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL's ``ImageEnhance.Contrast(image).enhance(factor)``: blend with a uniform grey image of
    the rounded mean grey level, trunc(mean + factor * (v - mean)) clipped to 0..255."""
    return image if factor == 1.0 else apply_lut(image, _blend_lut(_pil_grey_mean(image), factor))


@register_preprocess("enhance")
def enhance(image: np.ndarray, *, brightness: float = 1.0, contrast: float = 1.0) -> np.ndarray:
    """PIL's ``ImageEnhance.Brightness`` then ``ImageEnhance.Contrast`` (Hamrouni & Hassen), bit-exact.

    Brightness: ``out = trunc(v * brightness)``; contrast: ``out = trunc(m + contrast * (v - m))``
    with ``m = int(mean + 0.5)`` the mean grey level of the brightened image; both clipped to
    0..255, computed in float32 and truncated as Pillow's ``Image.blend`` does. Factor 1 is the
    identity. Grey or RGB uint8 in, same shape out."""
    image = require_uint8(image, "enhance")
    return contrast_stretch(brighten(image, brightness), contrast)


# ----------------------------------------------------------------------------- gamma


def gamma_lut(gamma: float) -> np.ndarray:
    """Lookup table ``round(255 * (v / 255) ** gamma)`` for v in 0..255, uint8 (0 and 255 map to themselves)."""
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    levels = np.arange(256, dtype=np.float64) / 255.0
    return np.clip(np.rint(255.0 * levels ** float(gamma)), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _cached_gamma_lut(gamma: float) -> np.ndarray:
    lut = gamma_lut(gamma)
    lut.setflags(write=False)  # shared between threads: read-only
    return lut


@register_preprocess("gamma")
def gamma(image: np.ndarray, *, gamma: float = 1.0) -> np.ndarray:
    """Gamma correction ``out = round(255 * (in / 255) ** gamma)`` through a lookup table;
    gamma < 1 brightens the mid-greys, gamma > 1 darkens them."""
    image = require_uint8(image, "gamma")
    return apply_lut(image, _cached_gamma_lut(float(gamma)))


# ----------------------------------------------------------------------------- filters


@register_preprocess("bilateral")
def bilateral(image: np.ndarray, *, diameter: int = 9, sigma_color: float = 75.0,
              sigma_space: float = 75.0) -> np.ndarray:
    """Edge-preserving bilateral filter (``cv2.bilateralFilter``; Hamrouni & Hassen): averages over a
    ``diameter``-pixel neighbourhood, weighting neighbours by spatial distance (``sigma_space``) and
    by grey-level difference (``sigma_color``), so edges stronger than ~sigma_color stay sharp."""
    image = require_uint8(image, "bilateral")
    out = cv2.bilateralFilter(np.ascontiguousarray(as_2d(image)), int(diameter), float(sigma_color),
                              float(sigma_space))
    return out.reshape(image.shape)


@register_preprocess("gaussian_blur")
def gaussian_blur(image: np.ndarray, *, sigma: float = 1.0, ksize: int = 0) -> np.ndarray:
    """Gaussian blur (``cv2.GaussianBlur``) with standard deviation ``sigma`` in both axes; kernel
    size ``ksize`` (odd), or 0 to derive it from sigma. Borders reflect (OpenCV's default)."""
    image = require_uint8(image, "gaussian_blur")
    ksize = int(ksize)
    if ksize < 0 or (ksize and ksize % 2 == 0):
        raise ValueError(f"gaussian_blur: ksize must be 0 or odd and positive, got {ksize}")
    if not sigma > 0 and ksize == 0:
        raise ValueError(f"gaussian_blur: sigma must be positive when ksize is 0, got {sigma}")
    out = cv2.GaussianBlur(np.ascontiguousarray(image), (ksize, ksize), sigmaX=float(sigma), sigmaY=float(sigma))
    return out.reshape(image.shape)
