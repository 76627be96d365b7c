"""python -m boneage_jax.predict: PNG, JPEG and DICOM inputs, CSV, heatmaps, failures, cache,
and parity with the TFDS evaluation pipeline."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from absl import app

from boneage_jax import inference, io, predict
from helpers import write_dicom

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> str:
    """The session's tiny trained run (conftest ``tiny_run``); predict only reads it."""
    return tiny_run


def test_dicom_monochrome_window_and_rescale(tmp_path):
    pixels = (np.arange(64 * 48).reshape(64, 48) * 20).astype(np.uint16)  # 0 .. 61420
    mono2, mono1 = str(tmp_path / "m2.dcm"), str(tmp_path / "m1")  # no suffix: found by its DICM magic
    write_dicom(mono2, pixels, "MONOCHROME2", center=[30000, 20000], width=[40000, 1000])  # first value used
    write_dicom(mono1, pixels, "MONOCHROME1", center=30000, width=40000)
    a, b = io.read_image(mono2), io.read_image(mono1)
    assert a.dtype == np.uint8 and a.shape == (64, 48)
    np.testing.assert_array_equal(b, 255 - a)  # MONOCHROME1 is inverted
    values = pixels.astype(np.float64)
    assert np.all(a[values <= 10000] == 0) and np.all(a[values >= 50000] == 255)
    inside = (values > 12000) & (values < 48000)
    expected = np.clip((values - 29999.5) / 39999 + 0.5, 0, 1) * 255
    assert np.max(np.abs(a[inside] - expected[inside])) <= 0.5 + 1e-6
    # No window: min-max after the modality rescale (a negative slope flips the ramp).
    flipped = str(tmp_path / "rescaled.dcm")
    write_dicom(flipped, pixels, slope=-2.0, intercept=100.0)
    c = io.read_image(flipped)
    assert c[0, 0] == 255 and c[-1, -1] == 0
    assert io.expand_inputs([str(tmp_path)]) == sorted([mono1, mono2, flipped])


def test_single_image_spec():
    spec, notes = inference.single_image_spec(
        "hand_mask|align|roi_crop(region='hand')|resize_pad|clahe(clip_limit=2.0)")
    assert spec == "hand_mask(source='classical')|align|roi_crop(region='hand')|resize_pad|clahe(clip_limit=2.0)"
    assert len(notes) == 1 and "classical" in notes[0]
    assert inference.single_image_spec("hand_mask(source='cache', cache_dir='/x', apply=False)")[0] == \
        "hand_mask(source='classical', apply=False)"
    assert inference.single_image_spec("resize_pad") == ("resize_pad", [])
    for spec in ("hand_mask|roi_crop(region='roi2')|resize_pad", "align(source='keypoints')|resize_pad"):
        with pytest.raises(ValueError, match="keypoints"):
            inference.single_image_spec(spec)
    with pytest.raises(ValueError, match="roi3"):  # the region from data.roi
        inference.single_image_spec("roi_crop|resize_pad", {"image_size": 32, "roi": "roi3"})
    assert inference.single_image_spec("roi_crop|resize_pad", {"roi": "hand"})[0] == "roi_crop|resize_pad"


def test_csv_columns_by_head():
    rows = [predict.Prediction("a.png", True, 100.0, std=5.0), predict.Prediction("b.png", False, 50.0, std=4.0)]
    assert predict.csv_rows(rows)[0] == ["file", "sex", "boneage_months", "boneage_std_months"]
    classes = [predict.Prediction("a.png", True, 100.0, age_class=2)]
    header, body = predict.csv_rows(classes)
    assert header == ["file", "sex", "boneage_months", "age_class"] and body == [["a.png", "M", "100.0000", 2]]
    assert inference.parse_sex("female") is False and inference.parse_sex("M") is True
    assert [inference.padded_size(n, 16) for n in (1, 2, 3, 5, 16, 40)] == [1, 2, 4, 8, 16, 16]


def test_cli_png_jpeg_dicom_csv_heatmaps_and_failure(run_dir, phantom_dir, tmp_path, capsys):
    source = os.path.join(phantom_dir, "boneage-test-dataset")
    name = sorted(os.listdir(source), key=lambda n: int(n.split(".")[0]))[0]
    grey = cv2.imread(os.path.join(source, name), cv2.IMREAD_GRAYSCALE)
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), grey)
    cv2.imwrite(str(images / "b.jpg"), grey, [cv2.IMWRITE_JPEG_QUALITY, 95])
    # 16-bit; this window maps v = 257 g back to g exactly (65535 = 257 * 255).
    write_dicom(str(images / "c.dcm"), grey.astype(np.uint16) * 257, center=32768, width=65536)
    np.testing.assert_array_equal(io.read_image(str(images / "c.dcm")), grey)
    (images / "notes.txt").write_text("not an image")  # skipped by the folder expansion
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out, heatmaps = str(tmp_path / "out" / "preds.csv"), str(tmp_path / "heat")
    code = predict.main(["--workdir", run_dir, "--sex", "female", "--cache_dir", "", str(images), str(broken),
                         "--out", out, "--heatmaps", heatmaps])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.png" in captured.err and "error:" in captured.err
    assert "months" in captured.out and "years" in captured.out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "sex", "boneage_months"]
    assert [os.path.basename(r["file"]) for r in rows] == ["a.png", "b.jpg", "c.dcm"]
    assert all(r["sex"] == "F" for r in rows)
    ages = [float(r["boneage_months"]) for r in rows]
    assert ages[2] == pytest.approx(ages[0], abs=1e-3)  # the DICOM holds the PNG's pixels
    assert abs(ages[1] - ages[0]) < 5  # JPEG: nearly the same pixels
    assert sorted(os.listdir(heatmaps)) == ["a_heatmap.png", "b_heatmap.png", "c_heatmap.png"]
    heat = cv2.imread(os.path.join(heatmaps, "a_heatmap.png"))
    assert heat.shape == (256, 256, 3) and heat.std() > 0


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (its data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_each_bad_file_is_named_and_the_others_still_run(run_dir, phantom_dir, tmp_path, capsys):
    """Unusable images get a reason instead of a bone age; a hostile DICOM field or a PNG beyond
    OpenCV's pixel limit names its file; the good image is still predicted."""
    source = os.path.join(phantom_dir, "boneage-test-dataset")
    name = sorted(os.listdir(source), key=lambda n: int(n.split(".")[0]))[0]
    good = str(tmp_path / "good.png")
    cv2.imwrite(good, cv2.imread(os.path.join(source, name), cv2.IMREAD_GRAYSCALE))
    rng = np.random.default_rng(0)
    bad = {}
    for label, shape in {"5x5": (5, 5), "1x1": (1, 1), "1x2000": (1, 2000), "strip": (60, 400)}.items():
        bad[label] = str(tmp_path / f"{label}.png")
        cv2.imwrite(bad[label], rng.integers(0, 256, shape, dtype=np.uint8))
    bad["blank"] = str(tmp_path / "blank.dcm")
    write_dicom(bad["blank"], np.full((200, 160), 1000, np.uint16))
    bad["slope"] = str(tmp_path / "slope.dcm")
    write_dicom(bad["slope"], np.arange(200 * 160).reshape(200, 160) % 4096, slope="7.5", intercept="0")
    with open(bad["slope"], "rb") as f:
        raw = f.read()
    assert raw.count(b"7.5 ") == 1  # pydicom refuses to write a non-numeric DS: edit the bytes
    with open(bad["slope"], "wb") as f:
        f.write(raw.replace(b"7.5 ", b"abc "))
    bad["huge"] = str(tmp_path / "huge.png")
    with open(bad["huge"], "wb") as f:
        f.write(_png_claiming(40000, 40000))
    out = str(tmp_path / "preds.csv")
    code = predict.main(["--workdir", run_dir, "--sex", "male", "--cache_dir", "", good, *bad.values(), "--out", out])
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad), captured.err
    for label, path in bad.items():
        assert any(path in line for line in errors), f"{label} not named: {captured.err}"
    for label in ("5x5", "1x1", "1x2000"):
        assert any(f"{label}.png: rejected: too small" in line for line in errors)
    assert any("strip.png: rejected: aspect ratio" in line for line in errors)
    assert any("blank.dcm" in line and "rejected: no contrast" in line for line in errors)
    assert any("slope.dcm" in line and "RescaleSlope" in line for line in errors)
    assert any("huge.png" in line and "OpenCV" in line for line in errors)
    assert "Traceback" not in captured.err
    with open(out) as f:
        assert [r["file"] for r in csv.DictReader(f)] == [good]


def test_prediction_matches_tfds_pipeline(run_dir, phantom_dir):
    """A phantom test image read from its file equals the same record through TFDS + grain."""
    from boneage_jax import data, input_pipeline

    predictor = inference.Predictor(run_dir)
    config = predictor.run.config
    selection = data.select_splits(config.data, data.prepare(config.data), config.seed)["test"]
    batch = next(input_pipeline.eval_batches(config.data, selection, 8))
    expected = np.asarray(predictor.run.predict({"image": batch["image"], "male": batch["male"]})["boneage"])
    files = [os.path.join(phantom_dir, "boneage-test-dataset", f"{int(i)}.png") for i in batch["id"]]
    images = np.stack([predictor.prepare(predictor.load(f)) for f in files])
    np.testing.assert_allclose(images, batch["image"], atol=1e-6)
    ours = predictor.predict_arrays(images, np.asarray(batch["male"]))["boneage"]
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert input_pipeline.prepare_image(config.data, predictor.load(files[0])).shape == images[0].shape


def test_repeat_run_reuses_compilation_cache(run_dir, phantom_dir, tmp_path):
    image = os.path.join(phantom_dir, "boneage-test-dataset", sorted(os.listdir(
        os.path.join(phantom_dir, "boneage-test-dataset")))[0])
    cache = str(tmp_path / "jax_cache")
    cmd = [sys.executable, "-m", "boneage_jax.predict", "--workdir", run_dir, "--sex", "M", "--cache_dir", cache,
           image]
    env = {**os.environ, "PYTHONPATH": REPO}
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(os.listdir(cache))
    assert any("predict_step" in e for e in entries), entries
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert sorted(os.listdir(cache)) == entries  # nothing compiled anew
    assert second.stdout == first.stdout


def test_quality_check_rejects_with_the_reason_unless_forced(run_dir, phantom_dir, tmp_path, capsys):
    """An inverted radiograph and a colour photograph get "rejected: REASON" instead of a bone
    age; with --force they are predicted, marked in the output and the CSV's quality column."""
    import skimage.data

    source = os.path.join(phantom_dir, "boneage-test-dataset")
    name = sorted(os.listdir(source), key=lambda n: int(n.split(".")[0]))[0]
    grey = cv2.imread(os.path.join(source, name), cv2.IMREAD_GRAYSCALE)
    good, inverted, photo = str(tmp_path / "good.png"), str(tmp_path / "inverted.png"), str(tmp_path / "cat.jpg")
    cv2.imwrite(good, grey)
    cv2.imwrite(inverted, 255 - grey)
    cv2.imwrite(photo, cv2.cvtColor(skimage.data.chelsea(), cv2.COLOR_RGB2BGR))
    out = str(tmp_path / "preds.csv")
    code = predict.main(["--workdir", run_dir, "--sex", "F", "--cache_dir", "", good, inverted, photo, "--out", out])
    captured = capsys.readouterr()
    assert code == 1
    assert f"error: {inverted}: rejected: inverted: " in captured.err
    assert f"error: {photo}: rejected: colour photograph: " in captured.err and "--force" in captured.err
    assert "2 of 3 image(s) failed or were rejected" in captured.err
    with open(out) as f:
        assert [r["file"] for r in csv.DictReader(f)] == [good]

    code = predict.main(["--workdir", run_dir, "--sex", "F", "--cache_dir", "", good, inverted, photo, "--out", out,
                         "--force"])
    captured = capsys.readouterr()
    assert code == 0 and "rejected" not in captured.err
    lines = captured.out.splitlines()
    assert any(line.startswith(inverted) and "[quality check: inverted: " in line and "--force]" in line
               for line in lines), captured.out
    assert any(line.startswith(good) and "quality check" not in line for line in lines)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "sex", "boneage_months", "quality"]
    assert [r["quality"].split(":")[0] for r in rows] == ["", "inverted", "colour photograph"]
    assert all(np.isfinite(float(r["boneage_months"])) for r in rows)


def test_chronological_age_from_age_or_dates(run_dir, phantom_dir, tmp_path, capsys):
    """--age (or --birth_date with --exam_date) adds the chronological age and the difference to
    each line and RDES14's fields to the CSV, with no SDS (a note says why); bad or half-given
    ages are usage errors naming the flag."""
    source = os.path.join(phantom_dir, "boneage-test-dataset")
    image = os.path.join(source, sorted(os.listdir(source), key=lambda n: int(n.split(".")[0]))[0])
    out = str(tmp_path / "preds.csv")
    code = predict.main(["--workdir", run_dir, "--sex", "F", "--cache_dir", "", image, "--out", out, "--age", "9y6m"])
    captured = capsys.readouterr()
    assert code == 0
    assert "note: chronological age 114.0 months; no standard deviation score" in captured.out
    with open(out) as f:
        (row,) = list(csv.DictReader(f))
    assert list(row) == ["file", "sex", "boneage_months", *predict.CHRONOLOGICAL_COLUMNS]
    difference = float(row["boneage_months"]) - 114.0
    assert float(row["chronological_age_months"]) == 114.0
    assert float(row["boneage_minus_chronological_months"]) == pytest.approx(difference, abs=1e-3)
    assert row["sds"] == "" and row["determination"] == "unknown"
    assert f"chronological age 114.0 months, bone age minus chronological {difference:+.1f} months" in captured.out

    for args, message in [
        (["--age", "ten"], "--age 'ten': expected months"),
        (["--age", "114", "--exam_date", "2024-09-02"], "give --age or --birth_date with --exam_date"),
        (["--birth_date", "2015-03-02"], "--birth_date and --exam_date go together"),
        (["--birth_date", "2015-03-02", "--exam_date", "2014-01-01"], "the exam date 2014-01-01 is before"),
    ]:
        with pytest.raises(app.UsageError) as e:  # cli.run prints it as one error: line, exit status 2
            predict.main(["--workdir", run_dir, "--sex", "F", image, *args])
        assert str(e.value).startswith(message), args
