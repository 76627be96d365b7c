"""Random augmentation, seeded per example by the pipeline: flips, affine warps, intensity jitter."""

from __future__ import annotations

import math

import cv2
import numpy as np

from boneage_jax.ops import AUGMENT_PRESETS, Sample, as_2d, register_augment, require_uint8
from boneage_jax.ops.contrast import apply_lut, brighten, clahe, contrast_stretch, gamma_lut
from boneage_jax.ops.geometry import BORDER_MODES, warp_sample

__all__ = ["random_flip", "flip_matrix", "random_affine", "random_affine_matrix", "affine_matrix", "brightness_jitter", "contrast_jitter", "gamma_jitter",
           "clahe_or_gamma"]


def flip_matrix(shape: tuple[int, int], rng: np.random.Generator, *, p: float = 0.5) -> np.ndarray | None:
    """``flip``'s draw as a warp: the mirror of pixel columns with probability ``p``, else None."""
    if rng.random() >= p:
        return None
    return np.array([[-1.0, 0.0, shape[1] - 1.0], [0.0, 1.0, 0.0]])


@register_augment("flip", on="sample", geometric=True, matrix=flip_matrix)
def random_flip(sample: Sample, rng: np.random.Generator, *, p: float = 0.5) -> Sample:
    """Horizontal flip with probability ``p`` (a left hand becomes a right hand)."""
    if flip_matrix(sample["image"].shape[:2], rng, p=p) is None:
        return sample
    out = {**sample, "image": np.ascontiguousarray(sample["image"][:, ::-1])}
    if sample.get("mask") is not None:
        out["mask"] = np.ascontiguousarray(sample["mask"][:, ::-1])
    if sample.get("keypoints") is not None:
        width = sample["image"].shape[1]
        out["keypoints"] = sample["keypoints"] * np.float32([-1, 1]) + np.float32([width - 1, 0])
    return out


def affine_matrix(center: tuple[float, float], angle: float = 0.0, scale: float = 1.0, shear: float = 0.0,
                  shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """2x3 matrix about ``center``: shear (degrees, Keras's convention), then rotation
    (degrees, counter-clockwise on screen as ``cv2.getRotationMatrix2D``), scale and shift (pixels)."""
    cx, cy = center
    a, s = math.radians(angle), math.radians(shear)
    rotation = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    shearing = np.array([[1.0, -math.sin(s)], [0.0, math.cos(s)]])
    linear = scale * rotation @ shearing
    offset = np.array([cx, cy]) + np.asarray(shift) - linear @ np.array([cx, cy])
    return np.concatenate([linear, offset[:, None]], axis=1).astype(np.float32)


def _uniform(rng: np.random.Generator, bound: float) -> float:
    return float(rng.uniform(-bound, bound)) if bound else 0.0


def random_affine_matrix(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    rotation: float = 0.0,
    shift: float = 0.0,
    width_shift: float | None = None,
    height_shift: float | None = None,
    shear: float = 0.0,
    zoom: float = 0.0,
    zoom_range: tuple[float, float] | None = None,
    fill_mode: str = "constant",
    fill_value: int = 0,
) -> np.ndarray | None:
    """``affine``'s draw: its 2x3 matrix for an image of ``shape`` (h, w), None for the identity."""
    if fill_mode not in BORDER_MODES:
        raise ValueError(f"affine: fill_mode {fill_mode!r}; expected one of {sorted(BORDER_MODES)}")
    height, width = shape
    width_shift = shift if width_shift is None else width_shift
    height_shift = shift if height_shift is None else height_shift
    angle = _uniform(rng, rotation)
    scale = float(rng.uniform(*zoom_range)) if zoom_range else 1.0 + _uniform(rng, zoom)
    dx = _uniform(rng, width_shift) * width
    dy = _uniform(rng, height_shift) * height
    shear_angle = _uniform(rng, shear)
    if not (angle or scale != 1.0 or dx or dy or shear_angle):
        return None
    return affine_matrix((width / 2.0, height / 2.0), angle, scale, shear_angle, (dx, dy))


@register_augment("affine", on="sample", geometric=True, matrix=random_affine_matrix)
def random_affine(
    sample: Sample,
    rng: np.random.Generator,
    *,
    rotation: float = 0.0,
    shift: float = 0.0,
    width_shift: float | None = None,
    height_shift: float | None = None,
    shear: float = 0.0,
    zoom: float = 0.0,
    zoom_range: tuple[float, float] | None = None,
    fill_mode: str = "constant",
    fill_value: int = 0,
) -> Sample:
    """One random warp about the centre, as Keras's ImageDataGenerator draws it: rotation
    uniform in +-``rotation`` degrees, shifts uniform in +-``width_shift`` / +-``height_shift``
    of the side (both default to ``shift``), shear uniform in +-``shear`` degrees, scale
    uniform in [1 - zoom, 1 + zoom] or in ``zoom_range`` (low, high) when given (Deeplasia:
    (0.8, 1.25)). ``fill_mode``: constant (``fill_value``), nearest or reflect."""
    height, width = sample["image"].shape[:2]
    matrix = random_affine_matrix((height, width), rng, rotation=rotation, shift=shift, width_shift=width_shift,
                                  height_shift=height_shift, shear=shear, zoom=zoom, zoom_range=zoom_range,
                                  fill_mode=fill_mode, fill_value=fill_value)
    if matrix is None:
        return sample
    return warp_sample(sample, matrix, (width, height), fill_mode=fill_mode, fill_value=fill_value,
                       interpolation=cv2.INTER_LINEAR)


# ----------------------------------------------------------------------------- intensity


def _factor(rng: np.random.Generator, max_delta: float) -> float:
    if not 0 <= max_delta < 1:
        raise ValueError(f"max_delta must be in [0, 1), got {max_delta}")
    return float(rng.uniform(1.0 - max_delta, 1.0 + max_delta))


@register_augment("brightness_jitter")
def brightness_jitter(image: np.ndarray, rng: np.random.Generator, *, max_delta: float = 0.2) -> np.ndarray:
    """PIL brightness (``trunc(v * f)``, clipped; see contrast.enhance) with f uniform in
    [1 - max_delta, 1 + max_delta]."""
    return brighten(require_uint8(image, "brightness_jitter"), _factor(rng, max_delta))


@register_augment("contrast_jitter")
def contrast_jitter(image: np.ndarray, rng: np.random.Generator, *, max_delta: float = 0.2) -> np.ndarray:
    """PIL contrast (``trunc(m + f * (v - m))`` about the rounded mean grey level m, clipped; see
    contrast.enhance) with f uniform in [1 - max_delta, 1 + max_delta]."""
    return contrast_stretch(require_uint8(image, "contrast_jitter"), _factor(rng, max_delta))


@register_augment("gamma_jitter")
def gamma_jitter(image: np.ndarray, rng: np.random.Generator, *, low: float = 0.8, high: float = 1.25) -> np.ndarray:
    """Gamma correction (see contrast.gamma) with gamma log-uniform in [low, high], so that with
    low = 1 / high brightening and darkening are equally likely."""
    if not 0 < low <= high:
        raise ValueError(f"gamma_jitter: need 0 < low <= high, got low={low}, high={high}")
    g = math.exp(rng.uniform(math.log(low), math.log(high)))
    return apply_lut(require_uint8(image, "gamma_jitter"), gamma_lut(g))


@register_augment("clahe_or_gamma")
def clahe_or_gamma(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    p_clahe: float = 2.0 / 3.0,
    clip_limit: float | tuple[float, float] = (1.0, 3.0),
    tile_grid: int = 8,
    gamma_low: float = 0.7,
    gamma_high: float = 1.3,
) -> np.ndarray:
    """Deeplasia's contrast augmentation: CLAHE with probability ``p_clahe``, otherwise a gamma
    correction with gamma uniform in [gamma_low, gamma_high].

    Deeplasia (aimi-bonn/Deeplasia, lib/datasets.py, ``get_train_augmentation``) uses
    ``A.OneOf([A.CLAHE(p=1, clip_limit=3), A.RandomGamma((70, 130), p=0.5)], p=1)``. Albumentations'
    OneOf picks a transform with the members' p as weights, so CLAHE 1 / 1.5 = 2/3 of the time;
    ``CLAHE(clip_limit=3)`` draws its clip limit uniformly in (1, 3) with an 8x8 tile grid;
    ``RandomGamma((70, 130))`` draws gamma uniformly in [0.7, 1.3]. Those are the defaults here. A
    number for ``clip_limit`` fixes it. Unlike albumentations' gamma table (truncated), the gamma
    table here rounds (contrast.gamma). A grey image comes back (H, W), as from contrast.clahe."""
    if not 0 < gamma_low <= gamma_high:
        raise ValueError(f"clahe_or_gamma: need 0 < gamma_low <= gamma_high, got {gamma_low}, {gamma_high}")
    low, high = clip_limit if isinstance(clip_limit, (tuple, list)) else (clip_limit, clip_limit)
    if not 0 < low <= high:
        raise ValueError(f"clahe_or_gamma: clip_limit must be positive, or a (low, high) range, got {clip_limit}")
    image = require_uint8(as_2d(image), "clahe_or_gamma")
    if rng.random() < p_clahe:
        return clahe(image, clip_limit=float(rng.uniform(low, high)) if high > low else float(low), tile_grid=tile_grid)
    return apply_lut(image, gamma_lut(float(rng.uniform(gamma_low, gamma_high))))


# Nguyen et al.: horizontal flip, shifts of 15%, rotation up to 5 degrees, shear 0.01 (Keras's
# shear_range, in degrees), zoom up to 25%, fill nearest.
AUGMENT_PRESETS["nguyen"] = "flip|affine(rotation=5, shift=0.15, shear=0.01, zoom=0.25, fill_mode='nearest')"
