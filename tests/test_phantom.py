"""Tests for the synthetic phantom radiographs (tfds_rsna.phantom)."""

import csv
import re
import time

import cv2
import numpy as np
import openpyxl
import pytest

from tfds_rsna import phantom

REQUIRED_KEYPOINTS = {
    "radius_distal", "ulna_distal", "capitate", "mcp3", "pip3_proximal", "middle_tip",
    *(f"mcp{i}" for i in range(1, 6)), *(f"prox_phalanx_base{i}" for i in range(1, 6)),
}


def _render(boneage, male=True, seed=0, **kwargs):
    return phantom.render_phantom(boneage, male, np.random.default_rng(seed), **kwargs)


def _angle_from_up(dx: float, dy: float) -> float:
    """Counter-clockwise angle (deg, as displayed) of an image vector from straight up."""
    return float(np.degrees(np.arctan2(-dx, -dy)))


def _bone_centres(image: np.ndarray, mask: np.ndarray, centre, radius: float) -> int:
    """Count bright blobs (ossified bone) within radius of a point, inside the soft tissue."""
    bone = ((image > 140) & (mask > 0)).astype(np.uint8)
    count, _, stats, centroids = cv2.connectedComponentsWithStats(bone)
    near = np.hypot(centroids[1:, 0] - centre[0], centroids[1:, 1] - centre[1]) < radius
    return int(np.count_nonzero(near & (stats[1:, cv2.CC_STAT_AREA] >= 4)))


def test_same_seed_is_identical_and_different_seed_differs():
    a = _render(100, seed=3)
    b = _render(100, seed=3)
    c = _render(100, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_outputs_shapes_types_and_keypoints():
    image, mask, keypoints = _render(120, height=320, width=256)
    assert image.shape == mask.shape == (320, 256)
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert REQUIRED_KEYPOINTS <= set(keypoints)
    assert keypoints["pip3_proximal"] == keypoints["prox_phalanx_base3"]


def test_neutral_pose_anatomy_is_ordered():
    image, mask, kp = _render(150, nuisance=phantom.Nuisance())
    # Upright left hand: fingertip above the MCP above the capitate above the radius; thumb radial (+x).
    assert kp["middle_tip"][1] < kp["pip3"][1] < kp["mcp3"][1] < kp["capitate"][1] < kp["radius_distal"][1]
    assert kp["mcp1"][0] > kp["mcp2"][0] > kp["mcp3"][0] > kp["mcp4"][0] > kp["mcp5"][0]
    assert kp["radius_distal"][0] > kp["ulna_distal"][0]
    x, y = (int(round(v)) for v in kp["mcp3"])
    assert mask[y, x] == 255 and mask[5, 5] == 0
    # bone brighter than soft tissue, soft tissue brighter than background
    tissue = image[(mask > 0) & (image < np.percentile(image[mask > 0], 30))].mean()
    assert image[y, x] > tissue > image[mask == 0].mean() + 20


def test_mirror_and_rotation_move_the_hand():
    _, _, left = _render(150, nuisance=phantom.Nuisance())
    _, _, right = _render(150, nuisance=phantom.Nuisance(mirror=True))
    assert left["mcp1"][0] > left["mcp5"][0] and right["mcp1"][0] < right["mcp5"][0]
    _, _, turned = _render(150, nuisance=phantom.Nuisance(), rotation_deg=15.0)
    dx, dy = (turned["middle_tip"][i] - turned["capitate"][i] for i in range(2))
    assert _angle_from_up(dx, dy) == pytest.approx(15.0, abs=3.0)


def test_maturity_signal_grows_with_age():
    ages = (12, 60, 150, 228)
    renders = {a: _render(a, seed=7, nuisance=phantom.Nuisance()) for a in ages}
    areas = [np.count_nonzero(renders[a][1]) for a in ages]
    assert areas == sorted(areas) and areas[-1] > 1.2 * areas[0]
    bone = {a: np.count_nonzero((renders[a][0] > 140) & (renders[a][1] > 0)) for a in ages}
    assert bone[150] > 1.5 * bone[12]
    carpals = {}
    for a in (12, 150):
        image, mask, kp = renders[a]
        reach = 0.8 * np.hypot(kp["mcp3"][0] - kp["capitate"][0], kp["mcp3"][1] - kp["capitate"][1])
        carpals[a] = _bone_centres(image, mask, kp["capitate"], 0.35 * reach)
    assert carpals[12] <= 2 < carpals[150]


def _physis_dip(boneage: float, seed: int) -> float:
    """Depth of the darkest dip across the base of the 3rd proximal phalanx (open physis = deep)."""
    image, _, kp = _render(boneage, seed=seed, nuisance=phantom.Nuisance())
    (x0, y0), (x1, y1) = kp["prox_phalanx_base3"], kp["pip3"]
    t = np.linspace(-0.03, 0.3, 100)
    profile = image[np.round(y0 + t * (y1 - y0)).astype(int), np.round(x0 + t * (x1 - x0)).astype(int)]
    profile = profile.astype(float)
    i = int(np.argmin(profile[5:40])) + 5
    return min(profile[:i].max(), profile[i:].max()) - profile[i]


@pytest.mark.parametrize("seed", [7, 8])
def test_physis_open_in_childhood_and_fused_in_adults(seed):
    assert _physis_dip(100, seed) > 30
    assert _physis_dip(228, seed) < 20


def test_girls_are_more_mature_at_the_same_bone_age():
    assert phantom.maturity(100, male=False) == pytest.approx(1.15 * phantom.maturity(100, male=True))
    boy = _render(100, male=True, seed=1, nuisance=phantom.Nuisance())
    girl = _render(100, male=False, seed=1, nuisance=phantom.Nuisance())
    assert np.count_nonzero(girl[1]) > np.count_nonzero(boy[1])


def test_label_distribution():
    draws = [phantom.sample_label(np.random.default_rng([0, i])) for i in range(2000)]
    ages = np.array([a for a, _ in draws])
    males = np.array([m for _, m in draws])
    assert 120 <= ages.mean() <= 135 and 35 <= ages.std() <= 47
    assert ages.min() >= 1 and ages.max() <= 228 and np.all(ages == np.round(ages))
    assert 0.50 <= males.mean() <= 0.58


def test_render_speed():
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # single core
    try:
        _render(100)
        start = time.perf_counter()
        for i in range(10):
            _render(20.0 * i + 10, seed=i)
        rate = 10 / (time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)
    assert rate > 20, f"{rate:.1f} images/s at 512x640"


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_write_dataset_layout(tmp_path):
    out = tmp_path / "rsna"
    lines = []  # not a terminal: progress lines instead of a bar
    summary = phantom.write_dataset(out, 6, 4, 4, seed=5, height=128, width=96, log=lines.append)
    assert summary["num_train"] == 6
    assert [line.split(" ")[1] for line in lines] == [f"{n}/14" for n in range(1, 15)]
    assert re.fullmatch(r"phantom: 14/14 images, [0-9.]+ images/s", lines[-1])

    train = _read_csv(out / "boneage-training-dataset.csv")
    assert train[0] == ["id", "boneage", "male"]
    assert [int(r[0]) for r in train[1:]] == [1, 2, 3, 4, 5, 6]
    assert all(r[2] in ("True", "False") and 1 <= int(r[1]) <= 228 for r in train[1:])

    validation = _read_csv(out / "Validation Dataset.csv")
    assert validation[0] == ["Image ID", "male", "Bone Age (months)"]
    assert [int(r[0]) for r in validation[1:]] == [7, 8, 9, 10]
    assert all(r[1] in ("TRUE", "FALSE") and 1 <= int(r[2]) <= 228 for r in validation[1:])
    assert sorted(p.name for p in (out / "boneage-validation-dataset-1").iterdir()) == ["7.png", "8.png"]
    assert sorted(p.name for p in (out / "boneage-validation-dataset-2").iterdir()) == ["10.png", "9.png"]

    sheet = openpyxl.load_workbook(out / "Bone age ground truth.xlsx").active
    rows = list(sheet.iter_rows(values_only=True))
    assert rows[0] == ("Case ID", "Sex", "Ground truth bone age (months)")
    assert [r[0] for r in rows[1:]] == [11, 12, 13, 14]
    assert all(r[1] in ("M", "F") and isinstance(r[2], float) for r in rows[1:])

    folders = {i: "boneage-training-dataset" for i in range(1, 7)}
    folders.update({7: "boneage-validation-dataset-1", 10: "boneage-validation-dataset-2"})
    folders.update({i: "boneage-test-dataset" for i in range(11, 15)})
    for image_id, folder in folders.items():
        image = cv2.imread(str(out / folder / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / "hand-masks" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == (128, 96) and image.dtype == np.uint8
    assert len(list((out / "hand-masks").iterdir())) == 14

    keypoints = _read_csv(out / "keypoints.csv")
    assert keypoints[0] == ["id", "name", "x", "y"]
    names_per_id = {}
    for image_id, name, x, y in keypoints[1:]:
        names_per_id.setdefault(int(image_id), set()).add(name)
        assert x == f"{float(x):.1f}" and y == f"{float(y):.1f}"
    assert sorted(names_per_id) == list(range(1, 15))
    assert all(REQUIRED_KEYPOINTS <= names for names in names_per_id.values())
    assert not [p for p in tmp_path.iterdir() if p.name != "rsna"]  # staging folder removed


def test_write_dataset_is_byte_identical(tmp_path):
    for name in ("a", "b"):
        phantom.write_dataset(tmp_path / name, 2, 2, 2, seed=9, height=96, width=80, log=lambda _: None)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 6 + 6 + 4  # images, masks, label files
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_worker_pool_gives_the_same_files(tmp_path):
    phantom.write_dataset(tmp_path / "one", 3, 2, 1, seed=2, height=96, width=80, log=lambda _: None)
    phantom.write_dataset(tmp_path / "two", 3, 2, 1, seed=2, height=96, width=80, num_workers=2,
                          log=lambda _: None)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_refuses_non_empty_dir_without_overwrite(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        phantom.write_dataset(tmp_path, 1, 0, 0, seed=0, height=96, width=80, log=lambda _: None)
    args = ["--out", str(tmp_path), "--num_train", "1", "--num_validation", "0", "--num_test", "0",
            "--seed", "0", "--height", "96", "--width", "80"]
    assert phantom.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "boneage-training-dataset.csv").exists()
    assert phantom.main([*args, "--overwrite"]) == 0
    assert (tmp_path / "boneage-training-dataset" / "1.png").exists()
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        phantom.write_dataset(tmp_path / "x", -1, 0, 0, seed=0)
    with pytest.raises(ValueError):
        phantom.write_dataset(tmp_path / "x", 0, 0, 0, seed=0)
    assert not (tmp_path / "x").exists()
