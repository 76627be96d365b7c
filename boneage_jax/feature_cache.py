"""Head-only training on cached backbone features (``config.cache_features``).

When the whole backbone is frozen (``config.freeze``, for the whole run) and the training
pipeline draws no random numbers (no ``data.augment`` op), the backbone maps each training and
validation image to the same features at every step. The training loop then passes every
image through the frozen backbone once (:func:`compute`, inference mode, as the frozen
backbone runs in training), keeps the features in memory (:class:`FeatureCache`), and trains
on batches of features (:func:`train_dataset`: the records of ``input_pipeline.train_order``,
so the head sees the batches that frozen training on images would give it) that only the head
sees (``inference.outputs``); periodic validation reads the cached validation features
(:func:`eval_batches`). The final scores in ``results.json`` run the whole model on the images.
The training state, checkpoints and iterator state are those of frozen training on images; a
resumed run computes the cache again.

:func:`refusal` says, in one line, why a config cannot cache (``config_check`` stops such a run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from boneage_jax import data, evaluation, freeze, input_pipeline, ops, state

LABELS = ("male", "boneage", "id")


def _read_options(batch_size: int) -> grain.ReadOptions:
    """Cached rows are in memory: one thread, two batches ahead."""
    return grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * batch_size)


@dataclasses.dataclass(frozen=True)
class FeatureCache:
    """The backbone features of a split's examples, row ``r`` for record ``index[r]`` of its source."""

    index: np.ndarray  # (N,) record indices into the split's data source
    features: np.ndarray  # (N, F)
    male: np.ndarray
    boneage: np.ndarray
    id: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def example(self, row: int) -> dict:
        """Row ``row`` as a training example: ``features`` in place of ``image``."""
        return {"features": self.features[row], "male": self.male[row], "boneage": self.boneage[row],
                "id": self.id[row], "weight": np.float32(1.0)}


def backbone_features(params, rest, rng_state, batch: dict, *, graphdef: nnx.GraphDef) -> jax.Array:
    """The backbone's output for a batch of images, in inference mode (``graphdef``: the eval graph)."""
    return state.merge(graphdef, params, rng_state, rest).backbone(batch["image"])


def compute(features_fn: Callable[[dict], jax.Array], config: ml_collections.ConfigDict,
            selection: data.SplitSelection, sharding: NamedSharding) -> FeatureCache:
    """Every example of a split through ``features_fn`` (a global batch -> its (B, F) features),
    in the split's order; every process gets all of them."""
    parts = []
    for batch in input_pipeline.eval_batches(config.data, selection, config.eval_batch_size):
        device_batch = evaluation.global_batch(batch, sharding)
        host = evaluation.to_host({"features": features_fn(device_batch),
                                   **{k: device_batch[k] for k in (*LABELS, "weight")}})
        parts.append(host)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    real = merged.pop("weight") > 0
    return FeatureCache(index=np.asarray(selection.indices, np.int64), **{k: v[real] for k, v in merged.items()})


def train_dataset(cache: FeatureCache, data_config: ml_collections.ConfigDict, selection: data.SplitSelection,
                  batch_size: int, seed: int) -> grain.IterDataset:
    """Infinite batches of cached features in ``input_pipeline.train_order`` (this process's rows
    of each global batch), checkpointable like ``input_pipeline.train_dataset``."""
    row_of = {int(i): r for r, i in enumerate(cache.index)}
    ds = input_pipeline.ProcessRows(input_pipeline.train_order(data_config, selection, seed), batch_size)
    ds = ds.map(lambda item: cache.example(row_of[int(item[1])]))
    ds = ds.batch(input_pipeline.local_batch_size(batch_size), drop_remainder=True, batch_fn=input_pipeline.stack)
    return ds.to_iter_dataset(_read_options(batch_size))


def eval_batches(cache: FeatureCache, batch_size: int) -> Iterator[dict]:
    """One pass over the cached examples in order (``input_pipeline.eval_batches``' padding)."""
    yield from input_pipeline.padded_batches(len(cache), cache.example, batch_size, _read_options(batch_size))


def random_ops(data_config: ml_collections.ConfigDict) -> list[str]:
    """The names of the ops of the training pipeline that draw random numbers."""
    pipeline = ops.Pipeline.from_config(data_config)
    return [op.op.name for chain in (pipeline.preprocess, pipeline.augment, pipeline.normalize)
            for op in chain.ops if op.op.random]


def refusal(config: ml_collections.ConfigDict, model: nnx.Module) -> str | None:
    """Why ``config.cache_features`` cannot work for ``config`` (``model``: the configured model,
    abstract is enough), in one line; None when it can."""
    if config.task != "boneage":
        return f"config.cache_features needs a backbone and a head (config.task='boneage'), not task {config.task!r}"
    if config.unfreeze_at or config.unfreeze_at_epoch:
        key = "unfreeze_at_epoch" if config.unfreeze_at_epoch else "unfreeze_at"
        return (f"config.cache_features needs the backbone frozen for the whole run, but config.{key} is "
                f"{config[key]!r}; set it to 0")
    thawed = freeze.not_frozen_under(model, freeze.freeze_of(config), ("backbone",))
    if thawed:
        shown = ", ".join(thawed[:4]) + (f" and {len(thawed) - 4} more" if len(thawed) > 4 else "")
        return (f"config.cache_features needs the whole backbone frozen, but config.freeze={tuple(config.freeze)!r} "
                f"leaves {shown} unfrozen (add 'backbone' to config.freeze)")
    randomness = random_ops(config.data)
    if randomness:
        return (f"config.cache_features needs a training pipeline without random ops, but it has "
                f"{', '.join(randomness)} (config.data.augment={config.data.augment!r}); set config.data.augment=''")
    return None
