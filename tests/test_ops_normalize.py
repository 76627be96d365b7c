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


@pytest.mark.parametrize("shape", [(48, 40), (37, 51, 1), (20, 30, 3), (1, 1)])
def test_uint8_images_go_through_tables_with_the_float_paths_values(shape):
    """A uint8 image takes the lookup-table path; the same image as float32 takes numpy's
    elementwise path. Fixed maps agree exactly, per-image statistics to float32 rounding."""
    image = np.clip(np.random.default_rng(1).normal(90, 40, shape), 0, 255).astype(np.uint8)
    exact = [ops.scale, lambda x: ops.value_range(x, low=-1, high=1), ops.preprocess_input]
    if image.ndim == 2 or image.shape[2] != 1:  # torch and caffe take grey (H, W) or RGB
        exact += [lambda x: ops.preprocess_input(x, mode="torch"), lambda x: ops.preprocess_input(x, mode="caffe")]
    for fn in exact:
        table, elementwise = fn(image), fn(image.astype(np.float32))
        assert table.dtype == elementwise.dtype == np.float32 and table.shape == elementwise.shape
        np.testing.assert_array_equal(table, elementwise)
    statistics = [ops.zscore, lambda x: ops.percentile_zscore(x, percentile=5.3, ddof=0)]
    if image.size > 1:
        statistics.append(ops.percentile_zscore)
    for fn in statistics:
        table, elementwise = fn(image), fn(image.astype(np.float32))
        assert table.dtype == elementwise.dtype == np.float32 and table.shape == elementwise.shape
        np.testing.assert_allclose(table, elementwise, atol=2e-6)


def test_the_percentile_from_a_histogram_is_numpys():
    from boneage_jax.ops.normalize import _histogram, _percentile

    for seed, size in ((0, 1), (1, 2), (2, 101), (3, 4000)):
        image = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        for q in (0, 1, 5.3, 50, 99, 100):
            assert _percentile(_histogram(image), q) == np.percentile(image, q)


@pytest.mark.parametrize("grey_first, fast", [
    ("grey_to_rgb|preprocess_input(mode='tf')", "preprocess_input(mode='tf')|grey_to_rgb"),
    ("grey_to_rgb|value_range", "value_range|grey_to_rgb"),
    ("grey_to_rgb|preprocess_input(mode='caffe')", "preprocess_input(mode='caffe')"),
    ("grey_to_rgb|preprocess_input(mode='torch')", "preprocess_input(mode='torch')"),
])
def test_normalising_grey_before_making_rgb_gives_the_same_input(grey_first, fast):
    """The paper configs normalise the grey image and then make 3 channels (a third of the
    arithmetic); the values are those of repeating the grey image first."""
    image = np.clip(np.random.default_rng(2).normal(120, 50, (33, 29)), 0, 255).astype(np.uint8)
    expected, out = ops.build_preprocess(grey_first)(image), ops.build_preprocess(fast)(image)
    assert out.shape == expected.shape == (33, 29, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("spec", ["", "zscore", "percentile_zscore(percentile=2.0)", "value_range(low=-1.0, high=1.0)",
                                  "scale(divisor=127.5, offset=-1.0)", "preprocess_input(mode='tf')|grey_to_rgb",
                                  "preprocess_input(mode='caffe')", "grey_to_rgb|preprocess_input(mode='torch')",
                                  "zscore|grey_to_rgb", "grey_to_rgb"])
def test_a_normalize_chain_is_one_table_of_grey_levels_per_image(spec):
    """``Chain.level_table``: the table looked up at each pixel gives the chain's float32 output, bit for bit."""
    chain = ops.build_preprocess(spec)
    assert chain.maps_grey_levels
    for seed in range(3):
        image = np.random.default_rng(seed).integers(seed * 40, 256 - seed * 30, (37, 29), dtype=np.uint8)
        expected = ops.as_network_array(chain(image))
        table = chain.level_table(image)
        assert table.dtype == np.float32 and table.shape == (256, expected.shape[-1])
        np.testing.assert_array_equal(table[image], expected)
        np.testing.assert_array_equal(chain.level_table(image[:, :, None]), table)


def test_chains_that_are_not_a_table_of_grey_levels_say_so():
    for spec in ("zscore|zscore", "clahe|zscore", "value_range|percentile_zscore"):
        chain = ops.build_preprocess(spec)
        assert not chain.maps_grey_levels
        with pytest.raises(ValueError, match="is not a grey-level table"):
            chain.level_table(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="needs a uint8 grey image, got float32"):
        ops.build_preprocess("zscore").level_table(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="only image preprocessing ops can be pointwise"):
        ops.register_augment("jitter_table", pointwise=True)(lambda image, rng: image)
