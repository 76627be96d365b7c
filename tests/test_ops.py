"""Preprocessing and augmentation ops: each with a property that can fail."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from boneage_jax import ops


def _hand_like(height=120, width=90, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width), 20, np.uint8)
    cv2.ellipse(image, (width // 2, height // 2), (width // 4, height // 3), 0, 0, 360, 110, -1)
    cv2.rectangle(image, (width // 2 - 5, 10), (width // 2 + 5, height - 10), 140, -1)
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def _image(fn, image, *args, **kwargs):
    """Runs a sample op on a bare image."""
    return fn({"image": image}, *args, **kwargs)["image"]


def test_resize_pad_keeps_aspect_and_centres():
    image = np.full((100, 50), 200, np.uint8)
    out = _image(ops.resize_pad, image, size=64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    columns = np.flatnonzero(out.max(axis=0) > 0)
    assert (columns.min(), columns.max()) == (16, 47)  # 32 wide, centred
    white = _image(ops.resize_pad, image, size=64, pad_value=255)
    assert white[:, 0].min() == 255


def test_resize_plain_fills_the_square():
    out = _image(ops.resize, np.full((100, 50), 7, np.uint8), size=40)
    assert out.shape == (40, 40) and np.all(out == 7)


def test_clahe_raises_local_contrast():
    image = (_hand_like() // 4 + 60).astype(np.uint8)  # a dull, low-contrast image
    out = ops.clahe(image, clip_limit=2.0, tile_grid=4)

    def local_std(x):
        x = x.astype(np.float32)
        return np.sqrt(np.maximum(cv2.blur(x * x, (9, 9)) - cv2.blur(x, (9, 9)) ** 2, 0)).mean()

    assert local_std(out) > 1.5 * local_std(image)


def test_clahe_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        ops.clahe(np.zeros((8, 8), np.float32))


def test_clahe_is_thread_safe():
    import concurrent.futures

    images = [_hand_like(seed=s) for s in range(16)]
    expected = [ops.clahe(x) for x in images]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ops.clahe, images * 4))
    for i, out in enumerate(got):
        np.testing.assert_array_equal(out, expected[i % 16])


def test_zscore_and_value_range():
    z = ops.zscore(_hand_like())
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    v = ops.value_range(np.array([[0, 255]], np.uint8), low=-1, high=1)
    np.testing.assert_allclose(v, [[-1, 1]])


def test_grey_to_rgb():
    out = ops.grey_to_rgb(_hand_like()[:, :, None])
    assert out.shape == (120, 90, 3) and np.all(out[..., 0] == out[..., 2])


def test_flip_is_seeded():
    image = _hand_like()
    flipped = [np.array_equal(_image(ops.random_flip, image, np.random.default_rng(s)), image[:, ::-1]) for s in range(40)]
    assert 10 <= sum(flipped) <= 30
    a = _image(ops.random_flip, image, np.random.default_rng(3), p=1.0)
    np.testing.assert_array_equal(a, image[:, ::-1])
    np.testing.assert_array_equal(_image(ops.random_flip, image, np.random.default_rng(3), p=0.0), image)


def test_affine_rotation_moves_the_centre_of_mass_back_when_zero():
    image = _hand_like()
    same = _image(ops.random_affine, image, np.random.default_rng(0))
    np.testing.assert_array_equal(same, image)
    a = _image(ops.random_affine, image, np.random.default_rng(5), rotation=20, shift=0.1, zoom=0.1)
    b = _image(ops.random_affine, image, np.random.default_rng(5), rotation=20, shift=0.1, zoom=0.1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, image) and a.shape == image.shape


class FixedRng:
    """Always draws the upper end of a range."""

    def uniform(self, low, high, size=None):
        return np.full(size, high) if size else high


def test_affine_shift_translates():
    image = np.zeros((50, 50), np.uint8)
    image[20:30, 20:30] = 255

    out = _image(ops.random_affine, image, FixedRng(), shift=0.1)  # +5 px in x and y
    ys, xs = np.nonzero(out > 128)
    assert (ys.min(), xs.min()) == (25, 25)


def test_affine_fill_modes():
    image = _hand_like()
    nearest = _image(ops.random_affine, image, FixedRng(), rotation=30, fill_mode="nearest")
    constant = _image(ops.random_affine, image, FixedRng(), rotation=30, fill_mode="constant", fill_value=0)
    assert (constant == 0).sum() > 500 and (nearest == 0).sum() == 0
    with pytest.raises(ValueError, match="fill_mode"):
        _image(ops.random_affine, image, FixedRng(), fill_mode="wrap")


def test_spec_parsing_and_errors():
    fn = ops.build_preprocess("resize_pad(pad_value=255)|clahe(clip_limit=3.0)", image_size=32)
    assert fn(_hand_like()).shape == (32, 32)
    assert [c.name for c in ops.parse_spec(" resize_pad | | zscore ")] == ["resize_pad", "zscore"]
    with pytest.raises(ValueError, match="unknown preprocess op 'sharpen'"):
        ops.build_preprocess("sharpen")
    with pytest.raises(ValueError, match="has no argument"):
        ops.build_preprocess("clahe(clip=2)")
    with pytest.raises(ValueError, match="use name or name"):
        ops.parse_spec("clahe(2.0)")
    augment = ops.build_augment("flip(p=1.0)|affine(rotation=5)")
    assert augment(_hand_like(), np.random.default_rng(0)).shape == (120, 90)
