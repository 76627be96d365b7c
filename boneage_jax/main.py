"""Train and evaluate a bone age model.

    python -m boneage_jax.main --config=configs/demo.py --workdir=runs/demo \
        [--config.data.manual_dir=PATH] [--config.key=value ...]

``--config`` is a config file, ``path.py`` or ``path.py:variant`` (its ``get_config(variant)``);
``--config.key=value`` arguments override its values (``ml_collections.config_flags``, through
:func:`boneage_jax.cli.load_config_file`; the config is locked, so a key it lacks is an error).
The dataset is prepared on first use. Re-running the same command resumes from the latest
checkpoint in the workdir. With ``--multihost``, ``jax.distributed.initialize()`` connects the
processes of a multi-host job first: on TPU pods, Slurm and Open MPI it finds its peers from
the environment; elsewhere pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (``launch/multihost.py`` does that for processes on one machine). The exit
status is 1 when training stops on a non-finite loss.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
from absl import flags, logging

from boneage_jax import cli, train

FLAGS = flags.FlagValues()  # this command's flags (cli.parse); the config's --config.* overrides follow them
_CONFIG = flags.DEFINE_string("config", None, "Training configuration file, path.py or path.py:variant; "
                              "--config.key=value overrides its values.", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.", flag_values=FLAGS)
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.",
                               flag_values=FLAGS)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).",
                                   flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).", flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).", flag_values=FLAGS)
_BIND = flags.DEFINE_string("coordinator_bind_address", None,
                            "Where process 0's coordination service listens (default: 127.0.0.1:PORT when "
                            "--coordinator_address is on this machine, else JAX's [::]:PORT).", flag_values=FLAGS)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def coordinator_bind_address(coordinator: str | None, bind: str | None) -> str | None:
    """``bind`` if given; a loopback address for a coordinator on this machine (the coordination
    service has no authentication, so it listens on nothing else); else None (JAX's default)."""
    if bind or not coordinator:
        return bind
    host, _, port = coordinator.rpartition(":")
    return f"127.0.0.1:{port}" if host in LOCAL_HOSTS else None
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def main(argv: Sequence[str]) -> int:
    """Parses ``argv`` (flags, then ``--config.*`` overrides), trains and evaluates; returns the
    exit status."""
    overrides = cli.parse(FLAGS, argv, config_overrides=True)
    config = cli.load_config_file(_CONFIG.value, overrides)
    if _MULTIHOST.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
            coordinator_bind_address=coordinator_bind_address(_COORDINATOR.value, _BIND.value),
        )
    workdir = _WORKDIR.value
    logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(), jax.process_count())
    try:
        train.train_and_evaluate(config, workdir)
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
