r"""Training speed of every model family: compile time and train-step images/s.

    python benchmarks/models.py [NAME ...] [--image_size=256] [--batch_size=8] \
        [--min_steps=3] [--min_seconds=20] [--out=benchmarks/results/models_cpu.md]

For each family it builds the model with the winner's sex head and a regression output, the
AdamW optimiser and the training step exactly as ``boneage_jax.train`` runs them (3-channel
input, float32), compiles the step ahead of time (timed as "compile"), runs one untimed step,
then times at least ``--min_steps`` steps and at least ``--min_seconds``. Rows are written to
``--out`` (Markdown) and ``<out>.json`` as each family finishes, so a long run that is stopped
keeps what it measured. By default every registered backbone is timed once, under its registered
name (``resnet50_keras``, not its alias ``resnet50``; see ``models.BACKBONES.aliases``).

:class:`TrainStep` (the model, optimiser, batch and compiled step) is also what the peer
benchmark (``benchmarks/peers/``) times beside PyTorch and Keras.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from boneage_jax import io, models, objectives, state, train  # noqa: E402
from configs.common import base_config  # noqa: E402


class TrainStep:
    """One family's training step exactly as ``boneage_jax.train`` runs it, on a fixed random batch.

    The model (``sex_fusion`` head: the winner's by default, ``"none"`` for backbone + pooling +
    Dense(1)), AdamW and ``train.train_step`` are built from ``configs.common.base_config``; the
    step is jitted with the state donated. :meth:`compile` compiles it ahead of time and returns
    the seconds it took; calling the object runs one step (compiling first if needed) and returns
    the loss as a host float, so a call ends when the step has finished.
    """

    def __init__(self, name: str, image_size: int, batch_size: int, *, sex_fusion: str = "winner16bit",
                 dtype: str = "float32"):
        config = base_config()
        config.model.name = name
        config.model.sex_fusion = sex_fusion
        config.model.dtype = dtype
        config.data.image_size = image_size
        mesh = state.make_mesh()
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        stats = objectives.LabelStats(mean=127.0, std=41.0)
        objective = objectives.Objective("regression", stats, "mse")
        tx = train.make_optimizer(config, train.make_schedule(config, 1000))
        create = state.model_factory(config, in_channels=3, num_outputs=objective.num_outputs, task="boneage")
        graphs, self.state, self.rng_state = state.create(config, create, tx, replicated)
        rng = np.random.default_rng(0)
        batch = {
            "image": rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32),
            "male": (rng.random(batch_size) < 0.5).astype(np.float32),
            "boneage": rng.uniform(0, 228, batch_size).astype(np.float32),
        }
        self.batch = jax.device_put(batch, data_sharding)
        self.key = jax.random.key(0)
        self._jitted = jax.jit(functools.partial(train.train_step, graphdef=graphs.train, tx=tx, objective=objective),
                               donate_argnums=(0,))
        self._compiled = None

    def compile(self) -> float:
        """Compiles the step ahead of time; returns the seconds it took."""
        start = time.perf_counter()
        self._compiled = self._jitted.lower(self.state, self.batch, self.rng_state, self.key).compile()
        return time.perf_counter() - start

    def __call__(self) -> float:
        """Runs one step (after compiling it if :meth:`compile` was not called); returns its loss."""
        if self._compiled is None:
            self.compile()
        self.state, metrics = self._compiled(self.state, self.batch, self.rng_state, self.key)
        return float(jax.block_until_ready(metrics)["loss"])

    @property
    def parameters(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(self.state["params"])))


def benchmark(name: str, image_size: int, batch_size: int, min_steps: int, min_seconds: float) -> dict:
    """Compile time (s) and images/s of one family's training step."""
    step = TrainStep(name, image_size, batch_size)
    compile_s = step.compile()
    loss = step()
    if not np.isfinite(loss):
        raise FloatingPointError(f"{name}: non-finite loss {loss}")
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < min_seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    return {"model": name, "parameters": step.parameters, "compile_s": round(compile_s, 1),
            "step_s": round(elapsed / steps, 3), "images_per_s": round(steps * batch_size / elapsed, 2),
            "timed_steps": steps}


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| model | parameters (with head) | compile (s) | step (s) | images/s |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r['compile_s']} | {r['step_s']} | {r['images_per_s']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="backbones (default: every registered name, without aliases)")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--min_steps", type=int, default=3)
    parser.add_argument("--min_seconds", type=float, default=20.0)
    parser.add_argument("--out", default="", help="Markdown table to write (and <out>.json)")
    args = parser.parse_args(argv)
    names = args.names or models.BACKBONES.names()
    unknown = sorted(name for name in names if models.BACKBONES.resolve(name) is None)
    if unknown:
        parser.error(f"unknown backbone(s) {unknown}; registered: {models.BACKBONES.describe()}")
    device = jax.devices()[0]
    header = (f"Train step, batch {args.batch_size}, {args.image_size} px, float32, on "
              f"{len(jax.devices())} x {device.device_kind} ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores), jax {jax.__version__}")
    print(header, flush=True)
    rows = []
    for name in names:
        try:
            row = benchmark(name, args.image_size, args.batch_size, args.min_steps, args.min_seconds)
        except Exception as error:  # noqa: BLE001 - one family failing must not lose the others' rows
            print(f"{name}: FAILED: {type(error).__name__}: {error}", flush=True)
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            for path, text in ((args.out, markdown(rows, header)), (args.out + ".json", json.dumps(rows, indent=1))):
                io.write_text(path, text)
    print(markdown(rows, header))
    return 0 if len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
