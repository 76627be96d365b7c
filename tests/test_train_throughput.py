"""benchmarks/train_throughput.py: the report's fields on a tiny CPU run, and one error line for a config typo."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from absl import app
from conftest import REPO, tiny_demo_config


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("train_throughput",
                                                  os.path.join(REPO, "benchmarks", "train_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_fields_on_a_tiny_cpu_run(throughput, phantom_dir, data_root):
    config = tiny_demo_config(phantom_dir, data_root)
    report = throughput.measure(config, seconds=1.0, warmup_steps=2)
    assert report["images_per_s"] > 0 and report["timed_steps"] >= 1 and report["timed_s"] >= 1.0
    assert 0 < report["step_s_median"] and 0 < report["step_s_mean"]
    assert 0 <= report["input_wait_fraction"] <= 1
    assert report["compile_s"] > 0 and report["first_step_s"] > 0
    assert isinstance(report["peak_memory_bytes"], int) and report["peak_memory_bytes"] > 0
    assert "RSS" in report["peak_memory_source"]  # a CPU has no device memory statistics
    assert report["flops_per_step"] > 0 and report["devices"] >= 1
    assert report["mfu"] is None and "--peak_tflops" in report["mfu_note"]
    assert (report["batch_size"], report["image_size"], report["task"]) == (8, 32, "boneage")
    json.dumps(report)  # all plain values
    assert throughput.summary(report).count("\n") >= 3

    # With a peak, the MFU is a fraction (the step and FLOPs of the run above).
    given = throughput.mfu(report["flops_per_step"], report["step_s_mean"], report["devices"], "cpu", 1.0)
    assert isinstance(given["mfu"], float) and 0 < given["mfu"] < 1 and given["peak_tflops_source"] == "--peak_tflops"


def test_mfu_peaks_and_flop_counts(throughput):
    assert throughput.known_peak("NVIDIA H100 80GB HBM3")[0] == 989.5
    assert throughput.known_peak("NVIDIA H100 PCIe")[0] == 756.0
    assert throughput.known_peak("TPU v5 lite")[0] == 197.0 and throughput.known_peak("TPU v5")[0] == 459.0
    assert throughput.known_peak("cpu") is None
    h200 = throughput.mfu(989.5e12, 2.0, 1, "NVIDIA H200", None)
    assert h200["mfu"] == pytest.approx(0.5) and "H200" in h200["peak_tflops_source"]
    assert throughput.mfu(None, 1.0, 1, "NVIDIA H200", None)["mfu"] is None

    class Compiled:
        def __init__(self, analysis):
            self.analysis = analysis

        def cost_analysis(self):
            return self.analysis

    assert throughput.flops_of(Compiled({"flops": 10.0})) == 10.0
    assert throughput.flops_of(Compiled([{"flops": 10.0}, {"bytes accessed": 1.0}])) == 10.0
    assert throughput.flops_of(Compiled({"bytes accessed": 1.0})) is None
    assert throughput.flops_of(Compiled(None)) is None


def test_the_command_with_a_config_typo_and_peak_tflops(throughput, phantom_dir, data_root, tmp_path):
    """The command: a config typo is a usage error naming the key (``cli.run`` prints it as one
    line with exit status 2, tests/test_cli.py); with --peak_tflops the MFU is a fraction; the
    JSON is the last line and what --out holds."""
    with pytest.raises(app.UsageError, match="'nope'"):
        throughput.main(["--config=configs/demo.py:tiny", "--config.nope=1"])
    command = [sys.executable, os.path.join(REPO, "benchmarks", "train_throughput.py"), "--config=configs/demo.py:tiny"]

    out = tmp_path / "report.json"
    on_phantoms = [f"--config.data.manual_dir={phantom_dir}", f"--config.data.data_dir={data_root}",
                   f"--config.data.mask_cache={os.path.join(phantom_dir, 'hand-masks')}"]
    run = subprocess.run([*command, *on_phantoms, "--seconds=0.5", "--warmup_steps=1", "--peak_tflops=1",
                          f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert isinstance(report["mfu"], float) and 0 < report["mfu"] < 1 and report["mfu_note"] is None
    assert report["peak_tflops"] == 1.0 and report["peak_tflops_source"] == "--peak_tflops"
    assert report["config"] == "configs/demo.py:tiny" and report["images_per_s"] > 0
