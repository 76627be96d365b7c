r"""Speed of the hand-written gradients in ``boneage_jax.models.layers`` against JAX's autodiff.

    python benchmarks/layers.py [--repeats=10]

Milliseconds per jitted forward + backward, on JAX's default backend, at the shapes of the
paper networks' train steps (256 px, batch 8):

- max pooling: ``layers.max_pool`` (a maximum of strided slices; first-maximum gradient without a
  scatter) against autodiff of ``nnx.max_pool`` (XLA's reduce-window and select-and-scatter),
  for ResNet-50's stem pool and Xception's pools;
- average pooling, stride 1: ``layers.avg_pool`` (a sum of slices with a hand-written gradient)
  against autodiff of ``nnx.avg_pool`` (reduce-window), at InceptionV3's branch pools;
- BatchNorm in training mode: ``layers.batch_norm_training`` against autodiff of flax's
  arithmetic (``_compute_stats`` + ``_normalize``), followed by a ReLU, at ResNet-50 sizes.

Each pair is checked to agree before it is timed (max pooling: exactly; average pooling and
BatchNorm: within float32 rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import normalization as flax_normalization

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from boneage_jax.models import layers  # noqa: E402

POOLS = (  # (name, input shape, window, stride, padding)
    ("ResNet-50 stem pool", (8, 128, 128, 64), 3, 2, 1),
    ("Xception block 2 pool", (8, 125, 125, 128), 3, 2, "SAME"),
    ("Xception block 3 pool", (8, 63, 63, 256), 3, 2, "SAME"),
)
AVG_POOLS = (  # (name, input shape): 3 x 3, stride 1, SAME, the padding left out of the count
    ("InceptionV3 mixed 5 (35 x 35 at 299 px)", (8, 29, 29, 288)),
    ("InceptionV3 mixed 6 (17 x 17 at 299 px)", (8, 14, 14, 768)),
    ("InceptionV3 mixed 7 (8 x 8 at 299 px)", (8, 6, 6, 2048)),
)
NORMS = (  # (name, activation shape)
    ("ResNet-50 stage 1, 256 channels", (8, 64, 64, 256)),
    ("ResNet-50 stem, 64 channels", (8, 128, 128, 64)),
    ("ResNet-50 stage 4, 2048 channels", (8, 8, 8, 2048)),
)


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats * 1e3


def pool_times(shape, size, stride, padding, repeats: int) -> tuple[float, float]:
    """(autodiff of nnx.max_pool, layers.max_pool) in ms per forward + backward."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.standard_normal(shape), 0), jnp.float32)  # ReLU'd: ties at zero
    pads = layers.resolve_padding(padding, shape[1:3], (size, size), (stride, stride))

    def gradient(pool):
        return jax.jit(jax.grad(lambda x: (pool(x) ** 2).sum()))

    xla = gradient(lambda x: nnx.max_pool(x, (size, size), strides=(stride, stride), padding=pads))
    ours = gradient(lambda x: layers.max_pool(x, size, stride, padding))
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(xla(x)))
    return _time(xla, x, repeats=repeats), _time(ours, x, repeats=repeats)


def avg_pool_times(shape, repeats: int) -> tuple[float, float]:
    """(autodiff of nnx.avg_pool, layers.avg_pool) in ms per forward + backward, 3 x 3, stride 1, SAME."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    pads = layers.resolve_padding("SAME", shape[1:3], (3, 3), (1, 1))

    def gradient(pool):
        return jax.jit(jax.grad(lambda x: (pool(x) ** 2).sum()))

    xla = gradient(lambda x: nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=pads, count_include_pad=False))
    ours = gradient(lambda x: layers.avg_pool(x, 3, 1, "SAME", count_include_pad=False))
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(xla(x)), rtol=1e-5, atol=1e-5)
    return _time(xla, x, repeats=repeats), _time(ours, x, repeats=repeats)


def norm_times(shape, repeats: int) -> tuple[float, float]:
    """(autodiff of flax's arithmetic, layers.batch_norm_training) in ms per forward + backward."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0.5, 2.0, size=shape), jnp.float32)
    scale = jnp.asarray(rng.normal(1.0, 0.2, shape[-1]), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 0.2, shape[-1]), jnp.float32)
    axes = (0, 1, 2)

    def flax_arithmetic(x, scale, bias):
        mean, var = flax_normalization._compute_stats(x, axes, dtype=jnp.float32, use_fast_variance=True)
        return flax_normalization._normalize(x, mean, var, scale, bias, axes, (3,), jnp.float32, 1e-3)

    def ours(x, scale, bias):
        return layers.batch_norm_training(x, scale, bias, feature_axes=(3,), dtype=jnp.float32, epsilon=1e-3)[0]

    def gradient(norm):
        return jax.jit(jax.grad(lambda x, s, b: (jax.nn.relu(norm(x, s, b)) ** 2).sum(), argnums=(0, 1, 2)))

    reference, candidate = gradient(flax_arithmetic), gradient(ours)
    for a, b in zip(candidate(x, scale, bias), reference(x, scale, bias)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    return _time(reference, x, scale, bias, repeats=repeats), _time(candidate, x, scale, bias, repeats=repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()}; ms per jitted forward + backward")
    for name, shape, size, stride, padding in POOLS:
        xla, ours = pool_times(shape, size, stride, padding, args.repeats)
        print(f"max pool {size}x{size}/{stride}, {name} {shape}: autodiff (select-and-scatter) {xla:.1f} ms, "
              f"layers.max_pool {ours:.1f} ms ({xla / ours:.1f}x)", flush=True)
    for name, shape in AVG_POOLS:
        xla, ours = avg_pool_times(shape, args.repeats)
        print(f"avg pool 3x3/1, {name} {shape}: autodiff (reduce-window) {xla:.1f} ms, "
              f"layers.avg_pool {ours:.1f} ms ({xla / ours:.1f}x)", flush=True)
    for name, shape in NORMS:
        reference, ours = norm_times(shape, args.repeats)
        print(f"BatchNorm + ReLU, {name} {shape}: autodiff of flax {reference:.1f} ms, "
              f"batch_norm_training {ours:.1f} ms ({reference / ours:.1f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
