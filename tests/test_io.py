"""io: images from bytes in memory (format by the first bytes, the size a header declares)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from boneage_jax import io
from helpers import write_dicom


def test_format_and_declared_size_without_decoding(tmp_path):
    image = (np.arange(70 * 50) % 251).astype(np.uint8).reshape(70, 50)
    png = cv2.imencode(".png", image)[1].tobytes()
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()  # SOF2
    write_dicom(str(tmp_path / "a.dcm"), image.astype(np.uint16) * 100)
    dicom = (tmp_path / "a.dcm").read_bytes()
    assert [io.image_format(d) for d in (png, jpeg, progressive, dicom)] == ["png", "jpeg", "jpeg", "dicom"]
    for data in (png, jpeg, progressive, dicom):
        assert io.image_dimensions(data) == (50, 70)
    assert io.image_format(b"BM" + b"\0" * 200) is None  # BMP: OpenCV reads it, the service does not
    assert io.image_format(b"\0" * 10, "x.DCM") == "dicom"  # a DICOM without preamble, by its name
    assert io.image_dimensions(b"\xff\xd8\xff\xe0\x00\x10" + b"\0" * 14 + b"\xff\xda") is None  # no frame header
    assert io.image_dimensions(b"\0" * 10, "broken.dcm") is None
    np.testing.assert_array_equal(io.decode_image(png, "a.png"), image)
    np.testing.assert_array_equal(io.decode_image(dicom, "a"), io.read_image(str(tmp_path / "a.dcm")))


def test_decode_image_names_what_it_cannot_read():
    with pytest.raises(io.UnknownFormatError, match=r"notes.txt: not a PNG, JPEG or DICOM file \(its first bytes"):
        io.decode_image(b"hello there", "notes.txt")
    with pytest.raises(io.UnknownFormatError, match="empty.png: .*an empty file"):
        io.decode_image(b"", "empty.png")
    png = cv2.imencode(".png", np.full((20, 20), 7, np.uint8))[1].tobytes()
    with pytest.raises(io.ImageReadError, match="half.png: (unreadable or )?truncated"):
        io.decode_image(png[:len(png) // 2 + 8], "half.png")
    with pytest.raises(io.ImageReadError, match="bad.dcm: DICOM file has no pixel data"):
        io.decode_image(b"\0" * 128 + b"DICM" + b"\x01" * 20, "bad.dcm")
