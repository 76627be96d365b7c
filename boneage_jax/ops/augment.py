"""Random augmentation, seeded per example by the pipeline: flips, affine warps, intensity jitter."""

from __future__ import annotations

import math

import cv2
import numpy as np

from boneage_jax.ops import AUGMENT_PRESETS, Sample, register_augment
from boneage_jax.ops.geometry import BORDER_MODES, warp_sample

__all__ = ["random_flip", "random_affine", "affine_matrix"]


@register_augment("flip", on="sample")
def random_flip(sample: Sample, rng: np.random.Generator, *, p: float = 0.5) -> Sample:
    """Horizontal flip with probability ``p`` (a left hand becomes a right hand)."""
    if rng.random() >= p:
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


@register_augment("affine", on="sample")
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
    fill_mode: str = "constant",
    fill_value: int = 0,
) -> Sample:
    """One random warp about the centre, as Keras's ImageDataGenerator draws it: rotation
    uniform in +-``rotation`` degrees, shifts uniform in +-``width_shift`` / +-``height_shift``
    of the side (both default to ``shift``), shear uniform in +-``shear`` degrees, scale
    uniform in [1 - zoom, 1 + zoom]. ``fill_mode``: constant (``fill_value``), nearest or reflect."""
    if fill_mode not in BORDER_MODES:
        raise ValueError(f"affine: fill_mode {fill_mode!r}; expected one of {sorted(BORDER_MODES)}")
    height, width = sample["image"].shape[:2]
    width_shift = shift if width_shift is None else width_shift
    height_shift = shift if height_shift is None else height_shift
    angle = _uniform(rng, rotation)
    scale = 1.0 + _uniform(rng, zoom)
    dx = _uniform(rng, width_shift) * width
    dy = _uniform(rng, height_shift) * height
    shear_angle = _uniform(rng, shear)
    if not (angle or scale != 1.0 or dx or dy or shear_angle):
        return sample
    matrix = affine_matrix((width / 2.0, height / 2.0), angle, scale, shear_angle, (dx, dy))
    return warp_sample(sample, matrix, (width, height), fill_mode=fill_mode, fill_value=fill_value,
                       interpolation=cv2.INTER_LINEAR)


# Nguyen et al.: horizontal flip, shifts of 15%, rotation up to 5 degrees, shear 0.01 (Keras's
# shear_range, in degrees), zoom up to 25%, fill nearest.
AUGMENT_PRESETS["nguyen"] = "flip|affine(rotation=5, shift=0.15, shear=0.01, zoom=0.25, fill_mode='nearest')"
