"""The bad-input corpus (``tests/bad_inputs.py``) through ``predict``, the dataset builder and
``weights``: each bad file is named in one ``error:`` line saying what is wrong, each usable one
gets its result."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest

import bad_inputs
from test_rsna_bone_age import build, read, write_kaggle


def test_predict_names_each_bad_file_of_the_corpus_once(tiny_run, tmp_path, capfd):
    """The whole corpus in one folder: one error line per bad file, with its reason, and nothing
    else on stderr (no libpng or OpenCV lines: ``capfd`` sees what C libraries write too); a bone
    age for every usable one; exit status 1."""
    from boneage_jax import predict

    corpus = bad_inputs.write_images(str(tmp_path / "corpus"))
    out = str(tmp_path / "preds.csv")
    capfd.readouterr()  # the fixture's training log, where it trained in this test
    code = predict.main(["--workdir", tiny_run, "--sex", "F", "--cache_dir", "", str(tmp_path / "corpus"),
                         "--out", out])
    captured = capfd.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    bad = {path: entry for path, entry in corpus.items() if entry.predict != bad_inputs.USABLE}
    others = [line for line in captured.err.splitlines() if not line.startswith("error:")]
    assert others == [f"{len(bad)} of {len(corpus)} image(s) failed or were rejected: {', '.join(sorted(bad))}"], captured.err
    assert len(errors) == len(bad), captured.err
    for path, entry in bad.items():
        named = [line for line in errors if f"{path}:" in line]
        assert len(named) == 1 and entry.predict in named[0], (entry.name, captured.err)
    with open(out) as f:
        rows = {r["file"]: float(r["boneage_months"]) for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(path for path, entry in corpus.items() if entry.predict == bad_inputs.USABLE)
    good = rows[str(tmp_path / "corpus" / "good.png")]
    for name in ("rgba.png", "palette.png", "good.dcm", "monochrome1.dcm", "progressive.jpg", "exif_thumbnail.jpg"):
        assert rows[str(tmp_path / "corpus" / name)] == pytest.approx(good, abs=2.0), name  # the same picture


@pytest.mark.parametrize("name", [e.name for e in bad_inputs.image_entries()
                                  if e.builder not in (None, bad_inputs.USABLE)])
def test_builder_names_a_bad_training_image(tmp_path, name):
    """One corpus file in place of training image 4: the build fails with an error naming it
    (its first line says what is wrong) and leaves no dataset."""
    manual = str(tmp_path / "manual")
    write_kaggle(manual)
    entry = {e.name: e for e in bad_inputs.image_entries()}[name]
    target = os.path.join(manual, "boneage-training-dataset", "boneage-training-dataset", "4.png")
    entry.write(target)
    data_dir = str(tmp_path / "data")
    with pytest.raises(ValueError) as error:
        build(manual, data_dir)
    first = str(error.value).splitlines()[0]
    assert f"{target}:" in first and entry.builder in first, first
    assert not [r for r, _, _ in os.walk(data_dir) if r.endswith("1.0.0") or "incomplete" in r]


def test_builder_takes_the_usable_images_of_the_corpus(tmp_path):
    """Eight usable corpus files (16-bit, palette, RGBA, progressive and CMYK JPEG, 1x1, 5x5,
    1x2000) in place of the eight images of a Kaggle layout: each is built, as 8-bit grey."""
    manual = str(tmp_path / "manual")
    write_kaggle(manual)
    usable = [e for e in bad_inputs.image_entries() if e.builder == bad_inputs.USABLE and e.name != "good.png"][:8]
    places = [os.path.join(manual, "boneage-training-dataset", "boneage-training-dataset", f"{i}.png")
              for i in range(1, 7)]
    places += [os.path.join(manual, "boneage-test-dataset", "boneage-test-dataset", f"{i}.png") for i in (7, 8)]
    for entry, place in zip(usable, places, strict=True):
        entry.write(place)
    build(manual, str(tmp_path / "data"))
    from tfds_rsna import rsna_bone_age

    built = {**read(str(tmp_path / "data"), "train"), **read(str(tmp_path / "data"), "test")}
    for i, place in enumerate(places, start=1):
        with open(place, "rb") as f:
            expected = rsna_bone_age.decode_grey(f.read(), place)
        image = np.asarray(built[i]["image"])
        assert image.dtype == np.uint8 and image[..., 0].shape == expected.shape, usable[i - 1].name
        np.testing.assert_array_equal(image[..., 0], expected)


def test_weights_names_each_broken_weight_file(tmp_path, capsys):
    """Zero-byte, truncated and wrong-format .h5, .safetensors and .pth files: one error line
    naming the file and what is wrong, exit status 2, nothing written at --out."""
    from boneage_jax import weights

    for path, (framework, words) in bad_inputs.write_weight_files(str(tmp_path / "files")).items():
        out = str(tmp_path / "out")
        code = weights.main(["--from", framework, "--model", "vgg16", "--in", path, "--out", out])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (path, err)
        assert lines[0].startswith(f"error: {path}: ") and words in lines[0], lines[0]
        assert not os.path.exists(out)
    shutil.rmtree(tmp_path / "files")
