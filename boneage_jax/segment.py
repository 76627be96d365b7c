r"""Writes hand masks predicted by a trained U-Net for every image of a dataset.

    python -m boneage_jax.segment --workdir=runs/unet --out=data/unet_masks \
        [--manual_dir=OTHER_DATASET] [--data_dir=PREPARED_ROOT] [--batch_size=16]

Loads the run's best checkpoint (``configs/unet_segmentation.py``), predicts the mask of each
image of every split of the dataset (the run's own ``data.manual_dir`` unless given), undoes
the ``resize_pad`` to the stored image size, keeps the hand-sized component
(``ops.hand.keep_hand``) and writes ``<out>/<id>.png`` (uint8, 255 on the hand). Those files
are what ``hand_mask(source='cache', cache_dir=OUT)`` reads in a bone-age config, and they can
also be copied to ``hand-masks/`` beside the images. Where the dataset has masks of its own
(the phantoms), the Jaccard index of the written masks against them is printed. Each file is
written atomically (``io.write_png``), so an interrupted run leaves no partial PNG; re-running
rewrites every mask. Progress shows as a bar per split when stderr is a terminal, else as a
line about every 10 % of the split's batches. A run that is not a segmentation run, or a
missing workdir, stops with one ``error:`` line and exit status 2. :func:`segment_dataset` does
the work for library callers.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import cv2
import numpy as np
from absl import app, flags

from boneage_jax import cli, data, inference, input_pipeline, io, objectives, ops
from boneage_jax.ops import hand

FLAGS = flags.FlagValues()  # this command's flags (cli.parse)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a trained segmentation run.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Folder for <id>.png masks.", flag_values=FLAGS)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Dataset folder (default: the run's data.manual_dir).",
                                  flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared-data root (default: the run's data.data_dir).",
                                flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per prediction batch.", lower_bound=1, flag_values=FLAGS)
_MIN_AREA = flags.DEFINE_float("min_area_fraction", 0.05, "Smallest hand, as a fraction of the image.",
                               lower_bound=0.0, upper_bound=1.0, flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def check_invertible(preprocess: str) -> None:
    """Masks predicted after ``preprocess`` map back to the stored images through one
    ``resize_pad``: the spec must have it and no other geometric op (one that moves pixels)."""
    if ops.Chain(preprocess, name="data.preprocess").geometric != ("resize_pad",):
        raise ValueError(f"segment: data.preprocess {preprocess!r} must resize with one resize_pad and no other "
                         f"geometric op, so that masks map back to the stored images")


def unpad_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (S, S) mask predicted on a ``resize_pad`` canvas -> (height, width) at the stored size."""
    size = mask.shape[0]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    inner = mask[top : top + new_h, left : left + new_w]
    return cv2.resize(inner, (width, height), interpolation=cv2.INTER_NEAREST)


def segment_dataset(workdir: str, out: str, manual_dir: str | None = None, data_dir: str | None = None,
                    batch_size: int = 16, min_area_fraction: float = 0.05) -> dict[str, float]:
    """Writes every image's mask; returns counts and (where the dataset has masks) Jaccard."""
    run = inference.load_run(workdir)
    if run.objective.task != "segmentation":
        raise ValueError(f"{workdir} is not a segmentation run (config.task is {run.objective.task!r})")
    config = run.config
    if manual_dir:
        config.data.manual_dir = manual_dir
    if data_dir:
        config.data.data_dir = data_dir
    check_invertible(config.data.preprocess)
    builder = data.prepare(config.data)
    os.makedirs(out, exist_ok=True)
    written, scores, start = 0, [], time.perf_counter()
    for split in sorted(builder.info.splits.keys()):
        source = data.data_source(config.data, split)
        starts = range(0, len(source), batch_size)
        for begin in io.progress(starts, desc=f"segment {split}", unit="batch", log=print):
            records = [source[i] for i in range(begin, min(begin + batch_size, len(source)))]
            images = np.stack([input_pipeline.prepare_image(config.data, r["image"], sample_id=int(r["id"]),
                                                            mask=r["mask"][:, :, 0] if r["has_mask"] else None)
                               for r in records])
            predicted = np.asarray(run.predict({"image": images, "male": np.zeros(len(records), np.float32)})["mask"])
            for record, logits_mask in zip(records, predicted):
                height, width = record["image"].shape[:2]
                mask = unpad_mask(logits_mask.astype(np.uint8) * 255, height, width)
                mask = hand.keep_hand(mask, min_area_fraction=min_area_fraction)
                io.write_png(os.path.join(out, f"{int(record['id'])}.png"), mask)
                written += 1
                if record["has_mask"]:
                    truth = record["mask"][:, :, 0] > 127
                    scores.append(float(objectives.jaccard((mask > 0)[None], truth[None])[0]))
    result = {"masks": written, "seconds": round(time.perf_counter() - start, 1)}
    if scores:
        result.update(jaccard_mean=float(np.mean(scores)), jaccard_min=float(np.min(scores)))
    return result


def main(argv: Sequence[str]) -> int:
    """Parses ``argv`` and writes the masks; returns the exit status (2 with an ``error:`` line
    for a missing workdir or a run that is not a segmentation run)."""
    extra = cli.parse(FLAGS, argv)
    if extra:
        raise app.UsageError(f"unexpected arguments: {' '.join(extra)}")
    try:
        result = segment_dataset(_WORKDIR.value, _OUT.value, _MANUAL_DIR.value, _DATA_DIR.value, _BATCH.value,
                                 _MIN_AREA.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.USAGE_STATUS
    line = f"Wrote {result['masks']} masks to {_OUT.value} in {result['seconds']} s"
    if "jaccard_mean" in result:
        line += f"; Jaccard against the dataset's masks: mean {result['jaccard_mean']:.4f}, min {result['jaccard_min']:.4f}"
    print(line)
    return 0


if __name__ == "__main__":
    cli.run(main)
