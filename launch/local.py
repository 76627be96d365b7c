r"""Runs one training job on this machine and keeps its console output in the workdir.

    python -m launch.local --config=configs/demo.py --workdir=runs/demo [--cpu_devices=4] \
        [-- --config.batch_size=64 ...]

``--cpu_devices=N`` splits the CPU into N JAX devices (``XLA_FLAGS``), to try data-parallel
code without accelerators. The output also goes to ``<workdir>/train.log``. Arguments this
command does not define (``--config.*`` overrides; ``--`` may come before them) are passed on
to ``boneage_jax.main``; the exit status is its exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from absl import flags

from boneage_jax import cli



def define_run_flags(flag_values: flags.FlagValues, workdir_help: str) -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """``--config`` and ``--workdir``, the flags every launcher passes on to ``boneage_jax.main``."""
    config = flags.DEFINE_string("config", None, "Training configuration file (boneage_jax.main's --config).",
                                 flag_values=flag_values)
    return config, flags.DEFINE_string("workdir", None, workdir_help, flag_values=flag_values)


FLAGS = flags.FlagValues()  # this command's flags (cli.parse_known); the others go to boneage_jax.main
_CONFIG, _WORKDIR = define_run_flags(FLAGS, "The run's workdir.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Split the CPU into N JAX devices.", lower_bound=1,
                                    flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


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


def main(argv: Sequence[str]) -> int:
    """Parses ``argv`` and runs the training command; returns its exit status."""
    extra = cli.parse_known(FLAGS, argv)
    cmd = command(_CONFIG.value, _WORKDIR.value, extra)
    print("+", " ".join(cmd), flush=True)
    return run_logged(cmd, environment(_CPU_DEVICES.value), os.path.join(_WORKDIR.value, "train.log"))


if __name__ == "__main__":
    cli.run(main)
