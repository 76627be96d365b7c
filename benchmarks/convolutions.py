r"""Speed of one convolution, forward + both gradients: XLA's CPU path against oneDNN's.

    python benchmarks/convolutions.py [--repeats=10] [--dtype=float32]

For a few shapes taken from ResNet-50, Xception and EfficientNet-B0 at 256 px, batch 8 (a 3x3
and a 1x1 convolution, the 7x7/2 stem, a depthwise 3x3), prints milliseconds per jitted
``jax.grad`` (the forward and both gradients) through ``lax.conv_general_dilated`` and through
``boneage_jax.kernels.onednn.conv_general_dilated``, their ratio, and the oneDNN primitive and
kernel of the forward / data gradient / weight gradient (``onednn.implementation``; a 1x1
convolution over few rows is a matmul). The README's figures for the oneDNN convolutions come
from this script; ``BONEAGE_ONEDNN_MATMUL=0 python benchmarks/convolutions.py`` times the 1x1
ones as oneDNN convolutions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from boneage_jax.kernels import onednn  # noqa: E402

# name: (input NHWC, kernel HWIO, strides, feature groups)
SHAPES = {
    "resnet50 3x3, 64 ch @ 64x64": ((8, 64, 64, 64), (3, 3, 64, 64), 1, 1),
    "resnet50 1x1, 256->64 @ 64x64": ((8, 64, 64, 256), (1, 1, 256, 64), 1, 1),
    "xception 1x1, 728->728 @ 16x16": ((8, 16, 16, 728), (1, 1, 728, 728), 1, 1),
    "resnet50 stem 7x7/2, 3->64 @ 256": ((8, 256, 256, 3), (7, 7, 3, 64), 2, 1),
    "depthwise 3x3, 144 ch @ 64x64": ((8, 64, 64, 144), (3, 3, 1, 144), 1, 144),
}


def milliseconds(conv, x_shape, w_shape, strides: int, groups: int, dtype, repeats: int) -> tuple[float, bool]:
    """Mean time of ``repeats`` calls after one warm-up call (ms), and whether the program calls
    oneDNN (``onednn.conv_general_dilated`` keeps XLA's path where oneDNN has no direct kernel)."""
    x = jax.random.normal(jax.random.key(0), x_shape).astype(dtype)
    w = (jax.random.normal(jax.random.key(1), w_shape) * 0.05).astype(dtype)

    def loss(x, w):
        y = conv(x, w, (strides, strides), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                 feature_group_count=groups)
        return y.astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    uses_onednn = "boneage_onednn_conv" in step.lower(x, w).as_text()
    jax.block_until_ready(step(x, w))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(step(x, w))
    return (time.perf_counter() - start) / repeats * 1e3, uses_onednn


def kernels(x_shape, w_shape, strides: int, groups: int, dtype: str) -> str:
    """oneDNN's primitive and kernel for the forward, data gradient and weight gradient."""
    geometry = onednn.geometry_of(x_shape, w_shape, (strides, strides), "SAME", None, groups)
    y_shape = jax.eval_shape(lambda x, w: lax.conv_general_dilated(
        x, w, (strides, strides), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups),
        jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(w_shape, dtype)).shape
    return " / ".join(str(onednn.implementation(kind, dtype, x_shape, w_shape, y_shape, geometry))
                      for kind in onednn.TARGETS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    reason = onednn.load()
    if reason is not None:
        sys.exit(f"error: {reason}")
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, {args.dtype}; ms per forward + both gradients")
    print("| convolution | XLA | oneDNN | XLA / oneDNN | oneDNN kernels (forward / data / weights) |\n"
          "|---|---:|---:|---:|---|")
    for name, (x_shape, w_shape, strides, groups) in SHAPES.items():
        xla, _ = milliseconds(lax.conv_general_dilated, x_shape, w_shape, strides, groups, args.dtype, args.repeats)
        ours, uses_onednn = milliseconds(onednn.conv_general_dilated, x_shape, w_shape, strides, groups, args.dtype,
                                         args.repeats)
        if not uses_onednn:
            print(f"| {name} | {xla:.1f} | XLA's path (no direct oneDNN kernel here) | | |", flush=True)
            continue
        print(f"| {name} | {xla:.1f} | {ours:.1f} | {xla / ours:.2f} | "
              f"{kernels(x_shape, w_shape, strides, groups, args.dtype)} |", flush=True)


if __name__ == "__main__":
    main()
