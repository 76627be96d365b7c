r"""Input pipeline throughput: training batches per second from the prepared store.

    python benchmarks/input_pipeline.py --config=configs/demo.py \
        [--config.data.image_size=256] [--batches=50] [--warmup=5]

Prepares the dataset if needed, then times ``--batches`` training batches (decode, the
config's preprocessing and augmentation, normalisation, batching) after ``--warmup`` batches.
The last line printed is JSON: ``{"images_per_s": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from boneage_jax import data, input_pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_BATCHES = flags.DEFINE_integer("batches", 50, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first (thread start-up, caches).")
flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    builder = data.prepare(config.data)
    splits = data.select_splits(config.data, builder, config.seed)
    iterator = iter(input_pipeline.train_dataset(config.data, splits["train"], config.batch_size, config.seed))
    for _ in range(_WARMUP.value):
        next(iterator)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    images = _BATCHES.value * len(batch["image"])
    print(f"{images} images of {batch['image'].shape[1:]} in {elapsed:.2f} s from "
          f"{config.data.builder_config} ({input_pipeline.read_threads(config.data)} threads, {config.data.num_workers} workers)")
    print(json.dumps({"images_per_s": round(images / elapsed, 1)}))


if __name__ == "__main__":
    app.run(main)
