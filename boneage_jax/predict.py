r"""Bone age of new hand radiographs from a trained run.

    python -m boneage_jax.predict --workdir runs/demo --sex F hand.png [more.jpg scans/ ...] \
        [--out preds.csv] [--heatmaps heatmaps/] [--which best] [--batch_size 16]

Prints the predicted bone age in months and years for each image (with the standard deviation
of a ``gaussian`` head and the age class of a ``classification`` head). ``--sex`` (M/F, male/
female) applies to every image. Inputs are PNG, JPEG or DICOM files, or folders, which expand
to the .png, .jpg, .jpeg and .dcm files (and other files that start like DICOM) in them, sorted;
folders are not searched recursively. ``--out`` writes a CSV with the columns ``file,sex,
boneage_months`` (``boneage_std_months`` for a gaussian head, ``age_class`` for a classification
head). An unreadable image is reported on stderr with its name and skipped; the exit status is
then 1 (0 when every image was predicted).

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

Compiled code is kept in JAX's persistent compilation cache (``--cache_dir``, default
``$BONEAGE_JAX_CACHE`` or ``~/.cache/boneage_jax/jax``; ``--cache_dir=''`` turns it off), so
a repeated call does not compile again. Batches are padded to a power of two (at most
``--batch_size``), which bounds the number of compiled shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
from absl import app, flags

from boneage_jax import cli, io

DEFAULT_CACHE = os.path.join("~", ".cache", "boneage_jax", "jax")
_SEXES = {"m": True, "male": True, "f": False, "female": False}

FLAGS = flags.FlagValues()  # this command's flags (cli.parse); the image files and folders follow them
_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (written by boneage_jax.main).", flag_values=FLAGS)
_SEX = flags.DEFINE_string("sex", None, "M or F (male/female) for every image.", flag_values=FLAGS)
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to load.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "CSV file for the predictions.", flag_values=FLAGS)
_HEATMAPS = flags.DEFINE_string("heatmaps", None, "Folder for saliency / attention overlays.", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Largest batch of images per call.", flag_values=FLAGS)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, f"Persistent compilation cache (default $BONEAGE_JAX_CACHE or {DEFAULT_CACHE}; '' off).",
    flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "sex"], flag_values=FLAGS)


# ----------------------------------------------------------------------------- compilation cache


def enable_compilation_cache(cache_dir: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in ``cache_dir`` (None: the default
    location; empty: off) for every compilation, however short; returns the folder used."""
    import jax  # pylint: disable=import-outside-toplevel

    if cache_dir is None:
        cache_dir = os.environ.get("BONEAGE_JAX_CACHE", DEFAULT_CACHE)
    if not cache_dir:
        return None
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return cache_dir


# ----------------------------------------------------------------------------- preprocessing specs


def single_image_spec(spec: str, data_config=None) -> tuple[str, list[str]]:
    """The preprocessing spec for images outside the dataset, and notes on what changed.

    Ops that read a stored hand mask make their own (``hand_mask`` with ``source='dataset'``, the
    default, or ``'cache'`` becomes ``source='classical'``); ops that need keypoints raise
    ValueError (``roi_crop`` of region roi1/roi2/roi3, given in the spec or by ``data.roi`` in
    ``data_config``, and ``align(source='keypoints')``): ``ops.Chain.for_single_images``."""
    from boneage_jax import ops  # pylint: disable=import-outside-toplevel

    chain, notes = ops.Chain(spec, config=data_config, name="data.preprocess").for_single_images()
    return chain.spec, notes


# ----------------------------------------------------------------------------- the predictor


def parse_sex(value: str) -> bool:
    """'M'/'male' -> True, 'F'/'female' -> False (any case)."""
    key = str(value).strip().lower()
    if key not in _SEXES:
        raise ValueError(f"sex {value!r}: expected M, F, male or female")
    return _SEXES[key]


def padded_size(n: int, batch_size: int) -> int:
    """The batch size that ``n`` images are padded to: the next power of two, at most ``batch_size``."""
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


@dataclasses.dataclass
class Prediction:
    file: str
    male: bool
    boneage: float
    std: float | None = None
    age_class: int | None = None

    @property
    def sex(self) -> str:
        return "M" if self.male else "F"


class Predictor:
    """A loaded run with the single-image preprocessing and jitted readout / saliency."""

    def __init__(self, workdir: str, which: str = "best", batch_size: int = 16):
        from boneage_jax import inference, objectives  # pylint: disable=import-outside-toplevel

        self.run = inference.load_run(workdir, which=which)
        objectives.require_bone_age(self.run.objective, workdir, "predict")
        self.data_config = self.run.config.data.copy_and_resolve_references()
        self.data_config.preprocess, self.notes = single_image_spec(self.run.config.data.preprocess, self.data_config)
        self.max_side = inference.stored_max_side(self.data_config)
        self.batch_size = max(1, batch_size)
        self.image_size = int(self.data_config.image_size)

    # -- images

    def load(self, path: str) -> np.ndarray:
        """A file -> the image the TFDS builder would have stored (uint8, longest side capped)."""
        from tfds_rsna import rsna_bone_age  # pylint: disable=import-outside-toplevel

        return rsna_bone_age.resize_longest_side(io.read_image(path), self.max_side)

    def prepare(self, image: np.ndarray, path: str = "image") -> np.ndarray:
        """The network input of a loaded image; ImageReadError for an image that is not usable
        (``quality.unusable_reason``) or that the preprocessing cannot handle."""
        from boneage_jax import input_pipeline, quality  # pylint: disable=import-outside-toplevel

        reason = quality.unusable_reason(image, self.image_size)
        if reason:
            raise io.ImageReadError(f"{path}: rejected: {reason}")
        try:
            return input_pipeline.prepare_image(self.data_config, image)
        except Exception as e:  # an op failing on this image (e.g. an empty hand mask)
            raise io.ImageReadError(f"{path}: preprocessing failed: {e}") from e

    def preprocessed_uint8(self, image: np.ndarray) -> np.ndarray:
        """The image after ``data.preprocess`` only (what the heatmap is drawn on)."""
        from boneage_jax import ops  # pylint: disable=import-outside-toplevel

        preprocess = ops.Pipeline.from_config(self.data_config).preprocess
        return np.asarray(ops.as_2d(preprocess({"image": image, "id": 0})["image"]))

    # -- the network

    def _padded(self, images: np.ndarray, male: np.ndarray) -> tuple[dict, int]:
        n = len(images)
        size = padded_size(n, self.batch_size)
        pad = size - n
        images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)]) if pad else images
        male = np.concatenate([male, np.repeat(male[:1], pad)]) if pad else male
        return {"image": images.astype(np.float32), "male": male.astype(np.float32)}, n

    def predict_arrays(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray]:
        """(N, S, S, C) network inputs and (N,) male flags -> readout numpy arrays, in batches."""
        import jax  # pylint: disable=import-outside-toplevel

        outputs: dict[str, list] = {}
        for start in range(0, len(images), self.batch_size):
            batch, n = self._padded(images[start:start + self.batch_size], male[start:start + self.batch_size])
            readout = jax.device_get(self.run.predict(batch))
            for key, value in readout.items():
                outputs.setdefault(key, []).append(np.asarray(value)[:n])
        return {k: np.concatenate(v) for k, v in outputs.items()}

    @functools.cached_property
    def _saliency_fn(self) -> tuple[str, Callable]:
        import jax  # pylint: disable=import-outside-toplevel
        import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

        from boneage_jax import state  # pylint: disable=import-outside-toplevel

        run = self.run
        if hasattr(run.model().backbone, "attention_map"):

            def attention(params, rest, rng_state, images, male):
                del male
                model = state.merge(run.graphdef, params, rng_state, rest)
                return model.backbone.attention_map(images)

            return "attention", jax.jit(attention)

        def gradient(params, rest, rng_state, images, male):
            def total_age(x):
                model = state.merge(run.graphdef, params, rng_state, rest)
                return jnp.sum(run.objective.predict(model(x, male))["boneage"])

            return jnp.max(jnp.abs(jax.grad(total_age)(images)), axis=-1)

        return "gradient", jax.jit(gradient)

    def saliency(self, images: np.ndarray, male: np.ndarray) -> tuple[str, np.ndarray]:
        """Per-image maps (N, S, S) in [0, 1]: smoothed |d boneage / d input| or the attention map."""
        import cv2  # pylint: disable=import-outside-toplevel
        import jax  # pylint: disable=import-outside-toplevel

        kind, fn = self._saliency_fn
        maps = []
        for start in range(0, len(images), self.batch_size):
            batch, n = self._padded(images[start:start + self.batch_size], male[start:start + self.batch_size])
            out = np.asarray(jax.device_get(fn(self.run.params, self.run.rest, self.run.rng_state, batch["image"],
                                               batch["male"])), np.float32)[:n]
            maps.extend(out)
        result = []
        size = self.image_size
        for m in maps:
            if m.shape != (size, size):
                m = cv2.resize(m, (size, size), interpolation=cv2.INTER_CUBIC)
            if kind == "gradient":
                m = cv2.GaussianBlur(m, (0, 0), sigmaX=max(1.0, size / 64))
                top = float(np.percentile(m, 99.5))
                m = m / top if top > 0 else np.zeros_like(m)
            result.append(np.clip(m, 0.0, 1.0))
        return kind, np.stack(result) if result else np.zeros((0, size, size), np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, min_side: int = 256) -> np.ndarray:
    """uint8 grey (S, S) and a map in [0, 1] -> a BGR uint8 overlay (JET colours), upscaled to
    at least ``min_side`` px."""
    import cv2  # pylint: disable=import-outside-toplevel

    grey = image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
    base = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (0.6 * heat)[..., None]
    out = np.round(base * (1 - alpha) + colour * alpha).astype(np.uint8)
    side = max(out.shape[:2])
    if side < min_side:
        scale = min_side / side
        out = cv2.resize(out, (round(out.shape[1] * scale), round(out.shape[0] * scale)),
                         interpolation=cv2.INTER_NEAREST)
    return out


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
    print(message, file=sys.stderr)


def predict_files(predictor: Predictor, files: Sequence[str], male: bool, *, heatmaps: str | None = None,
                  log: Callable[[str], None] = print,
                  error: Callable[[str], None] = _print_error) -> tuple[list[Prediction], list[str]]:
    """Predicts every readable file (``log`` gets a line per prediction, ``error`` one per
    failure); returns the predictions and the files that failed."""
    inputs, kept, originals, failed = [], [], [], []
    for path in files:
        try:
            image = predictor.load(path)
            inputs.append(predictor.prepare(image, path))
        except io.ImageReadError as e:  # its message starts with the file
            error(f"error: {e}")
            failed.append(path)
            continue
        except Exception as e:  # pylint: disable=broad-except  # whatever else fails, the other files run
            error(f"error: {path}: {type(e).__name__}: {e}")
            failed.append(path)
            continue
        kept.append(path)
        if heatmaps:
            originals.append(image)
    if not kept:
        return [], failed
    images = np.stack(inputs)
    males = np.full(len(kept), male, np.float32)
    readout = predictor.predict_arrays(images, males)
    predictions = []
    for i, path in enumerate(kept):
        predictions.append(Prediction(
            file=path, male=male, boneage=float(readout["boneage"][i]),
            std=float(readout["std"][i]) if "std" in readout else None,
            age_class=int(readout["class"][i]) if "class" in readout else None))
        log(describe(predictions[-1]))
    if heatmaps:
        kind, maps = predictor.saliency(images, males)
        os.makedirs(heatmaps, exist_ok=True)
        for name, image, heat in zip(heatmap_names(kept), originals, maps):
            io.write_png(os.path.join(heatmaps, name), overlay(predictor.preprocessed_uint8(image), heat))
        log(f"{len(kept)} heatmap(s) ({'attention map' if kind == 'attention' else 'gradient saliency'}) "
            f"written to {heatmaps}")
    return predictions, failed


def describe(p: Prediction) -> str:
    text = f"{p.file}  sex {p.sex}  bone age {p.boneage:.1f} months ({p.boneage / 12:.2f} years)"
    if p.std is not None:
        text += f"  ± {p.std:.1f} months"
    if p.age_class is not None:
        text += f"  age class {p.age_class}"
    return text


def csv_rows(predictions: Sequence[Prediction]) -> tuple[list[str], list[list]]:
    header = ["file", "sex", "boneage_months"]
    with_std = any(p.std is not None for p in predictions)
    with_class = any(p.age_class is not None for p in predictions)
    header += ["boneage_std_months"] * with_std + ["age_class"] * with_class
    rows = []
    for p in predictions:
        row = [p.file, p.sex, f"{p.boneage:.4f}"]
        if with_std:
            row.append(f"{p.std:.4f}")
        if with_class:
            row.append(p.age_class)
        rows.append(row)
    return header, rows


def main(argv: Sequence[str]) -> int:
    """``python -m boneage_jax.predict`` with ``argv`` (the arguments after the program name);
    returns the exit status."""
    files_or_folders = cli.parse(FLAGS, argv)
    if not files_or_folders:
        raise app.UsageError("give image files (PNG, JPEG, DICOM) or folders of them")
    try:
        male = parse_sex(_SEX.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    enable_compilation_cache(_CACHE_DIR.value)

    try:
        predictor = Predictor(_WORKDIR.value, which=_WHICH.value, batch_size=_BATCH_SIZE.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in predictor.notes:
        print(f"note: {note}")
    files = io.expand_inputs(files_or_folders)
    if not files:
        print("error: no image files found in " + ", ".join(files_or_folders), file=sys.stderr)
        return 1
    predictions, failed = predict_files(predictor, files, male, heatmaps=_HEATMAPS.value)
    if _OUT.value:
        header, rows = csv_rows(predictions)
        io.write_csv(_OUT.value, header, rows)
        print(f"{len(rows)} prediction(s) written to {_OUT.value}")
    if failed:
        print(f"{len(failed)} of {len(files)} image(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
