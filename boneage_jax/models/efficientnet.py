"""EfficientNet B0-B7 in the layout of ``keras.applications.EfficientNetB*`` (``include_top=False,
pooling="avg"``).

Stem: ``stem_conv`` (3x3/2, no bias, Keras ``correct_pad`` zero padding), ``stem_bn``, swish.
Then MBConv blocks ``block{stage}{letter}_`` (``expand_conv`` 1x1 + ``expand_bn`` + swish when the
expand ratio is not 1; ``dwconv`` depthwise kxk, ``correct_pad`` before stride 2, ``"same"``
otherwise; ``bn`` + swish; squeeze-excitation ``se_reduce`` (1x1 with bias, swish) and
``se_expand`` (1x1 with bias, sigmoid) on the global average; ``project_conv`` 1x1 + ``project_bn``;
identity shortcut with drop-connect (stochastic depth, rate ``0.2 * block / num_blocks``, one
Bernoulli per example, as Keras's ``Dropout(noise_shape=(None, 1, 1, 1))``) when shapes allow).
Then ``top_conv`` 1x1 + ``top_bn`` + swish and global average pooling. Widths and depths scale
with Keras's ``round_filters`` / ``round_repeats``. BatchNorm epsilon 1e-3, momentum 0.99.
Depthwise convolutions use ``layers.DepthwiseConv`` (``depthwise_impl="auto"``: shifted
multiply-adds on CPU, several times faster there; ``feature_group_count`` on GPU; or force
``"shift"``/``"grouped"``). Constructor keywords reachable through
``config.model.kwargs``: ``drop_connect_rate`` (0.2, Keras's default), ``imagenet_normalize``,
``depthwise_impl``.

Preprocessing. Keras's EfficientNet contains its input preprocessing: ``Rescaling(1/255)``, a
``Normalization`` layer (its mean/variance are weights of the ImageNet files) and, for
``weights="imagenet"``, a further ``Rescaling(1/sqrt(std))``; together they turn RGB in [0, 255]
into ``(x / 255 - mean) / std`` with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229,
0.224, 0.225). Our backbone does NOT contain these layers (our pipeline normalises images
itself; ``load_keras`` ignores the ``normalization``/``rescaling`` weights). To reproduce Keras
with ImageNet weights either feed ``(x / 255 - mean) / std`` yourself, or scale images to [0, 1]
(``data.normalize="value_range|grey_to_rgb"``) and build the backbone with
``imagenet_normalize=True`` (``--config.model.kwargs.imagenet_normalize=True``; 3-channel input
only), which applies that mean/std inside the model. With ``weights=None`` Keras's
``Normalization`` is the identity, so a Keras model fed ``x`` equals ours fed ``x / 255``; the
parity tests compare exactly that.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import BACKBONES, layers
from boneage_jax.weights import loaders

BN = {"epsilon": 1e-3, "momentum": 0.99}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# kernel, repeats, filters_in, filters_out, expand_ratio, strides (se_ratio 0.25, id_skip True)
BLOCKS = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
SE_RATIO = 0.25
# name: (width coefficient, depth coefficient, default resolution, top dropout)
VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}


def round_filters(filters: float, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class BlockSpec(NamedTuple):
    """One MBConv block of a scaled network."""

    stage: int  # 1-based, as Keras names blocks ("block2a_")
    index_in_stage: int  # 0-based ("a" is 0)
    cin: int
    cout: int
    kernel: int
    stride: int
    expand: int
    drop_rate: float  # drop-connect: drop_connect_rate * block index / number of blocks


def block_plan(width: float, depth: float, drop_connect_rate: float, *, stem: int | None = None,
               fixed_end_repeats: bool = False) -> list[BlockSpec]:
    """Every block of ``BLOCKS`` scaled by ``width`` and ``depth``, in order. EfficientNet-Lite
    passes its fixed ``stem`` width and keeps the repeats of the first and last stages
    (``fixed_end_repeats``)."""
    stages = []
    for i, (kernel, repeats, fin, fout, expand, stride) in enumerate(BLOCKS):
        fin, fout = round_filters(fin, width), round_filters(fout, width)
        if i == 0 and stem is not None:
            fin = stem
        if not (fixed_end_repeats and i in (0, len(BLOCKS) - 1)):
            repeats = round_repeats(repeats, depth)
        stages.append((kernel, repeats, fin, fout, expand, stride))
    total = sum(stage[1] for stage in stages)
    plan = []
    for number, (kernel, repeats, fin, fout, expand, stride) in enumerate(stages, start=1):
        for j in range(repeats):
            plan.append(BlockSpec(number, j, fin if j == 0 else fout, fout, kernel, stride if j == 0 else 1, expand,
                                  drop_connect_rate * len(plan) / total))
    return plan


class ScaledFamily(nnx.Module):
    """What EfficientNet and EfficientNet-Lite share: the constructor's common keywords, a
    variant's scaling and its checks, and the model input (compute dtype, optional ImageNet
    mean/std). A family names itself (``FAMILY``), lists its ``VARIANTS`` and builds its layers in
    its ``build(width, depth, dropout, *, drop_connect_rate, depthwise_impl, rngs, **own_keywords)``,
    which the constructor calls after the checks."""

    FAMILY: str = ""
    VARIANTS: dict[str, tuple[float, float, int, float]] = {}  # width, depth, resolution, dropout

    def __init__(
        self,
        variant: str | None = None,
        *,
        in_channels: int = 3,
        image_size: int | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        drop_connect_rate: float = 0.2,
        imagenet_normalize: bool = False,
        depthwise_impl: str = "auto",
        **family_options,
    ):
        del image_size  # any input size works
        variant = variant or next(iter(self.VARIANTS))
        if variant not in self.VARIANTS:
            raise ValueError(f"{self.FAMILY} variant {variant!r}; expected one of {sorted(self.VARIANTS)}")
        if imagenet_normalize and in_channels != 3:
            raise ValueError("imagenet_normalize needs in_channels=3 (per-channel RGB mean/std)")
        width, depth, self.default_size, dropout = self.VARIANTS[variant]
        self.variant = variant
        self.in_channels = in_channels
        self.dtype = dtype
        self.imagenet_normalize = imagenet_normalize
        self.build(width, depth, dropout, drop_connect_rate=drop_connect_rate, depthwise_impl=depthwise_impl,
                   rngs=rngs, **family_options)

    def _input(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(self.dtype)
        if self.imagenet_normalize:
            x = (x - jnp.asarray(IMAGENET_MEAN, self.dtype)) / jnp.asarray(IMAGENET_STD, self.dtype)
        return x


def correct_pad(size: tuple[int, int], kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``keras.applications.imagenet_utils.correct_pad`` for a known input size."""
    adjust = (1 - size[0] % 2, 1 - size[1] % 2)
    c = kernel // 2
    return (c - adjust[0], c), (c - adjust[1], c)


def _conv(cin, cout, kernel=1, strides=1, *, use_bias=False, padding="SAME", dtype, rngs):
    return nnx.Conv(
        cin, cout, (kernel, kernel), (strides, strides), padding=padding, use_bias=use_bias,
        kernel_init=layers.efficientnet_conv, dtype=dtype, rngs=rngs,
    )


def _bn(c, *, dtype, rngs):
    return layers.BatchNorm(c, **BN, dtype=dtype, rngs=rngs)


def expansion_and_depthwise(
    cin: int, expand: int, kernel: int, stride: int, padding, *, depthwise_impl: str, dtype, rngs: nnx.Rngs
) -> tuple[int, nnx.Conv | None, layers.BatchNorm | None, layers.DepthwiseConv]:
    """The first layers of an inverted-residual block, in creation order: the 1x1 expansion
    convolution and its BatchNorm (``None`` when ``expand`` is 1) and the depthwise convolution;
    with the expanded width. Each family names them as its reference does."""
    hidden = cin * expand
    expand_conv = _conv(cin, hidden, dtype=dtype, rngs=rngs) if expand != 1 else None
    expand_bn = _bn(hidden, dtype=dtype, rngs=rngs) if expand != 1 else None
    depthwise = layers.DepthwiseConv(hidden, kernel, stride, padding=padding, use_bias=False,
                                     kernel_init=layers.efficientnet_depthwise, impl=depthwise_impl, dtype=dtype,
                                     rngs=rngs)
    return hidden, expand_conv, expand_bn, depthwise


class MBConv(nnx.Module):
    """One inverted-residual block; attributes are named like its Keras layers (minus prefix)."""

    def __init__(self, name, cin, cout, kernel, strides, expand, drop_rate, *, depthwise_impl="auto", dtype, rngs):
        self.name = name
        self.kernel = kernel
        self.strides = strides
        self.expand = expand
        filters, expand_conv, expand_bn, self.dwconv = expansion_and_depthwise(
            cin, expand, kernel, strides, "VALID" if strides == 2 else "SAME", depthwise_impl=depthwise_impl,
            dtype=dtype, rngs=rngs)
        if expand != 1:
            self.expand_conv, self.expand_bn = expand_conv, expand_bn
        self.bn = _bn(filters, dtype=dtype, rngs=rngs)
        se = max(1, int(cin * SE_RATIO))
        self.se_reduce = _conv(filters, se, use_bias=True, dtype=dtype, rngs=rngs)
        self.se_expand = _conv(se, filters, use_bias=True, dtype=dtype, rngs=rngs)
        self.project_conv = _conv(filters, cout, dtype=dtype, rngs=rngs)
        self.project_bn = _bn(cout, dtype=dtype, rngs=rngs)
        self.skip = strides == 1 and cin == cout
        self.drop = nnx.Dropout(drop_rate, broadcast_dims=(1, 2, 3), rngs=rngs)

    def keras_layers(self):
        names = (["expand_conv", "expand_bn"] if self.expand != 1 else []) + [
            "dwconv", "bn", "se_reduce", "se_expand", "project_conv", "project_bn"]
        return [(f"{self.name}{n}", getattr(self, n)) for n in names]

    def __call__(self, inputs):
        x = inputs
        if self.expand != 1:
            x = nnx.swish(self.expand_bn(self.expand_conv(x)))
        if self.strides == 2:
            top, left = correct_pad(x.shape[1:3], self.kernel)
            x = jnp.pad(x, ((0, 0), top, left, (0, 0)))
        x = nnx.swish(self.bn(self.dwconv(x)))
        se = layers.global_avg_pool(x)[:, None, None, :]
        se = jax.nn.sigmoid(self.se_expand(nnx.swish(self.se_reduce(se))))
        x = self.project_bn(self.project_conv(x * se))
        if self.skip:
            x = self.drop(x) + inputs
        return x


class EfficientNet(ScaledFamily):
    FAMILY, VARIANTS = "EfficientNet", VARIANTS

    def build(self, width, depth, dropout, *, drop_connect_rate, depthwise_impl, rngs):
        del dropout  # no classifier
        in_channels, dtype = self.in_channels, self.dtype
        stem = round_filters(32, width)
        self.stem_conv = _conv(in_channels, stem, 3, 2, padding="VALID", dtype=dtype, rngs=rngs)
        self.stem_bn = _bn(stem, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([
            MBConv(f"block{b.stage}{chr(b.index_in_stage + 97)}_", b.cin, b.cout, b.kernel, b.stride, b.expand,
                   b.drop_rate, depthwise_impl=depthwise_impl, dtype=dtype, rngs=rngs)
            for b in block_plan(width, depth, drop_connect_rate)
        ])
        top = round_filters(1280, width)
        self.top_conv = _conv(round_filters(320, width), top, dtype=dtype, rngs=rngs)
        self.top_bn = _bn(top, dtype=dtype, rngs=rngs)
        self.num_features = top

    def features(self, x: jnp.ndarray) -> jnp.ndarray:
        """The ``top_activation`` feature map (stride 32)."""
        x = self._input(x)
        top, left = correct_pad(x.shape[1:3], 3)
        x = jnp.pad(x, ((0, 0), top, left, (0, 0)))
        x = nnx.swish(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks:
            x = block(x)
        return nnx.swish(self.top_bn(self.top_conv(x)))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return layers.global_avg_pool(self.features(x))

    def keras_layers(self) -> list[tuple[str, nnx.Module]]:
        named = [("stem_conv", self.stem_conv), ("stem_bn", self.stem_bn)]
        for block in self.blocks:
            named += block.keras_layers()
        return named + [("top_conv", self.top_conv), ("top_bn", self.top_bn)]

    def load_keras(self, weights: dict[str, list[np.ndarray]]) -> None:
        source = loaders.KerasLayers(weights)
        for name, module in self.keras_layers():
            stem = self.in_channels if name == "stem_conv" else None
            loaders.keras_load(module, source.take(name), name, in_channels=stem)
        source.finish()


for _variant in VARIANTS:
    BACKBONES.register(f"efficientnet_{_variant}", EfficientNet, variant=_variant)
