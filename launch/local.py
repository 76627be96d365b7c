r"""Runs one training job on this machine and keeps its console output in the workdir.

    python -m launch.local --config=configs/demo.py --workdir=runs/demo [--cpu_devices=4] \
        [-- --config.batch_size=64 ...]

``--cpu_devices=N`` splits the CPU into N JAX devices (``XLA_FLAGS``), to try data-parallel
code without accelerators. The output also goes to ``<workdir>/train.log``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def command(config: str, workdir: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "boneage_jax.main", f"--config={config}", f"--workdir={workdir}", *extra]


def environment(cpu_devices: int | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cpu_devices:
        flag = f"--xla_force_host_platform_device_count={cpu_devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_logged(cmd: list[str], env: dict[str, str], log_path: str) -> int:
    """Runs ``cmd``, copying its output to the console and to ``log_path``; returns its exit status."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a") as log, subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
            log.flush()
    return process.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cpu_devices", type=int, default=None, help="split the CPU into N JAX devices")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    cmd = command(args.config, args.workdir, extra)
    print("+", " ".join(cmd), flush=True)
    return run_logged(cmd, environment(args.cpu_devices), os.path.join(args.workdir, "train.log"))


if __name__ == "__main__":
    sys.exit(main())
