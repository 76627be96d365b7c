"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter, 2022).

The network of the paper's reference code (locuslab/convmixer ``convmixer.py``):

- patch embedding: a ``patch_size x patch_size`` convolution with stride ``patch_size`` (with
  bias), activation, BatchNorm;
- ``depth`` mixer blocks: a residual depthwise ``kernel_size x kernel_size`` convolution
  (``padding="same"``, with bias), activation, BatchNorm, added to its input; then a pointwise
  1x1 convolution (with bias), activation, BatchNorm;
- global average pooling: ``dim`` features (the reference's ``Linear(dim, n_classes)`` is the
  head's job here).

The activation is the exact (erf) GELU of ``torch.nn.GELU``, except ``convmixer_768_32``, which
uses ReLU as the released ConvMixer-768/32 weights and timm's ``convmixer_768_32`` do (the
reference README notes it). BatchNorm uses torch's defaults (eps 1e-5, momentum 0.1, i.e. flax
``momentum=0.9``).

Registered: ``convmixer_1536_20`` (patch 7, kernel 9), ``convmixer_768_32`` (patch 7, kernel 7,
ReLU), ``convmixer_1024_20_ks9_p14`` (patch 14, kernel 9), small CPU variants
``convmixer_256_8`` (patch 7, kernel 9) and ``convmixer_128_4`` (patch 4, kernel 5), and the
generic ``convmixer`` whose ``dim``, ``depth``, ``kernel_size``, ``patch_size`` and
``activation`` come from ``config.model.kwargs``. With the reference's 1000-class head the
parameter counts are 51,625,960 (1536/20, the paper's 51.6M) and 21,110,248 (768/32, 21.1M);
the backbones alone have 1000*(dim+1) fewer.

Depthwise convolution: ``layers.DepthwiseConv``, either as k*k shifted multiply-adds
(``"shift"``) or as ``lax.conv_general_dilated(feature_group_count=dim)`` (``"grouped"``).
``depthwise_impl="auto"`` (default) is ``"shift"`` on CPU and ``"grouped"`` on GPU/TPU, from these
measurements (time of one jitted training step, forward + backward, after compilation, float32;
the CPU runs on 2 cores shared with other jobs, so only the ratios mean something):

=======  =============  ==========  ======  =====================  ========================
backend  model          batch @ px  kernel  step: shift / grouped  compile: shift / grouped
=======  =============  ==========  ======  =====================  ========================
XLA:CPU  256/8          2 @ 224     9       4.6 s / 10.5 s         41 s / 18 s
XLA:CPU  256/8          2 @ 224     7       2.4 s / 4.6 s          20 s / 13 s
XLA:CPU  256/8          2 @ 224     5       1.2 s / 2.5 s          11 s / 6 s
XLA:CPU  256/8          2 @ 224     3       0.8 s / 2.6 s          5 s / 5 s
H100     1536/20        16 @ 224    9       1006 ms / 533 ms       59 s / 14 s
H100     768/8          16 @ 224    9       126 ms / 109 ms        19 s / 5 s
H100     1536/8         16 @ 224    7       109 ms / 79 ms         11 s / 12 s
H100     768/32 (ReLU)  32 @ 224    7       185 ms / 280 ms        58 s / 28 s
H100     768/8          16 @ 224    5       18 ms / 15 ms          7 s / 9 s
H100     1536/8         16 @ 224    3       23 ms / 22 ms          4 s / 8 s
=======  =============  ==========  ======  =====================  ========================

On CPU the shifted form wins at every kernel size, including 9 (it compiles slower: at k=9 the
gradient of its 81 taps takes ~40 s to compile), but it needs far more memory: ConvMixer-768/32
at 256 px, batch 8, needs 55.5 GB of temporary buffers shifted against 6.3 GB grouped, so on the
CPU ``"auto"`` takes the shifted form only for mixers with dim x depth <= 4096 (256/8, 128/4). On the H100 the grouped form wins in all but
one case (768/32 at batch 32, where the shifted one was 1.5x faster), so accelerators default to
``"grouped"``; force either with ``--config.model.kwargs.depthwise_impl=shift|grouped``.

``load_torch`` reads the reference's ``nn.Sequential`` state dict (``0.*`` stem conv, ``2.*``
stem BN, ``{3+i}.0.fn.0.*`` depthwise conv, ``{3+i}.0.fn.2.*`` its BN, ``{3+i}.1.*`` pointwise
conv, ``{3+i}.3.*`` its BN, ``{5+depth}.*`` the classifier, ignored) and also timm's layout of
the same network (``stem.0``, ``stem.2``, ``blocks.{i}.0.fn.0`` ..., ``head``), told apart by
the presence of ``stem.0.weight``. For a 1-channel stem the RGB kernel is summed over its input
channels.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import BACKBONES, layers
from boneage_jax.weights import loaders

# On XLA:CPU the shifted form keeps about k*k copies of each block's input for the backward
# pass: ConvMixer-768/32 at 256 px, batch 8, needs 55.5 GB of temporary memory that way and
# 6.3 GB grouped (``compiled.memory_analysis()``). Wide and deep mixers therefore use the grouped
# form on the CPU too.
SHIFT_MAX_DIM_X_DEPTH = 4096


def depthwise_impl_for(impl: str = "auto", backend: str | None = None, dim: int = 0, depth: int = 0) -> str:
    """``layers.resolve_depthwise_impl`` (``"auto"``: grouped, or shifted on a CPU without oneDNN),
    except that ``"auto"`` takes the grouped form for mixers with ``dim * depth`` above
    ``SHIFT_MAX_DIM_X_DEPTH`` (memory)."""
    if impl not in layers.DEPTHWISE_IMPLS:
        raise ValueError(f"convmixer: depthwise_impl {impl!r}; expected one of {layers.DEPTHWISE_IMPLS}")
    if impl == "auto" and dim * depth > SHIFT_MAX_DIM_X_DEPTH:
        return "grouped"
    return layers.resolve_depthwise_impl(impl, backend)


ACTIVATIONS = {
    "gelu": functools.partial(nnx.gelu, approximate=False),  # torch.nn.GELU() is the erf form
    "relu": nnx.relu,
}


def _bn(dim: int, dtype, rngs: nnx.Rngs) -> layers.BatchNorm:
    return layers.BatchNorm(dim, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


class MixerBlock(nnx.Module):
    """Residual(depthwise conv, act, BN), pointwise conv, act, BN."""

    def __init__(self, dim: int, kernel_size: int, *, activation: str, depthwise_impl: str, dtype, rngs: nnx.Rngs):
        self.depthwise = layers.DepthwiseConv(
            dim,
            kernel_size,
            padding="SAME",
            use_bias=True,
            impl=depthwise_impl_for(depthwise_impl),
            dtype=dtype,
            rngs=rngs,
        )
        self.depthwise_bn = _bn(dim, dtype, rngs)
        self.pointwise = nnx.Conv(dim, dim, (1, 1), use_bias=True, dtype=dtype, rngs=rngs)
        self.pointwise_bn = _bn(dim, dtype, rngs)
        self.activation = activation

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        act = ACTIVATIONS[self.activation]
        x = x + self.depthwise_bn(act(self.depthwise(x)))
        return self.pointwise_bn(act(self.pointwise(x)))


class ConvMixer(nnx.Module):
    """ConvMixer-``dim``/``depth`` mapping (B, H, W, C) images to (B, dim) features."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        activation: str = "gelu",
        depthwise_impl: str = "auto",
        in_channels: int = 3,
        image_size: int | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        del image_size  # any input size works
        depthwise_impl = depthwise_impl_for(depthwise_impl, dim=dim, depth=depth)  # validates the name
        if activation not in ACTIVATIONS:
            raise ValueError(f"convmixer: activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if min(dim, depth, kernel_size, patch_size) < 1:
            raise ValueError(
                f"convmixer: dim, depth, kernel_size and patch_size must be positive, got "
                f"{dim}, {depth}, {kernel_size}, {patch_size}"
            )
        self.dim, self.depth = dim, depth
        self.kernel_size, self.patch_size = kernel_size, patch_size
        self.activation = activation
        self.in_channels = in_channels
        self.dtype = dtype
        self.stem = nnx.Conv(
            in_channels, dim, (patch_size, patch_size), strides=patch_size, padding="VALID", dtype=dtype, rngs=rngs
        )
        self.stem_bn = _bn(dim, dtype, rngs)
        self.blocks = nnx.List(
            [
                MixerBlock(
                    dim, kernel_size, activation=activation, depthwise_impl=depthwise_impl, dtype=dtype, rngs=rngs
                )
                for _ in range(depth)
            ]
        )
        self.num_features = dim

    def feature_map(self, x: jnp.ndarray) -> jnp.ndarray:
        """(B, H, W, C) -> (B, H // patch, W // patch, dim), before pooling."""
        x = self.stem_bn(ACTIVATIONS[self.activation](self.stem(x.astype(self.dtype))))
        for block in self.blocks:
            x = block(x)
        return x

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return layers.global_avg_pool(self.feature_map(x))

    def torch_prefixes(self, tensors: dict) -> dict[str, str]:
        """Module -> torch name prefix, in the reference's Sequential layout or timm's."""
        timm = "stem.0.weight" in tensors
        names = {"stem": "stem.0" if timm else "0", "stem_bn": "stem.2" if timm else "2"}
        for i in range(self.depth):
            block = f"blocks.{i}" if timm else str(3 + i)
            names[f"blocks.{i}.depthwise"] = f"{block}.0.fn.0"
            names[f"blocks.{i}.depthwise_bn"] = f"{block}.0.fn.2"
            names[f"blocks.{i}.pointwise"] = f"{block}.1"
            names[f"blocks.{i}.pointwise_bn"] = f"{block}.3"
        names["classifier"] = "head" if timm else str(5 + self.depth)
        return names

    def load_torch(self, tensors: dict[str, np.ndarray]) -> None:
        names = self.torch_prefixes(tensors)
        source = loaders.TorchTensors(tensors, ignore=rf"^{names['classifier']}\.")
        loaders.torch_conv(self.stem, source, names["stem"], in_channels=self.in_channels)
        loaders.torch_bn(self.stem_bn, source, names["stem_bn"])
        for i, block in enumerate(self.blocks):
            loaders.torch_conv(block.depthwise, source, names[f"blocks.{i}.depthwise"])
            loaders.torch_bn(block.depthwise_bn, source, names[f"blocks.{i}.depthwise_bn"])
            loaders.torch_conv(block.pointwise, source, names[f"blocks.{i}.pointwise"])
            loaders.torch_bn(block.pointwise_bn, source, names[f"blocks.{i}.pointwise_bn"])
        source.finish()


# ``model.kwargs`` may still set ``depthwise_impl`` (and override the architecture: the generic
# ``convmixer`` is any ConvMixer-dim/depth, ``--config.model.kwargs.dim=512 --config.model.kwargs.depth=12``).
BACKBONES.register("convmixer", ConvMixer, dim=256, depth=8)
BACKBONES.register("convmixer_1536_20", ConvMixer, dim=1536, depth=20, kernel_size=9, patch_size=7)
BACKBONES.register("convmixer_768_32", ConvMixer, dim=768, depth=32, kernel_size=7, patch_size=7, activation="relu")
BACKBONES.register("convmixer_1024_20_ks9_p14", ConvMixer, dim=1024, depth=20, kernel_size=9, patch_size=14)
BACKBONES.register("convmixer_256_8", ConvMixer, dim=256, depth=8, kernel_size=9, patch_size=7)
BACKBONES.register("convmixer_128_4", ConvMixer, dim=128, depth=4, kernel_size=5, patch_size=4)
