"""Normalisation: uint8 images to the float32 inputs a network expects.

Every op here maps each grey level through the same arithmetic, so a uint8 image goes through
a 256-entry float32 table (``cv2.LUT``) computed with exactly the float32 operations that the
op applies to a float image: the same values, without a float temporary per operation (at
500 px, 3 channels, about 5x less time). The same tables let the device normalise a batch of
uint8 images (``ops.Chain.level_table``, ``data.normalize_on_device``): the fixed maps declare
themselves ``pointwise``, the per-image ones give their table (``levels``). The per-image statistics of ``zscore`` and
``percentile_zscore`` come from the image's grey-level histogram, in float64. A float image
(an op after another normalisation) takes the plain numpy path.
"""

from __future__ import annotations

import cv2
import numpy as np

from boneage_jax.ops import as_2d, register_preprocess

__all__ = ["zscore", "value_range", "percentile_zscore", "scale", "preprocess_input"]

_LEVELS = np.arange(256, dtype=np.float32)


def _through_table(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 image -> float32 of the same shape, each value v replaced by ``table[v]``; a table
    of shape (256, C) maps channel c of a C-channel image through ``table[:, c]``."""
    lut = np.ascontiguousarray(table, np.float32).reshape(256, 1, -1)
    return cv2.LUT(np.ascontiguousarray(image), lut).reshape(image.shape)


def _histogram(image: np.ndarray) -> np.ndarray:
    """Counts of the 256 grey levels over all pixels and channels, float64."""
    flat = np.ascontiguousarray(image).reshape(-1, 1)
    return cv2.calcHist([flat], [0], None, [256], [0, 256]).reshape(256).astype(np.float64)


def _mean_std(values: np.ndarray, counts: np.ndarray, ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of ``values`` weighted by ``counts`` (a histogram), float64."""
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    variance = float((counts * (values - mean) ** 2).sum() / max(n - ddof, 1))
    return mean, variance ** 0.5


def _zscore_levels(image: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    """``zscore`` of a uint8 image as its table of the 256 grey levels."""
    mean, std = _mean_std(_LEVELS.astype(np.float64), _histogram(image))
    return (_LEVELS - np.float32(mean)) / (np.float32(std) + eps)


@register_preprocess("zscore", levels=_zscore_levels)
def zscore(image: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    """Per-image zero mean and unit variance, float32."""
    if image.dtype == np.uint8:
        return _through_table(image, _zscore_levels(image, eps=eps))
    image = image.astype(np.float32)
    return (image - image.mean()) / (image.std() + eps)


@register_preprocess("value_range", pointwise=True)
def value_range(image: np.ndarray, *, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Scales uint8 [0, 255] linearly to [low, high], float32."""
    if image.dtype == np.uint8:
        return _through_table(image, _LEVELS * ((high - low) / 255.0) + low)
    return image.astype(np.float32) * ((high - low) / 255.0) + low


def _percentile_zscore_levels(image: np.ndarray, *, percentile: float = 1.0, eps: float = 1e-6,
                              ddof: int = 1) -> np.ndarray:
    """``percentile_zscore`` of a uint8 image as its table of the 256 grey levels."""
    counts = _histogram(image)
    x = np.maximum(_LEVELS - np.float32(_percentile(counts, percentile)), np.float32(0))
    mean, std = _mean_std(x.astype(np.float64), counts, ddof)
    return ((x - np.float32(mean)) / (np.float32(std) + eps)).astype(np.float32)


@register_preprocess("percentile_zscore", levels=_percentile_zscore_levels)
def percentile_zscore(image: np.ndarray, *, percentile: float = 1.0, eps: float = 1e-6, ddof: int = 1) -> np.ndarray:
    """Deeplasia's normalisation, float32: ``x = max(image - P, 0)`` with ``P`` the image's
    ``percentile``-th percentile (numpy's linear interpolation), then ``(x - mean(x)) / (std(x) + eps)``.

    Deeplasia (aimi-bonn/Deeplasia, lib/datasets.py) subtracts the 1st percentile from the masked
    uint8 image with ``cv2.subtract`` ("no underflow", i.e. saturating at 0) before augmentation,
    and z-scores with ``torch.std`` (unbiased, hence ``ddof=1``) after it. The saturation is what
    makes the subtraction matter: pixels darker than ``P`` become equal, and the z-score of the
    rest is unchanged, so the result is invariant to a constant offset of the image. Here the
    percentile is taken over the whole image and the subtraction is in float (not rounded)."""
    if image.dtype == np.uint8:
        return _through_table(image, _percentile_zscore_levels(image, percentile=percentile, eps=eps, ddof=ddof))
    p = float(np.percentile(image, percentile))
    x = np.maximum(image.astype(np.float32) - np.float32(p), np.float32(0))
    return ((x - x.mean()) / (x.std(ddof=ddof) + eps)).astype(np.float32)


def _percentile(counts: np.ndarray, q: float) -> float:
    """``np.percentile`` (linear interpolation) of the image whose grey-level histogram is ``counts``."""
    cumulative = np.cumsum(counts)
    position = (q / 100.0) * (cumulative[-1] - 1)
    below = int(np.floor(position))
    above = min(below + 1, int(cumulative[-1]) - 1)
    a, b = (float(np.searchsorted(cumulative, k, side="right")) for k in (below, above))
    t = position - below
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t  # numpy's _lerp


@register_preprocess("scale", pointwise=True)
def scale(image: np.ndarray, *, divisor: float = 255.0, offset: float = 0.0) -> np.ndarray:
    """Fixed linear scaling ``image / divisor + offset``, float32 (the default maps 0..255 to 0..1;
    ``divisor=127.5, offset=-1`` to -1..1)."""
    if divisor == 0:
        raise ValueError("scale: divisor must not be 0")
    if image.dtype == np.uint8:
        return _through_table(image, _LEVELS / np.float32(divisor) + np.float32(offset))
    return (image.astype(np.float32) / np.float32(divisor) + np.float32(offset)).astype(np.float32)


_PREPROCESS_MODES = ("caffe", "tf", "torch")
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # RGB
_TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN = np.array([103.939, 116.779, 123.68], np.float32)  # BGR


def _preprocess_input_channels(arguments: dict) -> int | None:
    """Mode 'tf' keeps the channels; 'torch' and 'caffe' make RGB."""
    return None if arguments["mode"] == "tf" else 3


@register_preprocess("preprocess_input", channels=_preprocess_input_channels, pointwise=True)
def preprocess_input(image: np.ndarray, *, mode: str = "tf") -> np.ndarray:
    """Keras's ``imagenet_utils.preprocess_input`` (channels last), float32:

    * ``tf``: ``x / 127.5 - 1`` (to -1..1), any number of channels, shape kept;
    * ``torch``: ``x / 255``, minus the ImageNet mean (0.485, 0.456, 0.406), divided by the std
      (0.229, 0.224, 0.225), per RGB channel;
    * ``caffe``: RGB to BGR, minus the ImageNet mean (103.939, 116.779, 123.68) per BGR channel,
      no scaling.

    ``torch`` and ``caffe`` need 3 channels: a grey (H, W) or (H, W, 1) image is first repeated to
    (H, W, 3) RGB, so the output has 3 channels; a 3-channel image is taken as RGB, as Keras does."""
    if mode not in _PREPROCESS_MODES:
        raise ValueError(f"preprocess_input: mode {mode!r}; expected one of {', '.join(_PREPROCESS_MODES)}")
    if image.dtype == np.uint8:
        return _preprocess_input_levels(image, mode)
    x = image.astype(np.float32)
    if mode == "tf":
        return x / np.float32(127.5) - np.float32(1.0)
    x = as_2d(x)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"preprocess_input(mode={mode!r}) needs a grey or 3-channel image, got shape {image.shape}")
    if mode == "torch":
        return (x / np.float32(255.0) - _TORCH_MEAN) / _TORCH_STD
    return x[..., ::-1] - _CAFFE_MEAN


def _preprocess_input_levels(image: np.ndarray, mode: str) -> np.ndarray:
    """``preprocess_input`` of a uint8 image through per-channel tables of the same arithmetic."""
    if mode == "tf":
        return _through_table(image, _LEVELS / np.float32(127.5) - np.float32(1.0))
    grey = as_2d(image)
    if grey.ndim == 2:
        rgb = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)  # caffe's RGB -> BGR leaves equal channels as they are
    elif grey.ndim == 3 and grey.shape[2] == 3:
        rgb = grey if mode == "torch" else cv2.cvtColor(np.ascontiguousarray(grey), cv2.COLOR_RGB2BGR)
    else:
        raise ValueError(f"preprocess_input(mode={mode!r}) needs a grey or 3-channel image, got shape {image.shape}")
    if mode == "torch":
        return _through_table(rgb, (_LEVELS[:, None] / np.float32(255.0) - _TORCH_MEAN) / _TORCH_STD)
    return _through_table(rgb, _LEVELS[:, None] - _CAFFE_MEAN)
