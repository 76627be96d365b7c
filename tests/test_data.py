"""Dataset preparation and split selection."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

from boneage_jax import data


def _labels(n: int, seed: int = 0) -> data.LabelIndex:
    rng = np.random.default_rng(seed)
    return data.LabelIndex(
        boneage=rng.integers(1, 228, n).astype(np.float32), male=rng.random(n) < 0.5, ids=np.arange(100, 100 + n)
    )


def test_holdout_is_deterministic_disjoint_and_stratified():
    labels = _labels(1000)
    train_a, val_a = data.holdout_split(labels, 0.1, seed=3)
    train_b, val_b = data.holdout_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(val_a, val_b)
    assert not set(train_a) & set(val_a) and len(train_a) + len(val_a) == 1000
    assert 95 <= len(val_a) <= 105
    # Stratified: the held-out age quartiles match the whole set's within a few months.
    for q in (25, 50, 75):
        assert abs(np.percentile(labels.boneage[val_a], q) - np.percentile(labels.boneage, q)) < 8
    _, val_c = data.holdout_split(labels, 0.1, seed=4)
    assert not np.array_equal(val_a, val_c)


def test_holdout_rejects_bad_fraction():
    with pytest.raises(ValueError, match="validation_fraction"):
        data.holdout_split(_labels(10), 1.5, seed=0)


def test_data_dir_is_per_source(tmp_path):
    config = ml_collections.ConfigDict({"manual_dir": str(tmp_path / "a"), "data_dir": str(tmp_path / "root")})
    a = data.data_dir_for(config)
    config.manual_dir = str(tmp_path / "b")
    assert a != data.data_dir_for(config) and a.startswith(str(tmp_path / "root"))


def test_prepare_requires_manual_dir():
    config = ml_collections.ConfigDict({"manual_dir": "", "data_dir": "", "builder_config": "max512"})
    with pytest.raises(ValueError, match="manual_dir is empty"):
        data.prepare(config)


def test_select_splits_on_phantom(tiny_config):
    builder = data.prepare(tiny_config.data)
    splits = data.select_splits(tiny_config.data, builder, seed=0)
    assert {k: len(v.indices) for k, v in splits.items()} == {"train": 48, "validation": 16, "test": 16}
    assert all(s.labelled for s in splits.values())
    assert os.path.isdir(data.data_dir_for(tiny_config.data))


def test_kaggle_layout_holds_out_validation(tmp_path, phantom_dir):
    """Without a validation split, a fraction of train is held out deterministically."""
    import shutil

    manual = tmp_path / "kaggle"
    manual.mkdir()
    shutil.copy(os.path.join(phantom_dir, "boneage-training-dataset.csv"), manual)
    shutil.copytree(os.path.join(phantom_dir, "boneage-training-dataset"), manual / "boneage-training-dataset")
    config = ml_collections.ConfigDict(
        {"manual_dir": str(manual), "data_dir": str(tmp_path / "tfds"), "builder_config": "max512",
         "validation_fraction": 0.25}
    )
    builder = data.prepare(config)
    splits = data.select_splits(config, builder, seed=0)
    assert set(splits) == {"train", "validation"}
    assert len(splits["validation"].indices) == 12 and len(splits["train"].indices) == 36
    assert splits["validation"].tfds_split == "train"
    assert not set(splits["train"].ids) & set(splits["validation"].ids)
