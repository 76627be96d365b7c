"""Xception in the layout of ``keras.applications.Xception`` (``include_top=False,
pooling="avg"``): 2048 features, smallest input 71x71.

Entry flow: ``block1_conv1`` (3x3/2 valid, no bias) and ``block1_conv2`` (3x3 valid) with BN and
ReLU; blocks 2-4 of two separable convolutions (``SeparableConv2D``, no bias, BN) and 3x3/2
``"same"`` max pooling, added to a 1x1/2 convolution + BN shortcut. Middle flow: blocks 5-12 of
three ReLU-separable-BN units with an identity shortcut. Exit flow: block 13 (728 then 1024
filters, max pooling, 1x1/2 shortcut) and block 14 (1536 and 2048 filters, each followed by BN
and ReLU). BatchNorm epsilon 1e-3, momentum 0.99. The separable convolutions use
``layers.SeparableConv`` (a ``DepthwiseConv`` + 1x1 pointwise conv; ``depthwise_impl="auto"``
uses shifted multiply-adds on CPU and ``feature_group_count`` elsewhere).

The four shortcut convolutions and their BNs are unnamed in Keras (``conv2d``/``conv2d_1``...,
``batch_normalization``...; session-dependent counters): ``load_keras`` pairs them with ours in
creation order. ImageNet weights expect ``tf`` preprocessing: RGB scaled to [-1, 1].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import BACKBONES, layers
from boneage_jax.weights import loaders

BN = {"epsilon": 1e-3, "momentum": 0.99}
# (block, filters of its two separable convs, filters of its 1x1/2 shortcut)
ENTRY = ((2, (128, 128), 128), (3, (256, 256), 256), (4, (728, 728), 728))
EXIT = (13, (728, 1024), 1024)


class Xception(nnx.Module):
    def __init__(
        self, *, in_channels: int = 3, image_size: int | None = None, dtype=jnp.float32, rngs: nnx.Rngs,
        depthwise_impl: str = "auto",
    ):
        del image_size  # any input size works
        self.in_channels = in_channels
        self.dtype = dtype
        names, shortcuts = [], []

        def bn(name, c):
            setattr(self, name, layers.BatchNorm(c, **BN, dtype=dtype, rngs=rngs))
            names.append(name)

        def sep(name, cin, cout):
            setattr(self, name, layers.SeparableConv(
                cin, cout, 3, padding="SAME", use_bias=False, depthwise_impl=depthwise_impl, dtype=dtype, rngs=rngs
            ))
            names.append(name)
            bn(f"{name}_bn", cout)

        def shortcut(cin, cout):
            shortcuts.append(nnx.Conv(
                cin, cout, (1, 1), (2, 2), padding="SAME", use_bias=False, kernel_init=layers.glorot_uniform,
                dtype=dtype, rngs=rngs,
            ))
            shortcuts.append(layers.BatchNorm(cout, **BN, dtype=dtype, rngs=rngs))

        self.block1_conv1 = nnx.Conv(
            in_channels, 32, (3, 3), (2, 2), padding="VALID", use_bias=False, kernel_init=layers.glorot_uniform,
            dtype=dtype, rngs=rngs,
        )
        names.append("block1_conv1")
        bn("block1_conv1_bn", 32)
        self.block1_conv2 = nnx.Conv(
            32, 64, (3, 3), padding="VALID", use_bias=False, kernel_init=layers.glorot_uniform, dtype=dtype, rngs=rngs
        )
        names.append("block1_conv2")
        bn("block1_conv2_bn", 64)
        width = 64
        for block, (f1, f2), fs in ENTRY:
            shortcut(width, fs)
            sep(f"block{block}_sepconv1", width, f1)
            sep(f"block{block}_sepconv2", f1, f2)
            width = f2
        for block in range(5, 13):
            for i in (1, 2, 3):
                sep(f"block{block}_sepconv{i}", 728, 728)
        block, (f1, f2), fs = EXIT
        shortcut(width, fs)
        sep("block13_sepconv1", width, f1)
        sep("block13_sepconv2", f1, f2)
        sep("block14_sepconv1", f2, 1536)
        sep("block14_sepconv2", 1536, 2048)
        self.shortcuts = nnx.List(shortcuts)
        self.keras_names = tuple(names)
        self.num_features = 2048

    def _sep_bn(self, name, x):
        return getattr(self, f"{name}_bn")(getattr(self, name)(x))

    def _short(self, i, x):
        return self.shortcuts[2 * i + 1](self.shortcuts[2 * i](x))

    def features(self, x: jnp.ndarray) -> jnp.ndarray:
        """The ``block14_sepconv2_act`` feature map (stride 32)."""
        if min(x.shape[1:3]) < 71:
            raise ValueError(f"Xception needs inputs of at least 71x71, got {x.shape[1:3]}")
        x = x.astype(self.dtype)
        x = nnx.relu(self.block1_conv1_bn(self.block1_conv1(x)))
        x = nnx.relu(self.block1_conv2_bn(self.block1_conv2(x)))
        for i, (block, _, _) in enumerate(ENTRY):
            residual = self._short(i, x)
            if block != 2:  # block 2 starts from block1_conv2_act (already ReLU'd)
                x = nnx.relu(x)
            x = self._sep_bn(f"block{block}_sepconv1", x)
            x = self._sep_bn(f"block{block}_sepconv2", nnx.relu(x))
            x = layers.max_pool(x, 3, 2, "SAME") + residual
        for block in range(5, 13):
            residual = x
            for i in (1, 2, 3):
                x = self._sep_bn(f"block{block}_sepconv{i}", nnx.relu(x))
            x = x + residual
        residual = self._short(len(ENTRY), x)
        x = self._sep_bn("block13_sepconv1", nnx.relu(x))
        x = self._sep_bn("block13_sepconv2", nnx.relu(x))
        x = layers.max_pool(x, 3, 2, "SAME") + residual
        x = nnx.relu(self._sep_bn("block14_sepconv1", x))
        return nnx.relu(self._sep_bn("block14_sepconv2", x))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return layers.global_avg_pool(self.features(x))

    def load_keras(self, weights: dict[str, list[np.ndarray]]) -> None:
        source = loaders.KerasLayers(weights)
        for name in self.keras_names:
            stem = self.in_channels if name == "block1_conv1" else None
            loaders.keras_load(getattr(self, name), source.take(name), name, in_channels=stem)
        count = len(self.shortcuts) // 2
        convs = source.auto("conv2d", count)
        bns = source.auto("batch_normalization", count)
        for i, (conv_name, bn_name) in enumerate(zip(convs, bns)):
            loaders.keras_conv(self.shortcuts[2 * i], source.take(conv_name), conv_name)
            loaders.keras_bn(self.shortcuts[2 * i + 1], source.take(bn_name), bn_name)
        source.finish()


BACKBONES.register("xception", Xception)
