"""Contrast ops: histogram equalisation, PIL enhancement, gamma, bilateral and Gaussian filters."""

from __future__ import annotations

import numpy as np
import pytest

from boneage_jax import ops


def _low_contrast(seed=0, shape=(64, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(80, 8, shape), 0, 255).astype(np.uint8)


def _cdf_deviation(image: np.ndarray) -> float:
    """Largest gap between the grey-level CDF and the CDF of a uniform histogram."""
    cdf = np.cumsum(np.bincount(image.ravel(), minlength=256)) / image.size
    return float(np.abs(cdf - np.arange(256) / 255).max())


def test_hist_eq_flattens_the_histogram():
    image = _low_contrast()
    out = ops.hist_eq(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert _cdf_deviation(image) > 0.5 and _cdf_deviation(out) < 0.08
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(ops.build_preprocess("equalize")(image), out)
    np.testing.assert_array_equal(ops.hist_eq(image[:, :, None]), out)  # (H, W, 1) as clahe: grey out
    with pytest.raises(ValueError, match="uint8"):
        ops.hist_eq(image.astype(np.float32))


def test_enhance_matches_pil_by_hand():
    # Pillow is not installed here; values worked out from Pillow's Blend.c (float32, truncation).
    image = np.array([[0, 100], [200, 255]], np.uint8)
    # brightness 1.2: 0, 120, 240, 306 -> 255. Mean of that = 153.75 -> int(154.25) = 154.
    # contrast 1.1 about 154: -15.4 -> 0, 116.6 -> 116, 248.6 -> 248, 265.1 -> 255 (truncated, not rounded).
    np.testing.assert_array_equal(ops.enhance(image, brightness=1.2, contrast=1.1), [[0, 116], [248, 255]])
    # brightness 0.5 (interpolation branch): 127.5 -> 127.
    np.testing.assert_array_equal(ops.enhance(image, brightness=0.5), [[0, 50], [100, 127]])
    # contrast 0 gives the uniform mean image: mean 138.75 -> int(139.25) = 139.
    np.testing.assert_array_equal(ops.enhance(image, contrast=0.0), np.full((2, 2), 139))
    # contrast 0.5 about 139: 69.5 -> 69, 119.5 -> 119, 169.5 -> 169, 197.0 -> 197.
    np.testing.assert_array_equal(ops.enhance(image, contrast=0.5), [[69, 119], [169, 197]])


def test_enhance_identity_shapes_and_rgb_mean():
    image = _low_contrast()
    np.testing.assert_array_equal(ops.enhance(image), image)
    assert ops.enhance(image[:, :, None], contrast=1.5).shape == (64, 64, 1)
    # An RGB image takes its contrast mean from Pillow's integer luma; a grey RGB image equals the grey result.
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    out = ops.enhance(rgb, brightness=1.1, contrast=1.3)
    np.testing.assert_array_equal(out[..., 1], ops.enhance(image, brightness=1.1, contrast=1.3))
    # More contrast spreads the grey levels about the mean.
    assert ops.enhance(image, contrast=2.0).std() > 1.8 * image.std()


def test_gamma_brightens_mid_greys_and_keeps_the_ends():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    bright, dark = ops.gamma(ramp, gamma=0.5), ops.gamma(ramp, gamma=2.0)
    assert bright.dtype == np.uint8 and bright.shape == ramp.shape
    assert bright.flat[0] == dark.flat[0] == 0 and bright.flat[255] == dark.flat[255] == 255
    assert bright.flat[128] == round(255 * (128 / 255) ** 0.5) == 181
    assert dark.flat[128] == round(255 * (128 / 255) ** 2) == 64
    assert np.all(bright.astype(int)[1:255] >= ramp[1:255]) and np.all(dark.astype(int)[1:255] <= ramp[1:255])
    assert np.all(np.diff(bright.ravel().astype(int)) >= 0)  # monotone
    np.testing.assert_array_equal(ops.gamma(ramp, gamma=1.0), ramp)
    with pytest.raises(ValueError, match="positive"):
        ops.gamma(ramp, gamma=0.0)


def _noisy_step(seed=0) -> np.ndarray:
    step = np.full((64, 64), 60.0)
    step[:, 32:] = 180
    return np.clip(step + np.random.default_rng(seed).normal(0, 10, step.shape), 0, 255).astype(np.uint8)


def test_bilateral_keeps_the_edge_that_gaussian_blur_smears():
    image = _noisy_step()
    bilateral = ops.bilateral(image, diameter=9, sigma_color=30, sigma_space=5).astype(np.float32)
    blurred = ops.gaussian_blur(image, sigma=2).astype(np.float32)
    noise = image[:, 4:24].astype(np.float32).std()
    # Both smooth the flat area about as much ...
    assert bilateral[:, 4:24].std() < 0.3 * noise and blurred[:, 4:24].std() < 0.3 * noise
    # ... but only the bilateral filter keeps the 120-level step between two neighbouring columns.
    assert bilateral[:, 32].mean() - bilateral[:, 31].mean() > 100
    assert blurred[:, 32].mean() - blurred[:, 31].mean() < 50


def test_gaussian_blur_reduces_noise_and_checks_ksize():
    image = _low_contrast()
    out = ops.gaussian_blur(image, sigma=1.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out.std() < 0.5 * image.std()
    assert abs(float(out.mean()) - float(image.mean())) < 1
    assert ops.gaussian_blur(image, sigma=1.0, ksize=5).std() < image.std()
    assert ops.gaussian_blur(image[:, :, None]).shape == (64, 64, 1)
    with pytest.raises(ValueError, match="odd"):
        ops.gaussian_blur(image, ksize=4)


def test_contrast_ops_compose_through_a_spec():
    fn = ops.build_preprocess(
        "hist_eq|enhance(brightness=1.2, contrast=1.1)|bilateral|gamma(gamma=0.8)|percentile_zscore")
    out = fn(_low_contrast())
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-2
    fn = ops.build_preprocess("gaussian_blur(sigma=0.8)|clahe|preprocess_input(mode='torch')")
    sample = fn({"image": _low_contrast(), "id": "x"})
    assert sample["image"].shape == (64, 64, 3) and sample["id"] == "x"
