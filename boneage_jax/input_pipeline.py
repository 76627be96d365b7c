"""grain input pipelines: seeded shuffle, repeat, per-process sharding, decode, ops, batching.

Every process reads its own rows of each *global* batch: the global order of examples (and each
example's augmentation, seeded by its global position) is the same for any number of processes
and devices, so a run on 2 hosts x 4 GPUs sees exactly the batches of a run on 1 device.

A batch is a dict of numpy arrays: ``image`` float32 (B, S, S, C), ``male`` float32 (B,),
``boneage`` float32 months (B,), ``id`` int64 (B,) and ``weight`` float32 (B,), which is 0 for
the padding that completes an evaluation's last batch. Training batches with
``data.normalize_on_device`` (the default, where the normalize ops allow it) carry instead the
augmented uint8 grey ``image`` (B, S, S, 1) and ``levels`` float32 (B, 256, C), each image's
``data.normalize`` as a table of its grey levels (``ops.Chain.level_table``);
:func:`network_images` looks them up on the device, the same float32 values as normalising on
the host, with 1/4 (grey) to 1/12 (3 channels) of the bytes to write, stack and transfer.
With ``data.augment_on_device`` the augmentation (flips and one affine warp) is drawn on the
host as before but applied on the device: the batch adds ``warp`` (B, 2, 3), each image's
inverse warp, and ``warp_fill`` (B, 2), its border mode and fill value, and holds the images
unwarped. It needs a fixed normalisation (pointwise ops: the same table for every image).

The ops come from the data config's :class:`boneage_jax.ops.Pipeline` (its specs parsed once):
a record's hand mask and keypoints are decoded and handed to the ops exactly when a
preprocessing op declares that it reads them (or, for the mask, segmentation batches carry it).
With ``data.cache_preprocessed`` the deterministic part (read, decode, preprocess) runs once
per image of a split and is kept in memory (:class:`PreprocessedExamples`); left at None (the
default), the training split is cached when the run reads it at least once over and its images
fit in a quarter of the memory available (:func:`caches_training_split`).
``input_channels`` is the network input's channel count (what the model is built for) and
``prepare_image`` runs one radiograph from outside the dataset through the deterministic part
of the pipeline, as validation images go.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from boneage_jax import data, io, ops


def needs_annotations(data_config: ml_collections.ConfigDict) -> tuple[bool, bool]:
    """(mask, keypoints): whether the config's ops or batches use them."""
    pipeline = ops.Pipeline.from_config(data_config)
    return pipeline.reads_mask or data_config.mask_in_batch, pipeline.reads_keypoints


def input_channels(data_config: ml_collections.ConfigDict) -> int:
    """Channels of the network input that the config's ops make from a grey radiograph."""
    return ops.Pipeline.from_config(data_config).num_channels


def prepare_image(data_config: ml_collections.ConfigDict, image: np.ndarray, *, mask: np.ndarray | None = None,
                  sample_id: int = 0) -> np.ndarray:
    """One decoded uint8 grey radiograph -> the network input (S, S, C) float32, through the
    run's ``data.preprocess`` and ``data.normalize`` (no augmentation)."""
    pipeline = ops.Pipeline.from_config(data_config)
    sample = {"image": ops.as_2d(image), "id": sample_id}
    if mask is not None:
        sample["mask"] = mask
    return pipeline.network_input(pipeline.preprocess(sample)["image"])


def example_fn(data_config: ml_collections.ConfigDict) -> Callable[[dict], dict]:
    """Decoded record -> preprocessed uint8 example (deterministic part of the pipeline).

    The ops see a sample with the image, its id and, where the ops use them and the dataset has
    them, the record's hand mask and keypoints. The example keeps the (transformed) mask only
    for segmentation batches, where augmentation must still move it."""
    preprocess = ops.Pipeline.from_config(data_config).preprocess
    use_mask, use_keypoints = needs_annotations(data_config)
    keep_mask = data_config.mask_in_batch

    def fn(record: dict) -> dict:
        sample = {"image": record["image"][:, :, 0], "id": int(record["id"])}
        if use_mask and record.get("has_mask"):
            sample["mask"] = record["mask"][:, :, 0]
        if use_keypoints and record.get("has_keypoints"):
            sample["keypoints"] = record["keypoints"]
        sample = preprocess(sample)
        return {
            "image": sample["image"],
            "mask": sample.get("mask") if keep_mask else None,
            "male": np.float32(record["male"]),
            "boneage": np.float32(record["boneage"]) if record["has_boneage"] else np.float32(np.nan),
            "id": np.int64(record["id"]),
            "weight": np.float32(1.0),
        }

    return fn


def augment_fn(data_config: ml_collections.ConfigDict, seed: int) -> Callable[[dict, int], dict]:
    """Augments an example with an RNG seeded by (seed, its global position in the stream)."""
    augment = ops.Pipeline.from_config(data_config).augment

    def fn(example: dict, position: int) -> dict:
        rng = np.random.default_rng([seed, position])
        sample = augment({"image": example["image"], "mask": example["mask"], "id": int(example["id"])}, rng)
        return {**example, "image": sample["image"], "mask": sample.get("mask")}

    return fn


def normalizes_on_device(data_config: ml_collections.ConfigDict) -> bool:
    """Whether training batches leave ``data.normalize`` to the device: ``data.normalize_on_device``
    and the normalize ops are one grey-level table per image (``ops.Chain.maps_grey_levels``)."""
    return data_config.normalize_on_device and ops.Pipeline.from_config(data_config).normalize.maps_grey_levels


WARP_FILL_MODES = ("constant", "nearest", "reflect")  # warp_fill[:, 0] codes, as ops.BORDER_MODES


def augments_on_device(data_config: ml_collections.ConfigDict) -> bool:
    """``data.augment_on_device``, checked: ValueError naming what stands in its way."""
    if not data_config.augment_on_device:
        return False
    pipeline = ops.Pipeline.from_config(data_config)
    if pipeline.augment.warp_fill is None:
        others = [str(op) for op in pipeline.augment.ops if op.op.matrix is None]
        raise ValueError(f"data.augment_on_device: data.augment {pipeline.augment.spec!r} is not one warp per image "
                         f"(" + (f"{', '.join(others)} cannot run on the device" if others else
                                 "more than one op fills the border") + "); set --config.data.augment_on_device=false")
    if not normalizes_on_device(data_config):
        raise ValueError(f"data.augment_on_device needs the normalisation on the device too: data.normalize "
                         f"{pipeline.normalize.spec!r} with data.normalize_on_device="
                         f"{data_config.normalize_on_device} is not a grey-level table per image")
    statistics = [str(op) for op in pipeline.normalize.ops if not op.op.pointwise]
    if statistics:
        raise ValueError(f"data.augment_on_device needs a fixed normalisation (pointwise ops such as value_range, "
                         f"scale, preprocess_input): {', '.join(statistics)} takes statistics of each image, which "
                         f"would come from the unwarped image; set --config.data.augment_on_device=false")
    if data_config.mask_in_batch:
        raise ValueError("data.augment_on_device does not move masks: segmentation batches (data.mask_in_batch) "
                         "need --config.data.augment_on_device=false")
    return True


def device_augment_fn(data_config: ml_collections.ConfigDict, seed: int) -> Callable[[dict, int], dict]:
    """Draws each example's warp as ``augment_fn`` would (same seed, same draws) and leaves the
    image as it is: ``warp`` is the inverse 2x3 matrix (destination to source pixel centres)."""
    chain = ops.Pipeline.from_config(data_config).augment
    mode, value = chain.warp_fill
    fill = np.float32([WARP_FILL_MODES.index(mode), value])

    def fn(example: dict, position: int) -> dict:
        rng = np.random.default_rng([seed, position])
        matrix = chain.draw_warp(example["image"].shape[:2], rng)
        inverse = np.linalg.inv(np.vstack([matrix.astype(np.float64), [0.0, 0.0, 1.0]]))[:2]
        return {**example, "warp": inverse.astype(np.float32), "warp_fill": fill}

    return fn


def normalize_fn(data_config: ml_collections.ConfigDict, *, on_device: bool = False) -> Callable[[dict], dict]:
    """Last ops to float32 (S, S, C), or with ``on_device`` the uint8 grey image (S, S, 1) and its
    ``levels`` table (256, C) for :func:`network_images`; the mask goes into the batch only for
    segmentation (``data.mask_in_batch``), as float32 (S, S, 1) in {0, 1}."""
    pipeline = ops.Pipeline.from_config(data_config)
    with_mask = data_config.mask_in_batch

    def fn(example: dict) -> dict:
        out = {k: v for k, v in example.items() if k != "mask"}
        if on_device:
            grey = ops.as_2d(example["image"])
            if grey.dtype != np.uint8 or grey.ndim != 2:
                raise ValueError(f"example {example['id']}: data.normalize_on_device needs a uint8 grey image after "
                                 f"data.augment, got {grey.dtype} {example['image'].shape}; set "
                                 f"--config.data.normalize_on_device=false")
            out["image"], out["levels"] = grey[:, :, None], pipeline.normalize.level_table(grey)
        else:
            out["image"] = pipeline.network_input(example["image"])
        if with_mask:
            mask = example["mask"]
            if mask is None:
                raise ValueError(f"example {example['id']} has no hand mask: segmentation needs masks "
                                 f"(hand-masks/<id>.png beside the images, see tfds_rsna/rsna_bone_age.py)")
            out["mask"] = (mask[:, :, None] > 127).astype(np.float32)
        return out

    return fn


def stack(examples) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def network_images(batch: dict) -> jax.Array:
    """A batch's network input, float32 (B, S, S, C): its ``image``, or where the batch has
    ``levels`` (``data.normalize_on_device``) each uint8 grey image looked up in its own table,
    after its ``warp`` where the batch has one (``data.augment_on_device``)."""
    if "levels" not in batch:
        return batch["image"]
    grey = batch["image"][..., 0]
    if "warp" in batch:
        grey = jax.vmap(warp_grey)(grey, batch["warp"], batch["warp_fill"])
    return jax.vmap(lambda table, levels: table[levels.astype(np.int32)])(batch["levels"], grey)


def _border_index(i: jax.Array, n: int, mode: jax.Array) -> jax.Array:
    """Pixel index ``i`` of a side of ``n`` pixels as the border mode reads it: clamped
    (nearest; constant, whose outside pixels are replaced) or reflected without repeating the
    edge (reflect, OpenCV's BORDER_REFLECT_101)."""
    if n == 1:
        return jnp.zeros_like(i)
    period = 2 * (n - 1)
    folded = jnp.abs(i) % period
    return jnp.where(mode == 2, jnp.where(folded >= n, period - folded, folded), jnp.clip(i, 0, n - 1))


def warp_grey(grey: jax.Array, inverse: jax.Array, fill: jax.Array) -> jax.Array:
    """A uint8 grey image (H, W) warped as ``cv2.warpAffine`` with bilinear interpolation does
    (``inverse``: destination to source pixel centres; ``fill``: border mode code of
    :data:`WARP_FILL_MODES` and fill value), rounded to grey levels (uint8). OpenCV's fixed-point
    weights make it differ by one grey level at a few pixels."""
    height, width = grey.shape
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij")
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = jnp.floor(sx), jnp.floor(sy)
    fx, fy = sx - x0, sy - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    mode, value = fill[0].astype(jnp.int32), fill[1]
    source = grey.astype(jnp.float32)

    def at(ix, iy):
        pixel = source[_border_index(iy, height, mode), _border_index(ix, width, mode)]
        outside = (ix < 0) | (ix >= width) | (iy < 0) | (iy >= height)
        return jnp.where((mode == 0) & outside, value, pixel)

    out = ((1 - fx) * (1 - fy) * at(x0, y0) + fx * (1 - fy) * at(x0 + 1, y0)
           + (1 - fx) * fy * at(x0, y0 + 1) + fx * fy * at(x0 + 1, y0 + 1))
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def local_batch_size(global_batch_size: int) -> int:
    if global_batch_size % jax.process_count():
        raise ValueError(f"batch_size {global_batch_size} is not divisible by {jax.process_count()} processes")
    return global_batch_size // jax.process_count()


LOCAL_PROCESS_VARIABLES = ("BONEAGE_LOCAL_PROCESSES", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def local_processes() -> int:
    """The processes of this run on this host (``launch.multihost``, Open MPI or Slurm say; 1)."""
    return max(1, next((int(os.environ[v]) for v in LOCAL_PROCESS_VARIABLES if os.environ.get(v, "").isdigit()), 1))


def read_threads(data_config: ml_collections.ConfigDict) -> int:
    """``data.num_threads``, or with 0 the CPUs this process may use (``os.sched_getaffinity``),
    shared with the other processes of this run on this host when the process is not bound to
    its own CPUs (:func:`local_processes`); at least 1."""
    if data_config.num_threads:
        return data_config.num_threads
    usable = len(os.sched_getaffinity(0))
    if usable < (os.cpu_count() or usable):  # already bound to its share (Slurm, taskset)
        return max(1, usable)
    return max(1, usable // local_processes())


CACHE_MEMORY_FRACTION = 0.25  # of the memory available when training starts, shared by the local processes


def available_memory_bytes() -> int:
    """The memory the kernel says is available now (``MemAvailable``), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def caches_training_split(data_config: ml_collections.ConfigDict, selection: data.SplitSelection,
                          num_steps: int | None, batch_size: int) -> bool:
    """Whether ``train_dataset`` keeps the split's preprocessed examples in memory.

    ``data.cache_preprocessed`` True or False decides. None (the default) caches when this
    process reads at least as many examples in the run (``num_steps`` of its rows of each global
    ``batch_size``; None: not known) as the split has, so that the one pass over the split at
    start-up costs no more than reading without the cache, and the split's preprocessed images
    (the size of the first, times the split) take at most :data:`CACHE_MEMORY_FRACTION` of the
    available memory over the local processes (each keeps its own). A refusal for memory is logged."""
    if data_config.cache_preprocessed is not None:
        return bool(data_config.cache_preprocessed)
    count = len(np.unique(np.asarray(selection.indices, np.int64)))
    if num_steps is None or num_steps * local_batch_size(batch_size) < count:
        return False
    first = _computed_examples(data_config, selection)(selection.indices[0])
    need = count * (first["image"].nbytes + (first["mask"].nbytes if first["mask"] is not None else 0))
    budget = CACHE_MEMORY_FRACTION * available_memory_bytes() / local_processes()
    if need > budget:
        io.log(f"Not caching the preprocessed {selection.tfds_split} split: {count} images take {need / 2**20:.0f} "
               f"MiB, over {CACHE_MEMORY_FRACTION:.0%} of the available memory ({budget / 2**20:.0f} MiB per "
               f"process); --config.data.cache_preprocessed=true caches it all the same")
        return False
    return True


def _read_options(data_config: ml_collections.ConfigDict) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=read_threads(data_config), prefetch_buffer_size=data_config.prefetch)


class BalancedEpochs:
    """An endless stream of record indices, epoch after epoch of class-balanced draws
    (``data.balance_bins`` age bins x ``data.balance_per_bin`` records, sexes equal), each
    epoch seeded by (seed, epoch) so any position can be recomputed after a restart."""

    def __init__(self, selection: data.SplitSelection, bins: int, per_bin: int, seed: int):
        self._selection, self._bins, self._per_bin, self._seed = selection, bins, per_bin, seed
        self._epoch_size = len(self._epoch(0))

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self._seed, epoch])
        return data.balanced_epoch(self._selection.labels, self._selection.indices, bins=self._bins,
                                   per_bin=self._per_bin, rng=rng)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self._epoch_size)
        return int(self._epoch(epoch)[offset])


class ProcessRows(grain.MapDataset):
    """This process's rows of every global batch, as (global position, element) pairs.

    Global batch ``b`` holds positions ``[b * G, (b + 1) * G)`` of the parent; process ``p``
    takes the ``p``-th block of ``G / num_processes`` of them, which is the block of the global
    array that ``jax.make_array_from_process_local_data`` expects from it.
    """

    def __init__(self, parent: grain.MapDataset, global_batch: int):
        super().__init__(parent)
        self._global = global_batch
        self._local = local_batch_size(global_batch)
        self._offset = jax.process_index() * self._local

    def __len__(self) -> int:
        parent = len(self._parents[0])
        return parent if parent == sys.maxsize else parent // self._global * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        position = (index // self._local) * self._global + self._offset + index % self._local
        return position, self._parents[0][position]


def train_order(data_config: ml_collections.ConfigDict, selection: data.SplitSelection, seed: int) -> grain.MapDataset:
    """The endless stream of record indices (into the split's data source) in training order:
    shuffled epochs, or ``data.sampling='balanced'`` draws. ``train_dataset`` and the feature
    cache's batches (``boneage_jax.feature_cache``) both follow it."""
    sampling = data_config.sampling
    if sampling == "shuffle":
        return grain.MapDataset.source(np.asarray(selection.indices, np.int64)).seed(seed).shuffle().repeat(None)
    if sampling == "balanced":
        return grain.MapDataset.source(BalancedEpochs(selection, data_config.balance_bins, data_config.balance_per_bin,
                                                      seed))
    raise ValueError(f"config.data.sampling is {sampling!r}; expected 'shuffle' or 'balanced'")


class PreprocessedExamples:
    """A split's examples after the deterministic part of the pipeline (record read, decode,
    ``data.preprocess``), computed once in this process and kept in memory
    (``data.cache_preprocessed``). Each epoch then runs only augmentation and normalisation:
    the same batches, bit for bit, as computing the examples every time."""

    def __init__(self, data_config: ml_collections.ConfigDict, selection: data.SplitSelection):
        example_at = _computed_examples(data_config, selection)
        indices = np.unique(np.asarray(selection.indices, np.int64))
        ds = grain.MapDataset.source(indices).map(lambda index: (int(index), example_at(index)))
        started = time.perf_counter()
        self._examples = dict(io.progress(ds.to_iter_dataset(_read_options(data_config)), len(indices),
                                          f"preprocessing {selection.tfds_split} once", log=io.log))
        self.nbytes = sum(e["image"].nbytes + (e["mask"].nbytes if e["mask"] is not None else 0)
                          for e in self._examples.values())
        io.log(f"Preprocessed {len(indices)} {selection.tfds_split} images once ({self.nbytes / 2**20:.0f} MiB in "
               f"memory, {time.perf_counter() - started:.1f} s); each epoch runs only augmentation and normalisation")

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict:
        return self._examples[int(index)]


_PREPROCESSED: dict[tuple, PreprocessedExamples] = {}


def preprocessed_examples(data_config: ml_collections.ConfigDict,
                          selection: data.SplitSelection) -> PreprocessedExamples:
    """The split's :class:`PreprocessedExamples`, computed on first use and kept for the process
    (validation is evaluated many times in a run). The key is the store, the bound preprocess
    ops (their spec with the defaults the data config gives them) and the split's records."""
    key = (data.data_dir_for(data_config), data.dataset_name(data_config), data_config.mask_in_batch,
           tuple(str(op) for op in ops.Pipeline.from_config(data_config).preprocess.ops), selection.tfds_split,
           hashlib.sha1(np.asarray(selection.indices, np.int64).tobytes()).hexdigest())
    if key not in _PREPROCESSED:
        _PREPROCESSED[key] = PreprocessedExamples(data_config, selection)
    return _PREPROCESSED[key]


def _computed_examples(data_config: ml_collections.ConfigDict,
                       selection: data.SplitSelection) -> Callable[[int], dict]:
    """Record index -> preprocessed example, read, decoded and preprocessed now."""
    source = data.data_source(data_config, selection.tfds_split, decode_masks=needs_annotations(data_config)[0])
    make_example = example_fn(data_config)
    return lambda index: make_example(source[int(index)])


def _examples(data_config: ml_collections.ConfigDict, selection: data.SplitSelection,
              cache: bool | None = None) -> Callable[[int], dict]:
    """Record index -> preprocessed example: from the cache with ``cache`` (by default
    ``data.cache_preprocessed`` set True)."""
    if data_config.cache_preprocessed if cache is None else cache:
        return preprocessed_examples(data_config, selection).__getitem__
    return _computed_examples(data_config, selection)


def train_dataset(
    data_config: ml_collections.ConfigDict, selection: data.SplitSelection, batch_size: int, seed: int,
    *, num_steps: int | None = None
) -> grain.IterDataset:
    """Infinite, shuffled, augmented batches: this process's rows of each global batch (uint8 grey
    images with their ``levels`` tables where :func:`normalizes_on_device`). ``num_steps``, the
    steps the run will take, lets :func:`caches_training_split` decide on the cache."""
    example_at = _examples(data_config, selection, caches_training_split(data_config, selection, num_steps, batch_size))
    augment = (device_augment_fn if augments_on_device(data_config) else augment_fn)(data_config, seed)
    normalize = normalize_fn(data_config, on_device=normalizes_on_device(data_config))
    ds = ProcessRows(train_order(data_config, selection, seed), batch_size)
    ds = ds.map(lambda item: normalize(augment(example_at(item[1]), item[0])))
    ds = ds.batch(local_batch_size(batch_size), drop_remainder=True, batch_fn=stack)
    iter_ds = ds.to_iter_dataset(_read_options(data_config))
    if data_config.num_workers > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
    return iter_ds


def eval_batches(
    data_config: ml_collections.ConfigDict, selection: data.SplitSelection, batch_size: int
) -> Iterator[dict]:
    """One pass over a split in order: this process's rows of each global batch.

    The last global batch is completed with copies of the first example of weight 0, so every
    process yields the same number of batches and multi-host evaluation stays in step.
    """
    example_at, normalize = _examples(data_config, selection), normalize_fn(data_config)
    yield from padded_batches(len(selection.indices), lambda i: normalize(example_at(selection.indices[i])),
                              batch_size, _read_options(data_config))


def padded_batches(num: int, example_at: Callable[[int], dict], batch_size: int,
                   options: grain.ReadOptions) -> Iterator[dict]:
    """Examples ``example_at(0 .. num-1)`` in order, this process's rows of each global batch;
    the last global batch is completed with copies of example 0 of weight 0."""
    padded = -(-num // batch_size) * batch_size

    def padded_example(position: int) -> dict:
        real = position < num
        return {**example_at(position if real else 0), "weight": np.float32(real)}

    ds = ProcessRows(grain.MapDataset.source(np.arange(padded)), batch_size)
    ds = ds.map(lambda item: padded_example(int(item[1])))
    ds = ds.batch(local_batch_size(batch_size), batch_fn=stack)
    yield from ds.to_iter_dataset(options)

