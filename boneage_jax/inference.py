"""A trained run, loaded for inference: its config, objective, weights and compiled readout.

``load_run(workdir)`` reads what ``boneage_jax.main`` wrote (``config.json``,
``label_stats.json`` and ``checkpoints/best`` or ``checkpoints/latest``) and returns a
:class:`LoadedRun` whose ``predict(batch)`` maps a batch (``image`` float32 (B, S, S, C),
``male`` float32 (B,)) to the objective's readout (``boneage`` in months, and ``std`` or
``class`` where the head gives them; ``mask`` for segmentation). The network input of a
radiograph from outside the dataset comes from :func:`boneage_jax.input_pipeline.prepare_image`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from boneage_jax import input_pipeline, models, objectives, train


@dataclasses.dataclass
class LoadedRun:
    workdir: str
    config: ml_collections.ConfigDict
    objective: objectives.Objective | objectives.Segmentation
    stats: objectives.LabelStats
    step: int
    in_channels: int
    graphdef: nnx.GraphDef
    params: dict
    rest: dict
    rng_state: dict
    predict: Callable[[dict], dict]  # batch -> readout (jax arrays)

    def model(self) -> nnx.Module:
        """The model in inference mode (for attention maps, Grad-CAM and other inspection)."""
        return nnx.merge(self.graphdef, self.params, self.rng_state, self.rest)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: is {workdir} a workdir written by boneage_jax.main?")
    with open(path) as f:
        raw = json.load(f)
    return ml_collections.ConfigDict(raw)


def load_run(workdir: str, which: str = "best", config: ml_collections.ConfigDict | None = None) -> LoadedRun:
    """Loads a run's weights from ``checkpoints/<which>`` (best or latest).

    ``config`` replaces the saved config (to change data settings such as ``manual_dir``);
    the model settings must stay those the run was trained with."""
    workdir = os.path.abspath(workdir)
    config = config if config is not None else read_config(workdir)
    stats_path = os.path.join(workdir, "label_stats.json")
    if not os.path.isfile(stats_path):
        raise FileNotFoundError(f"{stats_path} is missing: the run in {workdir} did not start training")
    with open(stats_path) as f:
        raw = json.load(f)
    stats = objectives.LabelStats(mean=raw["mean"], std=raw["std"], class_edges=tuple(raw.get("class_edges", ())),
                                  class_means=tuple(raw.get("class_means", ())))
    objective = objectives.make_objective(config, stats)
    in_channels = input_pipeline.input_channels(config.data)

    def create() -> nnx.Module:
        return models.create_model(config.model, in_channels=in_channels, image_size=config.data.image_size,
                                   num_outputs=objective.num_outputs, seed=config.seed,
                                   task=config.get("task", "boneage"))

    abstract = nnx.eval_shape(create)
    abstract.eval()
    graphdef, params_shape, _, rest_shape = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
    # The dropout RNG state is not checkpointed; only its (unused in eval mode) keys are needed.
    rng_state = jax.jit(lambda: nnx.split(create(), nnx.Param, nnx.RngState, ...)[2])()
    tx = train.make_optimizer(config, train.make_schedule(config, 1))
    abstract_state = {
        "step": jax.ShapeDtypeStruct((), np.int32),
        "params": params_shape,
        "rest": rest_shape,
        "opt_state": jax.eval_shape(tx.init, params_shape),
    }
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    directory = os.path.join(workdir, "checkpoints", which)
    manager = ocp.CheckpointManager(directory)
    try:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        state, _ = train.restore_checkpoint(manager, abstract_state)
    finally:
        manager.close()
    predict_jit = jax.jit(functools.partial(train.predict_step, graphdef=graphdef, objective=objective))
    params, rest = state["params"], state["rest"]

    def predict(batch: dict) -> dict:
        return predict_jit(params, rest, rng_state, batch)

    return LoadedRun(workdir=workdir, config=config, objective=objective, stats=stats,
                     step=int(jax.device_get(state["step"])), in_channels=in_channels, graphdef=graphdef,
                     params=params, rest=rest, rng_state=rng_state, predict=predict)

