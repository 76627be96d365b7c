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

import argparse
import functools
import sys

import jax
import numpy as np

from boneage_jax import evaluation, inference, predict, writers

FORMAT = "boneage_jax.jaxexport/1"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def inference_function(run: inference.LoadedRun):
    """(images, male) -> readout dict, with the run's weights as constants."""
    params, rest, rng_state = run.params, run.rest, run.rng_state
    step = functools.partial(evaluation.predict_step, graphdef=run.graphdef, objective=run.objective)

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
            "builder_config": data.get("builder_config", "max512"),
            "stored_max_side": predict.stored_max_side(data),
            "image_size": size,
            "preprocess": data.preprocess,
            "normalize": data.normalize,
            "spec_defaults": {k: v for k, v in predict.spec_defaults(data).items() if k != "size"},
        },
        "label_stats": {"mean": run.stats.mean, "std": run.stats.std, "class_edges": list(run.stats.class_edges),
                        "class_means": list(run.stats.class_means)},
        "model": {"name": run.config.model.name, "head": run.config.model.head,
                  "sex_fusion": run.config.model.sex_fusion},
        "run": {"workdir": run.workdir, "checkpoint": which, "step": run.step},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="output file, e.g. model.jaxexport (sidecar: <out>.json)")
    parser.add_argument("--which", default="best", choices=("best", "latest"))
    parser.add_argument("--batch_size", type=int, default=None, help="fixed batch size (default: symbolic)")
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help="comma-separated backends to lower for; empty: this machine's backend only")
    args = parser.parse_args(argv)
    try:
        run = inference.load_run(args.workdir, which=args.which)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if run.config.get("task", "boneage") != "boneage":
        print(f"error: {args.workdir} is a {run.config.task} run; export needs a bone age run", file=sys.stderr)
        return 2
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip()) if args.platforms else None
    exported = export_run(run, args.batch_size, platforms)
    data = exported.serialize()
    predict.write_bytes_atomic(args.out, bytes(data))
    writers.write_json(args.out + ".json", sidecar(run, exported, args.which))
    print(f"wrote {args.out} ({len(data) / 1e6:.1f} MB; inputs {[str(a) for a in exported.in_avals]}; "
          f"platforms {list(exported.platforms)}) and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
