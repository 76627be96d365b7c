r"""Is a setting faster? One family's training step under two environments, steps interleaved.

    python benchmarks/ab.py NAME --a KEY=VALUE [--a ...] --b KEY=VALUE [--b ...] \
        [--pairs=16] [--image_size=256] [--batch_size=8] [--sex_fusion=none]

e.g. ``python benchmarks/ab.py xception --a BONEAGE_ONEDNN_MATMUL=0`` (B: the defaults) or
``--b XLA_FLAGS=--xla_cpu_use_xnnpack=false``. ``--a_checkout DIR`` (``--b_checkout``) runs that
side's worker from another checkout of this project, e.g. one made with ``git worktree add
/tmp/before HEAD`` (copy ``boneage_jax/kernels/_onednn_conv-*.so`` into it, or run ``python -m
boneage_jax.kernels.build`` there), to time a code change against the commit before it; the
checkout must have this worker protocol (commits from 2026-12-02 on that say ``serve_steps`` in
this file). Two worker processes, each with the environment of this one plus its side's
assignments (read when it starts: ``XLA_FLAGS``, ``BONEAGE_*``), build and compile
:class:`benchmarks.models.TrainStep` one after the other and run two untimed steps; then they
take turns, one step at a time (A B, B A, A B, ...), for ``--pairs`` pairs. The workers speak the
peer benchmark's ``--serve`` protocol (``benchmarks/peers/job_common.py``) and are driven by its
``harness.ServedJob``.

This machine's speed drifts by 20-40% within minutes, so a run of A then a run of B measures the
drift as much as the setting. Interleaved steps see the same drift: the figure to read is the
median of the per-pair time ratios A / B (above 1: B is faster) with its quartiles, and in how
many pairs B was faster. Ratios within a few percent of 1, or B faster in about half the pairs,
are noise.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

from benchmarks.peers import harness, job_common  # noqa: E402
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


def parse_assignments(flag: str, values: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings to a dict; ValueError naming ``flag`` and the value otherwise."""
    result = {}
    for value in values:
        match = _ASSIGNMENT.fullmatch(value)
        if match is None:
            raise ValueError(f"{flag} {value!r}: expected KEY=VALUE, KEY an environment variable name")
        result[match.group(1)] = match.group(2)
    return result


STEP_TIMEOUT_S = 1800.0  # building and compiling a worker, or one step, longer than this is a failure


def worker(name: str, image_size: int, batch_size: int, sex_fusion: str) -> int:
    """Builds and compiles the step, then serves steps (``job_common.serve_steps``: the first
    step and one warm-up step untimed, then one timed step per ``step`` line on stdin)."""
    from benchmarks.models import TrainStep

    step = TrainStep(name, image_size, batch_size, sex_fusion=sex_fusion)
    step.compile()
    job_common.serve_steps(step, warmup_steps=1)
    return 0


class Worker:
    """One side's process (see :func:`worker`), driven by ``harness.ServedJob``."""

    def __init__(self, label: str, env: dict[str, str], args: argparse.Namespace):
        self.label, self.quiet = label, args.quiet_workers
        checkout = getattr(args, f"{label.lower()}_checkout") or REPO
        command = [sys.executable, os.path.join(checkout, "benchmarks", "ab.py"), args.name, "--worker",
                   f"--image_size={args.image_size}", f"--batch_size={args.batch_size}",
                   f"--sex_fusion={args.sex_fusion}"]
        start = time.monotonic()
        self.job = harness.ServedJob(command, env={**os.environ, **env}, cwd=os.getcwd(),
                                     show_stderr=not args.quiet_workers)
        self._call(self.job.wait_ready)
        self.ready_s, self.steps = time.monotonic() - start, 0

    def _call(self, method):
        try:
            return method(STEP_TIMEOUT_S)
        except harness.JobFailed as error:
            self.job.kill()
            why = str(error) if self.quiet else "its messages are above"
            raise RuntimeError(f"worker {self.label} stopped (exit status {self.job.process.returncode}); {why}") from None

    def step(self) -> tuple[float, float]:
        seconds = self._call(self.job.step)
        self.steps += 1
        return seconds, self.job.last_loss

    def close(self) -> None:
        if not self.steps:  # ``done`` before any step is an error to the worker: stop it instead
            self.job.kill()
        self.job.finish(60.0)


def summary(times_a: list[float], times_b: list[float], batch_size: int) -> str:
    """The report's figures from the two sides' step times (same length, pair by pair)."""
    a, b = np.asarray(times_a), np.asarray(times_b)
    ratio = a / b
    q1, median, q3 = np.percentile(ratio, [25, 50, 75])
    return (f"A: median step {np.median(a):.3f} s ({batch_size / np.median(a):.2f} images/s)\n"
            f"B: median step {np.median(b):.3f} s ({batch_size / np.median(b):.2f} images/s)\n"
            f"A / B step time, pair by pair: median {median:.3f} (quartiles {q1:.3f}-{q3:.3f}); "
            f"B faster in {int((ratio > 1).sum())} of {len(ratio)} pairs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a registered backbone (benchmarks/models.py's names)")
    parser.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="side A's environment")
    parser.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="side B's environment")
    parser.add_argument("--a_checkout", default="", metavar="DIR", help="run side A from this checkout")
    parser.add_argument("--b_checkout", default="", metavar="DIR", help="run side B from this checkout")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--sex_fusion", default="none", help="the head: none (backbone + Dense(1)) or a sex fusion")
    parser.add_argument("--quiet_workers", action="store_true", help="drop the workers' stderr (JAX's warnings)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.name, args.image_size, args.batch_size, args.sex_fusion)
    if args.pairs < 1:
        parser.error(f"--pairs={args.pairs}: expected at least 1")
    from boneage_jax import models

    if models.BACKBONES.resolve(args.name) is None:
        parser.error(f"unknown backbone {args.name!r}; registered: {models.BACKBONES.describe()}")
    try:
        sides = {"A": parse_assignments("--a", args.a), "B": parse_assignments("--b", args.b)}
    except ValueError as error:
        parser.error(str(error))
    for flag in ("a_checkout", "b_checkout"):
        folder = getattr(args, flag)
        if folder and not os.path.isfile(os.path.join(folder, "benchmarks", "ab.py")):
            parser.error(f"--{flag}={folder}: expected a checkout of this project (no benchmarks/ab.py in it)")
        setattr(args, flag, os.path.abspath(folder) if folder else "")
    if sides["A"] == sides["B"] and args.a_checkout == args.b_checkout:
        print("note: A and B have the same environment (an A/A run measures the noise)", flush=True)
    for label, env in sides.items():
        checkout = getattr(args, f"{label.lower()}_checkout")
        print(f"{label}: {' '.join(f'{k}={v}' for k, v in env.items()) or '(this environment)'}"
              + (f", code from {checkout}" if checkout else ""), flush=True)
    workers = {}
    times: dict[str, list[float]] = {"A": [], "B": []}
    losses: dict[str, float] = {}
    try:
        for label, env in sides.items():  # one at a time: compiling is the heaviest part
            workers[label] = Worker(label, env, args)
            print(f"{label}: ready in {workers[label].ready_s:.1f} s (build, compile, two steps)", flush=True)
        for pair in range(args.pairs):
            for label in ("A", "B") if pair % 2 == 0 else ("B", "A"):
                seconds, losses[label] = workers[label].step()
                times[label].append(seconds)
            print(f"pair {pair + 1}/{args.pairs}: A {times['A'][-1]:.3f} s, B {times['B'][-1]:.3f} s", flush=True)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        for w in workers.values():
            w.close()
    print(f"{args.name}, {args.image_size} px, batch {args.batch_size}, {args.pairs} pairs; "
          f"last losses A {losses['A']:.6g}, B {losses['B']:.6g}")
    print(summary(times["A"], times["B"], args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
