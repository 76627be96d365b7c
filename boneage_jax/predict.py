r"""Bone age of new hand radiographs from a trained run.

    python -m boneage_jax.predict --workdir runs/demo --sex F hand.png [more.jpg scans/ ...] \
        [--out preds.csv] [--heatmaps heatmaps/] [--which best] [--batch_size 16] [--force] \
        [--age 9y6m | --birth_date 2015-03-02 --exam_date 2024-09-14]

Prints the predicted bone age in months and years for each image (with the standard deviation
of a ``gaussian`` head and the age class of a ``classification`` head). ``--sex`` (M/F, male/
female) applies to every image. Inputs are PNG, JPEG or DICOM files, or folders, which expand
to the .png, .jpg, .jpeg and .dcm files (and other files that start like DICOM) in them, sorted;
folders are not searched recursively. ``--out`` writes a CSV with the columns ``file,sex,
boneage_months`` (``boneage_std_months`` for a gaussian head, ``age_class`` for a classification
head). An unreadable image is reported on stderr with its name and skipped; the exit status is
then 1 (0 when every image was predicted).

Before predicting, each image goes through the quality check (``boneage_jax.quality``: big
enough, a hand found by the mask, of plausible size and shape, not inverted, not blank, not
noise, not a photograph). An image it rejects gets ``error: FILE: rejected: REASON: details``
on stderr instead of a bone age and counts as not predicted (exit status 1). ``--force``
predicts it anyway: its line ends with ``[quality check: REASON: details; predicted with
--force]`` and the CSV gets a ``quality`` column (the rejection, empty for accepted images).

With a chronological age (``--age``: ``114`` or ``114m`` months, ``9y6m``, ``9y``, ``9.5y``; or
``--birth_date`` and ``--exam_date``, YYYY-MM-DD), each line and the CSV add RDES14's fields
(``boneage_jax.chronological.compare``): the chronological age, bone age minus chronological age,
and ``determination`` ``unknown`` with no standard deviation score, for want of a published table
of bone-age standard deviations (a note says so once).

Each image goes through what validation images went through in training: the dataset's stored
resolution (``data.builder_config``: longest side at most 512 or 1024 px), then the run's
``data.preprocess`` and ``data.normalize`` (:func:`boneage_jax.input_pipeline.prepare_image`).
Single images have no dataset hand mask: ops that read a stored mask make their own, as their
registry entry declares (``hand_mask(source='dataset')`` and ``source='cache'`` become
``hand_mask(source='classical')``, the Otsu mask of :func:`boneage_jax.ops.hand.classical_mask`),
and a note says so. Keypoint ops (``roi_crop`` with region roi1/roi2/roi3, from the spec or
``data.roi``, and ``align(source='keypoints')``) cannot run without keypoints: such a run stops
with an error before any image is read.

DICOM (pydicom): RescaleSlope/RescaleIntercept are applied, then the first WindowCenter/
WindowWidth (the DICOM linear VOI function) when present, else min-max scaling, to 8 bits;
MONOCHROME1 images (white background) are inverted. Compressed DICOM needs pydicom's pixel
data plug-ins (e.g. pylibjpeg) installed.

``--heatmaps DIR`` writes ``<name>_heatmap.png`` per image: the network's input (after
preprocessing) overlaid with a saliency map, the smoothed magnitude of the gradient of the
predicted bone age with respect to the input pixels; for models whose backbone has an
``attention_map`` (``vgg19_attention``) the attention map instead.

The reading, quality check, preprocessing, readout and saliency are ``inference.Predictor``'s,
which ``boneage_jax.serve`` shares. When stderr is a terminal, progress bars show the reading,
the predicting and the heatmaps (``io.progress``).

Compiled code is kept in JAX's persistent compilation cache (``--cache_dir``, default
``$BONEAGE_JAX_CACHE`` or ``~/.cache/boneage_jax/jax``; ``--cache_dir=''`` turns it off), so
a repeated call does not compile again. Batches are padded to a power of two (at most
``--batch_size``), which bounds the number of compiled shapes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from absl import app, flags

from boneage_jax import chronological, cli, io

if TYPE_CHECKING:
    from boneage_jax.inference import Predictor

FLAGS = flags.FlagValues()  # this command's flags (cli.parse); the image files and folders follow them
_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (written by boneage_jax.main).", flag_values=FLAGS)
_SEX = flags.DEFINE_string("sex", None, "M or F (male/female) for every image.", flag_values=FLAGS)
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to load.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "CSV file for the predictions.", flag_values=FLAGS)
_HEATMAPS = flags.DEFINE_string("heatmaps", None, "Folder for saliency / attention overlays.", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Largest batch of images per call.", flag_values=FLAGS)
_AGE = flags.DEFINE_string("age", None, "Chronological age of every image: months (114, 114m) or years and "
                           "months (9y6m, 9y, 9.5y).", flag_values=FLAGS)
_BIRTH_DATE = flags.DEFINE_string("birth_date", None, "Birth date (YYYY-MM-DD), with --exam_date: the "
                                  "chronological age.", flag_values=FLAGS)
_EXAM_DATE = flags.DEFINE_string("exam_date", None, "Exam date (YYYY-MM-DD), with --birth_date.", flag_values=FLAGS)
_FORCE = flags.DEFINE_bool("force", False, "Predict images that the quality check rejects too (their output says "
                           "so).", flag_values=FLAGS)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, f"Persistent compilation cache (default $BONEAGE_JAX_CACHE or {cli.DEFAULT_CACHE}; '' off).",
    flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "sex"], flag_values=FLAGS)
T = TypeVar("T")


# ----------------------------------------------------------------------------- output


@dataclasses.dataclass
class Prediction:
    file: str
    male: bool
    boneage: float
    std: float | None = None
    age_class: int | None = None
    rejected: str | None = None  # the quality check's reason, for an image predicted with --force
    chronological: dict | None = None  # chronological.compare's RDES14 fields, given an age

    @property
    def sex(self) -> str:
        return "M" if self.male else "F"


def heatmap_names(files: Sequence[str]) -> list[str]:
    """``<stem>_heatmap.png`` per file, numbered where two files share a stem."""
    names, seen = [], {}
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        names.append(f"{stem}_heatmap.png" if count == 1 else f"{stem}_{count}_heatmap.png")
    return names


def _print_error(message: str) -> None:
    io.print_above_progress(message, file=sys.stderr)


def in_batches(fn: Callable[[np.ndarray, np.ndarray], T], images: np.ndarray, males: np.ndarray, batch_size: int,
               desc: str) -> list[T]:
    """``fn`` over ``batch_size`` chunks of the images, with a progress bar on a terminal."""
    starts = range(0, len(images), batch_size)
    return [fn(images[s:s + batch_size], males[s:s + batch_size])
            for s in io.progress(starts, desc=desc, unit="batch")]


def predict_files(predictor: Predictor, files: Sequence[str], male: bool, *, heatmaps: str | None = None,
                  force: bool = False, age_months: float | None = None, log: Callable[[str], None] = print,
                  error: Callable[[str], None] = _print_error) -> tuple[list[Prediction], list[str]]:
    """Predicts every readable file that the quality check accepts (every readable file with
    ``force``; ``log`` gets a line per prediction, ``error`` one per failure or rejection), each
    compared with the chronological ``age_months`` when given; returns the predictions and the
    files that failed or were rejected."""
    inputs, kept, originals, failed, rejections = [], [], [], [], []
    for path in io.progress(files, desc="reading"):
        try:
            image = predictor.load(path)
            reason = predictor.unusable_reason(image)
            if reason and not force:
                error(f"error: {path}: rejected: {reason} (--force predicts it anyway)")
                failed.append(path)
                continue
            inputs.append(predictor.prepare(image, path, check_quality=False))
        except io.ImageReadError as e:  # its message starts with the file
            error(f"error: {io.one_line(e)}")
            failed.append(path)
            continue
        except Exception as e:  # pylint: disable=broad-except  # whatever else fails, the other files run
            error(f"error: {path}: {type(e).__name__}: {io.one_line(e)}")
            failed.append(path)
            continue
        kept.append(path)
        rejections.append(reason)
        if heatmaps:
            originals.append(image)
    if not kept:
        return [], failed
    images = np.stack(inputs)
    males = np.full(len(kept), male, np.float32)
    parts = in_batches(predictor.predict_arrays, images, males, predictor.batch_size, "predicting")
    readout = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    predictions = []
    for i, path in enumerate(kept):
        boneage = float(readout["boneage"][i])
        predictions.append(Prediction(
            file=path, male=male, boneage=boneage,
            std=float(readout["std"][i]) if "std" in readout else None,
            age_class=int(readout["class"][i]) if "class" in readout else None, rejected=rejections[i],
            chronological=None if age_months is None else chronological.compare(boneage, age_months)))
        log(describe(predictions[-1]))
    if heatmaps:
        from boneage_jax import explain  # pylint: disable=import-outside-toplevel

        parts = in_batches(predictor.saliency, images, males, predictor.batch_size, "heatmaps")
        kind, maps = parts[0][0], np.concatenate([m for _, m in parts])
        os.makedirs(heatmaps, exist_ok=True)
        for name, image, heat in zip(heatmap_names(kept), originals, maps):
            io.write_png(os.path.join(heatmaps, name), explain.overlay(predictor.preprocessed_uint8(image), heat))
        log(f"{len(kept)} heatmap(s) ({'attention map' if kind == 'attention' else 'gradient saliency'}) "
            f"written to {heatmaps}")
    return predictions, failed


def describe(p: Prediction) -> str:
    text = f"{p.file}  sex {p.sex}  bone age {p.boneage:.1f} months ({p.boneage / 12:.2f} years)"
    if p.std is not None:
        text += f"  ± {p.std:.1f} months"
    if p.age_class is not None:
        text += f"  age class {p.age_class}"
    if p.chronological is not None:
        text += (f"  chronological age {p.chronological['chronological_age_months']:.1f} months, bone age minus "
                 f"chronological {p.chronological['difference_months']:+.1f} months")
    if p.rejected is not None:
        text += f"  [quality check: {p.rejected}; predicted with --force]"
    return text


CHRONOLOGICAL_COLUMNS = ("chronological_age_months", "boneage_minus_chronological_months", "sds", "determination")


def csv_rows(predictions: Sequence[Prediction], with_quality: bool = False) -> tuple[list[str], list[list]]:
    """The CSV header and rows; ``with_quality`` (``--force``) adds the column ``quality``: the
    quality check's rejection of a forced image, empty for an accepted one. Given a chronological
    age, RDES14's fields follow (``CHRONOLOGICAL_COLUMNS``; sds empty: no reference table)."""
    header = ["file", "sex", "boneage_months"]
    with_std = any(p.std is not None for p in predictions)
    with_class = any(p.age_class is not None for p in predictions)
    with_age = any(p.chronological is not None for p in predictions)
    header += ["boneage_std_months"] * with_std + ["age_class"] * with_class + ["quality"] * with_quality
    header += list(CHRONOLOGICAL_COLUMNS) * with_age
    rows = []
    for p in predictions:
        row = [p.file, p.sex, f"{p.boneage:.4f}"]
        if with_std:
            row.append(f"{p.std:.4f}")
        if with_class:
            row.append(p.age_class)
        if with_quality:
            row.append(p.rejected or "")
        if with_age:
            fields = p.chronological
            row += [f"{fields['chronological_age_months']:.4f}", f"{fields['difference_months']:.4f}",
                    "" if fields["sds"] is None else f"{fields['sds']:.4f}", fields["determination"]]
        rows.append(row)
    return header, rows


def main(argv: Sequence[str]) -> int:
    """``python -m boneage_jax.predict`` with ``argv`` (the arguments after the program name);
    returns the exit status."""
    files_or_folders = cli.parse(FLAGS, argv)
    if not files_or_folders:
        raise app.UsageError("give image files (PNG, JPEG, DICOM) or folders of them")
    from boneage_jax import inference  # pylint: disable=import-outside-toplevel

    try:
        male = inference.parse_sex(_SEX.value)
        age_months = chronological.resolve(_AGE.value, _BIRTH_DATE.value, _EXAM_DATE.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    cli.enable_compilation_cache(_CACHE_DIR.value)

    try:
        predictor = inference.Predictor(_WORKDIR.value, which=_WHICH.value, batch_size=_BATCH_SIZE.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in predictor.notes:
        print(f"note: {note}")
    files = io.expand_inputs(files_or_folders)
    if not files:
        print("error: no image files found in " + ", ".join(files_or_folders), file=sys.stderr)
        return 1
    if age_months is not None:
        print(f"note: chronological age {age_months:.1f} months; {chronological.NO_REFERENCE}")
    predictions, failed = predict_files(predictor, files, male, heatmaps=_HEATMAPS.value, force=_FORCE.value,
                                        age_months=age_months)
    if _OUT.value:
        header, rows = csv_rows(predictions, with_quality=_FORCE.value)
        io.write_csv(_OUT.value, header, rows)
        print(f"{len(rows)} prediction(s) written to {_OUT.value}")
    if failed:
        print(f"{len(failed)} of {len(files)} image(s) failed or were rejected: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
