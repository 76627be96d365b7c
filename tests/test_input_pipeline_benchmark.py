"""benchmarks/input_pipeline.py: the per-op profile and the thread scaling on the tiny demo config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def _run(phantom_dir: str, data_root: str, *flags: str) -> dict:
    command = [sys.executable, os.path.join(REPO, "benchmarks", "input_pipeline.py"), "--config=configs/demo.py:tiny",
               f"--config.data.manual_dir={phantom_dir}", f"--config.data.data_dir={data_root}", *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("on_device", ["", "normalize", "augment"])
def test_profile_names_every_stage_of_the_pipeline(phantom_dir, data_root, on_device):
    report = _run(phantom_dir, data_root, "--profile", "--profile_images=16",
                  "--config.data.augment=flip|affine(rotation=10)",
                  f"--config.data.normalize_on_device={bool(on_device)}",
                  f"--config.data.augment_on_device={on_device == 'augment'}",
                  f"--config.data.normalize={'value_range' if on_device == 'augment' else 'zscore'}")
    stages = list(report["profile"])
    augment = (["augment: draw the warp (flip|affine(rotation=10); warped on the device)"] if on_device == "augment"
               else ["augment flip", "augment affine(rotation=10)"])
    normalize = {"": ["normalize zscore", "to float32 (S, S, C)"],
                 "normalize": ["normalize table (zscore; looked up on the device)"],
                 "augment": ["normalize table (value_range; looked up on the device)"]}[on_device]
    assert stages == ["read record", "decode image", "preprocess resize_pad(size=32)",
                      "preprocess clahe(clip_limit=2.0, tile_grid=8)", *augment, *normalize, "stack batch"]
    assert all(ms > 0 for ms in report["profile"].values())
    assert abs(report["total_ms"] - sum(report["profile"].values())) < 1e-2


def test_scaling_covers_one_thread_to_every_cpu_with_the_cache(phantom_dir, data_root):
    report = _run(phantom_dir, data_root, "--scaling", "--batches=2", "--warmup=1",
                  "--config.data.cache_preprocessed=true")
    cpus = len(os.sched_getaffinity(0))
    assert [row["threads"] for row in report["scaling"]] == list(range(1, cpus + 1))
    assert all(row["images_per_s"] > 0 and row["images_per_s_per_core"] > 0 for row in report["scaling"])
