r"""Multi-process / multi-host training.

Every process runs ``boneage_jax.main --multihost``; JAX connects them through a coordinator
(process 0) and each reads its own shard of the data, while parameters stay replicated and the
global batch is split over all devices of all processes.

On one machine (several processes, e.g. to test multi-host code on a CPU)::

    python -m launch.multihost --num_processes=2 --cpu_devices=2 \
        --config=configs/demo.py --workdir=runs/mh [-- --config.batch_size=64]

On a cluster, print each host's command and start it there::

    python -m launch.multihost --num_processes=4 --coordinator=host0:12355 --print \
        --config=configs/xception.py --workdir=/shared/runs/x

On Slurm or TPU pods ``jax.distributed.initialize`` finds its peers itself: run
``srun python -m boneage_jax.main --multihost --config=... --workdir=...`` on every task.
The workdir must be on storage that all hosts share (checkpoints are written collectively).
Arguments this command does not define (``--config.*`` overrides; ``--`` may come before
them) are passed on to every process's ``boneage_jax.main``. Each process's output goes to
``<workdir>/process_<i>.log``; process 0's is printed at the end. When one process fails the
others are stopped, and the exit status is 1.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import flags

from boneage_jax import cli
from launch import local

FLAGS = flags.FlagValues()  # this command's flags (cli.parse_known); the others go to boneage_jax.main
_CONFIG, _WORKDIR = local.define_run_flags(FLAGS, "The run's workdir, on storage all hosts share.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.", lower_bound=1,
                                      flag_values=FLAGS)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (default: a free local port).",
                                   flag_values=FLAGS)
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "JAX CPU devices per local process.", lower_bound=1,
                                    flag_values=FLAGS)
_PRINT = flags.DEFINE_bool("print", False, "Print each process's command instead of running it.",
                           flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir", "num_processes"], flag_values=FLAGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_command(config: str, workdir: str, coordinator: str, num_processes: int, process_id: int,
                    extra: list[str]) -> list[str]:
    return local.command(config, workdir, [
        "--multihost", f"--coordinator_address={coordinator}", f"--num_processes={num_processes}",
        f"--process_id={process_id}", *extra,
    ])


def wait_all(processes: list[subprocess.Popen]) -> list[int]:
    """Waits for every process; when one fails, stops the others (they would wait forever)."""
    while any(p.poll() is None for p in processes):
        if any(p.poll() not in (None, 0) for p in processes):
            for p in processes:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.5)
    return [p.returncode for p in processes]


def main(argv: Sequence[str]) -> int:
    """Parses ``argv`` and starts (or with ``--print`` prints) one training process per
    ``--num_processes``; returns 1 when any of them failed."""
    extra = cli.parse_known(FLAGS, argv)
    workdir, num_processes = _WORKDIR.value, _NUM_PROCESSES.value
    coordinator = _COORDINATOR.value or f"127.0.0.1:{free_port()}"  # main binds it to the loopback only
    commands = [process_command(_CONFIG.value, workdir, coordinator, num_processes, i, extra)
                for i in range(num_processes)]
    if _PRINT.value:
        for i, cmd in enumerate(commands):
            print(f"# process {i}\n{shlex.join(cmd)}")
        return 0
    env = local.environment(_CPU_DEVICES.value)
    env["BONEAGE_LOCAL_PROCESSES"] = str(num_processes)  # they share this machine's CPUs (data.num_threads=0)
    os.makedirs(workdir, exist_ok=True)
    logs = [open(os.path.join(workdir, f"process_{i}.log"), "w") for i in range(num_processes)]
    processes = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                 for cmd, log in zip(commands, logs)]
    codes = wait_all(processes)
    for log in logs:
        log.close()
    with open(os.path.join(workdir, "process_0.log")) as f:
        sys.stdout.write(f.read())
    failed = [i for i, c in enumerate(codes) if c]
    if failed:
        print(f"processes {failed} failed; see {workdir}/process_<i>.log", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
