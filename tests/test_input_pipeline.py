"""grain pipelines: determinism, checkpointable iterator state, eval padding."""

from __future__ import annotations

import numpy as np

from boneage_jax import data, input_pipeline


def _splits(config):
    return data.select_splits(config.data, data.prepare(config.data), seed=0)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_batches_are_deterministic_and_resumable(tiny_config):
    splits = _splits(tiny_config)
    make = lambda seed: iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, seed))  # noqa: E731
    a, b = _take(make(1), 3), _take(make(1), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["id"], y["id"])
    other = _take(make(2), 1)[0]
    assert not np.array_equal(other["id"], a[0]["id"])

    first = a[0]
    assert first["image"].shape == (8, 32, 32, 1) and first["image"].dtype == np.float32
    assert set(first) == {"image", "male", "boneage", "id", "weight"}
    assert np.all(first["weight"] == 1)

    iterator = make(1)
    next(iterator)
    state = iterator.get_state()
    expected = next(iterator)
    resumed = make(1)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], expected["image"])


def test_train_epochs_cover_every_example_and_reshuffle(tiny_config):
    splits = _splits(tiny_config)
    iterator = iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0))
    epoch1 = np.concatenate([next(iterator)["id"] for _ in range(6)])
    epoch2 = np.concatenate([next(iterator)["id"] for _ in range(6)])
    assert sorted(epoch1) == sorted(splits["train"].ids) == sorted(epoch2)
    assert not np.array_equal(epoch1, epoch2)


def test_eval_batches_pad_with_zero_weight(tiny_config):
    splits = _splits(tiny_config)
    batches = list(input_pipeline.eval_batches(tiny_config.data, splits["validation"], 6))
    assert len(batches) == 3 and all(len(b["id"]) == 6 for b in batches)
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.sum() == 16 and np.all(weights[16:] == 0)
    ids = np.concatenate([b["id"] for b in batches])[:16]
    np.testing.assert_array_equal(ids, splits["validation"].ids)


def test_pipeline_output_is_normalised(tiny_config):
    splits = _splits(tiny_config)
    batch = next(input_pipeline.eval_batches(tiny_config.data, splits["validation"], 4))
    per_image = batch["image"].reshape(4, -1)
    np.testing.assert_allclose(per_image.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(per_image.std(axis=1), 1, atol=1e-3)


def test_masks_move_with_the_augmentation(tiny_config):
    """Segmentation batches: the mask is flipped and warped with its image."""
    tiny_config.data.mask_in_batch = True
    tiny_config.data.preprocess = "resize_pad"
    tiny_config.data.normalize = "value_range"
    tiny_config.data.augment = "flip(p=1.0)|affine(rotation=15, shift=0.1)"
    splits = _splits(tiny_config)
    batch = next(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)))
    assert batch["mask"].shape == (8, 32, 32, 1) and set(np.unique(batch["mask"])) <= {0.0, 1.0}
    # The hand is brighter than the background under the (moved) mask, in every image.
    for image, mask in zip(batch["image"], batch["mask"]):
        inside, outside = image[mask > 0], image[mask == 0]
        assert inside.mean() > outside.mean() + 0.1
    tiny_config.data.augment = ""
    plain = next(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)))
    assert not np.array_equal(plain["mask"], batch["mask"])


def test_balanced_sampling_is_reproducible_and_resumable(tiny_config):
    tiny_config.data.sampling = "balanced"
    tiny_config.data.balance_bins = 3
    tiny_config.data.balance_per_bin = 8
    splits = _splits(tiny_config)
    make = lambda: iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0))  # noqa: E731
    ids = np.concatenate([b["id"] for b in _take(make(), 6)])  # two epochs of 24
    again = np.concatenate([b["id"] for b in _take(make(), 6)])
    np.testing.assert_array_equal(ids, again)
    assert not np.array_equal(np.sort(ids[:24]), np.sort(ids[24:]))  # each epoch is a fresh draw
    male = dict(zip(splits["train"].ids, splits["train"].male))
    assert sum(male[i] for i in ids[:24]) == 12  # sexes equal within the epoch
    iterator = make()
    next(iterator)
    state = iterator.get_state()
    expected = next(iterator)["id"]
    resumed = make()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["id"], expected)
    tiny_config.data.sampling = "stratified"
    with np.testing.assert_raises_regex(ValueError, "data.sampling is 'stratified'"):
        input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)
