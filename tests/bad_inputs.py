"""A corpus of hostile and odd input files, written by the tests that feed it to ``predict``, the
dataset builder and ``weights``.

:func:`write_images` writes radiograph-like inputs (PNG, JPEG, DICOM) into a folder and
:func:`write_weight_files` broken weight files; each :class:`Entry` says what each consumer is to
make of its file: :data:`USABLE` (a correct result) or the words its one ``error:`` line must
contain besides the file's name. Nothing is large: the "huge" PNG only declares its size.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from collections.abc import Callable

import cv2
import numpy as np

from helpers import write_dicom
from tfds_rsna import phantom

USABLE = "usable"


@dataclasses.dataclass(frozen=True)
class Entry:
    """A corpus file and what is expected of it: by ``predict`` (every entry) and by the dataset
    builder as a training image (None: not a format the RSNA layout holds, e.g. DICOM)."""

    name: str
    predict: str
    builder: str | None
    write: Callable[[str], None] = dataclasses.field(repr=False, compare=False)


def hand(seed: int = 0, shape: tuple[int, int] = (200, 160)) -> np.ndarray:
    """A phantom hand radiograph (uint8 grey, ``tfds_rsna.phantom``): passes ``predict``'s
    quality checks."""
    rng = np.random.default_rng(seed)
    return phantom.render_phantom(120.0, True, rng, *shape)[0]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk with its length and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR declares ``width`` x ``height`` grey pixels; its data is a
    few bytes (nothing of that size is allocated)."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + png_chunk(b"IEND", b""))


def _bytes(data: bytes) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)
    return write


def _flip(data: bytes, offset: int) -> bytes:
    """``data`` with the bits of one byte inverted."""
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


def with_exif_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
    """``jpeg`` with an EXIF APP1 segment after its SOI that carries ``thumbnail`` (a whole JPEG,
    so the file holds a second complete image with its own end marker)."""
    ifd1_offset, entries = 14, 2  # TIFF header (8 bytes), then an empty IFD0 (6 bytes) that links to IFD1
    data_offset = ifd1_offset + 2 + 12 * entries + 4
    tiff = (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<HI", 0, ifd1_offset)
            + struct.pack("<H", entries) + struct.pack("<HHII", 0x0201, 4, 1, data_offset)  # JPEGInterchangeFormat
            + struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0) + thumbnail)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _encoded(suffix: str, image: np.ndarray, params: tuple = (), keep: Callable[[bytes], bytes] = bytes
             ) -> Callable[[str], None]:
    def write(path: str) -> None:
        ok, buffer = cv2.imencode(suffix, image, list(params))
        assert ok
        _bytes(keep(buffer.tobytes()))(path)
    return write


def _cmyk_jpeg(path: str) -> None:
    from PIL import Image

    grey = hand(3)
    cmyk = np.stack([np.zeros_like(grey)] * 3 + [255 - grey], axis=-1)
    Image.fromarray(cmyk, mode="CMYK").save(path, format="JPEG", quality=95)


def _palette_png(path: str) -> None:
    from PIL import Image

    Image.fromarray(hand(4)).convert("P").save(path, format="PNG")


def _dicom(pixels: np.ndarray, edit: Callable[[bytes], bytes] | None = None, **kwargs) -> Callable[[str], None]:
    def write(path: str) -> None:
        write_dicom(path, pixels, **kwargs)
        if edit is not None:
            with open(path, "rb") as f:
                data = f.read()
            _bytes(edit(data))(path)
    return write


def _dicom_with(change: Callable) -> Callable[[str], None]:
    """A valid DICOM of :func:`hand`, changed through pydicom by ``change(dataset)``."""
    def write(path: str) -> None:
        import pydicom

        write_dicom(path, hand(5).astype(np.uint16) * 16)
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)
    return write


def _replace_once(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        assert data.count(old) == 1, old  # pydicom refuses to write some bad values: edit the bytes
        return data.replace(old, new)
    return edit


def _remove_pixel_data(ds) -> None:
    del ds.PixelData


def _wrong_rows(ds) -> None:
    ds.Rows = ds.Rows * 4  # the pixel data holds a quarter of what the header says


def _unsupported_syntax(ds) -> None:
    """JPEG-LS lossless, its one frame garbage: no installed decoder reads it."""
    from pydicom.encaps import encapsulate

    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    ds.PixelData = encapsulate([b"\xff\x00" * 32])
    ds["PixelData"].VR = "OB"


def image_entries() -> list[Entry]:
    """The image corpus; its file names are unique."""
    good = hand(0)
    png = cv2.imencode(".png", good)[1].tobytes()
    jpeg = cv2.imencode(".jpg", good, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    rng = np.random.default_rng(1)
    return [
        Entry("good.png", USABLE, USABLE, _bytes(png)),
        Entry("zero_bytes.png", "image file is empty", "image file is empty", _bytes(b"")),
        Entry("header_only.png", "truncated PNG", "truncated PNG", _bytes(png[:33])),
        Entry("crc_damaged.png", "fails its CRC check", "fails its CRC check", _bytes(_flip(png, 45))),
        Entry("cut_mid_stream.png", "truncated", "truncated", _bytes(png[: len(png) // 2])),
        Entry("cut_mid_stream.jpg", "truncated", "truncated", _bytes(jpeg[: len(jpeg) // 2])),
        Entry("cut_with_whole_exif_thumbnail.jpg", "truncated", "truncated",
              _bytes(with_exif_thumbnail(jpeg[: len(jpeg) // 2], cv2.imencode(".jpg", cv2.resize(good, (40, 50)))[1]
                                         .tobytes()))),
        Entry("exif_thumbnail.jpg", USABLE, USABLE,
              _bytes(with_exif_thumbnail(jpeg, cv2.imencode(".jpg", cv2.resize(good, (40, 50)))[1].tobytes()))),
        Entry("text.png", "unreadable", "unreadable", _bytes(b"this is not a picture\n" * 20)),
        Entry("huge_100000x100000.png", "OpenCV", "OpenCV", _bytes(png_claiming(100000, 100000))),
        Entry("sixteen_bit.png", USABLE, USABLE, _encoded(".png", good.astype(np.uint16) * 257)),
        Entry("palette.png", USABLE, USABLE, _palette_png),
        Entry("rgba.png", USABLE, USABLE, _encoded(".png", cv2.cvtColor(good, cv2.COLOR_GRAY2BGRA))),
        Entry("progressive.jpg", USABLE, USABLE, _encoded(".jpg", good, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))),
        Entry("cmyk.jpg", USABLE, USABLE, _cmyk_jpeg),
        Entry("1x1.png", "rejected: too small", USABLE, _encoded(".png", rng.integers(0, 256, (1, 1), np.uint8))),
        Entry("5x5.png", "rejected: too small", USABLE, _encoded(".png", rng.integers(0, 256, (5, 5), np.uint8))),
        Entry("1x2000.png", "rejected: too small", USABLE,
              _encoded(".png", rng.integers(0, 256, (1, 2000), np.uint8))),
        Entry("blank.png", "rejected: no contrast", USABLE, _encoded(".png", np.full((200, 160), 90, np.uint8))),
        Entry("good.dcm", USABLE, None, _dicom(good.astype(np.uint16) * 16)),
        Entry("monochrome1.dcm", USABLE, None, _dicom(65535 - good.astype(np.uint16) * 257, photometric="MONOCHROME1")),
        Entry("slope_not_a_number.dcm", "RescaleSlope", None,
              _dicom(good.astype(np.uint16), slope="7.5", intercept="0", edit=_replace_once(b"7.5 ", b"abc "))),
        Entry("no_pixel_data.dcm", "no pixel data", None, _dicom_with(_remove_pixel_data)),
        Entry("rows_do_not_match.dcm", "pixel data", None, _dicom_with(_wrong_rows)),
        Entry("unsupported_syntax.dcm", "transfer syntax", None, _dicom_with(_unsupported_syntax)),
        Entry("zero_bytes.dcm", "not a readable DICOM", None, _bytes(b"")),
        Entry("text.dcm", "not a readable DICOM", None, _bytes(b"this is not a DICOM file\n" * 20)),
    ]


def write_images(folder: str) -> dict[str, Entry]:
    """Writes the image corpus into ``folder``; returns its entries by path."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    for entry in image_entries():
        path = os.path.join(folder, entry.name)
        entry.write(path)
        written[path] = entry
    return written


def write_weight_files(folder: str) -> dict[str, tuple[str, str]]:
    """Broken weight files in ``folder``: path -> (framework, words its error must contain)."""
    import h5py

    os.makedirs(folder, exist_ok=True)
    good_h5 = os.path.join(folder, ".whole.h5")
    with h5py.File(good_h5, "w") as f:
        f.create_dataset("block1_conv1/block1_conv1/kernel:0", data=np.ones((3, 3, 3, 4), np.float32))
    with open(good_h5, "rb") as f:
        h5 = f.read()
    os.remove(good_h5)
    safetensors = _safetensors({"conv.weight": np.ones((4, 3, 3, 3), np.float32)})
    files = {
        "zero_bytes.h5": ("keras", b"", "not an HDF5 file"),
        "truncated.h5": ("keras", h5[: len(h5) // 3], "HDF5"),
        "text.h5": ("keras", b"weights? no.\n" * 20, "not an HDF5 file"),
        "zero_bytes.safetensors": ("torch", b"", "not a safetensors file"),
        "truncated.safetensors": ("torch", safetensors[: len(safetensors) - 20], "safetensors"),
        "text.safetensors": ("torch", b"weights? no.\n" * 20, "not a safetensors file"),
        "zero_bytes.pth": ("torch", b"", "not a torch file"),
        "truncated.pth": ("torch", b"PK\x03\x04" + b"\0" * 40, "torch"),
        "text.pth": ("torch", b"weights? no.\n" * 20, "not a torch file"),
    }
    written = {}
    for name, (framework, data, words) in files.items():
        path = os.path.join(folder, name)
        _bytes(data)(path)
        written[path] = (framework, words)
    return written


def _safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    """The bytes of a safetensors file holding float32 ``tensors`` (the format by hand)."""
    import json

    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)
