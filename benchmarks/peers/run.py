r"""Peer benchmark: our training step beside PyTorch's and Keras's, on the same workload, one run.

    make bench-peers [ARGS="--networks=resnet50,xception --torch_python=/path/to/bin/python"]
    python -m benchmarks.peers.run [--networks=resnet50,xception,inception_v3,efficientnet_b0,vgg19] \
        [--image_size=256] [--batch_size=8] [--warmup_steps=2] [--steps=10] [--device=cpu] \
        [--stacks=ours,torch,keras] [--ours_python=...] [--torch_python=...] [--keras_python=...] \
        [--out=benchmarks/results/peers_cpu_256px_b8.md]

The workload, in every stack: a random float32 batch resident in memory, the backbone without its
top ending in global average pooling, Dense(1), MSE loss, AdamW (learning rate 1e-3, weight decay
1e-4), BatchNorm in training mode. Each job times its first step apart (it includes any tracing
and compilation), runs ``--warmup_steps`` untimed steps, then times ``--steps`` steps; a row gives
the median step time, images/s = batch / median, and the first step's time. Per network the
table gives our images/s over the best peer's. What each stack builds, exactly:
``job_ours.py`` (``benchmarks/models.py``'s ``TrainStep``: the real ``train.train_step``),
``job_torch.py`` (torchvision / timm, eager, channels_last), ``job_keras.py``
(``keras.applications`` through ``train_on_batch``, Keras's default ``jit_compile``).

Each job (stack x network) is its own subprocess, run one at a time, each started once the
machine has been less than ``--idle_threshold_pct`` busy over one second (after
``--idle_timeout_s`` it starts anyway and its row says so). While it runs, the harness measures
the CPU time other processes used (``harness.py``), shown as "others' CPU %" so a noisy figure is
visible as such. A job that fails or passes ``--job_timeout_s`` gives a row with its last error
line. Rows are written to ``--out`` (Markdown) and the ``.json`` beside it as each job finishes.

``--interleave`` runs a network's jobs side by side instead, each in ``--serve`` mode
(``job_common``): once the machine is quiet they are started one after the other, each building
its step and running its first and warm-up steps before the next starts; then they take turns,
one timed step each, ``--steps`` times, the order rotating by one each turn (ours, PyTorch, Keras;
PyTorch, Keras, ours; ...). This machine's speed drifts by 20-40% within minutes, which moves
whole jobs run one after the other by as much as the stacks differ; steps taken in turns see the
same drift. The table then adds, per network, the median (and quartiles) over the turns of the
best peer's step time in that turn over ours, and in how many turns ours was the faster. The
jobs of a network are all in memory at once (on this project's 24 GiB machine the five networks
at 256 px, batch 8 fitted); a job waiting for its turn sleeps, and any CPU it uses counts among
the others' CPU of the job stepping.

Interpreters: ours runs with ``--ours_python`` (default: the one running this harness, the
project's ``.venv``) with the checkout's root on ``PYTHONPATH``. The peers run in their own venvs:
``--torch_python`` / ``--keras_python`` name existing interpreters; without them the harness
creates ``benchmarks/peers/.venvs/{torch,keras}`` from the pinned ``torch.txt`` / ``keras.txt``
(minutes, once; see ``venvs.py``). Nothing but this command creates them.

``--precision=bfloat16`` on a CPU (for CPUs with AVX512-BF16 or AMX, where oneDNN has bfloat16
kernels): ours with ``config.model.dtype="bfloat16"``, PyTorch under ``torch.autocast("cpu",
bfloat16)``, Keras with ``mixed_bfloat16``; parameters and the loss stay float32 in every stack.

``--device=gpu`` (for a machine with a GPU; this mode has NOT been run yet): ours in bfloat16
(``config.model.dtype``) against PyTorch with bfloat16 autocast, channels_last, eager
(``torch``) and ``torch.compile`` (``torch_compile``), and Keras with the ``mixed_bfloat16``
policy (XLA, Keras's default on a GPU), at the sizes the flags give (e.g. ``--image_size=512
--batch_size=32``). It needs a CUDA JAX in ``--ours_python`` and a GPU TensorFlow in
``--keras_python`` (``tensorflow-cpu`` has no GPU).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)  # also as a script: python benchmarks/peers/run.py

from benchmarks.peers import harness, table, venvs  # noqa: E402
from benchmarks.peers.job_common import NETWORKS  # noqa: E402
from boneage_jax import cli  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
JOB_SCRIPTS = {"ours": "job_ours.py", "torch": "job_torch.py", "torch_compile": "job_torch.py",
               "keras": "job_keras.py"}
# Which interpreter (and so which venv) each stack runs in.
INTERPRETER_OF = {"ours": "ours", "torch": "torch", "torch_compile": "torch", "keras": "keras"}
DEFAULT_STACKS = {"cpu": ["ours", "torch", "keras"], "gpu": ["ours", "torch", "torch_compile", "keras"]}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")
VERSION_TIMEOUT_S = 600

FLAGS = flags.FlagValues()
_NETWORKS = flags.DEFINE_list("networks", list(NETWORKS), f"Networks, of {', '.join(NETWORKS)}.", flag_values=FLAGS)
_STACKS = flags.DEFINE_list("stacks", [], "Stacks, of ours, torch, torch_compile, keras (default: ours,torch,keras "
                            "on cpu; ours,torch,torch_compile,keras on gpu).", flag_values=FLAGS)
_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Where the steps run (gpu: bfloat16 / AMP; not run "
                            "yet).", flag_values=FLAGS)
_PRECISION = flags.DEFINE_enum("precision", None, ["float32", "bfloat16"], "Compute precision of every stack "
                               "(default: float32 on cpu, bfloat16 on gpu): ours config.model.dtype, PyTorch autocast, "
                               "Keras mixed_bfloat16.", flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Input side in pixels (Xception needs 71, InceptionV3 75 in "
                                   "Keras).", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per step.", flag_values=FLAGS)
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after the first.", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).", flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Runs of each job; a network's jobs run round by round, the stacks' order "
                               "rotating, and the table takes each stack's median, so a machine whose speed drifts "
                               "moves every stack alike.", flag_values=FLAGS)
_INTERLEAVE = flags.DEFINE_boolean("interleave", False, "Run a network's jobs side by side, one timed step each in "
                                   "turn (see the module docstring); the table adds the per-turn ratio to the best peer.",
                                   flag_values=FLAGS)
_OURS_PYTHON = flags.DEFINE_string("ours_python", "", "Interpreter of our job (default: this one).",
                                   flag_values=FLAGS)
_TORCH_PYTHON = flags.DEFINE_string("torch_python", "", "Interpreter with torch, torchvision and timm (default: "
                                    "benchmarks/peers/.venvs/torch, created from torch.txt).", flag_values=FLAGS)
_KERAS_PYTHON = flags.DEFINE_string("keras_python", "", "Interpreter with tensorflow and keras 3 (default: "
                                    "benchmarks/peers/.venvs/keras, created from keras.txt).", flag_values=FLAGS)
_KERAS_JIT = flags.DEFINE_enum("keras_jit_compile", "auto", ["auto", "true", "false"],
                               "Keras's model.compile(jit_compile=...); auto is Keras's default.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "", "Markdown table to write, the .json beside it (default: "
                           "benchmarks/results/peers_<device>_<size>px_b<batch>.md).", flag_values=FLAGS)
_JOB_TIMEOUT = flags.DEFINE_float("job_timeout_s", 1800.0, "A job still running after this is killed.",
                                  flag_values=FLAGS)
_IDLE_THRESHOLD = flags.DEFINE_float("idle_threshold_pct", 10.0, "A job starts once the machine is less busy than "
                                     "this (percent of all CPUs, over one second).", flag_values=FLAGS)
_IDLE_TIMEOUT = flags.DEFINE_float("idle_timeout_s", 300.0, "Longest wait for a quiet CPU before a job; it then "
                                   "starts anyway, noted in its row.", flag_values=FLAGS)


def machine(device: str) -> str:
    """CPU model, CPUs (and how many this process may use), the vector flags that matter, memory;
    the GPUs that nvidia-smi names on a GPU run."""
    model, cpu_flags = "", set()
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not cpu_flags:
                cpu_flags = set(value.split())
    model = model or platform.processor() or platform.machine()
    memory = ""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / 2**20:.0f} GiB memory"
    present = " ".join(flag for flag in CPU_FLAGS if flag in cpu_flags) or "none of " + " ".join(CPU_FLAGS)
    text = (f"{model}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), flags: {present}{memory}, "
            f"Linux {platform.release()}")
    if device == "gpu" and shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, check=False)
        text += "; GPU: " + ("; ".join(query.stdout.split("\n")).strip("; ") or "nvidia-smi failed")
    return text


def job_environment(stack: str) -> dict[str, str]:
    """Ours with the checkout's root first on PYTHONPATH; the peers without our PYTHONPATH."""
    env = dict(os.environ)
    if stack == "ours":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    else:
        env.pop("PYTHONPATH", None)
    return env


def job_command(python: str, stack: str, network: str | None) -> list[str]:
    """The job's command line: ``network``'s step with the flags' sizes, or the versions probe."""
    command = [python, os.path.join(HERE, JOB_SCRIPTS[stack])]
    if network is None:
        return command + ["--versions"]
    command += [f"--network={network}", f"--image_size={_IMAGE_SIZE.value}", f"--batch_size={_BATCH_SIZE.value}",
                f"--warmup_steps={_WARMUP_STEPS.value}", f"--steps={_STEPS.value}", f"--device={_DEVICE.value}",
                f"--precision={precision()}"]
    if stack == "torch_compile":
        command.append("--compile")
    if stack == "keras":
        command.append(f"--jit_compile={_KERAS_JIT.value}")
    return command


def probe_versions(python: str, kind: str) -> dict:
    """The versions that the job of interpreter ``kind`` (ours, torch, keras) reports, or ``{"error": ...}``."""
    try:
        done = subprocess.run(job_command(python, kind, None), capture_output=True, text=True, cwd=REPO,
                              env=job_environment(kind), timeout=VERSION_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    report = harness.parse_report(done.stdout)
    if done.returncode != 0 or report is None:
        return {"error": harness.last_error_line(done.stderr) or f"exit {done.returncode}"}
    return report["versions"]


def describe_versions(stack: str, python: str | None, versions: dict | None, error: str) -> str:
    """One header line for the interpreter ``stack`` (ours, torch, keras)."""
    if python is None:
        return f"not available: {error}"
    if "error" in versions:
        return f"{python}: versions unknown ({versions['error']})"
    keys = {"ours": ("jax", "jaxlib", "flax", "optax"), "torch": ("torch", "torchvision", "timm"),
            "keras": ("keras", "tensorflow")}[stack]
    text = ", ".join(f"{key} {versions[key]}" for key in keys if key in versions)
    text += f", python {versions.get('python', '?')} ({python})"
    if stack == "ours":
        text += (f", code from {versions.get('boneage_jax', '?')}, XLA_FLAGS={versions.get('XLA_FLAGS') or '(none)'}"
                 f", convolutions: {versions.get('convolutions', '?')}, allocator: {versions.get('allocator', '?')}")
    elif stack == "torch":
        text += f", {versions.get('threads')} threads, CPU capability {versions.get('cpu_capability')}"
    else:
        text += f", backend {versions.get('backend')}, TF_ENABLE_ONEDNN_OPTS={versions.get('TF_ENABLE_ONEDNN_OPTS')}"
    return text


def job_order(networks: list[str], stacks: list[str], rounds: int) -> list[tuple[str, str, int]]:
    """``(network, stack, round)`` in running order: network by network, round by round, the
    stacks' order rotated by one each round (so no stack always runs first after a compilation-
    heavy job or last in a warm machine)."""
    return [(network, stack, number + 1) for network in networks for number in range(rounds)
            for stack in stacks[number % len(stacks):] + stacks[:number % len(stacks)]]


def job_row(network: str, stack: str, run: harness.JobRun, quiet: harness.Quiet, threshold_pct: float,
            timeout_s: float) -> dict:
    """The table row of one finished (or killed) job."""
    row = {"network": network, "stack": stack, "wall_s": run.wall_s, "others_cpu_pct": run.others_cpu_pct,
           "job_cpu_pct": run.job_cpu_pct, "busy_before_pct": quiet.busy_pct, "waited_for_idle_s": quiet.waited_s}
    notes = []
    if not quiet.quiet:
        notes.append(f"the CPU never got below {threshold_pct:g}% busy before this job "
                     f"({quiet.busy_pct:.0f}% after {quiet.waited_s:.0f} s)")
    report = harness.parse_report(run.stdout)
    if run.timed_out:
        row["status"] = "timeout"
        last = harness.last_error_line(run.stderr)
        notes.insert(0, f"killed after {timeout_s:g} s" + (f" (last line: {last})" if last else ""))
    elif run.returncode != 0 or report is None:
        row["status"] = "failed"
        notes.insert(0, harness.last_error_line(run.stderr) or f"exit {run.returncode} without a result line")
    else:
        row["status"] = "ok"
        report.pop("versions", None)
        report.pop("stack", None)
        row.update(report)
    row["note"] = "; ".join(notes)
    return row


def outcome(row: dict) -> str:
    """One progress line for a finished job."""
    if row["status"] != "ok":
        return f"{row['status']}: {row['note']}"
    return (f"{row['images_per_s']:.2f} images/s (median step {row['step_s_median']:.3f} s, first step "
            f"{row['first_step_s']:.1f} s), others' CPU {row['others_cpu_pct']:.1f}%")


def precision() -> str:
    """``--precision``, or the device's default (bfloat16 on a GPU, float32 on a CPU)."""
    return _PRECISION.value or ("bfloat16" if _DEVICE.value == "gpu" else "float32")


def output_paths(out: str) -> tuple[str, str]:
    if not out:
        suffix = "" if precision() == ("bfloat16" if _DEVICE.value == "gpu" else "float32") else f"_{precision()}"
        name = f"peers_{_DEVICE.value}_{_IMAGE_SIZE.value}px_b{_BATCH_SIZE.value}{suffix}"
        out = os.path.join(REPO, "benchmarks", "results", name + ".md")
    if not out.endswith(".md"):
        raise app.UsageError(f"--out={out}: expected a Markdown path ending in .md (the .json is written beside it)")
    return out, out[:-3] + ".json"


def check_flags() -> list[str]:
    """The stacks to run; raises ``app.UsageError`` naming a flag with a bad value."""
    unknown = [name for name in _NETWORKS.value if name not in NETWORKS]
    if unknown or not _NETWORKS.value:
        raise app.UsageError(f"--networks={','.join(_NETWORKS.value)}: expected names of {', '.join(NETWORKS)}")
    stacks = _STACKS.value or DEFAULT_STACKS[_DEVICE.value]
    unknown = [stack for stack in stacks if stack not in JOB_SCRIPTS]
    if unknown:
        raise app.UsageError(f"--stacks={','.join(stacks)}: expected names of {', '.join(JOB_SCRIPTS)}")
    for flag, least in ((_IMAGE_SIZE, 32), (_BATCH_SIZE, 1), (_WARMUP_STEPS, 0), (_STEPS, 1), (_ROUNDS, 1)):
        if flag.value < least:
            raise app.UsageError(f"--{flag.name}={flag.value}: expected an integer >= {least}")
    if _INTERLEAVE.value and _ROUNDS.value > 1:
        raise app.UsageError(f"--rounds={_ROUNDS.value} with --interleave: expected 1 (more --steps give more turns)")
    if not 0 < _IDLE_THRESHOLD.value <= 100:
        raise app.UsageError(f"--idle_threshold_pct={_IDLE_THRESHOLD.value}: expected a percentage in (0, 100]")
    for flag in (_JOB_TIMEOUT, _IDLE_TIMEOUT):
        if flag.value <= 0:
            raise app.UsageError(f"--{flag.name}={flag.value}: expected a positive number of seconds")
    for flag in (_OURS_PYTHON, _TORCH_PYTHON, _KERAS_PYTHON):
        if flag.value and not (os.path.isfile(flag.value) and os.access(flag.value, os.X_OK)):
            raise app.UsageError(f"--{flag.name}={flag.value}: expected an executable Python interpreter")
    return stacks


def interpreters(stacks: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The interpreter of each needed interpreter kind (ours, torch, keras), creating a peer venv
    where no flag names one; and the error of each that could not be had."""
    given = {"ours": _OURS_PYTHON.value or sys.executable, "torch": _TORCH_PYTHON.value, "keras": _KERAS_PYTHON.value}
    found, errors = {}, {}
    for kind in dict.fromkeys(INTERPRETER_OF[stack] for stack in stacks):
        if given[kind]:
            found[kind] = given[kind]
            continue
        try:
            found[kind] = venvs.ensure(kind)
        except (venvs.VenvError, OSError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            errors[kind] = str(error)
    return found, errors


def turn_order(stacks: list[str], turn: int) -> list[str]:
    """The stacks' order in turn ``turn`` (0-based) of an interleaved run: rotated by one each turn."""
    shift = turn % len(stacks) if stacks else 0
    return stacks[shift:] + stacks[:shift]


def run_interleaved(network: str, stacks: list[str], found: dict[str, str], errors: dict[str, str]) -> list[dict]:
    """``--interleave``: every stack's job for ``network`` in ``--serve`` mode, stepped in turns;
    one row per stack (``interleaved`` True, its step times in ``step_s`` in turn order)."""
    rows: dict[str, dict] = {}
    jobs: dict[str, harness.ServedJob] = {}
    failures: dict[str, str] = {}
    quiet = harness.wait_for_idle(_IDLE_THRESHOLD.value, 1.0, _IDLE_TIMEOUT.value)
    for stack in stacks:
        kind = INTERPRETER_OF[stack]
        if kind not in found:
            rows[stack] = {"network": network, "stack": stack, "status": "no interpreter", "note": errors[kind]}
            continue
        print(f"{NETWORKS[network]}, {table.STACK_NAMES[stack]}: building and warming up", flush=True)
        jobs[stack] = harness.ServedJob(job_command(found[kind], stack, network) + ["--serve"],
                                        env=job_environment(stack), cwd=REPO)
        try:
            jobs[stack].wait_ready(_JOB_TIMEOUT.value)
        except harness.JobFailed as error:
            failures[stack] = str(error)
            jobs[stack].kill()
            print(f"  failed: {error}", flush=True)
    for turn in range(_STEPS.value):
        times = []
        for stack in turn_order([stack for stack in stacks if stack in jobs], turn):
            if stack in failures:
                continue
            try:
                times.append(f"{table.STACK_NAMES[stack]} {jobs[stack].step(_JOB_TIMEOUT.value):.3f} s")
            except harness.JobFailed as error:
                failures[stack] = str(error)
                jobs[stack].kill()
                times.append(f"{table.STACK_NAMES[stack]} failed: {error}")
        print(f"{NETWORKS[network]}, turn {turn + 1}/{_STEPS.value}: " + ", ".join(times), flush=True)
    for stack, job in jobs.items():
        row = job_row(network, stack, job.finish(60.0), quiet, _IDLE_THRESHOLD.value, _JOB_TIMEOUT.value)
        if stack in failures:
            row["status"] = "failed"
            row["note"] = "; ".join(part for part in (failures[stack], row["note"]) if part)
        rows[stack] = row
    for row in rows.values():
        row["round"], row["interleaved"] = 1, True
    return [rows[stack] for stack in stacks]


def main(argv: Sequence[str]) -> int:
    """Runs every (network, stack) job and writes the table; exit status 1 if any job failed."""
    cli.parse(FLAGS, argv)
    stacks = check_flags()
    networks = list(dict.fromkeys(_NETWORKS.value))
    markdown_path, json_path = output_paths(_OUT.value)
    found, errors = interpreters(stacks)
    kinds = list(dict.fromkeys(INTERPRETER_OF[stack] for stack in stacks))
    facts = {"machine": machine(_DEVICE.value)}
    versions = {}
    for kind in kinds:
        versions[kind] = probe_versions(found[kind], kind) if kind in found else None
        label = {"ours": "ours", "torch": "PyTorch", "keras": "Keras"}[kind]
        facts[label] = describe_versions(kind, found.get(kind), versions[kind], errors.get(kind, ""))
    facts["workload"] = ("random float32 input resident in memory; backbone without its top, global average pooling, "
                         "Dense(1); MSE loss; AdamW (learning rate 1e-3, weight decay 1e-4); BatchNorm in training "
                         "mode; " + ("ours bfloat16, PyTorch bfloat16 autocast, Keras mixed_bfloat16"
                                     if precision() == "bfloat16" else "float32"))
    if _INTERLEAVE.value:
        facts["timing"] = (f"first step (with any compilation) timed apart, then {_WARMUP_STEPS.value} untimed warm-up "
                           f"step(s), then {_STEPS.value} timed steps per stack taken in turns (one step each, the "
                           "order rotating), all of a network's jobs alive at once; images/s = batch / median step; "
                           f"the jobs started once the machine was < {_IDLE_THRESHOLD.value:g}% busy over 1 s")
    else:
        facts["timing"] = (f"first step (with any compilation) timed apart, then {_WARMUP_STEPS.value} untimed warm-up "
                           f"step(s), then the median of {_STEPS.value} timed steps; images/s = batch / median; each job "
                           f"a subprocess, one at a time, started once the machine was < {_IDLE_THRESHOLD.value:g}% busy "
                           "over 1 s" + (f"; {_ROUNDS.value} rounds per network, run interleaved (the stacks' order "
                                         "rotating), each stack's median round in the summary" if _ROUNDS.value > 1 else ""))
    facts["command"] = "`" + shlex.join(["python", "-m", "benchmarks.peers.run", *argv]) + "`"
    facts["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = {"title": f"Peer benchmark: training step on {_DEVICE.value.upper()}, {_IMAGE_SIZE.value} px, "
                       f"batch {_BATCH_SIZE.value}, {precision()}",
              "facts": facts, "versions": versions, "device": _DEVICE.value, "precision": precision(), "image_size": _IMAGE_SIZE.value,
              "batch_size": _BATCH_SIZE.value, "warmup_steps": _WARMUP_STEPS.value, "steps": _STEPS.value,
              "rounds": _ROUNDS.value, "interleave": _INTERLEAVE.value,
              "networks": networks, "stacks": stacks}
    for key, value in facts.items():
        print(f"{key}: {value}", flush=True)
    rows: list[dict] = []
    if _INTERLEAVE.value:
        for network in networks:
            rows += run_interleaved(network, stacks, found, errors)
            for row in rows[-len(stacks):]:
                print(f"{NETWORKS[network]}, {table.STACK_NAMES[row['stack']]}: {outcome(row)}", flush=True)
            table.write(markdown_path, json_path, header, rows, networks, stacks)
        jobs = []
    else:
        jobs = job_order(networks, stacks, _ROUNDS.value)
    for number, (network, stack, round_number) in enumerate(jobs, 1):
        kind = INTERPRETER_OF[stack]
        progress = f", round {round_number}/{_ROUNDS.value}" if _ROUNDS.value > 1 else ""
        print(f"[{number}/{len(jobs)}] {NETWORKS[network]}, {table.STACK_NAMES[stack]}{progress}: ", end="", flush=True)
        if kind not in found:
            row = {"network": network, "stack": stack, "status": "no interpreter", "note": errors[kind]}
        else:
            quiet = harness.wait_for_idle(_IDLE_THRESHOLD.value, 1.0, _IDLE_TIMEOUT.value)
            run = harness.run_job(job_command(found[kind], stack, network), env=job_environment(stack), cwd=REPO,
                                  timeout_s=_JOB_TIMEOUT.value)
            row = job_row(network, stack, run, quiet, _IDLE_THRESHOLD.value, _JOB_TIMEOUT.value)
        row["round"] = round_number
        print(outcome(row), flush=True)
        rows.append(row)
        table.write(markdown_path, json_path, header, rows, networks, stacks)
    print()
    print(table.markdown(header, rows, networks, stacks))
    print(f"written: {markdown_path} and {json_path}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    cli.run(main)
