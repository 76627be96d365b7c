"""The training loop end to end: outputs, exact resume after a kill, data parallelism, NaN stop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from boneage_jax import train

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _read_events(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_params(workdir: str) -> dict:
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
    restored = manager.restore(manager.latest_step(),
                               args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    manager.close()
    return restored["params"]


def test_main_writes_every_output(tiny_config, tmp_path, capsys):
    """The training command (here in this process; launch.local and launch.multihost run it as
    its own process in the data-parallel test) writes every output of a run."""
    from boneage_jax import main

    workdir = str(tmp_path / "run")
    args = _overrides(tiny_config, log_every=2)
    assert main.main(["--config=configs/demo.py:tiny", f"--workdir={workdir}", *args]) == 0
    out = capsys.readouterr().out
    assert "baseline MAE" in out and "img/s" in out
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["num_train_steps"] == 4
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert set(results) == {"validation", "test"}
    for split in results.values():
        assert {"mae", "rmse", "r2", "num_examples", "baseline_mae"} <= set(split)
        assert split["num_examples"] == 16
    events = _read_events(workdir)
    assert {e["split"] for e in events} >= {"train", "validation", "final_test"}
    assert all("step" in e for e in events)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["best", "latest"]


def test_killed_run_resumes_to_identical_parameters(tiny_config, tmp_path, capsys):
    """kill -9 mid-run, re-run the same configuration (here, in this process): final parameters
    equal an uninterrupted run."""
    tiny_config.num_train_steps = 8
    tiny_config.model.dropout = 0.2  # dropout RNG must resume exactly too
    config_json = tiny_config.to_json()
    script = f"""
        import os, sys, ml_collections
        from boneage_jax import train
        config = ml_collections.ConfigDict(__import__("json").loads({config_json!r}))
        config.model.kwargs.filters = tuple(config.model.kwargs.filters)
        config.model.head_hidden = tuple(config.model.head_hidden)
        kill_at = int(sys.argv[1]) if len(sys.argv) > 1 else 0
        def callback(step):
            if step == kill_at:
                os.kill(os.getpid(), 9)
        train.train_and_evaluate(config, os.environ["WORKDIR"], step_callback=callback)
    """
    whole, interrupted = str(tmp_path / "whole"), str(tmp_path / "interrupted")
    train.train_and_evaluate(tiny_config, whole)  # the unbroken run, in this process
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(script), "5"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": REPO, "WORKDIR": interrupted}, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    capsys.readouterr()
    train.train_and_evaluate(tiny_config, interrupted)
    assert "Resumed from" in capsys.readouterr().out
    a, b = _final_params(whole), _final_params(interrupted)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    steps = [e["step"] for e in _read_events(interrupted) if e["split"] == "train"]
    assert steps == sorted(set(steps)), "a resumed run must not log a step twice"


def _overrides(config, **changes) -> list[str]:
    """Overrides of ``--config=configs/demo.py:tiny`` (the ``tiny_config`` fixture's settings) for
    a command-line run on the phantoms."""
    values = {"data.manual_dir": config.data.manual_dir, "data.data_dir": config.data.data_dir,
              "num_train_steps": 4, "log_every": 1, "eval_every": 2, "checkpoint_every": 2, **changes}
    return [f"--config.{k}={v}" for k, v in values.items()]


def test_data_parallel_and_multi_process_give_the_same_losses(tiny_config, tmp_path, capsys):
    """1 device, 4 devices, and 2 processes x 2 devices: the same global batch, the same losses
    (one evaluation and one checkpoint, at the end: each costs every process a compile or a save)."""
    settings = {"num_train_steps": 4, "log_every": 1, "eval_every": 4, "checkpoint_every": 4}
    overrides = _overrides(tiny_config, **settings)
    # 1 device: the same configuration in this process (one fewer Python start).
    tiny_config.update(settings)
    train.train_and_evaluate(tiny_config, str(tmp_path / "d1"))
    assert "on 1 device(s) in 1 process(es)" in capsys.readouterr().out
    losses = {1: [e["loss"] for e in _read_events(str(tmp_path / "d1")) if e["split"] == "train"]}
    workdir = str(tmp_path / "d4")
    result = subprocess.run(
        [sys.executable, "-m", "launch.local", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
         "--cpu_devices=4", "--", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "on 4 device(s) in 1 process(es)" in result.stdout
    losses[4] = [e["loss"] for e in _read_events(workdir) if e["split"] == "train"]
    workdir = str(tmp_path / "multihost")
    result = subprocess.run(
        [sys.executable, "-m", "launch.multihost", "--num_processes=2", "--cpu_devices=2",
         "--config=configs/demo.py:tiny", f"--workdir={workdir}", "--", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 4 device(s) in 2 process(es)" in result.stdout
    losses["2x2"] = [e["loss"] for e in _read_events(workdir) if e["split"] == "train"]
    assert len(losses[1]) == 4
    np.testing.assert_allclose(losses[4], losses[1], rtol=2e-5)
    np.testing.assert_allclose(losses["2x2"], losses[1], rtol=2e-5)
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["test"]["num_examples"] == 16  # gathered from both processes


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    tiny_config.learning_rate = 1e30
    tiny_config.schedule = "constant"
    tiny_config.log_every = 1
    tiny_config.checkpoint_every = 1
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss at step"):
        train.train_and_evaluate(tiny_config, workdir)
    steps = os.listdir(os.path.join(workdir, "checkpoints", "latest"))
    assert steps, "the last good checkpoint must be kept"
    params = _final_params(workdir)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_early_stopping_and_plateau(tiny_config, tmp_path):
    tiny_config.num_train_steps = 40
    tiny_config.eval_every = 1
    tiny_config.checkpoint_every = 10
    tiny_config.learning_rate = 0.0  # validation MAE never improves after the first evaluation
    tiny_config.model.kwargs.batch_norm = False  # (batch statistics would still change)
    tiny_config.plateau_patience = 1
    tiny_config.early_stopping_patience = 3
    workdir = str(tmp_path / "early")
    train.train_and_evaluate(tiny_config, workdir)
    events = _read_events(workdir)
    assert max(e["step"] for e in events if e["split"] == "validation") == 4
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["validation"]["checkpoint_step"] == 1


def test_training_hands_kept_memory_back_at_each_log_and_evaluation(tiny_config, tmp_path, monkeypatch):
    """allocator.release() (malloc_trim with the CPU default) after every log line and evaluation,
    which bounds how far the kept heap fragments between them."""
    calls = []
    monkeypatch.setattr(train.allocator, "release", lambda: calls.append(1) or True)
    tiny_config.num_train_steps = 12
    tiny_config.log_every = 4
    tiny_config.eval_every = 6
    tiny_config.checkpoint_every = 6
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert len(calls) == 3 + 2  # logs at steps 4, 8, 12; evaluations at 6, 12


@pytest.mark.parametrize("head", ["gaussian", "classification"])
def test_other_heads_train_and_report_months(tiny_config, tmp_path, head):
    tiny_config.model.head = head
    tiny_config.num_train_steps = 2
    tiny_config.eval_every = 2
    results = train.train_and_evaluate(tiny_config, str(tmp_path / head))
    validation = results["validation"]
    assert np.isfinite(validation["mae"]) and validation["num_examples"] == 16
    assert ("mean_predicted_std" in validation) == (head == "gaussian")
    assert ("accuracy" in validation) == (head == "classification")


def test_init_from_pretrained_backbone(tiny_config, tmp_path):
    from flax import nnx

    from boneage_jax import models, weights
    from boneage_jax.weights import WeightMismatchError

    tiny_config.model.kwargs.batch_norm = False
    backbone = models.create_backbone("cnn_memon", in_channels=1, image_size=32, rngs=models.Rngs(123),
                                      **dict(tiny_config.model.kwargs))
    weights.save_pretrained(backbone, str(tmp_path / "pretrained"), {"model": "cnn_memon", "in_channels": 1})
    tiny_config.init_from = str(tmp_path / "pretrained")
    tiny_config.learning_rate = 0.0
    tiny_config.num_train_steps = 1
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    trained = _final_params(str(tmp_path / "run"))["backbone"]
    expected = nnx.to_pure_dict(nnx.state(backbone, nnx.Param))
    for x, y in zip(jax.tree.leaves(trained), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(x, y)

    tiny_config.model.kwargs.filters = (4, 16)
    with pytest.raises(WeightMismatchError, match=r"layer convs/1/(bias|kernel): the model expects shape"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "mismatch"))


def test_kill_between_best_and_latest_save_still_resumes(tiny_config, tmp_path, monkeypatch):
    """A run dies after ``best/4`` is written but before ``latest/4``: the same command resumes
    from ``latest/2`` and finishes (it used to fail at step 4 with StepAlreadyExistsError)."""
    from boneage_jax import state as state_lib

    tiny_config.num_train_steps = 6
    tiny_config.eval_every = 2
    tiny_config.checkpoint_every = 2
    tiny_config.min_delta = -1e9  # every evaluation counts as an improvement: best is saved at 2, 4, 6
    workdir = str(tmp_path / "run")
    real_save = state_lib.save

    class Killed(Exception):
        pass

    def save_then_die(manager, state, iterator, meta):
        if str(manager.directory).endswith("latest") and int(jax.device_get(state["step"])) == 4:
            raise Killed
        real_save(manager, state, iterator, meta)

    monkeypatch.setattr(state_lib, "save", save_then_die)
    with pytest.raises(Killed):
        train.train_and_evaluate(tiny_config, workdir)
    assert ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "best")).all_steps() == [2, 4]
    monkeypatch.setattr(state_lib, "save", real_save)
    results = train.train_and_evaluate(tiny_config, workdir)
    assert results["validation"]["checkpoint_step"] == 6

    # A command that fails its checks leaves the finished run's files as they were.
    with open(os.path.join(workdir, "config.json"), "rb") as f:
        before = f.read()
    tiny_config.model.name = "nope"
    with pytest.raises(ValueError, match="unknown model 'nope'|config.model.name 'nope'"):
        train.train_and_evaluate(tiny_config, workdir)
    with open(os.path.join(workdir, "config.json"), "rb") as f:
        assert f.read() == before


def test_one_run_per_workdir(tiny_config, tmp_path):
    """A live holder of the workdir's lock stops a second run before it writes anything; the
    lock file a killed run leaves behind does not."""
    from boneage_jax import io

    tiny_config.num_train_steps = 2
    tiny_config.eval_every = 2
    workdir = tmp_path / "run"
    workdir.mkdir()
    with io.FileLock(str(workdir / train.LOCK_FILE), "test holder"):
        with pytest.raises(io.LockedError, match=rf"workdir {workdir} is in use by pid {os.getpid()} on "):
            train.train_and_evaluate(tiny_config, str(workdir))
    assert sorted(os.listdir(workdir)) == [train.LOCK_FILE]
    # The lock file stays after its holder is gone; it blocks nobody.
    train.train_and_evaluate(tiny_config, str(workdir))
    assert os.path.isfile(workdir / "results.json")


def test_non_finite_loss_before_any_checkpoint_says_so(tiny_config, tmp_path):
    tiny_config.learning_rate = 1e30
    tiny_config.schedule = "constant"
    tiny_config.log_every = 1
    tiny_config.checkpoint_every = 100
    with pytest.raises(train.NonFiniteLossError, match="no checkpoint had been saved yet"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "nan"))


def _damage(step_dir: str, kind: str) -> str:
    """Damages one file of a checkpoint step; returns its path."""
    if kind == "truncated array data":
        path = next(os.path.join(step_dir, "params", "d", name) for name in os.listdir(os.path.join(step_dir, "params", "d")))
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        return path
    path = {"garbage metadata": os.path.join(step_dir, "params", "_METADATA"),
            "broken iterator state": os.path.join(step_dir, "data_iter", "process_0-of-1.json")}[kind]
    with open(path, "w") as f:
        f.write("{garbage")
    return path


def test_damaged_latest_checkpoint_is_named_and_the_previous_step_offered(tiny_config, tmp_path, capsys):
    """For each kind of damage to the newest checkpoint: one error naming the file and offering
    the step before it; told so, the run moves the damaged step aside and resumes from the step
    before it, ending as an unbroken run (checked to the bit for the first kind: once the damaged
    step is moved aside, what is resumed no longer depends on the damage)."""
    import shutil

    from boneage_jax import state as state_lib

    tiny_config.num_train_steps = 6
    tiny_config.eval_every = 6
    tiny_config.checkpoint_every = 2
    unbroken = str(tmp_path / "unbroken")
    train.train_and_evaluate(tiny_config, unbroken)

    class Killed(Exception):
        pass

    def kill_at_5(step: int) -> None:
        if step == 5:
            raise Killed

    def kill_at_3(step: int) -> None:
        if step == 3:
            raise Killed

    base = str(tmp_path / "base")
    with pytest.raises(Killed):
        train.train_and_evaluate(tiny_config, base, step_callback=kill_at_5)
    assert sorted(os.listdir(os.path.join(base, "checkpoints", "latest"))) == ["2", "4"]
    for i, kind in enumerate(("truncated array data", "garbage metadata", "broken iterator state")):
        workdir = str(tmp_path / f"damaged{i}")
        shutil.copytree(base, workdir)
        damaged = _damage(os.path.join(workdir, "checkpoints", "latest", "4"), kind)
        tiny_config.on_damaged_checkpoint = "stop"
        with pytest.raises(state_lib.DamagedCheckpointError) as error:
            train.train_and_evaluate(tiny_config, workdir)
        assert f"{damaged} is damaged" in str(error.value), kind
        assert "step 2 before it is kept: re-run with --config.on_damaged_checkpoint=previous" in str(error.value)
        tiny_config.on_damaged_checkpoint = "previous"
        # To the end for the first kind; for the others, stopped once step 3 (from step 2) is done.
        with (pytest.raises(Killed) if i else contextlib.nullcontext()):
            train.train_and_evaluate(tiny_config, workdir, step_callback=kill_at_3 if i else None)
        assert os.path.isdir(os.path.join(workdir, "checkpoints", "damaged", "latest-4"))
        assert "at step 2" in [line for line in capsys.readouterr().out.splitlines() if "Resumed from" in line][0]
        if not i:
            for x, y in zip(jax.tree.leaves(_final_params(workdir)), jax.tree.leaves(_final_params(unbroken)),
                            strict=True):
                np.testing.assert_array_equal(x, y)


# The training command with a step callback that makes the workdir read-only at a step given on
# the command line, once the step-2 checkpoints are written (no save is then in flight).
_READ_ONLY_AT = """
import functools, os, sys, time
from boneage_jax import cli, main, train
workdir, at = sys.argv[1], int(sys.argv[2])

def make_read_only(step):
    if step != at:
        return
    done = [os.path.join(workdir, "checkpoints", name, "2") for name in ("latest", "best")]
    deadline = time.time() + 120
    while not all(map(os.path.isdir, done)) and time.time() < deadline:
        time.sleep(0.05)
    for folder, dirs, files in os.walk(workdir):
        for path in [folder, *(os.path.join(folder, n) for n in files)]:
            os.chmod(path, os.stat(path).st_mode & ~0o222)

train.train_and_evaluate = functools.partial(train.train_and_evaluate, step_callback=make_read_only)
sys.argv = ["boneage_jax.main", *sys.argv[3:]]
cli.run(main.main)
"""


def _without_write_privilege() -> list[str]:
    """A command prefix under which ``chmod a-w`` stops this process's writes: none for a normal
    user; for root (who writes anyway) a user namespace in which root's files are the own files of
    an unprivileged user (``unshare --map-user``). Skips the test where that is not possible."""
    if os.geteuid() != 0:
        return []
    import shutil

    prefix = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]
    if shutil.which("unshare") is None or subprocess.run(
            [*prefix, "sh", "-c", f'test "$(id -u)" = 1000 && test -w "{REPO}"'], capture_output=True).returncode:
        pytest.skip("running as root without user namespaces: chmod cannot make a folder read-only for this process")
    return prefix


def test_a_workdir_made_read_only_ends_with_one_error_and_resumes(tiny_config, tmp_path):
    """chmod -R a-w on the workdir after step 3 of 6: one ``error:`` line naming the workdir and
    the folder that cannot be written, exit status 2; the step-2 checkpoint stays, and once the
    workdir is writable again the same command resumes from it and finishes. A workdir that is
    read-only from the start gets the same line before anything is written."""
    prefix = _without_write_privilege()
    workdir = str(tmp_path / "run")
    command = ["--config=configs/demo.py:tiny", f"--workdir={workdir}", *_overrides(tiny_config, num_train_steps=6)]
    env = {**os.environ, "PYTHONPATH": REPO}

    def run(at: int) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, sys.executable, "-c", _READ_ONLY_AT, workdir, str(at), *command], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)

    def writable(yes: bool) -> None:
        for folder, _, files in os.walk(workdir):
            for path in [folder, *(os.path.join(folder, n) for n in files)]:
                mode = os.stat(path).st_mode
                os.chmod(path, mode | 0o200 if yes else mode & ~0o222)

    def one_error(result: subprocess.CompletedProcess) -> str:
        assert result.returncode == 2, result.stderr[-3000:]
        # (TFDS's own warnings about the prepared data aside)
        lines = [line for line in result.stderr.splitlines() if line.strip() and not re.match(r"W\d{4} ", line)]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
        return lines[0]

    line = one_error(run(3))
    assert f"workdir {workdir} is not writable" in line and "the checkpoint of step 2 is kept" in line
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))) == ["2"]
    writable(True)
    resumed = run(0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and "at step 2" in resumed.stdout

    # Read-only from the start: the same line, and nothing in the workdir changes.
    writable(False)
    def files() -> dict[str, int]:
        return {os.path.join(folder, n): os.stat(os.path.join(folder, n)).st_mtime_ns
                for folder, _, names in os.walk(workdir) for n in names}

    before = files()
    line = one_error(run(0))
    assert f"workdir {workdir} is not writable ({workdir} cannot be written)" in line
    assert "the checkpoint of step 6 is kept" in line
    assert files() == before
    writable(True)
