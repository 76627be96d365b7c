"""Dataset preparation and split selection."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

from boneage_jax import data
from configs.common import base_config


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
    config = base_config().data
    config.update({"manual_dir": str(manual), "data_dir": str(tmp_path / "tfds"), "builder_config": "max512",
                   "validation_fraction": 0.25})
    builder = data.prepare(config)
    splits = data.select_splits(config, builder, seed=0)
    assert set(splits) == {"train", "validation"}
    assert len(splits["validation"].indices) == 12 and len(splits["train"].indices) == 36
    assert splits["validation"].tfds_split == "train"
    assert not set(splits["train"].ids) & set(splits["validation"].ids)


def test_kfold_partitions_and_stratifies():
    labels = _labels(503)
    pool = np.arange(503)
    folds = [data.kfold_split(labels, pool, 5, i, seed=0) for i in range(5)]
    held = np.concatenate([f[1] for f in folds])
    np.testing.assert_array_equal(np.sort(held), pool)  # every record validates exactly once
    for train_idx, fold_idx in folds:
        assert not set(train_idx) & set(fold_idx) and len(train_idx) + len(fold_idx) == 503
        assert 100 <= len(fold_idx) <= 101
        assert abs(np.median(labels.boneage[fold_idx]) - np.median(labels.boneage)) < 6
    np.testing.assert_array_equal(folds[2][1], data.kfold_split(labels, pool, 5, 2, seed=0)[1])
    with pytest.raises(ValueError, match="data.fold must be in"):
        data.kfold_split(labels, pool, 5, 5, seed=0)
    with pytest.raises(ValueError, match="num_folds"):
        data.kfold_split(labels, pool, 1, 0, seed=0)


def test_sex_and_age_filters():
    labels = _labels(200)
    labels.boneage[:3] = np.nan  # unlabelled records pass the age filter
    config = ml_collections.ConfigDict({"sex": "female", "min_age": 24.0, "max_age": 120.0})
    kept = data.filter_indices(labels, np.arange(200), config)
    labelled = kept[~np.isnan(labels.boneage[kept])]
    assert not labels.male[kept].any() and len(labelled) > 20
    assert labels.boneage[labelled].min() >= 24 and labels.boneage[labelled].max() <= 120
    expected = [i for i in range(200) if not labels.male[i]
                and (np.isnan(labels.boneage[i]) or 24 <= labels.boneage[i] <= 120)]
    np.testing.assert_array_equal(kept, expected)
    with pytest.raises(ValueError, match="data.sex is 'boys'"):
        data.filter_indices(labels, np.arange(200), ml_collections.ConfigDict({"sex": "boys"}))


def test_balanced_epoch_has_equal_bins_and_sexes():
    rng = np.random.default_rng(0)
    n = 2000
    ages = np.concatenate([rng.normal(150, 20, n - 60), rng.uniform(0, 40, 60)]).clip(0, 228).astype(np.float32)
    male = rng.random(n) < 0.7
    labels = data.LabelIndex(boneage=ages, male=male, ids=np.arange(n))
    epoch = data.balanced_epoch(labels, np.arange(n), bins=4, per_bin=100, rng=np.random.default_rng(1))
    edges = np.linspace(ages.min(), ages.max(), 5)
    which = np.clip(np.searchsorted(edges, ages[epoch], side="right") - 1, 0, 3)
    counts = np.bincount(which, minlength=4)
    assert set(counts) == {100}  # the rare young bin is drawn as often as the crowded ones
    for b in range(4):
        boys = male[epoch][which == b].sum()
        assert boys == 50
    again = data.balanced_epoch(labels, np.arange(n), bins=4, per_bin=100, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(epoch, again)


def test_kfold_and_filters_in_select_splits(tiny_config):
    builder = data.prepare(tiny_config.data)
    tiny_config.data.num_folds = 4
    tiny_config.data.fold = 1
    splits = data.select_splits(tiny_config.data, builder, seed=0)
    assert len(splits["validation"].indices) == 12 and len(splits["train"].indices) == 36
    assert splits["validation"].tfds_split == "train" and len(splits["test"].indices) == 16
    tiny_config.data.num_folds = 0
    tiny_config.data.sex = "male"
    splits = data.select_splits(tiny_config.data, builder, seed=0)
    assert all(s.male.all() for s in splits.values())
    tiny_config.data.sex = "both"
    tiny_config.data.min_age = 300.0
    with pytest.raises(ValueError, match="train split is empty after the filters"):
        data.select_splits(tiny_config.data, builder, seed=0)


def test_prepare_removes_what_a_killed_build_left_and_waits_for_a_running_one(tmp_path, phantom_dir):
    """A build killed mid-way leaves TFDS's ``incomplete.*`` folder: the next prepare removes it.
    While another process holds the dataset folder's lock, prepare waits for it."""
    import threading

    from boneage_jax import io

    config = base_config().data
    config.update({"manual_dir": phantom_dir, "data_dir": str(tmp_path / "root"), "builder_config": "max512"})
    data_dir = data.data_dir_for(config)
    stale = os.path.join(data_dir, "rsna_bone_age", "max512", "incomplete.ABC123_1.1.0")
    os.makedirs(stale)
    with open(os.path.join(stale, "rsna_bone_age-train.array_record-00000-of-00001"), "wb") as f:
        f.write(b"half")
    holder = io.FileLock(os.path.join(data_dir, data.PREPARE_LOCK), "test").acquire()
    released = threading.Event()

    def release_later():
        released.wait(timeout=0.5)
        holder.release()

    thread = threading.Thread(target=release_later)
    thread.start()
    builder = data.prepare(config)
    thread.join()
    assert builder.is_prepared()
    assert not os.path.exists(stale)
    assert not [p for p in os.listdir(os.path.dirname(stale)) if p.startswith("incomplete.")]


def test_a_missing_source_is_named_and_tfds_says_nothing_of_an_unbuilt_dataset(tmp_path, caplog):
    """A missing manual_dir without a prepared copy is named before TFDS looks; TFDS's warning about
    a dataset folder without dataset_info.json (every first build) is dropped."""
    import tensorflow_datasets as tfds

    config = base_config().data
    config.manual_dir, config.data_dir = str(tmp_path / "absent"), str(tmp_path / "prepared")
    with pytest.raises(FileNotFoundError, match=f"config.data.manual_dir {tmp_path}/absent does not exist"):
        data.prepare(config)
    assert not os.path.exists(tmp_path / "prepared")
    os.makedirs(tmp_path / "unbuilt" / "rsna_bone_age" / "max512" / "1.1.0")
    with caplog.at_level("WARNING"):
        assert not tfds.builder("rsna_bone_age/max512", data_dir=str(tmp_path / "unbuilt")).is_prepared()
    assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]
