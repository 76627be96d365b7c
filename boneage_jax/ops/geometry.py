"""Geometry: resizing, padding, crops and warps that move the mask and keypoints with the image."""

from __future__ import annotations

import cv2
import numpy as np

from boneage_jax.ops import Sample, as_2d, register_preprocess

__all__ = ["BORDER_MODES", "warp_sample", "crop_sample", "resize_pad", "resize", "center_crop", "grey_to_rgb",
           "transform_points"]

BORDER_MODES = {
    "constant": cv2.BORDER_CONSTANT,
    "nearest": cv2.BORDER_REPLICATE,
    "reflect": cv2.BORDER_REFLECT_101,
}


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Applies a 2x3 affine matrix to (K, 2) points; NaN (unknown) points stay NaN."""
    points = np.asarray(points, np.float32)
    return (points @ matrix[:, :2].T.astype(np.float32) + matrix[:, 2].astype(np.float32)).astype(np.float32)


def _with(sample: Sample, **changes) -> Sample:
    return {**sample, **changes}


def warp_sample(sample: Sample, matrix: np.ndarray, size: tuple[int, int], *, fill_mode: str = "constant",
                fill_value: float = 0, interpolation: int = cv2.INTER_LINEAR) -> Sample:
    """Warps image, mask and keypoints with the 2x3 ``matrix`` onto a canvas of ``size`` (w, h)."""
    if fill_mode not in BORDER_MODES:
        raise ValueError(f"fill_mode {fill_mode!r}; expected one of {sorted(BORDER_MODES)}")
    border = BORDER_MODES[fill_mode]
    out = _with(sample, image=cv2.warpAffine(as_2d(sample["image"]), matrix, size, flags=interpolation,
                                             borderMode=border, borderValue=fill_value))
    if sample.get("mask") is not None:
        out["mask"] = cv2.warpAffine(sample["mask"], matrix, size, flags=cv2.INTER_NEAREST, borderMode=border,
                                     borderValue=0)
    if sample.get("keypoints") is not None:
        out["keypoints"] = transform_points(sample["keypoints"], matrix)
    return out


def crop_sample(sample: Sample, box: tuple[float, float, float, float], fill_value: float = 0) -> Sample:
    """Crops the box (x0, y0, x1, y1) in pixels; parts outside the image are filled."""
    image = sample["image"]
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty crop box {box}")
    if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
        out = _with(sample, image=image[y0:y1, x0:x1])
        if sample.get("mask") is not None:
            out["mask"] = sample["mask"][y0:y1, x0:x1]
        if sample.get("keypoints") is not None:
            out["keypoints"] = sample["keypoints"] - np.float32([x0, y0])
        return out
    matrix = np.float32([[1, 0, -x0], [0, 1, -y0]])
    return warp_sample(sample, matrix, (x1 - x0, y1 - y0), fill_value=fill_value, interpolation=cv2.INTER_NEAREST)


def _resize_image(image: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    shrinking = new_w * new_h < image.shape[0] * image.shape[1]
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _resize_sample(sample: Sample, new_w: int, new_h: int) -> Sample:
    height, width = sample["image"].shape[:2]
    out = _with(sample, image=_resize_image(as_2d(sample["image"]), new_w, new_h))
    if sample.get("mask") is not None:
        out["mask"] = cv2.resize(sample["mask"], (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    if sample.get("keypoints") is not None:
        out["keypoints"] = sample["keypoints"] * np.float32([new_w / width, new_h / height])
    return out


@register_preprocess("resize_pad", on="sample", geometric=True, config_defaults={"size": "image_size"})
def resize_pad(sample: Sample, *, size: int, pad_value: int = 0) -> Sample:
    """Aspect-preserving resize so the longest side is ``size``, centred on a square canvas.

    ``pad_value`` 0 pads black; 255 pads white (Memon & Cuomo).
    """
    height, width = sample["image"].shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = _resize_sample(sample, new_w, new_h)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    image = resized["image"]
    canvas = np.full((size, size) + image.shape[2:], pad_value, dtype=image.dtype)
    canvas[top : top + new_h, left : left + new_w] = image
    out = _with(resized, image=canvas)
    if resized.get("mask") is not None:
        mask = np.zeros((size, size), np.uint8)
        mask[top : top + new_h, left : left + new_w] = resized["mask"]
        out["mask"] = mask
    if resized.get("keypoints") is not None:
        out["keypoints"] = resized["keypoints"] + np.float32([left, top])
    return out


@register_preprocess("resize", on="sample", geometric=True, config_defaults={"size": "image_size"})
def resize(sample: Sample, *, size: int) -> Sample:
    """Plain resize to ``size`` x ``size`` (aspect not kept)."""
    return _resize_sample(sample, size, size)


@register_preprocess("center_crop", on="sample", geometric=True)
def center_crop(sample: Sample, *, fraction: float = 0.9) -> Sample:
    """Keeps the central ``fraction`` of each side (aspect kept)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"center_crop: fraction must be in (0, 1], got {fraction}")
    height, width = sample["image"].shape[:2]
    new_h, new_w = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return crop_sample(sample, (left, top, left + new_w, top + new_h))


@register_preprocess("grey_to_rgb", channels=3, pointwise=True)
def grey_to_rgb(image: np.ndarray) -> np.ndarray:
    """Repeats a grey image to 3 channels (for ImageNet models with RGB stems)."""
    image = as_2d(image)
    if image.ndim == 2 and image.dtype in (np.uint8, np.float32):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)  # about 10x faster than np.repeat
    return np.repeat(image[:, :, None], 3, axis=2)
