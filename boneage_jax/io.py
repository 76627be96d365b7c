"""Files in and out: atomic writes, and radiographs read from PNG, JPEG and DICOM files.

Every write goes to a temporary file beside its target that is then renamed into place, so an
interrupted run leaves the previous file (or none), never a partial one: :func:`write_bytes`,
:func:`write_text`, :func:`write_json` (on process 0 only), :func:`write_csv`,
:func:`write_png`.

:func:`read_image` reads a PNG, JPEG or DICOM radiograph as uint8 grey (or, asked to, a colour
PNG/JPEG as BGR, for the quality check to see that it is a photograph; DICOM through
:func:`read_dicom`: modality rescale, the first VOI window or else min-max, MONOCHROME1
inverted); :func:`expand_inputs` turns folders into their image files. A file that cannot be
read raises :class:`ImageReadError` naming it. :func:`decode_image` does the same for the
bytes of an upload, in memory, after :func:`image_format` (PNG, JPEG or DICOM by their first
bytes) and :func:`image_dimensions` (the size a header declares, read before any pixel is
decoded) have let a server refuse other files and huge images.

:class:`FileLock` keeps a directory (a workdir, a dataset being prepared) to one process at a
time and names the holder to anyone else; :func:`unwritable` finds the folder or file of a set
that cannot be written (:class:`NotWritableError` says so).

:func:`progress` shows a progress bar (tqdm) over long work a person waits for, on a terminal
only: every command's loops use it, and :func:`print_above_progress` prints a message without
breaking a bar.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TextIO, TypeVar

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
DICOM_MAGIC = b"DICM"  # at byte 128 of a DICOM Part 10 file


class ImageReadError(ValueError):
    """An input image could not be read or preprocessed."""


# ----------------------------------------------------------------------------- atomic writes


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically, creating its folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def jsonable(value):
    """A value as JSON writes it: numpy scalars as Python numbers, non-finite floats as None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, obj) -> None:
    """Writes JSON (indented, keys sorted; numpy scalars as numbers, NaN as null) atomically, on
    process 0 only."""
    import jax  # pylint: disable=import-outside-toplevel

    if jax.process_index() != 0:
        return
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=jsonable) + "\n")


def log(message: str) -> None:
    """A progress or summary line of a run: to absl's log, and printed by process 0 only."""
    import jax  # pylint: disable=import-outside-toplevel
    from absl import logging  # pylint: disable=import-outside-toplevel

    logging.info(message)
    if jax.process_index() == 0:
        print(message, flush=True)


def write_csv(path: str, header: Sequence, rows: Iterable[Sequence]) -> None:
    """Writes a CSV with a header row atomically."""
    buffer = _io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def write_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 image (grey or BGR) as PNG atomically."""
    import cv2  # pylint: disable=import-outside-toplevel

    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    write_bytes(path, buffer.tobytes())


# ----------------------------------------------------------------------------- progress

T = TypeVar("T")


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an open terminal (not a file, a pipe or a captured stream)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "image", *,
             file: TextIO | None = None, show: bool | None = None,
             log: Callable[[str], None] | None = None) -> Iterator[T]:
    """Yields ``items`` with a tqdm progress bar on ``file`` (default: stderr at the time of the
    call) when that is a terminal, or when ``show`` is True; ``total`` defaults to
    ``len(items)``. Without a bar it prints nothing, or, given ``log``, a line about every 10% of
    ``total`` and one at the end: ``"DESC: DONE/TOTAL UNITs, RATE UNITs/s"``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    stream = sys.stderr if file is None else file
    if show is None:
        show = is_terminal(stream)
    if show:
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel

        with tqdm(items, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True) as bar:
            yield from bar
        return
    if log is None:
        yield from items
        return
    step = max(1, total // 10) if total else 0  # no total: the end only
    start, done = time.perf_counter(), 0
    for done, item in enumerate(items, start=1):
        yield item
        if step and done % step == 0 and done != total:
            log(_progress_line(desc, done, total, unit, start))
    log(_progress_line(desc, done, total, unit, start))


def _progress_line(desc: str, done: int, total: int | None, unit: str, start: float) -> str:
    rate = done / max(time.perf_counter() - start, 1e-9)
    count = f"{done}/{total}" if total is not None else f"{done}"
    return f"{desc}: {count} {plural(unit)}, {rate:.1f} {plural(unit)}/s"


def print_above_progress(message: str, file: TextIO | None = None) -> None:
    """Prints ``message`` (to stderr by default) above any progress bar on the screen, which is
    drawn again below it (``tqdm.write``); without a bar, a plain print."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    tqdm.write(message, file=sys.stderr if file is None else file)


# ----------------------------------------------------------------------------- locks


class NotWritableError(PermissionError):
    """A folder or file that a command must write cannot be written (read-only, or not the user's)."""


def unwritable(paths: Iterable[str]) -> str | None:
    """The first of ``paths`` that this process cannot write (a folder: create files in; a file:
    append to), or, for a path that does not exist, its nearest existing folder that it cannot
    create it in; None when every one can be written. Writes nothing (``os.access``, which also
    sees read-only mounts)."""
    for path in paths:
        path = os.path.abspath(path)
        while not os.path.lexists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        mode = os.W_OK | os.X_OK if os.path.isdir(path) else os.W_OK
        if not os.access(path, mode):
            return path
    return None


class LockedError(RuntimeError):
    """Another live process holds the lock."""


class FileLock:
    """An exclusive lock on ``path`` (``fcntl.flock``) that names its holder.

    The operating system releases it when the holding process ends, however it ends, so the
    lock of a killed run never blocks the next one. ``acquire`` raises :class:`LockedError`
    naming the holder (pid, host, start time, command) while another process holds it."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                info = json.load(f)
            return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                    f"{' '.join(info.get('command', []))}")
        except (OSError, ValueError, KeyError):
            return "another process"

    def acquire(self, wait: bool = False, message: Callable[[str], None] = print) -> FileLock:
        """Takes the lock; with ``wait``, waits for its holder (telling ``message`` who) instead
        of raising :class:`LockedError`."""
        import datetime  # pylint: disable=import-outside-toplevel
        import fcntl  # pylint: disable=import-outside-toplevel
        import socket  # pylint: disable=import-outside-toplevel
        import sys  # pylint: disable=import-outside-toplevel

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait:
                message(f"waiting for {self.what}, in use by {self.holder()}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                os.close(fd)
                raise LockedError(f"{self.what} is in use by {self.holder()} (lock {self.path}); wait for that "
                                  f"run to end or choose another directory") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv,
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- reading images


def is_dicom(path: str) -> bool:
    """Whether the file starts like a DICOM Part 10 file (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == DICOM_MAGIC


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Files stay as they are; a folder becomes its image files (by suffix or DICOM magic), sorted."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if name.startswith(".") or not os.path.isfile(full):
                    continue
                if name.lower().endswith(IMAGE_SUFFIXES) or is_dicom(full):
                    files.append(full)
        else:
            files.append(path)
    return files


def _first(value) -> float:
    """A DICOM numeric value that may be multi-valued -> its first value."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def dicom_to_uint8(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", slope: float = 1.0,
                   intercept: float = 0.0, window_center: float | None = None,
                   window_width: float | None = None) -> np.ndarray:
    """Stored DICOM pixel values -> uint8 grey: modality rescale, then the linear VOI window
    (PS3.3 C.11.2.1.2.1) when given, else min-max; MONOCHROME1 is inverted (bone white)."""
    values = pixels.astype(np.float64) * slope + intercept
    if window_center is not None and window_width is not None and window_width >= 1:
        c, w = window_center, window_width
        scaled = np.clip(((values - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5), 0.0, 1.0)
    else:
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    out = np.round(scaled * 255.0).astype(np.uint8)
    if photometric.strip().upper() == "MONOCHROME1":
        out = 255 - out
    return out


def _pydicom():
    try:
        import pydicom  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError("reading DICOM needs pydicom: pip install pydicom") from e
    return pydicom


def one_line(text: str) -> str:
    """``text`` (an exception's message, which libraries sometimes spread over lines) as one line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "".join(line if i == 0 else (" " if lines[i - 1].endswith(":") else "; ") + line
                   for i, line in enumerate(lines))


def read_dicom(path: str) -> np.ndarray:
    """A DICOM radiograph -> uint8 grey (H, W) (see :func:`dicom_to_uint8`)."""
    return _dicom_image(path, path)


def _dicom_image(source, path: str) -> np.ndarray:
    """The uint8 grey image of a DICOM file or file object ``source`` (``path`` names it in messages)."""
    try:
        ds = _pydicom().dcmread(source)
    except Exception as e:  # pydicom raises several types for damaged files
        raise ImageReadError(f"{path}: not a readable DICOM file ({one_line(e)})") from e
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file has no pixel data")
    if _dicom_number(ds, path, "NumberOfFrames", 1) > 1:  # before decoding every frame
        raise ImageReadError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise ImageReadError(f"{path}: cannot decode the DICOM pixel data "
                             f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}): {one_line(e)}") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if _dicom_number(ds, path, "SamplesPerPixel", 1) > 1:
        import cv2  # pylint: disable=import-outside-toplevel

        pixels = cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]), cv2.COLOR_RGB2GRAY)
        photometric = "MONOCHROME2"
    if pixels.ndim != 2:
        raise ImageReadError(f"{path}: unsupported DICOM pixel array shape {pixels.shape}")
    center = ds.get("WindowCenter")
    width = ds.get("WindowWidth")
    try:
        center = _first(center) if center is not None and str(center) != "" else None
        width = _first(width) if width is not None and str(width) != "" else None
    except (TypeError, ValueError, IndexError):
        center = width = None
    return dicom_to_uint8(pixels, photometric=photometric, slope=_dicom_number(ds, path, "RescaleSlope", 1.0),
                          intercept=_dicom_number(ds, path, "RescaleIntercept", 0.0), window_center=center,
                          window_width=width)


def _dicom_number(ds, path: str, field: str, default: float) -> float:
    """A numeric DICOM field (``default`` where absent or empty); ImageReadError naming the file
    and the field when its value is not a finite number."""
    value = ds.get(field)
    if value is None or str(value).strip() == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ImageReadError(f"{path}: DICOM field {field} is {str(value)[:40]!r}, not a number") from None
    if not math.isfinite(number):
        raise ImageReadError(f"{path}: DICOM field {field} is {number}, not a finite number")
    return number


def keep_colour(pixels: np.ndarray, source: str) -> np.ndarray:
    """A decoded PNG/JPEG (``rsna_bone_age.decode_pixels``) -> uint8 BGR (H, W, 3) when its
    colour channels differ, else uint8 grey (H, W) (a grey radiograph stored as RGB is grey)."""
    from tfds_rsna import rsna_bone_age  # pylint: disable=import-outside-toplevel

    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        bgr = pixels[:, :, :3]
        if not (np.array_equal(bgr[:, :, 0], bgr[:, :, 1]) and np.array_equal(bgr[:, :, 0], bgr[:, :, 2])):
            if bgr.dtype != np.uint8:  # 16-bit or float colour: min-max to 8 bits, as grey images
                bgr = rsna_bone_age.minmax_uint8(bgr)
            return np.ascontiguousarray(bgr)
    return rsna_bone_age.to_grey_uint8(pixels, source)


def read_image(path: str, colour: bool = False) -> np.ndarray:
    """PNG, JPEG or DICOM file -> uint8 grey (H, W); ImageReadError (naming the file) otherwise.
    With ``colour``, a PNG or JPEG whose colour channels differ comes as uint8 BGR (H, W, 3)
    (:func:`keep_colour`; what ``boneage_jax.quality`` reads to tell a photograph); DICOM is grey."""
    if not os.path.exists(path):
        raise ImageReadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageReadError(f"{path}: is a folder")
    if path.lower().endswith(".dcm") or is_dicom(path):
        return read_dicom(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageReadError(f"{path}: {e.strerror}") from e
    return _decode(data, path, colour)


def _decode(data: bytes, name: str, colour: bool) -> np.ndarray:
    """PNG or JPEG bytes -> uint8 grey, or with ``colour`` :func:`keep_colour`'s image."""
    from tfds_rsna import rsna_bone_age  # pylint: disable=import-outside-toplevel

    try:
        if colour:
            return keep_colour(rsna_bone_age.decode_pixels(data, name), name)
        return rsna_bone_age.decode_grey(data, name)
    except rsna_bone_age.RsnaFormatError as e:
        raise ImageReadError(str(e)) from e


# ----------------------------------------------------------------------------- images in memory (serve)

IMAGE_FORMATS = "a PNG, JPEG or DICOM file"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# JPEG start-of-frame markers (they hold the image size): C0-CF but DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class UnknownFormatError(ImageReadError):
    """The bytes are not those of a PNG, JPEG or DICOM file."""


def image_format(data: bytes, name: str = "") -> str | None:
    """``png``, ``jpeg`` or ``dicom`` by the first bytes (DICOM also by a ``.dcm`` ``name``: files
    without the 128-byte preamble); None for anything else."""
    from tfds_rsna.rsna_bone_age import PNG_SIGNATURE  # pylint: disable=import-outside-toplevel

    if data[:8] == PNG_SIGNATURE:
        return "png"
    if data[:3] == JPEG_SIGNATURE:
        return "jpeg"
    if data[128:132] == DICOM_MAGIC or name.lower().endswith(".dcm"):
        return "dicom"
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment of a JPEG; None where not found."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                return None
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height) if width and height else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def image_dimensions(data: bytes, name: str = "") -> tuple[int, int] | None:
    """(width, height) that a PNG, JPEG or DICOM file declares in its header, read without
    decoding its pixels (so that a huge image can be refused before it takes the memory); None
    where the header does not say (the decoder then names what is wrong)."""
    kind = image_format(data, name)
    if kind == "png":
        from tfds_rsna.rsna_bone_age import png_size  # pylint: disable=import-outside-toplevel

        return png_size(data)
    if kind == "jpeg":
        return _jpeg_dimensions(data)
    if kind == "dicom":
        try:
            ds = _pydicom().dcmread(_io.BytesIO(data), stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        except Exception:  # pylint: disable=broad-except  # damaged or without a size: the decoder says why
            return None
    return None


def decode_image(data: bytes, name: str, colour: bool = False) -> np.ndarray:
    """The bytes of a PNG, JPEG or DICOM file -> uint8 grey (H, W), decoded in memory (as
    :func:`read_image` reads files; ``colour`` as there). :class:`UnknownFormatError` for bytes
    of any other kind, :class:`ImageReadError` for a damaged or unsupported image; both name
    ``name``."""
    kind = image_format(data, name)
    if kind is None:
        what = "an empty file" if not data else f"its first bytes are {data[:8]!r}"
        raise UnknownFormatError(f"{name}: not {IMAGE_FORMATS} ({what})")
    if kind == "dicom":
        return _dicom_image(_io.BytesIO(data), name)
    return _decode(data, name, colour)
