"""Runs one benchmark job at a time on a quiet CPU, and measures how quiet it stayed.

- :func:`cpu_times` reads the machine's busy and total time from ``/proc/stat``'s ``cpu`` line
  (busy: user, nice, system, irq, softirq and steal, so time a hypervisor gave other guests
  counts as busy; total: those and idle and iowait; guest time is already inside user and nice).
- :func:`wait_for_idle` waits until the machine is less than a threshold busy over one window.
- :func:`run_job` starts the job in its own process group, waits for it (killing the group at
  the timeout) and reports its own CPU time (``wait4``'s rusage: the job and the children it
  waited for) beside the machine's busy time over the same interval: what the others used is
  ``others_cpu_pct = (machine busy - job's CPU) / machine total``, in percent of all CPUs.
- :class:`ServedJob` runs a job in ``--serve`` mode (``job_common``) and asks it for one step at a
  time, so that several stacks' jobs can take turns (``run.py --interleave``); each step's CPU
  accounting is the same as a whole job's, with the stepping job's CPU time read from
  ``/proc/<pid>/stat`` (the other jobs, idle between their turns, count as others).
- :func:`parse_report` takes a job's ``PEER_RESULT`` line, or else its last error line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from benchmarks.peers.job_common import READY_MARKER, RESULT_MARKER, STEP_MARKER

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


def wait_or_kill(process: subprocess.Popen, timeout_s: float, poll_s: float = 0.2):
    """Waits for ``process`` (started with ``start_new_session``) up to ``timeout_s``, then kills its
    process group. Returns its exit status (None when killed) and its rusage (``wait4``: the
    process and the children it waited for); sets ``process.returncode``."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage
        if time.monotonic() > deadline:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            return None, usage
        time.sleep(poll_s)


def run_job(command: Sequence[str], *, env: Mapping[str, str], cwd: str, timeout_s: float,
            poll_s: float = 0.2) -> JobRun:
    """Runs ``command`` to its end or ``timeout_s`` (then kills its process group), with the CPU
    accounting of the module docstring."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        before = read_cpu_times()
        start = time.monotonic()
        process = subprocess.Popen(list(command), stdout=out, stderr=err, env=dict(env), cwd=cwd,
                                   start_new_session=True)
        returncode, usage = wait_or_kill(process, timeout_s, poll_s)
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


def process_cpu_s(pid: int, ticks_per_s: int = CLOCK_TICKS) -> float:
    """User + system CPU seconds of process ``pid`` and all its threads (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3 of stat(5)
    return (int(fields[11]) + int(fields[12])) / ticks_per_s  # utime, stime: fields 14 and 15


class JobFailed(RuntimeError):
    """A served job exited, printed something unexpected or passed its deadline."""


class ServedJob:
    """One job in ``--serve`` mode: started in its own process group, asked for one step at a time.

    ``wait_ready`` waits for ``PEER_READY``; ``step`` runs one step and returns its time as the job
    measured it, with the machine's busy time over the step and the job's own CPU time added to the
    running totals (``others_cpu_pct``, ``job_cpu_pct``); ``finish`` sends ``done`` and returns the
    :class:`JobRun` (``stdout`` holds the ``PEER_RESULT``); ``kill`` stops the group. A job that
    exits or sends something unexpected raises :class:`JobFailed`. ``last_loss`` is the loss of the
    last step. The job's stderr is kept for its error line, or with ``show_stderr`` left to this
    process's stderr (``benchmarks/ab.py`` does so).
    """

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str], cwd: str, show_stderr: bool = False):
        self._stderr = None if show_stderr else tempfile.TemporaryFile("w+")
        self._start = time.monotonic()
        self.process = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._stderr, env=dict(env), cwd=cwd, text=True, bufsize=1,
                                        start_new_session=True)
        self.last_loss = float("nan")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stdout: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._busy_s = self._total_s = self._own_s = 0.0
        self._returncode: int | None = None
        self._usage = None

    def _read(self) -> None:
        for line in self.process.stdout:
            self._stdout.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _next_marked(self, marker: str, deadline: float) -> str:
        """The first stdout line from now starting with ``marker`` (the rest of it)."""
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise JobFailed(f"no {marker.strip()} line within the deadline") from None
            if line is None:
                self._reap(10.0)
                raise JobFailed(f"exited ({self._returncode}) before {marker.strip()}: "
                                + (last_error_line(self.stderr()) or "no error line"))
            if line.startswith(marker):
                return line[len(marker):].strip()

    def wait_ready(self, timeout_s: float) -> None:
        self._next_marked(READY_MARKER, time.monotonic() + timeout_s)

    def step(self, timeout_s: float) -> float:
        before, own_before = read_cpu_times(), process_cpu_s(self.process.pid)
        try:
            self.process.stdin.write("step\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise JobFailed(f"could not ask for a step: {error}") from None
        answer = self._next_marked(STEP_MARKER, time.monotonic() + timeout_s)
        after, own_after = read_cpu_times(), process_cpu_s(self.process.pid)
        self._busy_s += after.busy_s - before.busy_s
        self._total_s += after.total_s - before.total_s
        self._own_s += own_after - own_before
        try:
            seconds, self.last_loss = (float(value) for value in answer.split())
        except ValueError:
            raise JobFailed(f"{STEP_MARKER.strip()} line {answer!r}: expected '<seconds> <loss>'") from None
        return seconds

    @property
    def others_cpu_pct(self) -> float:
        """CPU that everything but this job used during its steps, in percent of all CPUs."""
        if self._total_s <= 0:
            return 0.0
        return max(0.0, 100.0 * (self._busy_s - self._own_s) / self._total_s)

    @property
    def job_cpu_pct(self) -> float:
        """This job's CPU time during its steps, in percent of all CPUs over them."""
        return 100.0 * self._own_s / self._total_s if self._total_s > 0 else 0.0

    def stderr(self) -> str:
        """What the job wrote to stderr so far ('' with ``show_stderr``)."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()

    def _reap(self, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` for the job to exit, then kills it (once)."""
        if self._usage is None:
            self._returncode, self._usage = wait_or_kill(self.process, timeout_s, poll_s=0.05)

    def kill(self) -> None:
        """Kills the job's process group (the run then counts as timed out unless it had exited)."""
        self._reap(0.0)

    def finish(self, timeout_s: float) -> JobRun:
        """Sends ``done`` (if the job is still there), waits up to ``timeout_s`` for it to exit (else
        kills it) and returns what it printed, with the CPU figures of its steps."""
        if self._usage is None:
            try:
                self.process.stdin.write("done\n")
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        self._reap(timeout_s)
        self._reader.join(timeout=5.0)  # it sees the end of stdout once the process is gone
        usage, stderr = self._usage, self.stderr()
        if self._stderr is not None:
            self._stderr.close()
        return JobRun(returncode=self._returncode, wall_s=time.monotonic() - self._start,
                      job_cpu_s=usage.ru_utime + usage.ru_stime, others_cpu_pct=self.others_cpu_pct,
                      job_cpu_pct=self.job_cpu_pct, stdout="".join(self._stdout), stderr=stderr)


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
