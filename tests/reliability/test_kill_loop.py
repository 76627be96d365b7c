"""Kill training with SIGKILL at random points, many times in a row, and check that re-running the
same command always ends with the parameters and results of an unbroken run.

Long: behind the ``reliability`` marker (``make test-reliability``; ``KILLS=N`` sets how many kills,
default 50). Each cycle starts ``python -m boneage_jax.main`` on a tiny config that saves a
checkpoint every step and evaluates every other step, waits until training has started, then
kills the process after a random delay (so kills land in steps, evaluations, and the ``best``
and ``latest`` saves), and re-runs the same command until it finishes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.reliability

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _command(phantom_dir: str, data_root: str, workdir: str) -> list[str]:
    return [sys.executable, "-m", "boneage_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
            f"--config.data.manual_dir={phantom_dir}", f"--config.data.data_dir={data_root}",
            "--config.num_train_steps=12", "--config.eval_every=2", "--config.checkpoint_every=1",
            "--config.log_every=1", "--config.model.dropout=0.2"]


def _outcome(workdir: str) -> tuple[list[np.ndarray], dict]:
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    manager.close()
    import jax  # pylint: disable=import-outside-toplevel

    with open(os.path.join(workdir, "results.json")) as f:
        return [np.asarray(x) for x in jax.tree.leaves(restored["params"])], json.load(f)


def _run_until_killed(command: list[str], delay: float) -> int | None:
    """Starts ``command``; once it prints its first step, kills it after ``delay`` s. Returns the
    exit status if it ended by itself first, else None."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": REPO})
    for line in process.stdout:
        if line.startswith("step") or line.startswith("Resumed") or "MAE (months)" in line:
            break
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    if process.poll() is not None:
        process.stdout.read()
        return process.returncode
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.read()
    return None


def test_random_kills_always_resume_to_the_unbroken_run(phantom_dir, data_root, tmp_path):
    wanted = int(os.environ.get("KILLS", "50"))
    reference = str(tmp_path / "unbroken")
    result = subprocess.run(_command(phantom_dir, data_root, reference), cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    want_params, want_results = _outcome(reference)
    rng = random.Random(0)
    kills, runs = 0, 0
    while kills < wanted:
        workdir = str(tmp_path / f"killed{runs}")
        runs += 1
        while True:
            status = _run_until_killed(_command(phantom_dir, data_root, workdir), rng.uniform(0.0, 3.0))
            if status is None:
                kills += 1
                continue
            assert status == 0, f"run {workdir} failed after {kills} kills"
            break
        params, results = _outcome(workdir)
        assert results == want_results, workdir
        for got, want in zip(params, want_params, strict=True):
            np.testing.assert_array_equal(got, want)
    print(f"{kills} kills over {runs} runs; every resumed run equals the unbroken one")
