"""The peer benchmark (benchmarks/peers/) without the peers' venvs: its CPU accounting on fake
/proc/stat readings, the job runner's timeout, the table and its ratio to the best peer, the
flags' errors, and a real run of our own job (VGG19, 32 px, one step) through the harness."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from absl import app

from benchmarks.peers import harness, job_common, run, table, venvs

# /proc/stat's aggregate line: user nice system idle iowait irq softirq steal guest guest_nice
STAT = "cpu  {user} 0 {system} {idle} {iowait} 0 0 {steal} 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 12345\n"


def stat(user: int, system: int, idle: int, iowait: int = 0, steal: int = 0) -> str:
    return STAT.format(user=user, system=system, idle=idle, iowait=iowait, steal=steal)


def test_cpu_times_reads_the_aggregate_line_and_counts_steal_as_busy():
    times = harness.cpu_times(stat(user=300, system=100, idle=500, iowait=50, steal=50), ticks_per_s=100)
    assert times.busy_s == pytest.approx(4.5)  # user + system + steal; guest (7) is inside user already
    assert times.total_s == pytest.approx(10.0)
    with pytest.raises(ValueError, match="/proc/stat"):
        harness.cpu_times("intr 1\n")


def test_others_cpu_is_the_machine_busy_time_less_the_jobs_own():
    before = harness.CpuTimes(busy_s=100.0, total_s=1000.0)
    after = harness.CpuTimes(busy_s=130.0, total_s=1040.0)  # 40 s of both CPUs, 30 s busy
    assert harness.busy_percent(before, after) == pytest.approx(75.0)
    assert harness.others_cpu_percent(before, after, job_cpu_s=20.0) == pytest.approx(25.0)
    assert harness.others_cpu_percent(before, after, job_cpu_s=30.5) == 0.0  # tick rounding never goes negative


def test_wait_for_idle_waits_for_a_quiet_window_and_gives_up_at_the_timeout():
    # busy 50%, then 5%: quiet after the second window
    readings = iter([harness.CpuTimes(0, 0), harness.CpuTimes(1, 2), harness.CpuTimes(1, 2), harness.CpuTimes(1.1, 4)])
    quiet = harness.wait_for_idle(10.0, 1.0, 60.0, read=lambda: next(readings), sleep=lambda s: None)
    assert quiet == harness.Quiet(True, pytest.approx(5.0), 2.0)
    always_busy = iter(harness.CpuTimes(i, i) for i in range(100))
    quiet = harness.wait_for_idle(10.0, 1.0, 3.0, read=lambda: next(always_busy), sleep=lambda s: None)
    assert not quiet.quiet and quiet.waited_s == 3.0 and quiet.busy_pct == pytest.approx(100.0)


def test_run_job_counts_the_jobs_cpu_and_kills_it_at_the_timeout(tmp_path):
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\nprint('done')"
    done = harness.run_job([sys.executable, "-c", burn], env=os.environ, cwd=str(tmp_path), timeout_s=60)
    assert done.returncode == 0 and done.stdout.strip() == "done"
    assert done.job_cpu_s >= 0.3 and 0.0 <= done.others_cpu_pct <= 100.0
    killed = harness.run_job([sys.executable, "-c", "import time; time.sleep(60)"], env=os.environ,
                             cwd=str(tmp_path), timeout_s=0.5)
    assert killed.timed_out and killed.wall_s < 30


def test_a_failed_job_gives_a_row_with_its_error_line():
    stderr = "Traceback (most recent call last):\n  File x\nRuntimeError: out of memory\nwarning: trailing\n"
    failed = harness.JobRun(returncode=1, wall_s=3.0, job_cpu_s=2.0, others_cpu_pct=1.0, job_cpu_pct=33.0,
                            stdout="", stderr=stderr)
    quiet = harness.Quiet(False, 55.0, 300.0)
    row = run.job_row("xception", "keras", failed, quiet, 10.0, 1800.0)
    assert row["status"] == "failed"
    assert row["note"].startswith("RuntimeError: out of memory; the CPU never got below 10% busy")
    killed = harness.JobRun(None, 1800.0, 1.0, 0.0, 1.0, "", "step 3\n")
    row = run.job_row("xception", "torch", killed, harness.Quiet(True, 2.0, 1.0), 10.0, 1800.0)
    assert row["status"] == "timeout" and row["note"] == "killed after 1800 s (last line: step 3)"
    report = {"stack": "torch", "network": "xception", "images_per_s": 4.0, "versions": {"torch": "x"}}
    ok = harness.JobRun(0, 9.0, 15.0, 0.5, 83.0, "noise\n" + job_common.RESULT_MARKER + json.dumps(report), "")
    row = run.job_row("xception", "torch", ok, harness.Quiet(True, 2.0, 1.0), 10.0, 1800.0)
    assert row["status"] == "ok" and row["images_per_s"] == 4.0 and "versions" not in row and row["note"] == ""


def _row(network: str, stack: str, speed: float | None) -> dict:
    if speed is None:
        return {"network": network, "stack": stack, "status": "failed", "note": "RuntimeError: boom",
                "others_cpu_pct": 0.0, "job_cpu_pct": 50.0}
    return {"network": network, "stack": stack, "status": "ok", "images_per_s": speed, "step_s_median": 8 / speed,
            "step_s_min": 8 / speed, "step_s_max": 8 / speed, "first_step_s": 12.0, "parameters": 23_510_081,
            "built": "a | b", "note": "", "others_cpu_pct": 1.5, "job_cpu_pct": 97.0}


def test_summary_divides_ours_by_the_fastest_peer_that_ran():
    stacks = ["ours", "torch", "keras"]
    rows = [_row("resnet50", "ours", 2.0), _row("resnet50", "torch", 4.0), _row("resnet50", "keras", 5.0),
            _row("xception", "ours", 3.0), _row("xception", "torch", 2.5), _row("xception", "keras", None),
            _row("vgg19", "ours", None), _row("vgg19", "torch", 1.0)]
    networks = ["resnet50", "xception", "inception_v3", "vgg19"]
    summary = table.summary(rows, networks, stacks)
    assert [entry["network"] for entry in summary] == ["resnet50", "xception", "vgg19"]  # no rows, no line
    assert summary[0]["best_peer"] == "keras" and summary[0]["ours_to_best_peer"] == pytest.approx(0.4)
    assert summary[1]["best_peer"] == "torch" and summary[1]["ours_to_best_peer"] == pytest.approx(1.2)
    assert summary[2]["ours_to_best_peer"] is None
    text = table.markdown({"title": "T", "facts": {"machine": "m"}}, rows, networks, stacks)
    assert "| ResNet-50 | 2.00 | 4.00 | 5.00 | Keras 3 (TensorFlow) | 0.40 |" in text
    assert "| Xception | 3.00 | 2.50 | n/a | PyTorch eager | 1.20 |" in text
    assert "| VGG19 | n/a | 1.00 | n/a | PyTorch eager | n/a |" in text
    assert "| Xception | Keras 3 (TensorFlow) | 1 | failed |" in text and "RuntimeError: boom" in text
    assert "a / b" in text  # a '|' inside a cell would break the table


def test_rounds_interleave_the_stacks_and_the_summary_takes_each_stacks_median():
    assert run.job_order(["resnet50", "vgg19"], ["ours", "torch", "keras"], 2) == [
        ("resnet50", "ours", 1), ("resnet50", "torch", 1), ("resnet50", "keras", 1),
        ("resnet50", "torch", 2), ("resnet50", "keras", 2), ("resnet50", "ours", 2),
        ("vgg19", "ours", 1), ("vgg19", "torch", 1), ("vgg19", "keras", 1),
        ("vgg19", "torch", 2), ("vgg19", "keras", 2), ("vgg19", "ours", 2)]
    rows = [{**_row("resnet50", "ours", speed), "round": number} for number, speed in enumerate((3.0, 1.0, 4.0), 1)]
    rows += [{**_row("resnet50", "torch", speed), "round": number} for number, speed in enumerate((2.0, None, 5.0), 1)]
    (entry,) = table.summary(rows, ["resnet50"], ["ours", "torch"])
    assert entry["images_per_s"] == {"ours": 3.0, "torch": 3.5}  # a failed round is left out
    assert entry["ours_to_best_peer"] == pytest.approx(3.0 / 3.5)
    text = table.markdown({"title": "T", "facts": {"machine": "m"}}, rows, ["resnet50"], ["ours", "torch"])
    assert "the median of 3 rounds, run interleaved" in text
    assert "| ResNet-50 | PyTorch eager | 2 | failed |" in text


def test_time_steps_times_the_first_step_apart_and_takes_the_median():
    calls = []

    def step() -> float:
        calls.append(1)
        return 1.0

    timing = job_common.time_steps(step, warmup_steps=2, steps=3)
    assert len(calls) == 6 and timing["timed_steps"] == 3
    assert timing["step_s_min"] <= timing["step_s_median"] <= timing["step_s_max"]
    with pytest.raises(FloatingPointError):
        job_common.time_steps(lambda: math.nan, warmup_steps=0, steps=1)


def test_precision_defaults_to_the_devices_and_can_be_chosen():
    parse = lambda *argv: job_common.parse_arguments("job", argv=["--network=vgg19", *argv]).precision  # noqa: E731
    assert parse() == "float32" and parse("--device=gpu") == "bfloat16"
    assert parse("--precision=bfloat16") == "bfloat16" and parse("--device=gpu", "--precision=float32") == "float32"
    with pytest.raises(SystemExit):
        parse("--precision=float16")


@pytest.mark.parametrize("argv, flag", [(["--networks=resnet51"], "--networks"), (["--stacks=jax"], "--stacks"),
                                        (["--image_size=16"], "--image_size"), (["--steps=0"], "--steps"),
                                        (["--rounds=0"], "--rounds"),
                                        (["--torch_python=/nonexistent/python"], "--torch_python"),
                                        (["--out=table.txt"], "--out"),
                                        (["--idle_threshold_pct=0"], "--idle_threshold_pct"),
                                        (["--precision=float16"], "--precision")])
def test_bad_flags_name_the_flag(argv, flag):
    with pytest.raises(app.UsageError, match=flag):
        run.main(argv)


def test_our_job_runs_through_the_harness(tmp_path):
    """Our real train step (VGG19 + Dense(1), 32 px, batch 1, one timed step) in a subprocess."""
    out = tmp_path / "peers.md"
    status = run.main(["--stacks=ours", "--networks=vgg19", "--image_size=32", "--batch_size=1", "--warmup_steps=0",
                       "--steps=1", f"--ours_python={sys.executable}", "--idle_threshold_pct=100", "--idle_timeout_s=1",
                       f"--out={out}"])
    document = json.loads((tmp_path / "peers.json").read_text())
    (row,) = document["rows"]
    assert status == 0, row
    assert row["status"] == "ok" and row["network"] == "vgg19" and row["stack"] == "ours"
    assert row["precision"] == document["header"]["precision"] == "float32" and ", float32," in row["built"]
    # keras.applications.VGG19(include_top=False) has 20,024,384 parameters; Dense(1) adds 513: no sex head
    assert row["parameters"] == 20_024_384 + 513
    assert row["images_per_s"] > 0 and row["first_step_s"] >= row["compile_s"] > 0
    assert math.isfinite(row["last_loss"])
    assert document["header"]["versions"]["ours"]["boneage_jax"] == run.REPO
    assert "| VGG19 |" in out.read_text()


def test_a_peer_venv_is_installed_once_per_version_of_its_requirements(tmp_path, monkeypatch):
    """``venvs.ensure`` with a stand-in interpreter that records each pip call (no real install)."""
    root = tmp_path / "venvs"
    (root / "torch" / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    python = root / "torch" / "bin" / "python"
    python.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexit ${{FAIL:-0}}\n")
    python.chmod(0o755)
    requirements = tmp_path / "torch.txt"
    requirements.write_text("torch==1\n")
    monkeypatch.setitem(venvs.REQUIREMENTS, "torch", str(requirements))
    assert venvs.ensure("torch", root=str(root), log=lambda line: None) == str(python)
    assert venvs.ensure("torch", root=str(root), log=lambda line: None) == str(python)
    assert calls.read_text().splitlines() == [f"-m pip install --no-compile -r {requirements}"]
    requirements.write_text("torch==2\n")  # a new pin installs again
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(venvs.VenvError, match=r"torch\.txt.*exit 1.*torch\.log"):
        venvs.ensure("torch", root=str(root), log=lambda line: None)
    monkeypatch.delenv("FAIL")
    venvs.ensure("torch", root=str(root), log=lambda line: None)
    assert len(calls.read_text().splitlines()) == 3
    assert len([name for name in os.listdir(root / "torch") if name.startswith(".installed-")]) == 1


def test_serve_steps_runs_one_timed_step_per_line_until_done():
    losses = iter([5.0, 4.0, 3.0, 2.0, 1.0])
    written = []
    timing = job_common.serve_steps(lambda: next(losses), warmup_steps=1, lines=["step\n", " step ", "done\n", "step"],
                                    write=written.append)
    assert written[0] == job_common.READY_MARKER
    assert [line.split()[0] for line in written[1:]] == [job_common.STEP_MARKER.strip()] * 2
    assert [float(line.split()[2]) for line in written[1:]] == [3.0, 2.0]  # after the first and the warm-up step
    assert timing["timed_steps"] == 2 and len(timing["step_s"]) == 2 and timing["last_loss"] == 2.0
    with pytest.raises(ValueError, match="'go'"):
        job_common.serve_steps(lambda: 1.0, 0, lines=["go"], write=written.append)
    with pytest.raises(ValueError, match="no 'step' line"):
        job_common.serve_steps(lambda: 1.0, 0, lines=["done"], write=written.append)
    with pytest.raises(FloatingPointError):
        job_common.serve_steps(iter([1.0, math.nan]).__next__, 0, lines=["step"], write=written.append)


# A stand-in peer interpreter: answers --versions, and in --serve mode steps as job_common says,
# each step reporting STEP_S seconds; FAIL_AT=k makes it exit with an error at its k-th step,
# HANG makes it never get ready.
FAKE_JOB = """
import json, os, sys, time
if os.environ.get("HANG"):
    time.sleep(60)
if "--versions" in sys.argv:
    print("PEER_RESULT " + json.dumps({"versions": {"torch": "fake"}}), flush=True)
    sys.exit(0)
print("PEER_READY", flush=True)
times = []
for line in sys.stdin:
    if line.strip() == "done":
        break
    if len(times) + 1 == int(os.environ.get("FAIL_AT", "0")):
        sys.exit("RuntimeError: fake out of memory")
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    times.append(float(os.environ["STEP_S"]))
    print(f"PEER_STEP {times[-1]} 1.0", flush=True)
print("PEER_RESULT " + json.dumps({"stack": "torch", "network": "vgg19", "images_per_s": 1 / times[0],
      "step_s_median": times[0], "step_s_min": times[0], "step_s_max": times[0], "first_step_s": 1.0,
      "parameters": 1, "built": "fake", "step_s": times}), flush=True)
"""


def _fake_interpreter(tmp_path, name: str, **env) -> str:
    script = tmp_path / f"{name}.py"
    script.write_text(FAKE_JOB)
    python = tmp_path / name
    exports = "".join(f"export {key}={value}\n" for key, value in env.items())
    python.write_text(f"#!/bin/sh\n{exports}exec {sys.executable} {script} \"$@\"\n")
    python.chmod(0o755)
    return str(python)


def test_a_served_job_steps_on_request_and_reports_its_cpu(tmp_path):
    job = harness.ServedJob([_fake_interpreter(tmp_path, "fake", STEP_S=0.25), "job.py", "--serve"], env=os.environ,
                            cwd=str(tmp_path))
    job.wait_ready(60)
    assert [job.step(60), job.step(60)] == [0.25, 0.25]
    assert job.job_cpu_pct > 0 and 0.0 <= job.others_cpu_pct <= 100.0
    done = job.finish(60)
    assert done.returncode == 0 and harness.parse_report(done.stdout)["step_s"] == [0.25, 0.25]
    failing = harness.ServedJob([_fake_interpreter(tmp_path, "failing", STEP_S=1, FAIL_AT=1)], env=os.environ,
                                cwd=str(tmp_path))
    failing.wait_ready(60)
    with pytest.raises(harness.JobFailed, match="exited \\(1\\) before PEER_STEP: RuntimeError: fake out of memory"):
        failing.step(60)
    assert failing.finish(60).returncode == 1
    hanging = harness.ServedJob([_fake_interpreter(tmp_path, "hanging", STEP_S=1, HANG=1)], env=os.environ,
                                cwd=str(tmp_path))
    with pytest.raises(harness.JobFailed, match="no PEER_READY line within the deadline"):
        hanging.wait_ready(0.5)
    hanging.kill()
    assert hanging.finish(60).timed_out


def test_paired_takes_the_fastest_peer_of_each_turn_over_ours():
    def row(stack, times, status="ok"):
        return {"network": "resnet50", "stack": stack, "status": status, "interleaved": True, "step_s": times}

    rows = [row("ours", [1.0, 2.0, 4.0]), row("torch", [2.0, 2.0, 2.0]), row("keras", [3.0, 1.0, 8.0]),
            row("torch_compile", [0.1, 0.1, 0.1], status="failed")]
    pair = table.paired(rows, "resnet50", ["ours", "torch", "keras", "torch_compile"])
    # per turn: min(2, 3) / 1, min(2, 1) / 2, min(2, 8) / 4 = 2, 0.5, 0.5
    assert pair == {"median": 0.5, "q1": 0.5, "q3": pytest.approx(1.25), "ours_faster": 1, "turns": 3}
    assert table.paired(rows[:1], "resnet50", ["ours", "torch"]) is None  # no peer
    assert table.paired([{**r, "interleaved": False} for r in rows], "resnet50", ["ours", "torch"]) is None
    assert run.turn_order(["ours", "torch", "keras"], 4) == ["torch", "keras", "ours"]


def test_interleave_steps_the_stacks_in_turns(tmp_path):
    """Our real step (VGG19, 32 px, batch 1) in turns with a stand-in peer that reports 100 s steps
    and one that fails at its second step."""
    out = tmp_path / "peers.md"
    status = run.main(["--interleave", "--stacks=ours,torch,keras", "--networks=vgg19", "--image_size=32",
                       "--batch_size=1", "--warmup_steps=0", "--steps=3", f"--ours_python={sys.executable}",
                       f"--torch_python={_fake_interpreter(tmp_path, 'slow', STEP_S=100)}",
                       f"--keras_python={_fake_interpreter(tmp_path, 'failing', STEP_S=1, FAIL_AT=2)}",
                       "--idle_threshold_pct=100", "--idle_timeout_s=1", f"--out={out}"])
    document = json.loads((tmp_path / "peers.json").read_text())
    ours, slow, failing = document["rows"]
    assert status == 1  # one job failed
    assert ours["status"] == "ok" and ours["interleaved"] and len(ours["step_s"]) == 3
    assert slow["status"] == "ok" and slow["step_s"] == [100.0] * 3
    assert failing["status"] == "failed" and "RuntimeError: fake out of memory" in failing["note"]
    (entry,) = document["summary"]
    assert entry["paired"]["turns"] == 3 and entry["paired"]["ours_faster"] == 3
    text = out.read_text()
    assert "turn by turn" in text and ", 3 of 3 |" in text
    with pytest.raises(app.UsageError, match="--rounds"):
        run.main(["--interleave", "--rounds=2"])
