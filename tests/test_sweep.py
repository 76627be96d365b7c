"""python -m launch.sweep: grid, folder names, k-fold summary, failures, resume, --print."""

from __future__ import annotations

import csv
import os

import pytest

from launch import sweep


def test_values_names_and_grid():
    assert sweep.split_values("none,concat, winner16bit") == ["none", "concat", "winner16bit"]
    assert sweep.split_values("(8,16),(16, 32),'a,b'") == ["(8,16)", "(16, 32)", "'a,b'"]
    assert sweep.parse_value("256") == 256 and sweep.parse_value("none") == "none"
    assert sweep.parse_value("(8, 16)") == (8, 16)
    runs = sweep.grid([("model.sex_fusion", ["none", "concat"]), ("data.image_size", ["256", "384"])])
    assert [r.name for r in runs] == ["sex_fusion=none,image_size=256", "sex_fusion=none,image_size=384",
                                      "sex_fusion=concat,image_size=256", "sex_fusion=concat,image_size=384"]
    runs = sweep.grid([("model.kwargs.filters", ["(8, 16)"]), ("model.dropout", ["0.1"]),
                       ("data.dropout", ["0.2"])], folds=2)
    assert [r.name for r in runs] == ["filters=8_16,model.dropout=0.1,data.dropout=0.2,num_folds=2,fold=0",
                                      "filters=8_16,model.dropout=0.1,data.dropout=0.2,num_folds=2,fold=1"]
    with pytest.raises(ValueError, match="same folder"):
        sweep.grid([("model.kwargs.filters", ["(8,16)", "[8, 16]"])])
    # --set KEY= clears a string (init_from, data.augment); a swept value may not be empty.
    _, sets = sweep.plan(["model.dropout=0.1"], ["init_from=", "data.augment="], 0)
    assert sets == [("init_from", ""), ("data.augment", "")]
    with pytest.raises(ValueError, match="--sweep 'model.dropout=': expected key=value"):
        sweep.plan(["model.dropout="], [], 0)
    with pytest.raises(ValueError, match="--set '=1': expected key=value"):
        sweep.plan([], ["=1"], 0)
    cmd = sweep.command("configs/demo.py", "out", runs[0], [("seed", "1")], [])
    assert cmd[-6:] == ["--config.seed=1", "--config.model.kwargs.filters=(8, 16)", "--config.model.dropout=0.1",
                        "--config.data.dropout=0.2", "--config.data.num_folds=2", "--config.data.fold=0"]


def _tiny_sets(phantom_dir: str, data_root: str) -> list[str]:
    """``--set`` arguments over ``configs/demo.py:tiny``: the phantoms, 2 steps."""
    values = {"data.manual_dir": phantom_dir, "data.data_dir": data_root, "num_train_steps": 2, "eval_every": 2}
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_folds_failure_resume_and_print(phantom_dir, data_root, tmp_path, capsys):
    # 2 x 1 values x 2 folds: 4 runs of 2 steps, of which the 'bogus' fusion fails.
    workdir = str(tmp_path / "sweep")
    argv = ["--config=configs/demo.py:tiny", f"--workdir={workdir}", "--sweep", "model.sex_fusion=none,bogus",
            "--sweep", "model.dropout=0.0", "--folds", "2", *_tiny_sets(phantom_dir, data_root)]
    assert sweep.main(argv) == 1
    captured = capsys.readouterr()
    assert "sex_fusion=bogus,dropout=0.0,num_folds=2,fold=0: failed" in captured.err
    rows = _read(os.path.join(workdir, "summary.csv"))
    assert [(r["name"], r["status"]) for r in rows[:4]] == [
        ("sex_fusion=none,dropout=0.0,num_folds=2,fold=0", "ok"),
        ("sex_fusion=none,dropout=0.0,num_folds=2,fold=1", "ok"),
        ("sex_fusion=bogus,dropout=0.0,num_folds=2,fold=0", "failed"),
        ("sex_fusion=bogus,dropout=0.0,num_folds=2,fold=1", "failed")]
    assert list(rows[0])[:6] == ["name", "status", "model.sex_fusion", "model.dropout", "data.num_folds", "data.fold"]
    ok = rows[:2]
    for row in ok:
        assert float(row["validation_mae"]) > 0 and float(row["test_rmse"]) > 0 and row["test_num_examples"] == "16"
        assert row["model.sex_fusion"] == "none" and row["model.dropout"] == "0.0"
    # The two folds validate on halves of the 48 training images (the official validation split is not used).
    assert sorted(int(r["validation_num_examples"]) for r in ok) == [24, 24]
    mean, sd = rows[4], rows[5]
    assert (mean["data.fold"], sd["data.fold"]) == ("mean", "sd")
    assert mean["status"] == "mean over 2 of 2 folds" and mean["validation_num_examples"] == "48"
    maes = [float(r["validation_mae"]) for r in ok]
    assert float(mean["validation_mae"]) == pytest.approx(sum(maes) / 2)
    assert float(sd["validation_mae"]) == pytest.approx(abs(maes[0] - maes[1]) / 2 ** 0.5)
    assert rows[6]["status"] == "mean over 0 of 2 folds" and rows[6]["validation_mae"] == ""
    with open(os.path.join(workdir, "summary.md")) as f:
        markdown = f.read()
    assert " ± " in markdown and "mean ± sd" in markdown and "Failed: sex_fusion=bogus" in markdown
    assert os.path.isfile(os.path.join(workdir, "sex_fusion=none,dropout=0.0,num_folds=2,fold=0", "train.log"))

    # Resume: finished runs are skipped; --print lists only the runs still to do.
    stamp = os.path.getmtime(os.path.join(workdir, rows[0]["name"], "results.json"))
    assert sweep.main([*argv, "--print"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [f"# done: {rows[0]['name']}", f"# done: {rows[1]['name']}"]
    assert len(printed) == 4 and all("boneage_jax.main" in line and "sex_fusion=bogus" in line for line in printed[2:])
    # (the finished runs alone: a re-run of the failing ones would only fail again, two more processes)
    finished = ["--config=configs/demo.py:tiny", f"--workdir={workdir}", "--sweep", "model.sex_fusion=none",
                "--sweep", "model.dropout=0.0", "--folds", "2", *_tiny_sets(phantom_dir, data_root)]
    assert sweep.main(finished) == 0
    assert f"{rows[0]['name']}: done, skipped" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(workdir, rows[0]["name"], "results.json")) == stamp

    # --summarize_only rebuilds the same table from the run folders.
    os.remove(os.path.join(workdir, "summary.csv"))
    assert sweep.main([*argv, "--summarize_only"]) == 1
    again = _read(os.path.join(workdir, "summary.csv"))
    assert [r["name"] for r in again] == [r["name"] for r in rows]
    assert [r["status"] for r in again][:4] == ["ok", "ok", "failed", "failed"]
