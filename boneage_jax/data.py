"""Preparing the TFDS dataset and choosing the examples of each split.

``prepare(config.data)`` builds ``rsna_bone_age`` from ``data.manual_dir`` into
``data.data_dir`` the first time and reuses it afterwards. ``split_indices`` turns a TFDS split
into the record indices a run uses: the Kaggle layout has no validation split, so a
deterministic, age-stratified fraction of ``train`` is held out for validation.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging as std_logging
import os
import shutil

import cv2
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

import tfds_rsna  # noqa: F401  (registers the builder)
from boneage_jax import io

DATASET = "rsna_bone_age"
PREPARE_LOCK = ".prepare.lock"  # in a source's data dir, held while its dataset is built


DEFAULT_DATA_ROOT = "~/tensorflow_datasets/boneage_jax"


class _UnbuiltVariantFilter(std_logging.Filter):
    """Drops TFDS's warning 'Variant folder ... has no dataset_info.json', which it logs whenever
    it looks for a dataset that is not built yet: the normal case before the first build."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Variant folder %s has no")


if not any(isinstance(f, _UnbuiltVariantFilter) for f in logging.get_absl_logger().filters):
    logging.get_absl_logger().addFilter(_UnbuiltVariantFilter())


def data_dir_for(data_config: ml_collections.ConfigDict) -> str:
    """The TFDS data dir of a manual directory: ``<data.data_dir>/<folder name>-<path hash>``.

    Each source folder gets its own prepared copy, so one ``data.data_dir`` serves the
    phantoms, a sample and the full release side by side.
    """
    path = os.path.abspath(os.path.expanduser(data_config.manual_dir))
    tag = hashlib.sha1(path.encode()).hexdigest()[:10]
    name = os.path.basename(path.rstrip("/")) or "root"
    root = os.path.expanduser(data_config.data_dir or DEFAULT_DATA_ROOT)
    return os.path.join(root, f"{name}-{tag}")


def dataset_name(data_config: ml_collections.ConfigDict) -> str:
    return f"{DATASET}/{data_config.builder_config}"


def prepare(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Builds the dataset if it is not prepared yet, on process 0 only; returns the builder."""
    if not data_config.manual_dir:
        raise ValueError("config.data.manual_dir is empty: set it to the RSNA download or a phantom folder")
    data_dir = data_dir_for(data_config)
    manual_dir = os.path.abspath(os.path.expanduser(data_config.manual_dir))
    missing = None if os.path.isdir(manual_dir) else FileNotFoundError(
        f"config.data.manual_dir {manual_dir} does not exist")
    if missing and not os.path.isdir(data_dir):  # neither the source nor a prepared copy: before TFDS looks
        raise missing
    builder = tfds.builder(dataset_name(data_config), data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        if missing:
            raise missing
        if jax.process_index() == 0:
            _prepare_once(builder, data_config, manual_dir, data_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

            multihost_utils.sync_global_devices("boneage_jax dataset prepared")
        builder = tfds.builder(dataset_name(data_config), data_dir=data_dir, file_format="array_record")
    return builder


def _prepare_once(builder, data_config: ml_collections.ConfigDict, manual_dir: str, data_dir: str) -> None:
    """Builds the dataset under a lock on its folder: a second process waits and then finds it
    built; folders that a killed build left (TFDS's ``incomplete.*``) are removed first."""
    with io.FileLock(os.path.join(data_dir, PREPARE_LOCK), f"dataset folder {data_dir}").acquire(wait=True):
        if builder.is_prepared():  # another process built it while this one waited
            return
        name, config_name = dataset_name(data_config).split("/")
        for stale in glob.glob(os.path.join(data_dir, name, config_name, "incomplete.*")):
            shutil.rmtree(stale, ignore_errors=True)
        logging.info("Preparing %s from %s into %s", dataset_name(data_config), manual_dir, data_dir)
        print(f"Preparing dataset {dataset_name(data_config)} from {manual_dir} into {data_dir} ...", flush=True)
        # The builder shows its own bar per split (with the split's size, on a terminal only);
        # TFDS's bars, which know no total and print to logs too, are off meanwhile.
        tfds.display_progress_bar(False)
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        finally:
            tfds.display_progress_bar(True)


def data_source(data_config: ml_collections.ConfigDict, split: str, decode_images: bool = True,
                decode_masks: bool = True):
    """The random-access source of one TFDS split.

    With ``decode_images``, ``image`` (and ``mask`` if ``decode_masks``) come decoded to uint8
    (H, W, 1) by OpenCV (about 1.7x faster than TFDS's own PNG decoding, and it releases the GIL
    for grain's threads); a record without a mask, or whose mask is not decoded, gets a 1x1
    empty mask. Without ``decode_images``, both stay PNG bytes.
    """
    skip = {"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()}
    source = tfds.data_source(dataset_name(data_config), data_dir=data_dir_for(data_config), split=split,
                              decoders=skip)
    return DecodedRecords(source, decode_masks) if decode_images else source


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes of a grey image -> uint8 (H, W, 1)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("undecodable image in the prepared dataset; rebuild it (delete its folder)")
    return image[:, :, None] if image.ndim == 2 else image


class DecodedRecords:
    """A TFDS data source whose records have their image (and mask) decoded by OpenCV."""

    def __init__(self, source, decode_masks: bool = True):
        self._source = source
        self._decode_masks = decode_masks

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = dict(self._source[index])
        record["image"] = decode_png(record["image"])
        if "mask" in record:
            wanted = record["has_mask"] and self._decode_masks
            record["mask"] = decode_png(record["mask"]) if wanted else np.zeros((1, 1, 1), np.uint8)
        return record


@dataclasses.dataclass(frozen=True)
class LabelIndex:
    """Labels of every record of a split, aligned with the source's indices."""

    boneage: np.ndarray  # float32 months, NaN where unlabelled
    male: np.ndarray  # bool
    ids: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.ids)


def label_index(data_config: ml_collections.ConfigDict, split: str) -> LabelIndex:
    """Reads the labels of a split without decoding its images."""
    source = data_source(data_config, split, decode_images=False)
    records = [source[i] for i in range(len(source))]
    return LabelIndex(
        boneage=np.array([r["boneage"] if r["has_boneage"] else np.nan for r in records], np.float32),
        male=np.array([r["male"] for r in records], bool),
        ids=np.array([r["id"] for r in records], np.int64),
    )


def holdout_split(labels: LabelIndex, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, age-stratified hold-out: returns (train indices, validation indices).

    Records are sorted by (bone age, id) and cut into strata of ``round(1/fraction)``
    consecutive records; one record per stratum, chosen with ``seed``, goes to validation.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"config.data.validation_fraction must be in (0, 1), got {fraction}")
    order = np.lexsort((labels.ids, labels.boneage))
    stride = max(2, round(1.0 / fraction))
    rng = np.random.default_rng(seed)
    held = []
    for start in range(0, len(order), stride):
        stratum = order[start : start + stride]
        if len(stratum) == stride or rng.random() < len(stratum) / stride:
            held.append(rng.choice(stratum))
    held_out = np.zeros(len(order), bool)
    held_out[np.asarray(held, np.int64)] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


@dataclasses.dataclass(frozen=True)
class SplitSelection:
    """The TFDS split and record indices behind one of a run's splits."""

    tfds_split: str
    indices: np.ndarray
    labels: LabelIndex  # of the whole TFDS split

    @property
    def boneage(self) -> np.ndarray:
        return self.labels.boneage[self.indices]

    @property
    def male(self) -> np.ndarray:
        return self.labels.male[self.indices]

    @property
    def ids(self) -> np.ndarray:
        return self.labels.ids[self.indices]

    @property
    def labelled(self) -> bool:
        return bool(len(self.indices)) and not np.isnan(self.boneage).any()


def kfold_split(labels: LabelIndex, indices: np.ndarray, num_folds: int, fold: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, age-stratified k-fold: returns (train indices, fold ``fold``'s indices).

    The records are sorted by (bone age, id) and cut into blocks of ``num_folds``
    consecutive records; a seeded permutation gives each record of a block a different fold,
    so every fold spans the whole age range and the folds partition ``indices``.
    """
    if num_folds < 2:
        raise ValueError(f"config.data.num_folds must be 0 (off) or at least 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"config.data.fold must be in [0, {num_folds}), got {fold}")
    indices = np.asarray(indices, np.int64)
    order = indices[np.lexsort((labels.ids[indices], labels.boneage[indices]))]
    rng = np.random.default_rng(seed)
    folds = np.empty(len(order), np.int64)
    for start in range(0, len(order), num_folds):
        block = slice(start, start + num_folds)
        folds[block] = rng.permutation(num_folds)[: len(folds[block])]
    return np.sort(order[folds != fold]), np.sort(order[folds == fold])


SEXES = ("both", "male", "female")


def filter_indices(labels: LabelIndex, indices: np.ndarray, data_config: ml_collections.ConfigDict) -> np.ndarray:
    """Keeps the records of the configured sex and bone-age range (``data.sex``,
    ``data.min_age`` and ``data.max_age`` in months, inclusive). Unlabelled records pass the
    age filter (their age is unknown)."""
    sex = data_config.sex
    if sex not in SEXES:
        raise ValueError(f"config.data.sex is {sex!r}; expected one of {SEXES}")
    keep = np.ones(len(indices), bool)
    if sex != "both":
        keep &= labels.male[indices] == (sex == "male")
    ages = labels.boneage[indices]
    low, high = data_config.min_age, data_config.max_age
    keep &= np.isnan(ages) | ((ages >= low) & (ages <= high))
    return np.asarray(indices)[keep]


def select_splits(data_config: ml_collections.ConfigDict, builder, seed: int) -> dict[str, SplitSelection]:
    """Maps the run's ``train``, ``validation`` and (if present) ``test`` to record indices.

    With ``data.num_folds`` = k > 1, the whole TFDS ``train`` split is cut into k
    age-stratified folds; fold ``data.fold`` validates and the others train (an official
    validation split is then not used). Sex and age filters apply to every split. Then
    ``data.test_from_validation`` = n moves n random validation images into the test split
    (replacing it), and ``data.train_subset`` = n keeps n random training images."""
    splits = _base_splits(data_config, builder, seed)
    num_folds = data_config.num_folds
    if num_folds:
        train, held_out = splits["train"], splits["validation"]
        pool = train.indices
        if held_out.tfds_split == "train":  # the Kaggle layout: the hold-out returns to the pool
            pool = np.concatenate([pool, held_out.indices])
        train_idx, fold_idx = kfold_split(train.labels, pool, num_folds, data_config.fold, seed)
        splits["train"] = SplitSelection("train", train_idx, train.labels)
        splits["validation"] = SplitSelection("train", fold_idx, train.labels)
    splits = {name: dataclasses.replace(s, indices=filter_indices(s.labels, s.indices, data_config))
              for name, s in splits.items()}
    test_size = data_config.test_from_validation
    if test_size:  # Nguyen et al.: the test set is a random draw from the validation images
        validation = splits["validation"]
        if test_size >= len(validation.indices):
            raise ValueError(f"config.data.test_from_validation={test_size} needs more than the "
                             f"{len(validation.indices)} validation images")
        drawn = np.random.default_rng([seed, 1]).permutation(len(validation.indices))
        splits["test"] = dataclasses.replace(validation, indices=np.sort(validation.indices[drawn[:test_size]]))
        splits["validation"] = dataclasses.replace(validation, indices=np.sort(validation.indices[drawn[test_size:]]))
    train_size = data_config.train_subset
    if train_size and train_size < len(splits["train"].indices):  # Lee et al.: 1,000 training images per sex
        train = splits["train"]
        drawn = np.random.default_rng([seed, 2]).permutation(len(train.indices))[:train_size]
        splits["train"] = dataclasses.replace(train, indices=np.sort(train.indices[drawn]))
    for name in ("train", "validation"):
        if not len(splits[name].indices):
            raise ValueError(f"the {name} split is empty after the filters data.sex={data_config.sex!r}, "
                             f"data.min_age={data_config.min_age}, data.max_age={data_config.max_age}")
    return splits


def balanced_epoch(labels: LabelIndex, indices: np.ndarray, *, bins: int, per_bin: int,
                   rng: np.random.Generator) -> np.ndarray:
    """One epoch of class-balanced sampling (Nguyen et al.), shuffled.

    The training ages are cut into ``bins`` equal-width bins over their range; from each bin
    ``per_bin`` records are drawn, half boys and half girls (without replacement where a group
    has enough records, with replacement where it has fewer; a sex missing from a bin is made
    up by the other). Empty bins are skipped.
    """
    indices = np.asarray(indices, np.int64)
    ages, male = labels.boneage[indices], labels.male[indices]
    edges = np.linspace(ages.min(), ages.max(), bins + 1)
    which = np.clip(np.searchsorted(edges, ages, side="right") - 1, 0, bins - 1)
    chosen = []
    for b in range(bins):
        groups = [indices[(which == b) & male], indices[(which == b) & ~male]]
        groups = [g for g in groups if len(g)]
        if not groups:
            continue
        counts = [per_bin // len(groups) + (i < per_bin % len(groups)) for i in range(len(groups))]
        for group, count in zip(groups, counts):
            chosen.append(rng.choice(group, count, replace=len(group) < count))
    epoch = np.concatenate(chosen)
    return epoch[rng.permutation(len(epoch))]


def _base_splits(data_config: ml_collections.ConfigDict, builder, seed: int) -> dict[str, SplitSelection]:
    available = set(builder.info.splits.keys())
    train_labels = label_index(data_config, "train")
    splits = {}
    if "validation" in available:
        validation_labels = label_index(data_config, "validation")
        splits["train"] = SplitSelection("train", np.arange(len(train_labels)), train_labels)
        splits["validation"] = SplitSelection("validation", np.arange(len(validation_labels)), validation_labels)
    else:
        train_idx, validation_idx = holdout_split(train_labels, data_config.validation_fraction, seed)
        logging.info("No validation split: holding out %d of %d training images", len(validation_idx), len(train_labels))
        splits["train"] = SplitSelection("train", train_idx, train_labels)
        splits["validation"] = SplitSelection("train", validation_idx, train_labels)
    if "test" in available:
        test_labels = label_index(data_config, "test")
        splits["test"] = SplitSelection("test", np.arange(len(test_labels)), test_labels)
    return splits
