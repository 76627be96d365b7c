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
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time

from launch import local


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (default: a free local port)")
    parser.add_argument("--cpu_devices", type=int, default=None, help="JAX CPU devices per local process")
    parser.add_argument("--print", action="store_true", help="print each process's command instead of running")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    coordinator = args.coordinator or f"localhost:{free_port()}"
    commands = [process_command(args.config, args.workdir, coordinator, args.num_processes, i, extra)
                for i in range(args.num_processes)]
    if args.print:
        for i, cmd in enumerate(commands):
            print(f"# process {i}\n{shlex.join(cmd)}")
        return 0
    env = local.environment(args.cpu_devices)
    os.makedirs(args.workdir, exist_ok=True)
    logs = [open(os.path.join(args.workdir, f"process_{i}.log"), "w") for i in range(args.num_processes)]
    processes = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                 for cmd, log in zip(commands, logs)]
    codes = wait_all(processes)
    for log in logs:
        log.close()
    with open(os.path.join(args.workdir, "process_0.log")) as f:
        sys.stdout.write(f.read())
    failed = [i for i, c in enumerate(codes) if c]
    if failed:
        print(f"processes {failed} failed; see {args.workdir}/process_<i>.log", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
