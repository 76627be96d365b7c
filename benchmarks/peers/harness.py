"""Runs one benchmark job at a time on a quiet CPU, and measures how quiet it stayed.

- :func:`cpu_times` reads the machine's busy and total time from ``/proc/stat``'s ``cpu`` line
  (busy: user, nice, system, irq, softirq and steal, so time a hypervisor gave other guests
  counts as busy; total: those and idle and iowait; guest time is already inside user and nice).
- :func:`wait_for_idle` waits until the machine is less than a threshold busy over one window.
- :func:`run_job` starts the job in its own process group, waits for it (killing the group at
  the timeout) and reports its own CPU time (``wait4``'s rusage: the job and the children it
  waited for) beside the machine's busy time over the same interval: what the others used is
  ``others_cpu_pct = (machine busy - job's CPU) / machine total``, in percent of all CPUs.
- :func:`parse_report` takes a job's ``PEER_RESULT`` line, or else its last error line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

from benchmarks.peers.job_common import RESULT_MARKER

PROC_STAT = "/proc/stat"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class CpuTimes:
    """Machine-wide CPU time in seconds, summed over all CPUs, since boot."""

    busy_s: float
    total_s: float


def cpu_times(stat_text: str, ticks_per_s: int = CLOCK_TICKS) -> CpuTimes:
    """The busy and total time of the aggregate ``cpu`` line of a ``/proc/stat`` text."""
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in (fields[1:9] + ["0"] * 8)[:8])
            busy = user + nice + system + irq + softirq + steal
            return CpuTimes(busy_s=busy / ticks_per_s, total_s=(busy + idle + iowait) / ticks_per_s)
    raise ValueError(f"{PROC_STAT}: no aggregate 'cpu' line")


def read_cpu_times(path: str = PROC_STAT) -> CpuTimes:
    with open(path, encoding="ascii") as f:
        return cpu_times(f.read())


def busy_percent(before: CpuTimes, after: CpuTimes) -> float:
    """How busy the machine was between two readings, in percent of all its CPUs."""
    total = after.total_s - before.total_s
    return 100.0 * (after.busy_s - before.busy_s) / total if total > 0 else 0.0


def others_cpu_percent(before: CpuTimes, after: CpuTimes, job_cpu_s: float) -> float:
    """CPU that everything but the job used between two readings, in percent of all CPUs (never
    below 0: ``/proc/stat`` counts in ticks, the job's rusage in microseconds)."""
    total = after.total_s - before.total_s
    if total <= 0:
        return 0.0
    return max(0.0, 100.0 * (after.busy_s - before.busy_s - job_cpu_s) / total)


@dataclasses.dataclass(frozen=True)
class Quiet:
    """The outcome of :func:`wait_for_idle`."""

    quiet: bool
    busy_pct: float  # over the last window
    waited_s: float


def wait_for_idle(threshold_pct: float = 10.0, window_s: float = 1.0, timeout_s: float = 300.0,
                  read: Callable[[], CpuTimes] = read_cpu_times, sleep: Callable[[float], None] = time.sleep) -> Quiet:
    """Waits until the machine is less than ``threshold_pct`` busy over a ``window_s`` window, or
    ``timeout_s`` has passed (then ``quiet`` is False)."""
    waited = 0.0
    while True:
        before = read()
        sleep(window_s)
        waited += window_s
        busy = busy_percent(before, read())
        if busy < threshold_pct:
            return Quiet(True, busy, waited)
        if waited >= timeout_s:
            return Quiet(False, busy, waited)


@dataclasses.dataclass
class JobRun:
    """What :func:`run_job` saw of one job."""

    returncode: int | None  # None: killed at the timeout
    wall_s: float
    job_cpu_s: float
    others_cpu_pct: float
    job_cpu_pct: float  # the job's own CPU time, in percent of all CPUs over its wall time
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_job(command: Sequence[str], *, env: Mapping[str, str], cwd: str, timeout_s: float,
            poll_s: float = 0.2) -> JobRun:
    """Runs ``command`` to its end or ``timeout_s`` (then kills its process group), with the CPU
    accounting of the module docstring."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        before = read_cpu_times()
        start = time.monotonic()
        process = subprocess.Popen(list(command), stdout=out, stderr=err, env=dict(env), cwd=cwd,
                                   start_new_session=True)
        returncode: int | None = None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() - start > timeout_s:
                os.killpg(process.pid, signal.SIGKILL)
                _, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(poll_s)
        process.returncode = returncode if returncode is not None else os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
        after = read_cpu_times()
        job_cpu = usage.ru_utime + usage.ru_stime
        total = after.total_s - before.total_s
        out.seek(0)
        err.seek(0)
        return JobRun(returncode=returncode, wall_s=wall, job_cpu_s=job_cpu,
                      others_cpu_pct=others_cpu_percent(before, after, job_cpu),
                      job_cpu_pct=100.0 * job_cpu / total if total > 0 else 0.0,
                      stdout=out.read(), stderr=err.read())


def last_error_line(text: str) -> str:
    """The last line naming an error or exception, else the last non-empty line, else ''."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or line.startswith("error:"):
            return line
    return lines[-1] if lines else ""


def parse_report(stdout: str) -> dict | None:
    """The job's ``PEER_RESULT`` JSON (the last one), or None if it printed none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    return None
