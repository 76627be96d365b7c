"""Intensity augmentations: seeded by the rng passed in, within their ranges, usable in specs and threads."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from boneage_jax import ops


def _image(seed=0, shape=(48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(100, 20, shape), 40, 180).astype(np.uint8)


@pytest.mark.parametrize("name", ["brightness_jitter", "contrast_jitter", "gamma_jitter", "clahe_or_gamma"])
def test_jitter_is_seeded_by_the_rng_only(name):
    # 256 px: CLAHE tiles of 32 x 32, so that the random clip limit changes the result.
    fn, image = getattr(ops, name), _image(shape=(256, 256))
    a, b = fn(image, np.random.default_rng(7)), fn(image, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == image.shape
    outs = {fn(image, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outs) >= 4  # OpenCV quantises CLAHE's clip limit to whole counts per histogram bin


def test_brightness_jitter_stays_within_its_factor():
    image = _image()  # no pixel saturates at 180 * 1.3
    ratios = [ops.brightness_jitter(image, np.random.default_rng(s), max_delta=0.3).mean() / image.mean()
              for s in range(60)]
    # trunc(v * f) loses < 1 level: ratio in (f - 1/mean, f], f in [0.7, 1.3].
    assert min(ratios) >= 0.7 - 1 / image.mean() and max(ratios) <= 1.3
    assert min(ratios) < 0.8 and max(ratios) > 1.2  # the range is used
    np.testing.assert_array_equal(ops.brightness_jitter(image, np.random.default_rng(0), max_delta=0.0), image)
    with pytest.raises(ValueError, match="max_delta"):
        ops.brightness_jitter(image, np.random.default_rng(0), max_delta=1.5)


def test_contrast_jitter_scales_the_spread_about_the_mean():
    image = _image()  # 40..180 about ~100: no clipping for factors within 1 +- 0.3
    ratios = [ops.contrast_jitter(image, np.random.default_rng(s), max_delta=0.3).std() / image.std()
              for s in range(60)]
    assert 0.69 <= min(ratios) and max(ratios) <= 1.31
    assert min(ratios) < 0.8 and max(ratios) > 1.2
    for s in range(5):  # the mean stays (to within the rounding of the mean and the truncation)
        assert abs(ops.contrast_jitter(image, np.random.default_rng(s)).mean() - image.mean()) < 1.5


def test_gamma_jitter_stays_within_its_range():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    lo = ops.gamma(ramp, gamma=1.25).astype(int)  # darkest allowed
    hi = ops.gamma(ramp, gamma=0.8).astype(int)  # brightest allowed
    brighter = 0
    for s in range(60):
        out = ops.gamma_jitter(ramp, np.random.default_rng(s)).astype(int)
        assert np.all(out >= lo) and np.all(out <= hi)
        assert out.flat[0] == 0 and out.flat[255] == 255
        brighter += out.flat[128] > 128
    assert 15 <= brighter <= 45  # log-uniform in [0.8, 1.25]: as often brighter as darker
    with pytest.raises(ValueError, match="low"):
        ops.gamma_jitter(ramp, np.random.default_rng(0), low=1.2, high=0.9)


def _is_clahe(image, out) -> bool:
    """CLAHE flattens the histogram locally; a gamma curve is a monotone map of the grey levels."""
    order = np.argsort(image.ravel(), kind="stable")
    return bool(np.any(np.diff(out.ravel()[order].astype(int)) < 0))


def test_clahe_or_gamma_picks_clahe_p_of_the_time():
    image = _image(shape=(32, 32))
    assert _is_clahe(image, ops.clahe(image)) and not _is_clahe(image, ops.gamma(image, gamma=0.7))
    picks = [_is_clahe(image, ops.clahe_or_gamma(image, np.random.default_rng(s))) for s in range(200)]
    assert 110 <= sum(picks) <= 156  # p = 2/3 (Deeplasia): 133 +- 3.5 sigma
    picks = [_is_clahe(image, ops.clahe_or_gamma(image, np.random.default_rng(s), p_clahe=0.25)) for s in range(200)]
    assert 30 <= sum(picks) <= 70
    always = ops.clahe_or_gamma(image, np.random.default_rng(0), p_clahe=1.0, clip_limit=2.0, tile_grid=4)
    np.testing.assert_array_equal(always, ops.clahe(image, clip_limit=2.0, tile_grid=4))
    never = ops.clahe_or_gamma(image, np.random.default_rng(0), p_clahe=0.0, gamma_low=0.5, gamma_high=0.5)
    np.testing.assert_array_equal(never, ops.gamma(image, gamma=0.5))


def test_clahe_or_gamma_is_thread_safe():
    images = [_image(seed=s) for s in range(16)]
    expected = [ops.clahe_or_gamma(x, np.random.default_rng(i)) for i, x in enumerate(images)]

    def run(i):
        return ops.clahe_or_gamma(images[i % 16], np.random.default_rng(i % 16))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, range(64)))
    for i, out in enumerate(got):
        np.testing.assert_array_equal(out, expected[i % 16])


def test_intensity_augmentations_compose_through_a_spec():
    augment = ops.build_augment("brightness_jitter|contrast_jitter|gamma_jitter|clahe_or_gamma")
    image = _image()
    a = augment(image, np.random.default_rng(3))
    np.testing.assert_array_equal(a, augment(image, np.random.default_rng(3)))
    assert a.shape == image.shape and a.dtype == np.uint8
    sample = ops.build_augment("clahe_or_gamma(p_clahe=1.0, clip_limit=(2.0, 4.0))|flip(p=1.0)")(
        {"image": image, "id": "x"}, np.random.default_rng(0))
    assert sample["image"].shape == image.shape and sample["id"] == "x"
