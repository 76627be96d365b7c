"""The RSNA builder: both layouts, conversions, clear errors, nothing half-built."""

from __future__ import annotations

import os
import struct
import zipfile
import zlib

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_rsna import rsna_bone_age

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
SHARED_SAMPLE = os.path.join(SHARED, "rsna_sample")
SHARED_FORMATS = os.path.join(SHARED, "rsna_formats")


def _image(seed: int, shape=(90, 70)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write_png(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, image)


def _write(path: str, text: str) -> None:
    with open(path, "w", newline="") as f:
        f.write(text)


def write_kaggle(root: str, nested: bool = True) -> dict[int, np.ndarray]:
    """Kaggle layout: train CSV + doubly nested images, unlabelled test CSV + images."""
    images = {i: _image(i) for i in range(1, 9)}
    train_dir = os.path.join(root, "boneage-training-dataset")
    if nested:
        train_dir = os.path.join(train_dir, "boneage-training-dataset")
    rows = ["id,boneage,male"]
    for i in range(1, 7):
        rows.append(f"{i},{20 * i},{'True' if i % 2 else 'False'}")
        _write_png(os.path.join(train_dir, f"{i}.png"), images[i])
    _write(os.path.join(root, "boneage-training-dataset.csv"), "\n".join(rows) + "\n")
    _write(os.path.join(root, "boneage-test-dataset.csv"), "Case ID,Sex\r\n7,M\r\n8,F\r\n")
    for i in (7, 8):
        _write_png(os.path.join(root, "boneage-test-dataset", "boneage-test-dataset", f"{i}.png"), images[i])
    return images


def write_official(root: str) -> dict[int, np.ndarray]:
    """Official layout: train as Kaggle, validation CSV + two zips, test xlsx + images."""
    import openpyxl

    images = {i: _image(i) for i in range(1, 11)}
    rows = ["id,boneage,male"]
    for i in range(1, 5):
        rows.append(f"{i},{30 * i},True")
        _write_png(os.path.join(root, "boneage-training-dataset", f"{i}.png"), images[i])
    _write(os.path.join(root, "boneage-training-dataset.csv"), "\n".join(rows) + "\n")
    _write(os.path.join(root, "Validation Dataset.csv"), "Image ID,male,Bone Age (months)\r\n5,TRUE,12\r\n6,FALSE,200\r\n7,FALSE,99\r\n")
    for part, ids in ((1, (5, 6)), (2, (7,))):
        with zipfile.ZipFile(os.path.join(root, f"boneage-validation-dataset-{part}.zip"), "w") as archive:
            for i in ids:
                ok, buf = cv2.imencode(".png", images[i])
                archive.writestr(f"boneage-validation-dataset-{part}/{i}.png", buf.tobytes())
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(["Case ID", "Sex", "Ground truth bone age (months)"])
    for i, sex, age in ((8, "M", 168.9), (9, "F", 73.25), (10, "F", 0.5)):
        sheet.append([i, sex, age])
        _write_png(os.path.join(root, "boneage-test-dataset", f"{i}.png"), images[i])
    workbook.save(os.path.join(root, "Bone age ground truth.xlsx"))
    return images


def build(manual_dir: str, data_dir: str, config: str = "original"):
    builder = tfds.builder(f"rsna_bone_age/{config}", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def read(data_dir: str, split: str, config: str = "original") -> dict[int, dict]:
    source = tfds.data_source(f"rsna_bone_age/{config}", data_dir=data_dir, split=split)
    return {int(e["id"]): e for e in (source[i] for i in range(len(source)))}


def test_kaggle_layout(tmp_path):
    images = write_kaggle(str(tmp_path / "manual"))
    builder = build(str(tmp_path / "manual"), str(tmp_path / "data"))
    assert set(builder.info.splits.keys()) == {"train", "test"}
    assert builder.info.metadata["labelled_splits"] == ["train"]
    train = read(str(tmp_path / "data"), "train")
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    assert train[3]["boneage"] == 60.0 and train[3]["male"] and train[3]["has_boneage"]
    assert not train[2]["male"]
    assert train[3]["image"].shape == (90, 70, 1) and train[3]["image"].dtype == np.uint8
    np.testing.assert_array_equal(train[3]["image"][:, :, 0], images[3])
    test = read(str(tmp_path / "data"), "test")
    assert sorted(test) == [7, 8]
    assert np.isnan(test[7]["boneage"]) and not test[7]["has_boneage"] and test[7]["male"] and not test[8]["male"]


def test_kaggle_layout_single_nesting(tmp_path):
    write_kaggle(str(tmp_path / "manual"), nested=False)
    build(str(tmp_path / "manual"), str(tmp_path / "data"))
    assert len(read(str(tmp_path / "data"), "train")) == 6


def test_official_layout_with_zips_and_xlsx(tmp_path):
    images = write_official(str(tmp_path / "manual"))
    builder = build(str(tmp_path / "manual"), str(tmp_path / "data"))
    assert set(builder.info.splits.keys()) == {"train", "validation", "test"}
    assert builder.info.metadata["labelled_splits"] == ["test", "train", "validation"]
    validation = read(str(tmp_path / "data"), "validation")
    assert sorted(validation) == [5, 6, 7]
    assert validation[6]["boneage"] == 200.0 and not validation[6]["male"] and validation[5]["male"]
    np.testing.assert_array_equal(validation[7]["image"][:, :, 0], images[7])
    test = read(str(tmp_path / "data"), "test")
    assert test[9]["boneage"] == pytest.approx(73.25) and not test[9]["male"] and test[8]["male"]
    assert test[10]["has_boneage"]


def test_extracted_validation_folders_are_read(tmp_path):
    manual = str(tmp_path / "manual")
    write_official(manual)
    for part in (1, 2):
        archive = os.path.join(manual, f"boneage-validation-dataset-{part}.zip")
        with zipfile.ZipFile(archive) as z:
            z.extractall(os.path.join(manual, f"boneage-validation-dataset-{part}"))
        os.remove(archive)
    build(manual, str(tmp_path / "data"))
    assert sorted(read(str(tmp_path / "data"), "validation")) == [5, 6, 7]


def test_downscaled_configs_keep_aspect(tmp_path):
    manual = str(tmp_path / "manual")
    write_kaggle(manual)
    big = _image(0, (1300, 700))
    _write_png(os.path.join(manual, "boneage-training-dataset", "boneage-training-dataset", "1.png"), big)
    build(manual, str(tmp_path / "data"), "max512")
    train = read(str(tmp_path / "data"), "train", "max512")
    assert train[1]["image"].shape == (512, round(700 * 512 / 1300), 1)
    assert train[2]["image"].shape == (90, 70, 1)  # never upscaled


def _palette_png(indices: np.ndarray, palette: np.ndarray) -> bytes:
    """A colour-type-3 (palette) PNG, which OpenCV cannot write."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    height, width = indices.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    raw = b"".join(b"\x00" + indices[r].astype(np.uint8).tobytes() for r in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", palette.astype(np.uint8).tobytes())
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_colour_palette_and_16bit_inputs_become_8bit_grey(tmp_path):
    manual = str(tmp_path / "manual")
    write_kaggle(manual)
    folder = os.path.join(manual, "boneage-training-dataset", "boneage-training-dataset")
    grey = _image(1)
    bgr = np.repeat(grey[:, :, None], 3, axis=2)
    _write_png(os.path.join(folder, "1.png"), bgr)
    _write_png(os.path.join(folder, "2.png"), np.concatenate([bgr, np.full_like(grey[:, :, None], 255)], axis=2))
    wide = np.linspace(1000, 5000, 90 * 70).reshape(90, 70).astype(np.uint16)
    _write_png(os.path.join(folder, "3.png"), wide)
    palette = np.stack([np.arange(256)] * 3, axis=1)
    with open(os.path.join(folder, "4.png"), "wb") as f:
        f.write(_palette_png(grey, palette))
    build(manual, str(tmp_path / "data"))
    train = read(str(tmp_path / "data"), "train")
    for i in (1, 2, 4):
        np.testing.assert_array_equal(train[i]["image"][:, :, 0], grey)
    scaled = train[3]["image"][:, :, 0]
    assert scaled.min() == 0 and scaled.max() == 255 and np.all(np.diff(scaled.ravel().astype(int)) >= 0)


def _expect_error(tmp_path, match: str) -> None:
    data_dir = str(tmp_path / "data")
    with pytest.raises(Exception, match=match):
        build(str(tmp_path / "manual"), data_dir)
    built = [r for r, _, _ in os.walk(data_dir) if os.path.basename(r).endswith("1.0.0") or "incomplete" in r]
    assert not built, f"half-built dataset left behind: {built}"


def test_label_files_without_rows_leave_their_split_out(tmp_path):
    """The phantom writer's --num_validation 0 --num_test 0 writes label files with headers alone."""
    from tfds_rsna import phantom

    phantom.write_dataset(tmp_path / "manual", num_train=2, num_validation=0, num_test=0, seed=0, height=160,
                          width=128, log=lambda line: None)
    builder = build(str(tmp_path / "manual"), str(tmp_path / "data"))
    assert set(builder.info.splits.keys()) == {"train"}
    assert len(read(str(tmp_path / "data"), "train")) == 2


def test_a_training_label_file_without_rows_is_named(tmp_path):
    write_kaggle(str(tmp_path / "manual"))
    _write(str(tmp_path / "manual" / "boneage-training-dataset.csv"), "id,boneage,male\n")
    _expect_error(tmp_path, "boneage-training-dataset.csv has no rows: the training split needs labelled images")


def test_missing_train_csv(tmp_path):
    write_kaggle(str(tmp_path / "manual"))
    os.remove(tmp_path / "manual" / "boneage-training-dataset.csv")
    _expect_error(tmp_path, "boneage-training-dataset.csv is missing")


def test_unexpected_header(tmp_path):
    write_kaggle(str(tmp_path / "manual"))
    _write(str(tmp_path / "manual" / "boneage-test-dataset.csv"), "id,sex\n7,M\n")
    _expect_error(tmp_path, r"boneage-test-dataset.csv: header is \['id', 'sex'\]; expected \['Case ID', 'Sex'\]")


def test_row_without_image(tmp_path):
    write_kaggle(str(tmp_path / "manual"))
    with open(tmp_path / "manual" / "boneage-training-dataset.csv", "a") as f:
        f.write("99,100,True\n")
    _expect_error(tmp_path, r"boneage-training-dataset.csv:8: no image 99.png")


def test_truncated_image(tmp_path):
    write_kaggle(str(tmp_path / "manual"))
    path = tmp_path / "manual" / "boneage-training-dataset" / "boneage-training-dataset" / "4.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path, r"4.png: (unreadable or truncated|truncated PNG)")


def test_png_with_bytes_after_its_end_is_complete():
    """Some writers append bytes after IEND: the PNG is whole; one cut inside a chunk is not."""
    from tfds_rsna import rsna_bone_age

    image = (np.arange(40 * 30) % 251).astype(np.uint8).reshape(40, 30)
    png = rsna_bone_age.encode_png(image)
    np.testing.assert_array_equal(rsna_bone_age.decode_grey(png + b"\0" * 64 + b"trailing metadata", "a.png"), image)
    assert rsna_bone_age.png_damage(png + b"x" * 100) is None
    assert rsna_bone_age.png_damage(png[:-4]) == "truncated PNG (its chunks end before the IEND chunk)"
    flipped = bytearray(png)
    flipped[45] ^= 0xFF  # in the data of the IDAT chunk that follows the 33 bytes of signature and IHDR
    assert rsna_bone_age.png_damage(bytes(flipped)) == "damaged PNG (chunk IDAT at byte 33 fails its CRC check)"
    with pytest.raises(rsna_bone_age.RsnaFormatError, match="b.png"):
        rsna_bone_age.decode_grey(png[:-6], "b.png")


def test_label_file_that_is_not_utf8_text(tmp_path):
    write_kaggle(str(tmp_path / "manual"))
    csv_path = tmp_path / "manual" / "boneage-training-dataset.csv"
    csv_path.write_bytes(csv_path.read_bytes().replace(b"3,60,True", b"3,60,\xff\xfeTrue"))
    _expect_error(tmp_path, r"boneage-training-dataset.csv:4: not UTF-8 text \(byte 0xff\)")


def test_age_out_of_range(tmp_path):
    write_kaggle(str(tmp_path / "manual"))
    csv_path = tmp_path / "manual" / "boneage-training-dataset.csv"
    csv_path.write_text(csv_path.read_text().replace("3,60,True", "3,260,True"))
    _expect_error(tmp_path, r"boneage-training-dataset.csv:4: bone age 260.0 months is outside 0-240")


def test_duplicate_ids(tmp_path):
    write_kaggle(str(tmp_path / "manual"))
    with open(tmp_path / "manual" / "boneage-training-dataset.csv", "a") as f:
        f.write("2,100,True\n")
    _expect_error(tmp_path, r"duplicate id 2: .*csv:3 and .*csv:8")


def test_failed_build_leaves_nothing_and_a_fixed_one_succeeds(tmp_path):
    write_kaggle(str(tmp_path / "manual"))
    path = tmp_path / "manual" / "boneage-test-dataset" / "boneage-test-dataset" / "8.png"
    good = path.read_bytes()
    path.write_bytes(good[:40])  # fails while generating the test split, after train was written
    _expect_error(tmp_path, "8.png")
    path.write_bytes(good)
    builder = build(str(tmp_path / "manual"), str(tmp_path / "data"))
    assert builder.info.splits["test"].num_examples == 2


@pytest.mark.shared
@pytest.mark.skipif(not os.path.isdir(SHARED_FORMATS), reason="../shared/rsna_formats is absent")
def test_reads_the_real_label_files():
    train = rsna_bone_age.read_train_labels(os.path.join(SHARED_FORMATS, "boneage-training-dataset.csv"))
    validation = rsna_bone_age.read_validation_labels(os.path.join(SHARED_FORMATS, "Validation Dataset.csv"))
    test_csv = rsna_bone_age.read_test_csv(os.path.join(SHARED_FORMATS, "boneage-test-dataset.csv"))
    test_xlsx = rsna_bone_age.read_test_xlsx(os.path.join(SHARED_FORMATS, "Bone age ground truth.xlsx"))
    assert (len(train), len(validation), len(test_csv), len(test_xlsx)) == (12611, 1425, 200, 200)
    assert {r.image_id for r in test_csv} == {r.image_id for r in test_xlsx} == set(range(4360, 4560))
    assert all(np.isnan(r.boneage) for r in test_csv)
    ages = np.array([r.boneage for r in train])
    assert 120 < ages.mean() < 135 and ages.min() >= 1 and ages.max() <= 228
    assert 0.5 < np.mean([r.male for r in train]) < 0.6


@pytest.mark.shared
@pytest.mark.skipif(not os.path.isdir(SHARED_SAMPLE), reason="../shared/rsna_sample is absent")
def test_builds_the_real_sample(tmp_path):
    builder = build(SHARED_SAMPLE, str(tmp_path / "data"), "max512")
    assert builder.info.splits["train"].num_examples == 599
    train = read(str(tmp_path / "data"), "train", "max512")
    example = train[1377]
    assert example["boneage"] == 180.0 and not example["male"]
    assert max(example["image"].shape[:2]) == 512 and example["image"].shape[2] == 1


# ----------------------------------------------------------------------------- masks and keypoints


def _write_annotations(root: str, images: dict[int, np.ndarray], ids) -> dict[int, np.ndarray]:
    masks = {}
    for i in ids:
        mask = np.zeros(images[i].shape[:2], np.uint8)
        mask[2:-2, 3:-3] = 200  # binarised to 255 by the builder
        masks[i] = mask
        _write_png(os.path.join(root, "hand-masks", f"{i}.png"), mask)
    _write(os.path.join(root, "keypoints.csv"), "id,name,x,y\n1,capitate,10.5,20\n1,middle_tip,11,2\n2,mcp3,4,5\n")
    return masks


def test_masks_and_keypoints_beside_the_images(tmp_path):
    manual = str(tmp_path / "manual")
    images = write_kaggle(manual)
    masks = _write_annotations(manual, images, ids=(1, 3))
    build(manual, str(tmp_path / "data"))
    train = read(str(tmp_path / "data"), "train")
    assert train[1]["has_mask"] and train[3]["has_mask"] and not train[2]["has_mask"]
    np.testing.assert_array_equal(train[1]["mask"][:, :, 0], np.where(masks[1] > 127, 255, 0))
    assert train[2]["mask"].shape == (1, 1, 1)
    assert train[1]["has_keypoints"] and train[2]["has_keypoints"] and not train[3]["has_keypoints"]
    from tfds_rsna.keypoints import KEYPOINT_INDEX

    points = train[1]["keypoints"]
    np.testing.assert_allclose(points[KEYPOINT_INDEX["capitate"]], [10.5, 20])
    assert np.isnan(points[KEYPOINT_INDEX["mcp3"]]).all()
    assert np.isnan(train[3]["keypoints"]).all()


def test_masks_and_keypoints_follow_the_downscale(tmp_path):
    manual = str(tmp_path / "manual")
    images = write_kaggle(manual)
    big = np.zeros((1200, 600), np.uint8)
    big[100:1100, 100:500] = 150
    _write_png(os.path.join(manual, "boneage-training-dataset", "boneage-training-dataset", "1.png"), big)
    mask = np.zeros_like(big)
    mask[100:1100, 100:500] = 255
    _write_png(os.path.join(manual, "hand-masks", "1.png"), mask)
    _write(os.path.join(manual, "keypoints.csv"), "id,name,x,y\n1,capitate,599.5,1199.5\n")
    del images
    build(manual, str(tmp_path / "data"), "max512")
    example = read(str(tmp_path / "data"), "train", "max512")[1]
    assert example["image"].shape == example["mask"].shape == (512, 256, 1)
    np.testing.assert_allclose(example["keypoints"][2], [255.5, 511.5], atol=1e-3)  # the far corner stays there
    assert abs(int((example["mask"] > 0).sum()) - 1000 * 400 * (512 / 1200) ** 2) < 2000


def test_mask_of_the_wrong_size_is_named(tmp_path):
    manual = str(tmp_path / "manual")
    write_kaggle(manual)
    _write_png(os.path.join(manual, "hand-masks", "2.png"), np.zeros((5, 5), np.uint8))
    with pytest.raises(rsna_bone_age.RsnaFormatError, match=r"hand-masks/2.png: mask is 5x5 px; expected"):
        build(manual, str(tmp_path / "data"))


def test_bad_keypoints_csv_is_named(tmp_path):
    manual = str(tmp_path / "manual")
    write_kaggle(manual)
    _write(os.path.join(manual, "keypoints.csv"), "id,name,x,y\n1,elbow,1,2\n")
    with pytest.raises(rsna_bone_age.RsnaFormatError, match=r"keypoints.csv:2: unknown keypoint name 'elbow'"):
        build(manual, str(tmp_path / "data"))
    _write(os.path.join(manual, "keypoints.csv"), "id,name,x,y\n1,capitate,left,2\n")
    with pytest.raises(rsna_bone_age.RsnaFormatError, match=r"keypoints.csv:2: x, y are 'left'"):
        build(manual, str(tmp_path / "data"))
