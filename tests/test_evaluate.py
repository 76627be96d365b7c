"""boneage_jax.evaluate, report and explain on one tiny trained run (trained once per module)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import FAST_COMPILE

from boneage_jax import cli, evaluate, evaluation, explain, inference, report

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def workdir(tiny_run) -> str:
    """The session's tiny trained run (conftest ``tiny_run``: configs/demo.py:tiny, 6 steps);
    evaluation adds only its own evaluation_*, predictions_* and report files to it."""
    return tiny_run


def _results(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def test_test_split_matches_results_json(workdir):
    ev = evaluation.evaluate(workdir, split="test", verbose=False)
    assert ev.json_path == os.path.join(workdir, "evaluation_test.json")
    with open(ev.json_path) as f:
        saved = json.load(f)
    expected = _results(workdir)["test"]
    assert saved["num_examples"] == 16
    assert saved["checkpoint_step"] == expected["checkpoint_step"]
    for key in ("mae", "rmse", "r2", "baseline_mae"):
        assert saved[key] == pytest.approx(expected[key], abs=1e-4), key
    assert saved["mad_difference"] == pytest.approx(saved["mae"])
    assert {"mse", "mad_deviation", "ccc", "mean_error", "sd_error", "inference", "breakdown"} <= set(saved)
    breakdown = saved["breakdown"]
    assert sum(m["num_examples"] for m in breakdown["sex"].values()) == 16
    assert set(breakdown["age_band"]) == {"0-2y", "2-6y", "6-10y", "10-14y", "14-19y"}  # JSON keys are sorted
    assert list(ev.result["breakdown"]["age_band"]) == ["0-2y", "2-6y", "6-10y", "10-14y", "14-19y"]
    assert sum(m["num_examples"] for m in breakdown["age_band"].values()) == 16
    assert saved["inference"]["model_ms_per_image"] > 0 and saved["inference"]["peak_host_mib"] > 0
    with open(ev.csv_path) as f:
        rows = list(csv.DictReader(f))
    assert ev.csv_path.endswith("predictions_test.csv") and len(rows) == 16
    assert list(rows[0]) == ["id", "male", "boneage", "pred_boneage"]
    pred = np.array([float(r["pred_boneage"]) for r in rows])
    true = np.array([float(r["boneage"]) for r in rows])
    assert np.mean(np.abs(pred - true)) == pytest.approx(expected["mae"], abs=1e-3)
    ci = saved["confidence_intervals"]
    assert ci["num_examples"] == 16 and ci["num_resamples"] == 2000 and ci["level"] == 0.95
    for key in ("mae", "rmse", "ccc"):
        assert ci[key]["estimate"] == pytest.approx(saved[key])
        assert ci[key]["low"] <= saved[key] <= ci[key]["high"], key
    # A regression head without TTA or an ensemble has no spread: no interval, and it says so.
    assert saved["prediction_interval"]["sources"] == [] and "no per-image interval" in \
        saved["prediction_interval"]["note"]
    assert "calibration" not in saved and "pred_std" not in ev.predictions


def test_split_all_scores_every_labelled_image(workdir):
    ev = evaluation.evaluate(workdir, split="all", verbose=False)
    assert ev.result["num_examples"] == 80
    assert ev.result["tfds_splits"] == ["test", "train", "validation"]
    assert os.path.isfile(os.path.join(workdir, "evaluation_all.json"))


def test_tta_is_close_but_different(workdir):
    plain = evaluation.evaluate(workdir, split="validation", verbose=False).result
    tta = evaluation.evaluate(workdir, split="validation", tta=True, verbose=False)
    assert tta.json_path.endswith("evaluation_validation_tta.json")
    assert tta.result["tta"] == {"views": 4, "flip": True, "angles": [-5.0, 5.0]}
    assert tta.result["mae"] != plain["mae"]
    assert abs(tta.result["mae"] - plain["mae"]) < 0.2 * plain["mae"]
    # A regression head's interval under TTA is the spread over the views.
    assert tta.result["prediction_interval"]["sources"] == ["spread over 4 TTA views"]
    assert np.all(tta.predictions["pred_std"] > 0)
    assert tta.result["calibration"]["num_examples"] == 16


def test_ensemble_of_one_run_twice_equals_the_run(workdir):
    single = evaluation.evaluate(workdir, split="test", verbose=False)
    double = evaluation.evaluate(workdir, split="test", ensemble=[workdir], verbose=False)
    assert double.json_path.endswith("evaluation_test_ensemble.json")
    assert len(double.result["members"]) == 2
    np.testing.assert_allclose(double.predictions["pred_boneage"], single.predictions["pred_boneage"], rtol=1e-6)
    for key in ("mae", "rmse", "r2", "ccc"):
        assert double.result[key] == pytest.approx(single.result[key], rel=1e-6)
    # Identical members: no spread (a zero-width interval, which covers nothing), no MAE difference.
    assert double.result["prediction_interval"]["sources"] == ["spread over 2 ensemble members"]
    np.testing.assert_array_equal(double.predictions["pred_std"], 0.0)
    assert double.result["calibration"]["coverage_95"] == 0.0
    comparison = double.result["member_comparison"]
    assert [m["mae"] for m in comparison["members"]] == pytest.approx([single.result["mae"]] * 2)
    for d in comparison["minus_first"] + comparison["ensemble_minus_member"]:
        assert (d["difference"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
    assert len(comparison["minus_first"]) == 1 and len(comparison["ensemble_minus_member"]) == 2


def test_bias_correction_is_fitted_on_validation(workdir):
    ev = evaluation.evaluate(workdir, split="test", bias_correction=True, verbose=False)
    bc = ev.result["bias_correction"]
    assert ev.json_path.endswith("evaluation_test_bc.json")
    assert bc["num_fitted"] == 16 and not bc["in_sample"]
    validation = evaluation.evaluate(workdir, split="validation", verbose=False).predictions
    slope, intercept = np.polyfit(validation["pred_boneage"], validation["boneage"], 1)
    assert bc["slope"] == pytest.approx(slope, rel=1e-4) and bc["intercept"] == pytest.approx(intercept, rel=1e-4)
    np.testing.assert_allclose(ev.predictions["pred_boneage"],
                               ev.predictions["pred_boneage_uncorrected"] * slope + intercept, rtol=1e-4)
    assert bc["uncorrected"]["mae"] == pytest.approx(_results(workdir)["test"]["mae"], abs=1e-4)


def _csv_rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_gaussian_head_intervals_calibration_and_report(tiny_gaussian_run, capsys):
    """A gaussian head's per-image intervals in the CSV, their coverage in the JSON, the printed
    table and report.md with the reliability figure."""
    ev = evaluation.evaluate(tiny_gaussian_run, split="test", report=True, report_images=0)
    printed = capsys.readouterr().out
    r = ev.result
    assert r["prediction_interval"]["sources"] == ["gaussian head"]
    rows = _csv_rows(ev.csv_path)
    assert list(rows[0]) == ["id", "male", "boneage", "pred_boneage", "pred_std", "pred_low_68", "pred_high_68",
                             "pred_low_95", "pred_high_95"]
    column = {k: np.array([float(row[k]) for row in rows]) for k in rows[0]}
    assert np.all(column["pred_std"] > 0)
    for level, z in ((68, 0.994458), (95, 1.959964)):
        low, high = column[f"pred_low_{level}"], column[f"pred_high_{level}"]
        np.testing.assert_allclose(low, column["pred_boneage"] - z * column["pred_std"], atol=2e-3)
        np.testing.assert_allclose(high, column["pred_boneage"] + z * column["pred_std"], atol=2e-3)
        inside = (column["boneage"] >= low) & (column["boneage"] <= high)
        assert r["calibration"][f"coverage_{level}"] == pytest.approx(inside.mean())
        assert r["calibration"][f"mean_width_{level}"] == pytest.approx(np.mean(high - low), abs=2e-3)
    assert r["calibration"]["levels"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    with open(ev.json_path) as f:
        saved = json.load(f)["calibration"]
    assert saved["coverage"] == pytest.approx(r["calibration"]["coverage"])
    assert saved["mean_width_95"] == pytest.approx(r["calibration"]["mean_width_95"])
    assert re.search(r"MAE \d+\.\d\d \(95% CI \d+\.\d\d to \d+\.\d\d\)", printed)
    assert "per-image intervals (gaussian head): 68% interval covers" in printed
    out = os.path.dirname(ev.report_path)
    assert os.path.getsize(os.path.join(out, "reliability.png")) > 1000
    with open(ev.report_path) as f:
        text = f.read()
    assert "![Calibration of the per-image intervals](reliability.png)" in text
    assert "### Uncertainty per image" in text and "Confidence intervals: MAE" in text
    assert f"| 95% | {100 * r['calibration']['coverage_95']:.1f}% |" in text


def test_tta_ensemble_of_gaussian_heads_adds_the_spread(tiny_gaussian_run):
    """Total variance = mean of the variances + variance of the means: a second, identical member
    adds no spread to the TTA mixture; a bias correction scales the std by its slope."""
    tta = evaluation.evaluate(tiny_gaussian_run, split="validation", tta=True, verbose=False)
    double = evaluation.evaluate(tiny_gaussian_run, split="validation", tta=True, ensemble=[tiny_gaussian_run],
                                 bias_correction=True, verbose=False)
    assert double.result["prediction_interval"]["sources"] == [
        "gaussian head", "spread over 4 TTA views", "spread over 2 ensemble members"]
    slope = double.result["bias_correction"]["slope"]
    assert double.result["prediction_interval"]["scaled_by_bias_correction"] == pytest.approx(abs(slope))
    np.testing.assert_allclose(double.predictions["pred_std"], tta.predictions["pred_std"] * abs(slope), rtol=1e-5)
    np.testing.assert_allclose(double.predictions["pred_high_95"] - double.predictions["pred_low_95"],
                               2 * 1.959964 * double.predictions["pred_std"], rtol=1e-4)


def test_report_cli_with_config_override(workdir):
    """python -m boneage_jax.report with a --config override: figures and report.md, every link there."""
    result = subprocess.run(
        [sys.executable, "-m", "boneage_jax.report", f"--workdir={workdir}", "--split=validation",
         "--config.eval_batch_size=4", "--report_images=4"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MAE" in result.stdout and "report.md" in result.stdout
    out = os.path.join(workdir, "report")
    for name in ("learning_curves", "predicted_vs_true", "bland_altman", "error_by_age", "gradcam"):
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 1000, name
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert len(links) >= 7  # 5 figures, the JSON and the CSV
    for link in links:
        assert os.path.isfile(os.path.join(out, link)), link
    for words in ("training time", "inference time per image", "peak host memory", "By age band"):
        assert words in text
    with open(os.path.join(workdir, "evaluation_validation.json")) as f:
        assert json.load(f)["overrides"] == ["--config.eval_batch_size=4"]


def test_missing_workdir_and_checkpoint_errors(workdir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "boneage_jax.evaluate", f"--workdir={tmp_path}/nowhere"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert f"workdir {tmp_path}/nowhere does not exist" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty / "config.json"))):
        evaluation.evaluate(str(empty), verbose=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints/latest"):
        # A copy without checkpoints.
        copy = tmp_path / "copy"
        copy.mkdir()
        for name in ("config.json", "label_stats.json"):
            (copy / name).write_text(open(os.path.join(workdir, name)).read())
        evaluation.evaluate(str(copy), which="latest", verbose=False)


def test_quality_check_counts_the_rejected_and_scores_with_and_without_them(workdir, phantom_dir, tmp_path, capsys):
    """--quality on a copy of the phantoms with one test image inverted and one replaced by
    noise: both counted with their reasons, the CSV marks them, and the MAE of all images is
    the evaluation's while that of the accepted ones leaves them out."""
    import shutil

    import cv2

    copy = tmp_path / "manual"
    shutil.copytree(phantom_dir, copy)
    test_dir = copy / "boneage-test-dataset"
    names = sorted(os.listdir(test_dir), key=lambda n: int(n.split(".")[0]))
    first = cv2.imread(str(test_dir / names[0]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(test_dir / names[0]), 255 - first)
    second = cv2.imread(str(test_dir / names[1]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(test_dir / names[1]), np.random.default_rng(0).integers(0, 256, second.shape, dtype=np.uint8))
    bad = {int(names[0].split(".")[0]): "inverted", int(names[1].split(".")[0]): "noise"}
    ev = evaluation.evaluate(workdir, split="test", quality_check=True,
                             overrides=[f"--config.data.manual_dir={copy}",
                                        f"--config.data.data_dir={tmp_path / 'data'}"])
    printed = capsys.readouterr().out
    q = ev.result["quality"]
    assert (q["checked"], q["rejected"], q["reasons"]) == (16, 2, {"inverted": 1, "noise": 1})
    assert q["rejected_fraction"] == pytest.approx(2 / 16) and q["ms_per_image"] > 0
    assert {item["id"]: item["rejection"].split(":")[0] for item in q["rejected_images"]} == bad
    assert "quality check: 2 of 16 images (12.5%) would be rejected (inverted 1, noise 1)" in printed
    with open(ev.json_path) as f:
        assert json.load(f)["quality"]["rejected"] == 2
    with open(ev.csv_path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-1] == "quality"
    assert {int(r["id"]): r["quality"] for r in rows if r["quality"]} == bad
    errors = {int(r["id"]): abs(float(r["pred_boneage"]) - float(r["boneage"])) for r in rows}
    groups = q["metrics"]
    assert groups["all"]["mae"] == pytest.approx(ev.result["mae"]) and groups["all"]["num_examples"] == 16
    accepted = [e for i, e in errors.items() if i not in bad]
    assert groups["accepted"]["num_examples"] == 14
    assert groups["accepted"]["mae"] == pytest.approx(np.mean(accepted), abs=1e-3)
    assert groups["rejected"]["mae"] == pytest.approx(np.mean([errors[i] for i in bad]), abs=1e-3)
    assert f"MAE {groups['all']['mae']:.2f} on all 16, {groups['accepted']['mae']:.2f} on the 14 accepted" in printed
    section = "\n".join(report._quality_section(q))  # what report.md shows with --quality --report
    assert "### Quality control" in section and "| accepted | 14 |" in section
    assert all(f"| {i} | {reason}: " in section for i, reason in bad.items())


def test_overrides_keep_the_model(workdir):
    config = inference.load_config(workdir, ["--config.data.min_age=24"])
    assert config.data.min_age == 24.0
    with pytest.raises(ValueError, match="model settings cannot change.*model.name"):
        inference.load_config(workdir, ["--config.model.name=resnet18"])
    with pytest.raises(ValueError, match="data.image_size"):
        inference.load_config(workdir, ["--config.data.image_size=64"])
    with pytest.raises(ValueError, match="unknown config key"):
        inference.load_config(workdir, ["--config.data.no_such_key=1"])
    assert cli.parse(evaluate.FLAGS, ["--split=test", "--config.a", "1", "--config.b=2", "--tta"],
                     config_overrides=True) == ["--config.a", "1", "--config.b=2"]
    assert evaluate.FLAGS.split == "test" and evaluate.FLAGS.tta
    config = inference.load_config(workdir, ["--config.data.min_age", "24", "--config.eval_batch_size=4"])
    assert config.data.min_age == 24.0 and config.eval_batch_size == 4


def test_gradcam_equals_the_gradient_at_the_last_feature_map(workdir):
    """The generic Grad-CAM equals one computed by hand from cnn_memon's layers."""
    run = inference.load_run(workdir)
    batch = report.example_batch(run, 4)
    cams, info = explain.gradcam(run, batch["image"], batch["male"])
    assert cams.shape == (4, 32, 32) and info["shape"] == (8, 8, 8)
    model = run.model()
    backbone = model.backbone

    def feature_map(x):
        for conv, norm in zip(backbone.convs, backbone.norms):
            x = nnx.max_pool(nnx.relu(norm(conv(x))), (2, 2), strides=(2, 2))
        return x

    def by_hand(images, male):
        a = feature_map(images)
        grads = jax.grad(lambda a: run.objective.predict(model.head(a.mean(axis=(1, 2)), male))["boneage"].sum())(a)
        cam = jax.nn.relu(jnp.sum(grads.mean(axis=(1, 2), keepdims=True) * a, axis=-1))
        return model.head(a.mean(axis=(1, 2)), male), model(images, male), cam

    # One program (eagerly, each operation compiles on its own).
    split, whole, expected = jax.jit(by_hand, compiler_options=FAST_COMPILE)(batch["image"], batch["male"])
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)  # the split is the model
    expected = np.asarray(expected)
    import cv2

    expected = np.stack([cv2.resize(m, (32, 32), interpolation=cv2.INTER_LINEAR) for m in expected])
    expected /= np.maximum(expected.max(axis=(1, 2), keepdims=True), 1e-12)
    np.testing.assert_allclose(cams, expected, atol=1e-4)
    assert explain.attention_maps(run, batch["image"]) is None  # cnn_memon has no attention map


def test_combine_and_tta_views():
    a = {"boneage": np.array([10.0, 20.0]), "std": np.array([1.0, 2.0]), "class": np.array([0, 2])}
    b = {"boneage": np.array([14.0, 20.0]), "std": np.array([1.0, 2.0]), "class": np.array([1, 2])}
    out = evaluation.combine([a, b], class_means=[10.5, 13.0, 20.0])
    np.testing.assert_allclose(out["boneage"], [12.0, 20.0])
    # Mixture of N(10, 1) and N(14, 1): variance 1 + 4.
    np.testing.assert_allclose(out["std"], [np.sqrt(5.0), 2.0], rtol=1e-6)
    np.testing.assert_array_equal(out["class"], [1, 2])  # tie 0/1 -> class mean 13 is nearer 12 than 10.5
    # Readouts without a std (regression heads): the spread of their means, none for one readout.
    points = [{"boneage": np.array([a, 5.0])} for a in (10.0, 14.0, 12.0)]
    np.testing.assert_allclose(evaluation.combine(points)["std"], [np.sqrt(8.0 / 3.0), 0.0], rtol=1e-6)
    assert "std" not in evaluation.combine(points[:1])
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
    views = evaluation.tta_views(images, flip=True, angles=(-5.0, 5.0))
    assert len(views) == 4 and all(v.shape == images.shape and v.dtype == np.float32 for v in views)
    np.testing.assert_array_equal(views[1][:, :, ::-1], images)
    np.testing.assert_allclose(evaluation.rotate(images, 0.0), images, atol=1e-6)
    assert not np.allclose(views[2], images)
