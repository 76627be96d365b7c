"""Peer-benchmark job for our stack: the real ``train.train_step`` as ``benchmarks/models.py`` builds it.

    PYTHONPATH=. python benchmarks/peers/job_ours.py --network=resnet50 [--image_size=256] \
        [--batch_size=8] [--warmup_steps=2] [--steps=10] [--device=cpu] [--precision=float32] [--serve]

``benchmarks.models.TrainStep`` with ``sex_fusion="none"``: the registered backbone (with its
global average pooling) and a Dense(1) regression output, the MSE loss on the z-scored age,
AdamW (``configs.common.base_config``'s: learning rate 1e-3 on a cosine schedule, weight decay
1e-4) and BatchNorm in training mode, jitted with the state donated. The first step includes the
XLA compilation. ``--device=cpu`` keeps JAX on the CPU; ``--device=gpu`` requires JAX's GPU
backend. ``--precision=bfloat16`` (the default on a GPU) computes in bfloat16
(``config.model.dtype``; parameters stay float32); on a CPU as ``"mixed_bfloat16"``.

The harness runs this script with the checkout's root on ``PYTHONPATH``; the script also puts
that root first on ``sys.path``, so it always times this checkout's code.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import job_common  # noqa: E402  (from this script's folder, which Python puts on sys.path)

# Our registered backbone for each benchmark network. ``resnet50_keras`` is the Keras layout
# (ResNet v1: the stride on the first 1x1 convolution), as keras.applications.ResNet50;
# torchvision's resnet50 is v1.5 (the stride on the 3x3).
OUR_NAMES = {
    "resnet50": "resnet50_keras",
    "xception": "xception",
    "inception_v3": "inception_v3",
    "efficientnet_b0": "efficientnet_b0",
    "vgg19": "vgg19",
}


def versions() -> dict:
    import flax  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    import jaxlib  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel

    import boneage_jax  # pylint: disable=import-outside-toplevel

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "python": job_common.python_version(),
            "boneage_jax": os.path.dirname(os.path.dirname(os.path.abspath(boneage_jax.__file__))),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "convolutions": convolutions(),
            "allocator": boneage_jax._allocator.apply()}  # "retain" (the CPU default) or "system" (BONEAGE_ALLOCATOR)


def convolutions() -> str:
    """Which convolutions a CPU step of ours runs: oneDNN's (``boneage_jax.kernels``) or XLA's, and why."""
    import jax  # pylint: disable=import-outside-toplevel

    from boneage_jax.kernels import onednn  # pylint: disable=import-outside-toplevel

    if jax.default_backend() != "cpu":
        return f"XLA's ({jax.default_backend()})"
    try:
        if onednn.use_onednn():
            return "oneDNN"
        if onednn.mode() == "xla":
            return f"XLA's ({onednn.ENV}=xla)"
        return f"XLA's ({onednn.load() or 'several CPU devices'})"
    except (RuntimeError, ValueError) as error:
        return f"unusable: {error}"


def main() -> int:
    args = job_common.parse_arguments(__doc__.splitlines()[0])
    if args.versions:
        job_common.emit({"versions": versions()})
        return 0
    import jax  # pylint: disable=import-outside-toplevel

    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() != "gpu":
        raise RuntimeError(f"--device=gpu, but JAX's default backend is {jax.default_backend()!r} "
                           "(install jax[cuda] in the interpreter given by --ours_python)")
    from benchmarks import models as model_benchmark  # pylint: disable=import-outside-toplevel

    # config.model.dtype (parameters stay float32). bfloat16 on a CPU is "mixed_bfloat16", the split
    # of PyTorch's CPU autocast (convolutions in bfloat16, the rest in float32); on a GPU all bfloat16.
    dtype = "mixed_bfloat16" if args.precision == "bfloat16" and args.device == "cpu" else args.precision
    name = OUR_NAMES[args.network]
    step = model_benchmark.TrainStep(name, args.image_size, args.batch_size, sex_fusion="none", dtype=dtype)
    compile_s = step.compile()
    timing = job_common.run_steps(step, args)
    timing["first_step_s"] += compile_s  # the first step includes its compilation, as in the other stacks
    device = jax.devices()[0]
    job_common.emit(job_common.result(
        args, "ours", timing, parameters=step.parameters, compile_s=compile_s,
        built=f"{name} + Dense(1) (sex_fusion none), {dtype}, jit on {len(jax.devices())} x {device.device_kind}",
        versions=versions()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
