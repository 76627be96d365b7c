"""Preprocessing and augmentation ops: each with a property that can fail."""

from __future__ import annotations

import dataclasses

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


# ----------------------------------------------------------------------------- the registry and pipelines


def _data_config(**overrides) -> dict:
    config = {"preprocess": "resize_pad", "augment": "", "normalize": "zscore", "image_size": 32, "roi": "hand",
              "mask_cache": ""}
    return {**config, **overrides}


def test_every_op_declares_its_facts():
    assert len(ops.OPS) >= 26
    for name, op in ops.OPS.items():
        assert op.name == name and op.on in ("image", "sample")
        assert isinstance(op.random, bool) and isinstance(op.geometric, bool)
        assert op.reads <= ops.ANNOTATIONS
        if op.on == "image":
            assert not op.geometric and not op.reads, name  # image ops see only the image
        if op.random:
            assert not op.reads, name
        assert set(op.config_defaults) <= set(op.arguments), name
    reading = lambda what: {n for n, o in ops.OPS.items() if what in o.reads}  # noqa: E731
    assert reading("mask") == {"hand_mask", "align", "roi_crop", "suppress_markers"}
    assert reading("keypoints") == {"align", "roi_crop"}
    assert {n for n, o in ops.OPS.items() if o.random} == {
        "flip", "affine", "brightness_jitter", "contrast_jitter", "gamma_jitter", "clahe_or_gamma"}
    assert {n for n, o in ops.OPS.items() if o.geometric} == {
        "resize_pad", "resize", "center_crop", "align", "roi_crop", "flip", "affine"}
    assert {(n, a, f) for n, o in ops.OPS.items() for a, f in o.config_defaults.items()} == {
        ("resize_pad", "size", "image_size"), ("resize", "size", "image_size"), ("roi_crop", "region", "roi"),
        ("hand_mask", "cache_dir", "mask_cache")}


def test_registration_needs_the_facts(monkeypatch):
    monkeypatch.setattr(ops, "OPS", dict(ops.OPS))  # whatever registers here is dropped afterwards

    def op(sample, *, size=1):
        return sample

    with pytest.raises(ValueError, match="must declare geometric"):
        ops.register_preprocess("undeclared", on="sample")(op)
    with pytest.raises(ValueError, match="sees only the image"):
        ops.register_preprocess("moving_image_op", geometric=True)(op)
    with pytest.raises(ValueError, match="subset"):
        ops.register_preprocess("bones", on="sample", geometric=False, reads=("bones",))(op)
    with pytest.raises(ValueError, match="augmentations get no annotations"):
        ops.register_augment("peeking", on="sample", geometric=False, reads=("mask",))(op)
    with pytest.raises(ValueError, match="does not take"):
        ops.register_preprocess("wrong_default", on="sample", geometric=False,
                                config_defaults={"side": "image_size"})(op)
    with pytest.raises(ValueError, match="registered twice"):
        ops.register_preprocess("clahe")(op)
    # Defaults are declared, not matched by keyword name: an op with a `size` argument that does
    # not declare it gets no data.image_size.
    ops.register_preprocess("sized", on="sample", geometric=False)(op)
    assert ops.Chain("sized|resize_pad", config=_data_config(image_size=48)).ops[0].kwargs == {}


def test_spec_defaults_come_from_the_data_config():
    config = _data_config(preprocess="hand_mask(source='cache')|roi_crop|resize_pad|resize(size=20)", image_size=40,
                          roi="roi1", mask_cache="/masks")
    hand_mask, roi_crop, resize_pad, resize = ops.Pipeline.from_config(config).preprocess.ops
    assert hand_mask.kwargs == {"cache_dir": "/masks", "source": "cache"}
    assert roi_crop.kwargs == {"region": "roi1"} and resize_pad.kwargs == {"size": 40}
    assert resize.kwargs == {"size": 20}  # the spec wins
    assert ops.spec_defaults(config) == {"size": 40, "region": "roi1", "cache_dir": "/masks"}
    unset = _data_config(preprocess="roi_crop|resize_pad", roi="", mask_cache="")
    assert ops.spec_defaults(unset) == {"size": 32}
    assert ops.Pipeline.from_config(unset).preprocess.ops[0].arguments["region"] == "hand"  # the op's own default
    with pytest.raises(ValueError, match="data-config field"):
        ops.build_preprocess("resize_pad", size=32)  # arguments are not defaults: fields are


def test_pipeline_is_parsed_once_per_config(monkeypatch):
    config = _data_config(preprocess="resize_pad|clahe", augment="nguyen", normalize="grey_to_rgb|value_range")
    pipeline = ops.Pipeline.from_config(config)
    calls = []
    monkeypatch.setattr(ops, "parse_spec", lambda *args: calls.append(args))
    assert ops.Pipeline.from_config(dict(config)) is pipeline
    sample = pipeline.augment(pipeline.preprocess({"image": _hand_like(), "id": 0}), np.random.default_rng(0))
    assert pipeline.network_input(sample["image"]).shape == (32, 32, 3)
    assert calls == []
    assert pipeline.augment.geometric == ("flip", "affine") and pipeline.augment.random
    assert pipeline.preprocess.geometric == ("resize_pad",) and not pipeline.reads_mask
    monkeypatch.undo()
    assert ops.Pipeline.from_config({**config, "image_size": 16}) is not pipeline


def test_specs_keep_augmentations_and_preprocessing_apart():
    with pytest.raises(ValueError, match="'flip' is an augmentation"):
        ops.build_preprocess("resize_pad|flip")
    with pytest.raises(ValueError, match="'clahe' is not an augmentation"):
        ops.build_augment("flip|clahe")
    with pytest.raises(ValueError, match="^data.normalize: 'affine' is an augmentation"):
        ops.Pipeline.from_config(_data_config(normalize="affine"))
    with pytest.raises(ValueError, match="^data.augment: unknown augment op 'twist'"):
        ops.Pipeline.from_config(_data_config(augment="flip|twist"))


@pytest.mark.parametrize("name, kwargs", [(name, {}) for name in sorted(ops.OPS)] + [
    ("preprocess_input", {"mode": "torch"}), ("preprocess_input", {"mode": "caffe"})])
def test_declared_channels_match_the_output(name, kwargs):
    """The network input's channel count comes from the ops' declarations: they must be right."""
    image = _hand_like()
    mask = np.where(image > 60, 255, 0).astype(np.uint8)
    chain = ops.Chain(ops.format_spec([ops.OpCall(name, kwargs)]), random=ops.OPS[name].random,
                      config={"image_size": 24})
    out = chain({"image": image, "mask": mask, "id": 0}, np.random.default_rng(0))["image"]
    assert (1 if out.ndim == 2 else out.shape[2]) == chain.channels(1)


def test_configs_keep_the_channels_their_runs_were_built_with():
    """Runs written before the registry built their model for what data.normalize made of a grey image."""
    import glob
    import importlib
    import os

    root = os.path.join(os.path.dirname(__file__), "..")
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "configs", "*.py")))
    checked = 0
    for name in names:
        module = importlib.import_module(f"configs.{name}")
        if not hasattr(module, "get_config"):
            continue
        data = module.get_config().data
        probe = ops.Chain(data.normalize, config=data)(np.full((data.image_size,) * 2, 128, np.uint8))
        assert ops.Pipeline.from_config(data).num_channels == (1 if probe.ndim == 2 else probe.shape[2]), name
        checked += 1
    assert checked >= 10


def test_geometric_ops_are_what_segment_refuses():
    from boneage_jax import segment

    def refuses(spec: str) -> bool:
        try:
            segment.check_invertible(spec)
        except ValueError:
            return True
        return False

    assert not refuses("hand_mask(source='cache')|resize_pad|clahe") and refuses("clahe")
    refused = {name for name, op in ops.OPS.items() if not op.random and refuses(name + "|resize_pad")}
    assert refused == {name for name, op in ops.OPS.items() if op.geometric and not op.random}
    assert refused >= {"resize_pad", "align", "roi_crop"} and not refused & {"hand_mask", "suppress_markers"}


def test_single_images_make_their_own_mask_or_stop(monkeypatch):
    chain, notes = ops.Chain("hand_mask|align|resize_pad", config=_data_config()).for_single_images()
    assert chain.spec == "hand_mask(source='classical')|align|resize_pad"
    assert notes == ["hand_mask -> hand_mask(source='classical'): single images have no stored (dataset or cached) "
                     "hand mask; the mask is made from the image"]
    with pytest.raises(ValueError, match=r"roi_crop\(region='roi2'\) needs hand keypoints"):
        ops.Chain("roi_crop|resize_pad", config=_data_config(roi="roi2"), name="data.preprocess").for_single_images()
    monkeypatch.setitem(ops.OPS, "hand_mask", dataclasses.replace(ops.OPS["hand_mask"], without_mask=None))
    with pytest.raises(ValueError, match="needs a stored hand mask"):
        ops.Chain("hand_mask(source='dataset')").for_single_images()
