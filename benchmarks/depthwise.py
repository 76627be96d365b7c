r"""Speed of ``layers.DepthwiseConv``'s two forms: shifted multiply-adds against the grouped convolution.

    python benchmarks/depthwise.py

Prints milliseconds per jitted forward + backward (batch 8, 56x56, 144 channels) for 3x3 and
5x5 kernels at strides 1 and 2, on JAX's default backend. The README's "depthwise 3x3
convolution" row and ``layers.resolve_depthwise_impl``'s choice of ``"shift"`` on the CPU come
from this measurement.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from boneage_jax.models.layers import DepthwiseConv  # noqa: E402


def benchmark_depthwise(
    batch: int = 8, size: int = 56, channels: int = 144, kernel: int = 3, strides: int = 1, repeats: int = 10
) -> dict[str, float]:
    """Milliseconds per jitted forward+backward of ``DepthwiseConv`` for both ``impl`` choices."""
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    times = {}
    for impl in ("shift", "grouped"):
        conv = DepthwiseConv(channels, kernel, strides, use_bias=False, impl=impl, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(conv)

        @jax.jit
        def step(params, x, graphdef=graphdef):
            def loss(params, x):
                return jnp.mean(nnx.merge(graphdef, params)(x) ** 2)

            return jax.grad(loss, argnums=(0, 1))(params, x)

        jax.block_until_ready(step(params, x))
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(step(params, x))
        times[impl] = (time.perf_counter() - start) / repeats * 1e3
    return times


def main() -> int:
    print(f"backend {jax.default_backend()}; ms per forward+backward (batch 8, 56x56, 144 channels)")
    for k, s in ((3, 1), (3, 2), (5, 1), (5, 2)):
        t = benchmark_depthwise(kernel=k, strides=s)
        print(f"{k}x{k} stride {s}: shift {t['shift']:.2f} ms, grouped {t['grouped']:.2f} ms, "
              f"grouped/shift {t['grouped'] / t['shift']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
