r"""Input pipeline throughput: training batches per second from the prepared store.

    python benchmarks/input_pipeline.py --config=configs/demo.py \
        [--config.data.image_size=256] [--batches=50] [--warmup=5]
    python benchmarks/input_pipeline.py --config=configs/demo.py --profile [--profile_images=200]
    python benchmarks/input_pipeline.py --config=configs/demo.py --scaling

Prepares the dataset if needed, then:

* by default times ``--batches`` training batches (record read, decode, the config's
  preprocessing and augmentation, normalisation, batching) after ``--warmup`` batches, with the
  config's read threads and worker processes (by default every CPU this process may use) and,
  as training with the config would, its cache of preprocessed images (by default when the
  config's run reads the split at least once over and it fits in memory; the one pass that
  fills it is not timed);
* ``--profile`` runs ``--profile_images`` training examples one at a time in this thread and
  prints where the time goes: milliseconds per image for the record read, the PNG decode (image
  and mask), each op of ``data.preprocess`` and ``data.augment``, ``data.normalize`` (its
  ops, or with ``data.normalize_on_device`` the grey-level table the device looks the image up
  in) and the batch stacking, with each one's share, as if nothing were cached;
* ``--scaling`` repeats the default measurement with 1, 2, ... read threads up to the CPUs this
  process may use (and, with ``--workers``, with that many worker processes of one thread each)
  and prints images/s in all and per thread.

The last line printed is JSON: ``{"images_per_s": ...}``, ``{"profile": {...}}`` or
``{"scaling": [...]}``.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from boneage_jax import data, input_pipeline, ops, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_BATCHES = flags.DEFINE_integer("batches", 50, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first (thread start-up, caches).")
_PROFILE = flags.DEFINE_bool("profile", False, "Per-op milliseconds per image, one example at a time in this thread.")
_PROFILE_IMAGES = flags.DEFINE_integer("profile_images", 200, "Training examples that --profile runs.")
_SCALING = flags.DEFINE_bool("scaling", False, "images/s with 1, 2, ... read threads up to the CPUs this process may use.")
_WORKERS = flags.DEFINE_bool("workers", False, "With --scaling: also 1, 2, ... worker processes of one thread each.")
flags.mark_flag_as_required("config")


def throughput(config, splits, *, batches: int, warmup: int) -> float:
    """Training images per second from the config's input pipeline, after ``warmup`` batches."""
    iterator = iter(input_pipeline.train_dataset(config.data, splits["train"], config.batch_size, config.seed,
                                                 num_steps=train.num_train_steps(config, len(splits["train"].indices))))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    return batches * len(batch["image"]) / elapsed


def profile(config, splits, num_images: int) -> dict[str, float]:
    """Milliseconds per image of each stage of the training pipeline, as ``train_dataset`` runs
    it (``input_pipeline.example_fn``, ``augment_fn``, ``normalize_fn``), one example at a time."""
    data_config = config.data
    source = data.data_source(data_config, splits["train"].tfds_split, decode_images=False)
    pipeline = ops.Pipeline.from_config(data_config)
    use_mask, use_keypoints = input_pipeline.needs_annotations(data_config)
    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(stage: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        seconds[stage] += time.perf_counter() - start
        return out

    indices = np.resize(np.asarray(splits["train"].indices), num_images)
    augment_on_device = input_pipeline.augments_on_device(data_config)
    normalize_on_device = input_pipeline.normalizes_on_device(data_config)
    examples = []
    for position, index in enumerate(indices):
        record = timed("read record", lambda: dict(source[int(index)]))
        sample = {"image": timed("decode image", data.decode_png, record["image"])[:, :, 0], "id": int(record["id"])}
        if use_mask and record.get("has_mask"):
            sample["mask"] = timed("decode mask", data.decode_png, record["mask"])[:, :, 0]
        if use_keypoints and record.get("has_keypoints"):
            sample["keypoints"] = record["keypoints"]
        for op in pipeline.preprocess.ops:
            sample = timed(f"preprocess {op}", op, sample)
        sample = {"image": sample["image"], "mask": sample.get("mask") if data_config.mask_in_batch else None,
                  "id": sample["id"]}
        rng = np.random.default_rng([config.seed, position])
        if augment_on_device:
            timed(f"augment: draw the warp ({pipeline.augment.spec}; warped on the device)",
                  pipeline.augment.draw_warp, sample["image"].shape[:2], rng)
        else:
            for op in pipeline.augment.ops:
                sample = timed(f"augment {op}", op, sample, rng)
        image, levels = sample["image"], {}
        if normalize_on_device:
            grey = ops.as_2d(image)
            levels["levels"] = timed(f"normalize table ({pipeline.normalize.spec or 'as float32'}; looked up on the "
                                     f"device)", pipeline.normalize.level_table, grey)
            image = grey[:, :, None]
        else:
            for op in pipeline.normalize.ops:
                image = timed(f"normalize {op}", op, {"image": image})["image"]
            image = timed("to float32 (S, S, C)", ops.as_network_array, image)
        examples.append({"image": image, **levels, "male": np.float32(record["male"]), "boneage": np.float32(0),
                         "id": np.int64(record["id"]), "weight": np.float32(1)})
    for start in range(0, len(examples) - config.batch_size + 1, config.batch_size):
        timed("stack batch", input_pipeline.stack, examples[start : start + config.batch_size])
    return {stage: 1000 * s / num_images for stage, s in seconds.items()}


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    builder = data.prepare(config.data)
    splits = data.select_splits(config.data, builder, config.seed)
    where = f"{config.data.builder_config} store, {config.data.image_size} px"
    if _PROFILE.value:
        ms = profile(config, splits, _PROFILE_IMAGES.value)
        total = sum(ms.values())
        print(f"Per-op profile of {_PROFILE_IMAGES.value} training images, one thread ({where}):")
        width = max(len(stage) for stage in ms)
        for stage, value in ms.items():
            print(f"  {stage:<{width}}  {value:7.3f} ms  {100 * value / total:5.1f}%")
        print(f"  {'total':<{width}}  {total:7.3f} ms  = {1000 / total:.0f} images/s on one core")
        print(json.dumps({"profile": {k: round(v, 4) for k, v in ms.items()}, "total_ms": round(total, 4)}))
        return
    if _SCALING.value:
        cpus = len(os.sched_getaffinity(0))
        settings = [(threads, 0) for threads in range(1, cpus + 1)]
        if _WORKERS.value:
            settings += [(1, workers) for workers in range(1, cpus + 1)]
        rows = []
        for threads, workers in settings:
            with config.unlocked():
                config.data.num_threads, config.data.num_workers = threads, workers
            rate = throughput(config, splits, batches=_BATCHES.value, warmup=_WARMUP.value)
            processes = max(1, workers)
            cores = threads * processes
            rows.append({"threads": threads, "workers": workers, "images_per_s": round(rate, 1),
                         "images_per_s_per_core": round(rate / min(cores, cpus), 1)})
            print(f"{threads} thread(s), {workers} worker(s): {rate:.1f} images/s, "
                  f"{rate / min(cores, cpus):.1f} per core ({where})", flush=True)
        print(json.dumps({"scaling": rows}))
        return
    rate = throughput(config, splits, batches=_BATCHES.value, warmup=_WARMUP.value)
    print(f"{_BATCHES.value * config.batch_size} images at {config.data.image_size} px in "
          f"{_BATCHES.value * config.batch_size / rate:.2f} s from {config.data.builder_config} "
          f"({input_pipeline.read_threads(config.data)} threads, {config.data.num_workers} workers)")
    print(json.dumps({"images_per_s": round(rate, 1)}))


if __name__ == "__main__":
    app.run(main)
