"""Train and evaluate a bone age model.

    python -m boneage_jax.main --config=configs/demo.py --workdir=runs/demo \
        [--config.data.manual_dir=PATH] [--config.key=value ...]

The dataset is prepared on first use. Re-running the same command resumes from the latest
checkpoint in the workdir. With ``--multihost``, ``jax.distributed.initialize()`` connects the
processes of a multi-host job first: on TPU pods, Slurm and Open MPI it finds its peers from
the environment; elsewhere pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (``launch/multihost.py`` does that for processes on one machine).
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from boneage_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # progress goes to stdout; -v 0 shows library logs
    if _MULTIHOST.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )
    config = _CONFIG.value
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    saved = os.path.join(workdir, "config.json")
    if os.path.exists(saved):
        with open(saved) as f:
            previous = json.load(f)
        if previous != json.loads(config.to_json_best_effort()):
            logging.warning("%s differs from this run's config; it is overwritten", saved)
    logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(), jax.process_count())
    try:
        train.train_and_evaluate(config, workdir)
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
