"""What every peer-benchmark job shares: its arguments, the timing loop and how it reports.

Standard library only: each job runs in its own stack's interpreter (ours, PyTorch's venv,
Keras's venv), which has none of the other stacks' packages. A job script puts its own folder on
``sys.path`` (Python does so for a script) and imports this module as ``job_common``; the harness
imports it as ``benchmarks.peers.job_common`` for the network names.

A job builds one network's training step, runs the first step (timed on its own: it includes any
tracing and compilation), then ``--warmup_steps`` untimed steps, then ``--steps`` timed ones, and
prints one line ``PEER_RESULT {json}`` on stdout. Every step ends with the loss on the host, so a
step's time covers all of its work. ``--versions`` prints the stack's versions the same way and
builds nothing.

With ``--serve`` (the harness's ``--interleave``) the job runs its first and warm-up steps, prints
``PEER_READY``, then runs one timed step for each ``step`` line it reads on stdin, answering
``PEER_STEP <seconds> <loss>``, until a ``done`` line (or the end of its input); then it prints its
``PEER_RESULT`` over the steps it ran. The harness steps several stacks' jobs in turn this way, so
the machine's drift moves every stack alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable

# The networks every stack builds: key -> the name the tables show.
NETWORKS = {
    "resnet50": "ResNet-50",
    "xception": "Xception",
    "inception_v3": "InceptionV3",
    "efficientnet_b0": "EfficientNet-B0",
    "vgg19": "VGG19",
}
RESULT_MARKER = "PEER_RESULT "
READY_MARKER = "PEER_READY"
STEP_MARKER = "PEER_STEP "
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4  # configs.common.base_config's, used by every stack


def parse_arguments(description: str, add_extra: Callable[[argparse.ArgumentParser], None] | None = None,
                    argv: list[str] | None = None) -> argparse.Namespace:
    """The job's arguments: ``--versions``, or a network and the workload's sizes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--versions", action="store_true", help="print the stack's versions and exit")
    parser.add_argument("--network", choices=sorted(NETWORKS))
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default=None,
                        help="compute precision (default: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--serve", action="store_true",
                        help="after the warm-up, run one timed step per 'step' line on stdin until 'done' "
                             "(--steps is then unused)")
    if add_extra is not None:
        add_extra(parser)
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "bfloat16" if args.device == "gpu" else "float32"
    if not args.versions:
        if args.network is None:
            parser.error("--network is required (one of " + ", ".join(sorted(NETWORKS)) + ")")
        for flag, value, least in (("image_size", args.image_size, 32), ("batch_size", args.batch_size, 1),
                                   ("warmup_steps", args.warmup_steps, 0), ("steps", args.steps, 1)):
            if value < least:
                parser.error(f"--{flag}={value}: expected an integer >= {least}")
    return args


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), which may be fewer than the machine has."""
    return len(os.sched_getaffinity(0))


def time_steps(step: Callable[[], float], warmup_steps: int, steps: int) -> dict:
    """Runs ``step`` (one training step, returning its loss on the host) once timed as the first
    step, ``warmup_steps`` times untimed, then ``steps`` times timed. Raises ``FloatingPointError``
    if a loss is not finite."""
    first_step_s, first_loss = _first_and_warmup(step, warmup_steps)
    times, loss = [], first_loss
    for _ in range(steps):
        seconds, loss = _timed(step)
        times.append(seconds)
    return _timing(first_step_s, first_loss, warmup_steps, times, loss)


def serve_steps(step: Callable[[], float], warmup_steps: int, lines: Iterable[str] | None = None,
                write: Callable[[str], None] | None = None) -> dict:
    """The ``--serve`` protocol (module docstring): first and warm-up steps, ``PEER_READY``, then
    one timed step per ``step`` line of ``lines`` (stdin) until ``done``. Raises ``ValueError`` on
    another line or when no step was asked for, ``FloatingPointError`` on a non-finite loss."""
    lines = sys.stdin if lines is None else lines
    write = write or (lambda text: print(text, flush=True))
    first_step_s, first_loss = _first_and_warmup(step, warmup_steps)
    write(READY_MARKER)
    times, loss = [], first_loss
    for line in lines:
        command = line.strip()
        if command == "done":
            break
        if command != "step":
            raise ValueError(f"stdin line {command!r}: expected 'step' or 'done'")
        seconds, loss = _timed(step)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at served step {len(times) + 1}")
        times.append(seconds)
        write(f"{STEP_MARKER}{seconds:.6f} {loss:.6g}")
    if not times:
        raise ValueError("stdin: no 'step' line before 'done' or the end of input")
    return _timing(first_step_s, first_loss, warmup_steps, times, loss)


def _first_and_warmup(step: Callable[[], float], warmup_steps: int) -> tuple[float, float]:
    first_step_s, first_loss = _timed(step)
    for _ in range(warmup_steps):
        step()
    return first_step_s, first_loss


def _timed(step: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    loss = step()
    return time.perf_counter() - start, loss


def _timing(first_step_s: float, first_loss: float, warmup_steps: int, times: list[float], loss: float) -> dict:
    if not (math.isfinite(first_loss) and math.isfinite(loss)):
        raise FloatingPointError(f"non-finite loss: first {first_loss}, last {loss}")
    return {"first_step_s": first_step_s, "step_s_median": statistics.median(times), "step_s_min": min(times),
            "step_s_max": max(times), "timed_steps": len(times), "warmup_steps": warmup_steps,
            "step_s": times, "first_loss": first_loss, "last_loss": loss}


def run_steps(step: Callable[[], float], args: argparse.Namespace) -> dict:
    """:func:`serve_steps` with ``--serve``, else :func:`time_steps` with ``--steps``."""
    if args.serve:
        return serve_steps(step, args.warmup_steps)
    return time_steps(step, args.warmup_steps, args.steps)


def result(args: argparse.Namespace, stack: str, timing: dict, **fields) -> dict:
    """The job's report: ``timing`` (from :func:`time_steps`), images/s (batch / median step) and
    ``fields`` (parameters, what was built, versions)."""
    return {"stack": stack, "network": args.network, "image_size": args.image_size, "batch_size": args.batch_size,
            "device": args.device, "precision": args.precision, **timing, "images_per_s": args.batch_size / timing["step_s_median"], **fields}


def emit(report: dict) -> None:
    """Prints ``report`` as the job's one result line."""
    print(RESULT_MARKER + json.dumps(report), flush=True)


def python_version() -> str:
    return sys.version.split()[0]
