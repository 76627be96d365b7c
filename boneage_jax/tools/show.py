r"""A grid of pipeline stages for a few examples, to see what a config does to the radiographs.

    python -m boneage_jax.tools.show --config=configs/demo.py --out=grid.png \
        [--num=8] [--split=train] [--seed=0] [--tile=192] [--config.key=value ...]

One row per example (id, bone age and sex written on it), one column per stage:

- ``raw``: the stored radiograph, with the dataset's keypoints (dots) and the ROI boxes that
  can be computed for it (green: the hand mask's box with 1.15 margin; blue, cyan, magenta:
  Lee et al.'s ROI1, ROI2, ROI3 from keypoints);
- ``preprocessed``: after ``data.preprocess`` (every split sees this);
- ``augmented``: after ``data.augment`` as training draws it (seeded by ``--seed``);
- ``mask``: the preprocessed image with its hand mask outlined (red) where the sample has
  one (from the dataset, or set by the ``hand_mask`` op); the classical mask (yellow) otherwise;
- ``normalised``: the network input (``data.normalize``), first channel, min-max scaled.

The stages are the config's :class:`boneage_jax.ops.Pipeline`, as training runs them.
``--config`` is read as ``boneage_jax.main`` reads it (``path.py[:variant]`` and
``--config.key=value`` overrides, :func:`boneage_jax.cli.load_config_file`); the grid is
written atomically (``io.write_png``). :func:`render` draws it for library callers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import cv2
import numpy as np
from absl import flags

from boneage_jax import cli, data, io, ops
from boneage_jax.ops import hand

FLAGS = flags.FlagValues()  # this command's flags (cli.parse); the config's --config.* overrides follow them
_CONFIG = flags.DEFINE_string("config", None, "Training configuration file, path.py or path.py:variant; "
                              "--config.key=value overrides its values.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "PNG file to write.", flag_values=FLAGS)
_NUM = flags.DEFINE_integer("num", 8, "Examples (rows).", lower_bound=1, flag_values=FLAGS)
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "validation", "test"], "Split to draw from.",
                           flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the example choice and the augmentation.", flag_values=FLAGS)
_TILE = flags.DEFINE_integer("tile", 192, "Tile side in pixels.", lower_bound=1, flag_values=FLAGS)
flags.mark_flags_as_required(["config", "out"], flag_values=FLAGS)

HEADER_HEIGHT = 20  # the row of stage names above the tiles
STAGES = ("raw", "preprocessed", "augmented", "mask", "normalised")
ROI_COLOURS = {"hand": (0, 200, 0), "roi1": (255, 80, 0), "roi2": (255, 220, 0), "roi3": (255, 0, 255)}


def _to_bgr(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image[:, :, ::-1].copy()
    image = image[:, :, 0] if image.ndim == 3 else image
    if image.dtype != np.uint8:
        lo, hi = float(image.min()), float(image.max())
        image = ((image - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)).astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)


def _tile(image: np.ndarray, side: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Fits a BGR image into a side x side tile; returns it with the scale and offset used."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    resized = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=cv2.INTER_AREA)
    tile = np.full((side, side, 3), 40, np.uint8)
    top, left = (side - resized.shape[0]) // 2, (side - resized.shape[1]) // 2
    tile[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return tile, scale, (left, top)


def _outline(tile: np.ndarray, mask: np.ndarray, scale: float, offset: tuple[int, int], colour) -> None:
    small = cv2.resize(mask, (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale))),
                       interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours((small > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(tile, contours, -1, colour, 1, offset=offset)


def _raw_tile(sample: dict, side: int) -> np.ndarray:
    tile, scale, (left, top) = _tile(_to_bgr(sample["image"]), side)
    for region, colour in ROI_COLOURS.items():
        try:
            x0, y0, x1, y1 = hand.roi_box(sample, region)
        except ValueError:
            continue  # no mask or keypoints for this region
        cv2.rectangle(tile, (round(x0 * scale) + left, round(y0 * scale) + top),
                      (round(x1 * scale) + left, round(y1 * scale) + top), colour, 1)
    points = sample.get("keypoints")
    if points is not None:
        for x, y in points[np.all(np.isfinite(points), axis=1)]:
            cv2.circle(tile, (round(x * scale) + left, round(y * scale) + top), 2, (0, 0, 255), -1)
    return tile


def _mask_tile(sample: dict, side: int) -> np.ndarray:
    tile, scale, offset = _tile(_to_bgr(sample["image"]), side)
    if sample.get("mask") is not None:
        _outline(tile, sample["mask"], scale, offset, (0, 0, 255))
    elif sample["image"].dtype == np.uint8:
        _outline(tile, hand.classical_mask(ops.as_2d(sample["image"])), scale, offset, (0, 255, 255))
    return tile


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def render(config, split: str, num: int, seed: int, side: int) -> np.ndarray:
    """The grid (BGR uint8) of ``num`` examples of ``split`` through the config's pipeline."""
    builder = data.prepare(config.data)
    selection = data.select_splits(config.data, builder, config.seed)[split]
    source = data.data_source(config.data, selection.tfds_split)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(selection.indices, size=min(num, len(selection.indices)), replace=False)
    pipeline = ops.Pipeline.from_config(config.data)
    header = np.full((HEADER_HEIGHT, side * len(STAGES), 3), 0, np.uint8)
    for column, stage in enumerate(STAGES):
        cv2.putText(header, stage, (column * side + 4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
    rows = [header]
    for index in chosen:
        record = source[int(index)]
        raw = {"image": record["image"][:, :, 0], "id": int(record["id"])}
        if record["has_mask"]:
            raw["mask"] = record["mask"][:, :, 0]
        if record["has_keypoints"]:
            raw["keypoints"] = record["keypoints"]
        prepared = pipeline.preprocess(dict(raw))
        augmented = pipeline.augment(dict(prepared), np.random.default_rng([seed, int(index)]))
        network_input = pipeline.network_input(augmented["image"])
        age = f"{record['boneage']:.0f} mo" if record["has_boneage"] else "no age"
        tiles = [
            _label(_raw_tile(raw, side), f"{record['id']}  {age}  {'M' if record['male'] else 'F'}"),
            _tile(_to_bgr(prepared["image"]), side)[0],
            _tile(_to_bgr(augmented["image"]), side)[0],
            _mask_tile(augmented, side),
            _tile(_to_bgr(network_input), side)[0],
        ]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def main(argv: Sequence[str]) -> int:
    """Parses ``argv`` (flags, then ``--config.*`` overrides), draws the grid and writes it;
    returns the exit status (1 with an ``error:`` line when the PNG cannot be written)."""
    overrides = cli.parse(FLAGS, argv, config_overrides=True)
    config = cli.load_config_file(_CONFIG.value, overrides)
    grid = render(config, _SPLIT.value, _NUM.value, _SEED.value, _TILE.value)
    out = os.path.abspath(_OUT.value)
    try:
        io.write_png(out, grid)
    except OSError as e:
        print(f"error: could not write {out}: {e}", file=sys.stderr)
        return 1
    examples = (grid.shape[0] - HEADER_HEIGHT) // _TILE.value
    print(f"Wrote {out}: {examples} examples x {len(STAGES)} stages ({', '.join(STAGES)})")
    return 0


if __name__ == "__main__":
    cli.run(main)
