r"""Serialises a trained run's inference function with ``jax.export``, weights baked in.

    python -m boneage_jax.export --workdir runs/demo --out demo.jaxexport \
        [--which best] [--batch_size N] [--platforms cpu,cuda,tpu]

writes ``demo.jaxexport`` (the serialised ``jax.export.Exported``) and ``demo.jaxexport.json``
(input shapes and dtypes, output names, the run's preprocessing specs, label statistics). The
file runs without this codebase, with JAX alone::

    import jax, numpy as np
    with open("demo.jaxexport", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    out = exported.call(images, male)  # float32 (B, S, S, C), float32 (B,) 1.0 = male
    out["boneage"]                     # months; also "std" (gaussian) or "class" (classification)

``images`` must be preprocessed as in training (``data.preprocess`` then ``data.normalize``,
see the sidecar and :func:`boneage_jax.input_pipeline.prepare_image`). By default the batch
dimension is symbolic (any batch size works); ``--batch_size N`` fixes it. The function is
lowered for CPU, CUDA GPUs and TPUs at once (``--platforms`` chooses), so the file runs on any
of them whichever machine exported it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from boneage_jax import cli, inference, io, objectives, ops
from boneage_jax.kernels import onednn

FORMAT = "boneage_jax.jaxexport/1"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")

FLAGS = flags.FlagValues()  # this command's flags (cli.parse)
_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (written by boneage_jax.main).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output file, e.g. model.jaxexport (sidecar: <out>.json).",
                           flag_values=FLAGS)
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to load.", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Fixed batch size (default: symbolic).", flag_values=FLAGS)
_PLATFORMS = flags.DEFINE_string("platforms", ",".join(DEFAULT_PLATFORMS),
                                 "Comma-separated backends to lower for; empty: this machine's backend only.",
                                 flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def inference_function(run: inference.LoadedRun):
    """(images, male) -> readout dict, with the run's weights as constants."""
    params, rest, rng_state = run.params, run.rest, run.rng_state
    step = functools.partial(inference.predict_step, graphdef=run.graphdef, objective=run.objective)

    def fn(images, male):
        return step(params, rest, rng_state, {"image": images, "male": male})

    return fn


def export_run(run: inference.LoadedRun, batch_size: int | None = None,
               platforms: tuple[str, ...] | None = None) -> jax.export.Exported:
    """The run's inference function exported for (batch, S, S, C) float32 images and (batch,)
    float32 sex; ``batch_size`` None makes the batch dimension symbolic."""
    size = int(run.config.data.image_size)
    if batch_size is None:
        (batch,) = jax.export.symbolic_shape("b")
    else:
        batch = int(batch_size)
    images = jax.ShapeDtypeStruct((batch, size, size, run.in_channels), np.float32)
    male = jax.ShapeDtypeStruct((batch,), np.float32)
    with onednn.xla_convolutions():  # portable: no custom calls into this machine's oneDNN library
        return jax.export.export(jax.jit(inference_function(run)), platforms=platforms)(images, male)


def sidecar(run: inference.LoadedRun, exported: jax.export.Exported, which: str) -> dict:
    size = int(run.config.data.image_size)
    batch = str(exported.in_avals[0].shape[0])
    batch_dim = int(batch) if batch.isdigit() else batch
    out_avals = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
    data = run.config.data
    return {
        "format": FORMAT,
        "jax_version": jax.__version__,
        "platforms": list(exported.platforms),
        "inputs": [
            {"name": "images", "shape": [batch_dim, size, size, run.in_channels], "dtype": "float32",
             "description": "preprocessed images: data.preprocess then data.normalize"},
            {"name": "male", "shape": [batch_dim], "dtype": "float32", "description": "1.0 male, 0.0 female"},
        ],
        "outputs": {name: {"shape": [str(d) if not isinstance(d, int) else d for d in aval.shape],
                           "dtype": str(aval.dtype),
                           "units": {"boneage": "months", "std": "months"}.get(name, "class index")}
                    for name, aval in out_avals.items()},
        "preprocessing": {
            "builder_config": data.builder_config,
            "stored_max_side": inference.stored_max_side(data),
            "image_size": size,
            "preprocess": data.preprocess,
            "normalize": data.normalize,
            "spec_defaults": {k: v for k, v in ops.spec_defaults(data).items() if k != "size"},
        },
        "label_stats": {"mean": run.stats.mean, "std": run.stats.std, "class_edges": list(run.stats.class_edges),
                        "class_means": list(run.stats.class_means)},
        "model": {"name": run.config.model.name, "head": run.config.model.head,
                  "sex_fusion": run.config.model.sex_fusion},
        "run": {"workdir": run.workdir, "checkpoint": which, "step": run.step},
    }


def main(argv: Sequence[str]) -> int:
    """``python -m boneage_jax.export`` with ``argv`` (the arguments after the program name);
    returns the exit status."""
    extra = cli.parse(FLAGS, argv)
    if extra:
        raise app.UsageError(f"unexpected arguments: {extra}")
    try:
        run = inference.load_run(_WORKDIR.value, which=_WHICH.value)
        objectives.require_bone_age(run.objective, _WORKDIR.value, "export")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    platforms = tuple(p.strip() for p in _PLATFORMS.value.split(",") if p.strip()) if _PLATFORMS.value else None
    exported = export_run(run, _BATCH_SIZE.value, platforms)
    data = exported.serialize()
    io.write_bytes(_OUT.value, bytes(data))
    io.write_json(_OUT.value + ".json", sidecar(run, exported, _WHICH.value))
    print(f"wrote {_OUT.value} ({len(data) / 1e6:.1f} MB; inputs {[str(a) for a in exported.in_avals]}; "
          f"platforms {list(exported.platforms)}) and {_OUT.value}.json")
    return 0


if __name__ == "__main__":
    cli.run(main)
