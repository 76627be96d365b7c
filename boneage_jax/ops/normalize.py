"""Normalisation: uint8 images to the float32 inputs a network expects."""

from __future__ import annotations

import numpy as np

from boneage_jax.ops import as_2d, register_preprocess

__all__ = ["zscore", "value_range", "percentile_zscore", "scale", "preprocess_input"]


@register_preprocess("zscore")
def zscore(image: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    """Per-image zero mean and unit variance, float32."""
    image = image.astype(np.float32)
    return (image - image.mean()) / (image.std() + eps)


@register_preprocess("value_range")
def value_range(image: np.ndarray, *, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Scales uint8 [0, 255] linearly to [low, high], float32."""
    return image.astype(np.float32) * ((high - low) / 255.0) + low


@register_preprocess("percentile_zscore")
def percentile_zscore(image: np.ndarray, *, percentile: float = 1.0, eps: float = 1e-6, ddof: int = 1) -> np.ndarray:
    """Deeplasia's normalisation, float32: ``x = max(image - P, 0)`` with ``P`` the image's
    ``percentile``-th percentile (numpy's linear interpolation), then ``(x - mean(x)) / (std(x) + eps)``.

    Deeplasia (aimi-bonn/Deeplasia, lib/datasets.py) subtracts the 1st percentile from the masked
    uint8 image with ``cv2.subtract`` ("no underflow", i.e. saturating at 0) before augmentation,
    and z-scores with ``torch.std`` (unbiased, hence ``ddof=1``) after it. The saturation is what
    makes the subtraction matter: pixels darker than ``P`` become equal, and the z-score of the
    rest is unchanged, so the result is invariant to a constant offset of the image. Here the
    percentile is taken over the whole image and the subtraction is in float (not rounded)."""
    p = float(np.percentile(image, percentile))
    x = np.maximum(image.astype(np.float32) - np.float32(p), np.float32(0))
    return ((x - x.mean()) / (x.std(ddof=ddof) + eps)).astype(np.float32)


@register_preprocess("scale")
def scale(image: np.ndarray, *, divisor: float = 255.0, offset: float = 0.0) -> np.ndarray:
    """Fixed linear scaling ``image / divisor + offset``, float32 (the default maps 0..255 to 0..1;
    ``divisor=127.5, offset=-1`` to -1..1)."""
    if divisor == 0:
        raise ValueError("scale: divisor must not be 0")
    return (image.astype(np.float32) / np.float32(divisor) + np.float32(offset)).astype(np.float32)


_PREPROCESS_MODES = ("caffe", "tf", "torch")
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # RGB
_TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN = np.array([103.939, 116.779, 123.68], np.float32)  # BGR


def _preprocess_input_channels(arguments: dict) -> int | None:
    """Mode 'tf' keeps the channels; 'torch' and 'caffe' make RGB."""
    return None if arguments["mode"] == "tf" else 3


@register_preprocess("preprocess_input", channels=_preprocess_input_channels)
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
