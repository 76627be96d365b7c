"""Normalisation ops: Deeplasia's percentile z-score, fixed scaling and Keras's preprocess_input."""

from __future__ import annotations

import numpy as np
import pytest

from boneage_jax import ops


def _image(seed=0, shape=(48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(90, 25, shape), 0, 200).astype(np.uint8)


def test_percentile_zscore_is_a_zscore_invariant_to_an_offset():
    image = _image()
    out = ops.percentile_zscore(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert abs(out.mean()) < 1e-5 and abs(out.std(ddof=1) - 1) < 1e-4
    shifted = ops.percentile_zscore(image + np.uint8(40))  # max 200 + 40: no overflow
    np.testing.assert_allclose(shifted, out, atol=1e-5)
    # Pixels below the 1st percentile saturate at it: they all get the lowest value ...
    low = image <= np.percentile(image, 1)
    np.testing.assert_allclose(out[low], out.min(), atol=1e-6)
    # ... which is what makes it differ from a plain z-score.
    assert not np.allclose(out, ops.zscore(image), atol=1e-3)
    # percentile 0 subtracts the minimum and clips nothing: a plain z-score (up to ddof).
    np.testing.assert_allclose(ops.percentile_zscore(image, percentile=0, ddof=0), ops.zscore(image), atol=1e-5)


def test_scale():
    image = np.array([[0, 51, 255]], np.uint8)
    np.testing.assert_allclose(ops.scale(image), [[0, 0.2, 1]], rtol=1e-6)
    out = ops.scale(image, divisor=127.5, offset=-1.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-1, 51 / 127.5 - 1, 1]], rtol=1e-6)
    with pytest.raises(ValueError, match="divisor"):
        ops.scale(image, divisor=0)


def test_preprocess_input_tf():
    image = np.array([[0, 127, 255]], np.uint8)
    out = ops.preprocess_input(image)
    assert out.dtype == np.float32 and out.shape == (1, 3)  # grey stays grey
    np.testing.assert_allclose(out, [[-1.0, 127 / 127.5 - 1, 1.0]], rtol=1e-6)
    assert ops.preprocess_input(image[:, :, None], mode="tf").shape == (1, 3, 1)


def test_preprocess_input_torch_and_caffe_on_grey_and_rgb():
    grey = np.array([[0, 255]], np.uint8)
    torch = ops.preprocess_input(grey, mode="torch")
    assert torch.shape == (1, 2, 3) and torch.dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(torch[0, 0], -mean / std, rtol=1e-5)
    np.testing.assert_allclose(torch[0, 1], (1 - mean) / std, rtol=1e-5)
    caffe = ops.preprocess_input(grey[:, :, None], mode="caffe")
    bgr_mean = np.array([103.939, 116.779, 123.68])
    assert caffe.shape == (1, 2, 3)
    np.testing.assert_allclose(caffe[0, 1], 255 - bgr_mean, rtol=1e-5)

    rgb = np.array([[[10, 20, 30], [200, 100, 50]]], np.uint8)  # RGB
    caffe = ops.preprocess_input(rgb, mode="caffe")
    np.testing.assert_allclose(caffe[0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-5)  # BGR
    np.testing.assert_allclose(caffe[0, 1], [50 - 103.939, 100 - 116.779, 200 - 123.68], rtol=1e-5)
    torch = ops.preprocess_input(rgb, mode="torch")
    np.testing.assert_allclose(torch[0, 1], (np.array([200, 100, 50]) / 255 - mean) / std, rtol=1e-5)


def test_preprocess_input_errors():
    with pytest.raises(ValueError, match="caffe, tf, torch"):
        ops.preprocess_input(np.zeros((2, 2), np.uint8), mode="imagenet")
    with pytest.raises(ValueError, match="3-channel"):
        ops.preprocess_input(np.zeros((2, 2, 2), np.uint8), mode="torch")
    with pytest.raises(ValueError, match="has no argument"):
        ops.build_preprocess("preprocess_input(style='tf')")
    fn = ops.build_preprocess("preprocess_input(mode='caffe')")
    assert fn(np.zeros((4, 4), np.uint8)).shape == (4, 4, 3)
