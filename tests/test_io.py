"""io: images from bytes in memory (format by the first bytes, the size a header declares);
progress bars on terminals only."""

from __future__ import annotations

import io as std_io
import re

import cv2
import numpy as np
import pytest

import bad_inputs
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
    thumbnailed = bad_inputs.with_exif_thumbnail(jpeg, cv2.imencode(".jpg", image[:20, :10])[1].tobytes())
    for data in (png, jpeg, progressive, dicom, thumbnailed):  # the EXIF thumbnail's frame is not the image's
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


class _Terminal(std_io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_quiet_off_a_terminal_and_a_bar_on_one():
    quiet = std_io.StringIO()
    assert list(io.progress(range(5), desc="quiet", file=quiet)) == [0, 1, 2, 3, 4]
    assert quiet.getvalue() == ""
    for stream, show in ((_Terminal(), None), (std_io.StringIO(), True)):
        assert list(io.progress(iter(range(7)), total=7, desc="reading", file=stream, show=show)) == list(range(7))
        assert re.search(r"reading: 100%.*7/7", stream.getvalue()), stream.getvalue()
    closed = std_io.StringIO()
    closed.close()
    assert not io.is_terminal(closed) and not io.is_terminal(object())


def test_progress_logs_about_every_tenth_without_a_terminal():
    lines, quiet = [], std_io.StringIO()
    assert list(io.progress(range(25), desc="phantom", file=quiet, log=lines.append)) == list(range(25))
    assert quiet.getvalue() == ""
    assert [line.split(" ")[1] for line in lines] == [f"{n}/25" for n in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22,
                                                                        24, 25)]
    assert re.fullmatch(r"phantom: 25/25 images, [0-9.]+ images/s", lines[-1])
    batches = []
    list(io.progress(iter(range(3)), desc="segment test", unit="batch", file=quiet, log=batches.append))
    assert re.fullmatch(r"segment test: 3 batches, [0-9.]+ batches/s", batches[-1])  # no total: only the end
    assert len(batches) == 1
    shown = []  # a bar replaces the lines
    list(io.progress(range(25), file=_Terminal(), log=shown.append))
    assert shown == []


def test_print_above_progress_writes_the_line():
    stream = std_io.StringIO()
    io.print_above_progress("error: a.png: unreadable", file=stream)
    assert stream.getvalue() == "error: a.png: unreadable\n"


def test_one_line_joins_a_message_spread_over_lines():
    message = "Unable to decompress pixel data because all plugins are missing dependencies:\n\tgdcm - needs gdcm\n" \
              "\tpylibjpeg - needs pylibjpeg\n"
    assert io.one_line(message) == ("Unable to decompress pixel data because all plugins are missing dependencies: "
                                    "gdcm - needs gdcm; pylibjpeg - needs pylibjpeg")
    assert io.one_line("already one line") == "already one line"
    assert io.one_line("") == ""
