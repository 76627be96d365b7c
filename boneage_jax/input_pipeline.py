"""grain input pipelines: per-process sharding, seeded shuffle, repeat, decode, ops, batching.

A batch is a dict of numpy arrays: ``image`` float32 (B, S, S, C), ``male`` float32 (B,),
``boneage`` float32 months (B,), ``id`` int64 (B,) and ``weight`` float32 (B,), which is 0 for
the padding that completes an evaluation's last batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np

from boneage_jax import data, ops


class SelectedRecords:
    """Random access to the chosen records of a TFDS data source."""

    def __init__(self, source, indices: np.ndarray):
        self._source = source
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict:
        return self._source[int(self._indices[index])]


def example_fn(data_config: ml_collections.ConfigDict) -> Callable[[dict], dict]:
    """Decoded record -> preprocessed uint8 example (deterministic part of the pipeline)."""
    preprocess = ops.build_preprocess(data_config.preprocess, size=data_config.image_size)

    def fn(record: dict) -> dict:
        image = preprocess(record["image"])
        return {
            "image": image,
            "male": np.float32(record["male"]),
            "boneage": np.float32(record["boneage"]) if record["has_boneage"] else np.float32(np.nan),
            "id": np.int64(record["id"]),
            "weight": np.float32(1.0),
        }

    return fn


def augment_fn(data_config: ml_collections.ConfigDict) -> Callable[[dict, np.random.Generator], dict]:
    augment = ops.build_augment(data_config.augment)

    def fn(example: dict, rng: np.random.Generator) -> dict:
        return {**example, "image": augment(example["image"], rng)}

    return fn


def normalize_fn(data_config: ml_collections.ConfigDict) -> Callable[[dict], dict]:
    normalize = ops.build_preprocess(data_config.normalize, size=data_config.image_size)

    def fn(example: dict) -> dict:
        image = normalize(example["image"]).astype(np.float32)
        if image.ndim == 2:
            image = image[:, :, None]
        return {**example, "image": image}

    return fn


def stack(examples) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def local_batch_size(global_batch_size: int) -> int:
    if global_batch_size % jax.process_count():
        raise ValueError(f"batch_size {global_batch_size} is not divisible by {jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def _read_options(data_config: ml_collections.ConfigDict) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=data_config.num_threads, prefetch_buffer_size=data_config.prefetch)


def train_dataset(
    data_config: ml_collections.ConfigDict, selection: data.SplitSelection, batch_size: int, seed: int
) -> grain.IterDataset:
    """Infinite, shuffled, augmented batches of this process's shard of the training split."""
    source = data.data_source(data_config, selection.tfds_split)
    ds = grain.MapDataset.source(SelectedRecords(source, selection.indices))
    ds = ds[jax.process_index() :: jax.process_count()]
    ds = ds.seed(seed).shuffle().repeat(None)
    ds = ds.map(example_fn(data_config)).random_map(augment_fn(data_config)).map(normalize_fn(data_config))
    ds = ds.batch(local_batch_size(batch_size), drop_remainder=True, batch_fn=stack)
    iter_ds = ds.to_iter_dataset(_read_options(data_config))
    if data_config.num_workers > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
    return iter_ds


def eval_batches(
    data_config: ml_collections.ConfigDict, selection: data.SplitSelection, batch_size: int
) -> Iterator[dict]:
    """One pass over this process's shard of a split, in order, the last batch padded (weight 0).

    Every process yields the same number of batches so that multi-host evaluation stays in step.
    """
    source = data.data_source(data_config, selection.tfds_split)
    ds = grain.MapDataset.source(SelectedRecords(source, selection.indices))
    ds = ds[jax.process_index() :: jax.process_count()]
    ds = ds.map(example_fn(data_config)).map(normalize_fn(data_config))
    local = local_batch_size(batch_size)
    num_batches = -(-(-(-len(selection.indices) // jax.process_count())) // local)
    iterator = iter(ds.batch(local, batch_fn=stack).to_iter_dataset(_read_options(data_config)))
    template = None
    for _ in range(num_batches):
        batch = next(iterator, None)
        if batch is None:  # this process's shard is shorter than the longest one
            if template is None:
                raise ValueError(f"process {jax.process_index()} has no examples of split {selection.tfds_split}")
            batch = {**template, "weight": np.zeros_like(template["weight"])}
        else:
            batch = pad_batch(batch, local)
        template = batch
        yield batch


def pad_batch(batch: dict, size: int) -> dict:
    """Pads a batch to ``size`` examples by repeating its first one with weight 0."""
    n = len(batch["weight"])
    if n == size:
        return batch
    out = {}
    for key, value in batch.items():
        pad = np.repeat(value[:1], size - n, axis=0)
        if key == "weight":
            pad = np.zeros_like(pad)
        out[key] = np.concatenate([value, pad], axis=0)
    return out
