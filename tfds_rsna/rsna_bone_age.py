"""TFDS builder for the RSNA Pediatric Bone Age release (and the phantom datasets).

The builder reads the files from a *manual directory* exactly as users download them:

Kaggle layout::

    boneage-training-dataset.csv        id,boneage,male            (male: True/False)
    boneage-training-dataset/[boneage-training-dataset/]<id>.png
    boneage-test-dataset.csv            Case ID,Sex                 (Sex: M/F, no ages)
    boneage-test-dataset/[boneage-test-dataset/]<id>.png

Official RSNA layout (training as above, plus)::

    Validation Dataset.csv              Image ID,male,Bone Age (months)   (male: TRUE/FALSE)
    boneage-validation-dataset-1.zip and boneage-validation-dataset-2.zip, or their
        extracted folders boneage-validation-dataset-{1,2}/[...]/<id>.png
    Bone age ground truth.xlsx          Case ID, Sex, Ground truth bone age (months)
    boneage-test-dataset/[...]/<id>.png

Splits ``train``, ``validation`` and ``test`` exist where the files provide them. A test
split built from ``boneage-test-dataset.csv`` alone has no ages: its examples have
``boneage = NaN`` and ``has_boneage = False``, and ``info.metadata['labelled_splits']``
leaves it out.

Optional annotations beside the images (the phantom generator writes both):

    hand-masks/<id>.png                 hand mask, same size as the image (>127: hand)
    keypoints.csv                       id,name,x,y   (x, y in pixels of the original image;
                                        names from tfds_rsna.keypoints.KEYPOINT_NAMES)

Every example has ``mask`` (uint8 (H, W, 1), 0 or 255, the image's size; 1x1 when absent),
``has_mask``, ``keypoints`` (float32 (27, 2) x, y in pixels of the *stored* image, NaN where
unknown) and ``has_keypoints``. Hand masks from a trained U-Net are written in the same
layout by ``python -m boneage_jax.segment`` into a folder the ``hand_mask`` op reads.

Images are stored as 8-bit greyscale PNG of shape (H, W, 1). Conversions: RGB and palette
images become grey with ITU-R BT.601 luma (OpenCV's ``COLOR_BGR2GRAY``); RGBA images drop
their alpha channel first; 16-bit images are scaled linearly from their own minimum and
maximum to 0-255 (the bit depth actually used by scanners varies, so a fixed divisor would
leave many images nearly black). Builder configs store the images at their ``original``
size or downscaled (area interpolation, aspect kept) to a longest side of 1024 (``max1024``)
or 512 (``max512``); smaller images are never upscaled.

The build checks its input first and fails with an error naming the file and row: a missing
label file, an unexpected header, a row without an image, an unreadable or truncated image,
an age outside 0-240 months, duplicate ids. TFDS writes into a temporary directory that is
removed on failure, so nothing half-built remains.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import math
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Sequence

from tfds_rsna.keypoints import KEYPOINT_NAMES

import cv2
import numpy as np
import tensorflow_datasets as tfds

from boneage_jax.io import progress

MIN_AGE_MONTHS = 0.0
MAX_AGE_MONTHS = 240.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

TRAIN_CSV = "boneage-training-dataset.csv"
TRAIN_HEADER = ["id", "boneage", "male"]
VALIDATION_CSV = "Validation Dataset.csv"
VALIDATION_HEADER = ["Image ID", "male", "Bone Age (months)"]
TEST_CSV = "boneage-test-dataset.csv"
TEST_HEADER = ["Case ID", "Sex"]
TEST_XLSX = "Bone age ground truth.xlsx"
TEST_XLSX_HEADER = ["Case ID", "Sex", "Ground truth bone age (months)"]

MASKS_DIR = "hand-masks"  # optional: <id>.png hand masks, same size as the images
KEYPOINTS_CSV = "keypoints.csv"  # optional: id,name,x,y (pixels of the original image)
KEYPOINTS_HEADER = ["id", "name", "x", "y"]

TRAIN_IMAGES = "boneage-training-dataset"
VALIDATION_IMAGES = "boneage-validation-dataset"  # -1 and -2, folders or zips
TEST_IMAGES = "boneage-test-dataset"


class RsnaFormatError(ValueError):
    """The manual directory does not hold the RSNA release in a layout we know."""


@dataclasses.dataclass(frozen=True)
class LabelRow:
    """One labelled (or unlabelled) radiograph as the label file lists it."""

    image_id: int
    male: bool
    boneage: float  # NaN when the split has no ages
    source: str  # "file:row" for error messages


# ----------------------------------------------------------------------------- labels


def _parse_bool(text: str, where: str, field: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "m", "male"):
        return True
    if value in ("false", "0", "f", "female"):
        return False
    raise RsnaFormatError(f"{where}: field {field!r} is {text!r}; expected True/False (or M/F)")


def _parse_id(text, where: str, field: str) -> int:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise RsnaFormatError(f"{where}: field {field!r} is {text!r}; expected an integer id") from None
    if not value.is_integer() or value < 0:
        raise RsnaFormatError(f"{where}: field {field!r} is {text!r}; expected a non-negative integer id")
    return int(value)


def _parse_age(text, where: str, field: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise RsnaFormatError(f"{where}: field {field!r} is {text!r}; expected bone age in months") from None
    if not (MIN_AGE_MONTHS <= value <= MAX_AGE_MONTHS):
        raise RsnaFormatError(
            f"{where}: bone age {value} months is outside {MIN_AGE_MONTHS:g}-{MAX_AGE_MONTHS:g} months"
        )
    return value


def _check_header(path: str, header: Sequence, expected: Sequence[str]) -> None:
    got = [str(h).strip() if h is not None else "" for h in header]
    if got != list(expected):
        raise RsnaFormatError(f"{path}: header is {got}; expected {list(expected)}")


def _read_csv(path: str, expected_header: Sequence[str]) -> list[tuple[str, list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise RsnaFormatError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the label "
                              f"file as UTF-8 CSV") from None
    except csv.Error as e:
        raise RsnaFormatError(f"{path}: not a CSV file ({e})") from None
    except OSError as e:
        raise RsnaFormatError(f"{path}: cannot be read ({e.strerror})") from None
    if not rows:
        raise RsnaFormatError(f"{path}: file is empty; expected header {list(expected_header)}")
    _check_header(path, rows[0], expected_header)
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(expected_header):
            raise RsnaFormatError(f"{path}:{line}: {len(row)} fields {row}; expected {len(expected_header)}")
        out.append((f"{path}:{line}", row))
    return out


def read_train_labels(path: str) -> list[LabelRow]:
    """Reads ``boneage-training-dataset.csv`` (``id,boneage,male``)."""
    return [
        LabelRow(
            _parse_id(r[0], where, "id"),
            _parse_bool(r[2], where, "male"),
            _parse_age(r[1], where, "boneage"),
            where,
        )
        for where, r in _read_csv(path, TRAIN_HEADER)
    ]


def read_validation_labels(path: str) -> list[LabelRow]:
    """Reads ``Validation Dataset.csv`` (``Image ID,male,Bone Age (months)``)."""
    return [
        LabelRow(
            _parse_id(r[0], where, "Image ID"),
            _parse_bool(r[1], where, "male"),
            _parse_age(r[2], where, "Bone Age (months)"),
            where,
        )
        for where, r in _read_csv(path, VALIDATION_HEADER)
    ]


def read_test_csv(path: str) -> list[LabelRow]:
    """Reads Kaggle's ``boneage-test-dataset.csv`` (``Case ID,Sex``): no ages."""
    return [
        LabelRow(_parse_id(r[0], where, "Case ID"), _parse_bool(r[1], where, "Sex"), math.nan, where)
        for where, r in _read_csv(path, TEST_HEADER)
    ]


def read_test_xlsx(path: str) -> list[LabelRow]:
    """Reads the official ``Bone age ground truth.xlsx`` (first sheet)."""
    import openpyxl  # pylint: disable=import-outside-toplevel

    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises several types for broken files
        raise RsnaFormatError(f"{path}: not a readable .xlsx workbook ({e})") from e
    try:
        rows = list(workbook.worksheets[0].iter_rows(values_only=True))
    finally:
        workbook.close()
    if not rows:
        raise RsnaFormatError(f"{path}: first sheet is empty; expected header {TEST_XLSX_HEADER}")
    _check_header(path, rows[0][: len(TEST_XLSX_HEADER)], TEST_XLSX_HEADER)
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if all(c is None or str(c).strip() == "" for c in row):
            continue
        where = f"{path}:row {line}"
        out.append(
            LabelRow(
                _parse_id(row[0], where, "Case ID"),
                _parse_bool(str(row[1]), where, "Sex"),
                _parse_age(row[2], where, "Ground truth bone age (months)"),
                where,
            )
        )
    return out


def _check_unique(rows: Sequence[LabelRow]) -> None:
    seen: dict[int, str] = {}
    for row in rows:
        if row.image_id in seen:
            raise RsnaFormatError(f"duplicate id {row.image_id}: {seen[row.image_id]} and {row.source}")
        seen[row.image_id] = row.source


# ----------------------------------------------------------------------------- images


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """Where one radiograph's encoded bytes live: a file, or a member of a zip archive."""

    path: str
    member: str | None = None

    def read_bytes(self) -> bytes:
        if self.member is None:
            with open(self.path, "rb") as f:
                return f.read()
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(self.member)

    def __str__(self) -> str:
        return self.path if self.member is None else f"{self.path}!{self.member}"


def _image_id(name: str) -> int | None:
    stem, suffix = os.path.splitext(os.path.basename(name))
    if suffix.lower() not in IMAGE_SUFFIXES or not re.fullmatch(r"\d+", stem):
        return None
    return int(stem)


def index_images(manual_dir: str, prefix: str) -> dict[int, ImageRef]:
    """Finds ``<id>.png`` under every folder or zip in ``manual_dir`` whose name starts with ``prefix``."""
    found: dict[int, ImageRef] = {}

    def add(image_id: int, ref: ImageRef) -> None:
        if image_id in found:
            raise RsnaFormatError(f"two images for id {image_id}: {found[image_id]} and {ref}")
        found[image_id] = ref

    for entry in sorted(os.listdir(manual_dir)):
        path = os.path.join(manual_dir, entry)
        if not entry.startswith(prefix):
            continue
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    image_id = _image_id(name)
                    if image_id is not None:
                        add(image_id, ImageRef(os.path.join(root, name)))
        elif entry.endswith(".zip"):
            extracted = os.path.join(manual_dir, entry[: -len(".zip")])
            if os.path.isdir(extracted):
                continue  # the extracted folder is read instead
            try:
                with zipfile.ZipFile(path) as archive:
                    members = sorted(archive.namelist())
            except zipfile.BadZipFile as e:
                raise RsnaFormatError(f"{path}: not a readable zip archive ({e})") from e
            for member in members:
                image_id = _image_id(member)
                if image_id is not None and not os.path.basename(member).startswith("."):
                    add(image_id, ImageRef(path, member))
    return found


def to_grey_uint8(image: np.ndarray, source: str) -> np.ndarray:
    """Converts a decoded image (any of OpenCV's layouts) to 8-bit greyscale (H, W)."""
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2:
        raise RsnaFormatError(f"{source}: unsupported image shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype in MINMAX_TYPES:
        return minmax_uint8(image)
    raise RsnaFormatError(f"{source}: unsupported pixel type {image.dtype}")


MINMAX_TYPES = (np.uint16, np.int16, np.int32, np.float32, np.float64)  # what minmax_uint8 maps to 8 bits


def minmax_uint8(image: np.ndarray) -> np.ndarray:
    """An image of more than 8 bits (any shape) to uint8, its minimum to 0 and maximum to 255."""
    lo, hi = float(image.min()), float(image.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((image.astype(np.float32) - lo) * scale + 0.5, 0, 255).astype(np.uint8)


def decode_grey(data: bytes, source: str) -> np.ndarray:
    """Decodes PNG/JPEG bytes to 8-bit grey, failing clearly on unreadable or truncated files."""
    return to_grey_uint8(decode_pixels(data, source), source)


def decode_pixels(data: bytes, source: str) -> np.ndarray:
    """Decodes PNG/JPEG bytes as they are stored (any of OpenCV's layouts and depths; colour
    as BGR), failing clearly on unreadable or truncated files.

    A PNG is checked before OpenCV sees it (its chunks whole up to IEND, their CRCs, its declared
    size against OpenCV's pixel limit), so a damaged one gets this function's one error and not,
    besides, libpng's or OpenCV's own lines on stderr."""
    if len(data) == 0:
        raise RsnaFormatError(f"{source}: image file is empty")
    if data[:8] == PNG_SIGNATURE:
        damage = png_damage(data)
        if damage:
            raise RsnaFormatError(f"{source}: {damage}")
        (width, height), limit = png_size(data), opencv_max_pixels()
        if width * height > limit:
            raise RsnaFormatError(f"{source}: the PNG declares {width} x {height} pixels, more than OpenCV decodes "
                                  f"({limit:,}, its OPENCV_IO_MAX_IMAGE_PIXELS)")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # e.g. more pixels than OpenCV's limit (CV_IO_MAX_IMAGE_PIXELS)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "OpenCV error"
        raise RsnaFormatError(f"{source}: OpenCV cannot decode this image ({reason})") from e
    if image is None or image.size == 0:
        raise RsnaFormatError(f"{source}: unreadable or truncated image")
    return image


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that a PNG's IHDR chunk declares; None where the bytes have no IHDR there."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def opencv_max_pixels() -> int:
    """The most pixels OpenCV's decoders accept (its environment variable, else its default 2**30)."""
    try:
        return int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))
    except ValueError:
        return 1 << 30


def png_damage(data: bytes) -> str | None:
    """What is wrong with a PNG's chunk structure, or None: every chunk (length, type, data, CRC)
    whole and its CRC right, from IHDR up to IEND.

    Bytes after IEND (some writers append metadata or padding) do not make a PNG damaged."""
    offset = len(PNG_SIGNATURE)
    if data[offset + 4:offset + 8] != b"IHDR":
        return "not a PNG (no IHDR chunk after the signature)"
    while offset + 12 <= len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        kind = data[offset + 4:offset + 8]
        end = offset + 12 + length
        if end > len(data):
            break
        if zlib.crc32(data[offset + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            name = kind.decode("latin-1") if kind.isalpha() else repr(kind)
            return f"damaged PNG (chunk {name} at byte {offset} fails its CRC check)"
        if kind == b"IEND":
            return None
        offset = end
    return "truncated PNG (its chunks end before the IEND chunk)"


def resize_longest_side(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscales so that the longest side is at most ``max_side`` (area interpolation)."""
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


def _read_mask(masks_dir: str | None, image_id: int, original_shape: tuple, stored_shape: tuple) -> np.ndarray | None:
    """The hand mask of an image, binarised to 0/255 and resized (nearest) like the image; None if absent."""
    if masks_dir is None:
        return None
    path = os.path.join(masks_dir, f"{image_id}.png")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        mask = decode_grey(f.read(), path)
    if mask.shape != tuple(original_shape[:2]):
        raise RsnaFormatError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} px; expected the image's "
                              f"{original_shape[1]}x{original_shape[0]}")
    if mask.shape != tuple(stored_shape[:2]):
        mask = cv2.resize(mask, (stored_shape[1], stored_shape[0]), interpolation=cv2.INTER_NEAREST)
    return np.where(mask > 127, 255, 0).astype(np.uint8)


# ----------------------------------------------------------------------------- splits


def read_keypoints(path: str) -> dict[int, np.ndarray]:
    """Reads ``keypoints.csv`` (``id,name,x,y``) into id -> (27, 2) float32, NaN where not given."""
    index = {name: i for i, name in enumerate(KEYPOINT_NAMES)}
    out: dict[int, np.ndarray] = {}
    for where, row in _read_csv(path, KEYPOINTS_HEADER):
        image_id = _parse_id(row[0], where, "id")
        name = row[1].strip()
        if name not in index:
            raise RsnaFormatError(f"{where}: unknown keypoint name {name!r}; expected one of {list(KEYPOINT_NAMES)}")
        try:
            xy = float(row[2]), float(row[3])
        except ValueError:
            raise RsnaFormatError(f"{where}: x, y are {row[2]!r}, {row[3]!r}; expected numbers (pixels)") from None
        points = out.setdefault(image_id, np.full((len(KEYPOINT_NAMES), 2), np.nan, np.float32))
        points[index[name]] = xy
    return out


@dataclasses.dataclass(frozen=True)
class SplitSource:
    rows: list[LabelRow]
    images: dict[int, ImageRef]
    labelled: bool
    masks_dir: str | None = None
    keypoints: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


def find_splits(manual_dir: str) -> dict[str, SplitSource]:
    """Reads and checks the label files and image index of every split the folder provides; a label
    file without rows (the phantom writer's ``--num_test 0``) leaves its split out."""
    if not os.path.isdir(manual_dir):
        raise RsnaFormatError(f"manual directory {manual_dir} does not exist")
    train_csv = os.path.join(manual_dir, TRAIN_CSV)
    if not os.path.isfile(train_csv):
        raise RsnaFormatError(
            f"{train_csv} is missing: the manual directory must hold the RSNA training labels "
            f"({TRAIN_CSV}, header {','.join(TRAIN_HEADER)})"
        )
    splits = {"train": SplitSource(read_train_labels(train_csv), index_images(manual_dir, TRAIN_IMAGES), True)}

    validation_csv = os.path.join(manual_dir, VALIDATION_CSV)
    if os.path.isfile(validation_csv):
        splits["validation"] = SplitSource(
            read_validation_labels(validation_csv), index_images(manual_dir, VALIDATION_IMAGES), True
        )

    test_xlsx = os.path.join(manual_dir, TEST_XLSX)
    test_csv = os.path.join(manual_dir, TEST_CSV)
    if os.path.isfile(test_xlsx):
        splits["test"] = SplitSource(read_test_xlsx(test_xlsx), index_images(manual_dir, TEST_IMAGES), True)
    elif os.path.isfile(test_csv):
        splits["test"] = SplitSource(read_test_csv(test_csv), index_images(manual_dir, TEST_IMAGES), False)

    masks_dir = os.path.join(manual_dir, MASKS_DIR)
    keypoints_csv = os.path.join(manual_dir, KEYPOINTS_CSV)
    keypoints = read_keypoints(keypoints_csv) if os.path.isfile(keypoints_csv) else {}
    splits = {
        name: dataclasses.replace(split, masks_dir=masks_dir if os.path.isdir(masks_dir) else None,
                                  keypoints=keypoints)
        for name, split in splits.items()
    }

    all_rows: list[LabelRow] = []
    for name, split in splits.items():
        _check_unique(split.rows)
        for row in split.rows:
            if row.image_id not in split.images:
                raise RsnaFormatError(f"{row.source}: no image {row.image_id}.png for this row of the {name} split")
        all_rows.extend(split.rows)
    _check_unique(all_rows)  # an id may not appear in two splits either
    if not splits["train"].rows:
        raise RsnaFormatError(f"{train_csv} has no rows: the training split needs labelled images")
    # A label file without rows (the phantom writer's --num_test 0) leaves its split out.
    return {name: split for name, split in splits.items() if split.rows}


# ----------------------------------------------------------------------------- builder


class RsnaBoneAgeConfig(tfds.core.BuilderConfig):
    """Stored resolution: ``max_side`` None keeps the original images."""

    def __init__(self, *, max_side: int | None, **kwargs):
        super().__init__(**kwargs)
        self.max_side = max_side


class RsnaBoneAge(tfds.core.GeneratorBasedBuilder):
    """RSNA Pediatric Bone Age radiographs with bone age (months) and sex."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release: Kaggle and official layouts, three stored resolutions.",
        "1.1.0": "Optional hand masks (hand-masks/<id>.png) and keypoints (keypoints.csv).",
    }
    BUILDER_CONFIGS = [
        RsnaBoneAgeConfig(name="original", max_side=None, description="Images at their original size."),
        RsnaBoneAgeConfig(name="max1024", max_side=1024, description="Longest side at most 1024 px."),
        RsnaBoneAgeConfig(name="max512", max_side=512, description="Longest side at most 512 px."),
    ]
    DEFAULT_CONFIG_NAME = "max512"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download the RSNA Pediatric Bone Age Challenge release (Kaggle's "RSNA Bone Age" or the
    official RSNA files) and pass its folder as the manual directory. The folder must hold
    boneage-training-dataset.csv and the boneage-training-dataset images; the validation
    and test files are used when present (see tfds_rsna/rsna_bone_age.py).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
                    "boneage": tfds.features.Scalar(np.float32, doc="Bone age in months; NaN if unlabelled."),
                    "has_boneage": tfds.features.Scalar(np.bool_, doc="False for an unlabelled test split."),
                    "male": tfds.features.Scalar(np.bool_),
                    "id": tfds.features.Scalar(np.int64),
                    "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png",
                                                doc="Hand mask (255 on the hand), 1x1 when has_mask is False."),
                    "has_mask": tfds.features.Scalar(np.bool_),
                    "keypoints": tfds.features.Tensor(shape=(len(KEYPOINT_NAMES), 2), dtype=np.float32,
                                                      doc="x, y in stored-image pixels; NaN where unknown."),
                    "has_keypoints": tfds.features.Scalar(np.bool_),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            homepage="https://www.rsna.org/rsnai/ai-image-challenge/rsna-pediatric-bone-age-challenge-2017",
            citation="""@article{halabi2019rsna,
  title={The RSNA Pediatric Bone Age Machine Learning Challenge},
  author={Halabi, Safwan S and others},
  journal={Radiology}, volume={290}, number={2}, pages={498--503}, year={2019}}""",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        splits = find_splits(manual_dir)
        self.info.metadata["manual_dir"] = os.path.abspath(manual_dir)
        self.info.metadata["labelled_splits"] = sorted(n for n, s in splits.items() if s.labelled)
        self.info.metadata["split_sizes"] = {n: len(s.rows) for n, s in splits.items()}
        return {name: self._generate_examples(split, name) for name, split in splits.items()}

    def _generate_examples(self, split: SplitSource, name: str = "") -> Iterator[tuple[int, dict]]:
        max_side = self.builder_config.max_side

        def encode(row: LabelRow) -> tuple[int, dict]:
            ref = split.images[row.image_id]
            try:
                data = ref.read_bytes()
            except OSError as e:
                raise RsnaFormatError(f"{ref}: cannot read image ({e})") from e
            original = decode_grey(data, str(ref))
            image = resize_longest_side(original, max_side)
            mask = _read_mask(split.masks_dir, row.image_id, original.shape, image.shape)
            points = split.keypoints.get(row.image_id)
            if points is not None:  # pixel centres scale about the corner half a pixel out
                scale = np.float32([image.shape[1] / original.shape[1], image.shape[0] / original.shape[0]])
                points = (points + 0.5) * scale - 0.5
            return row.image_id, {
                "mask": encode_png((mask if mask is not None else np.zeros((1, 1), np.uint8))[:, :, None]),
                "has_mask": mask is not None,
                "keypoints": points if points is not None else np.full((len(KEYPOINT_NAMES), 2), np.nan, np.float32),
                "has_keypoints": points is not None,
                "image": encode_png(image[:, :, None]),
                "boneage": np.float32(row.boneage),
                "has_boneage": not math.isnan(row.boneage),
                "male": row.male,
                "id": row.image_id,
            }

        # OpenCV releases the GIL, so threads decode and encode in parallel. A progress bar with
        # the split's size on a terminal (TFDS's own bar knows no total).
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            yield from progress(pool.map(encode, split.rows), total=len(split.rows), desc=f"preparing {name}".strip())
