"""U-Net (Ronneberger, Fischer & Brox, 2015) for hand masks.

The paper's network with ``padding="same"`` convolutions (as the common Keras U-Nets use), so the
output has the input's size and no cropping of the skip connections is needed:

- contracting path: ``depth`` levels (default 4) of two 3x3 convolutions + ReLU with
  ``base_filters * 2**level`` filters (default 64, 128, 256, 512), each followed by 2x2 max
  pooling;
- bottleneck: two 3x3 convolutions + ReLU with ``base_filters * 2**depth`` filters (1024), then
  Dropout(``dropout``, default 0.5: the paper's "drop-out layers at the end of the contracting
  path");
- expanding path: per level a 2x2 stride-2 up-convolution (transposed convolution) halving the
  channels, concatenation with the skip connection of the same level, two 3x3 convolutions + ReLU;
- a 1x1 convolution to ``num_classes`` logits (default 1: one sigmoid channel for the hand mask,
  where the paper used a 2-class softmax).

Weights start from He-normal (the paper's sqrt(2/N) Gaussian); biases from zero. ``batch_norm=True``
adds BatchNorm after each 3x3 convolution (not in the paper; off by default).

Inputs whose sides are not multiples of ``2**depth`` are zero-padded at the bottom/right and the
logits cropped back, so ``segment(x)`` always returns the input's height and width.

Parameters with the defaults (depth 4, 64 filters, 1 input channel, 1 class): 31,030,593. The
widely used Keras U-Net (zhixuhao/unet, 31,031,685) has the same body and ends in a 3x3 conv to
2 channels and a 1x1 conv to 1 (1,157 parameters) where this one has a single 1x1 conv (65).

Use:

- ``UNet.segment(x) -> (B, H, W, num_classes)`` float32 logits: for the segmentation training;
- ``UNet.decode(x) -> (B, H, W, base_filters)``: the last decoder feature map;
- ``UNet(x) -> (B, base_filters)``: global average pool of ``decode(x)`` (``num_features =
  base_filters``); it is not meant as a bone age regressor.

Registered as ``unet`` in ``models.SEGMENTATION_NETWORKS`` (not among the backbones):
``config.task="segmentation"`` wraps it in ``models.SegmentationModel``, which calls ``segment``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from boneage_jax.models import SEGMENTATION_NETWORKS, layers

_HE = nnx.initializers.he_normal()


class DoubleConv(nnx.Module):
    """Two 3x3 "same" convolutions, each followed by ReLU (and BatchNorm first, if asked)."""

    def __init__(self, cin: int, cout: int, *, batch_norm: bool, dtype, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), padding="SAME", kernel_init=_HE, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding="SAME", kernel_init=_HE, dtype=dtype, rngs=rngs)
        if batch_norm:
            self.bn1 = layers.BatchNorm(cout, dtype=dtype, rngs=rngs)
            self.bn2 = layers.BatchNorm(cout, dtype=dtype, rngs=rngs)
        else:
            self.bn1 = self.bn2 = None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        x = self.conv2(nnx.relu(x))
        if self.bn2 is not None:
            x = self.bn2(x)
        return nnx.relu(x)


class UpBlock(nnx.Module):
    """2x2 up-convolution halving the channels, concatenation with the skip, DoubleConv."""

    def __init__(self, cin: int, cout: int, *, batch_norm: bool, dtype, rngs: nnx.Rngs):
        self.up = nnx.ConvTranspose(
            cin, cout, (2, 2), strides=(2, 2), padding="VALID", kernel_init=_HE, dtype=dtype, rngs=rngs
        )
        self.convs = DoubleConv(2 * cout, cout, batch_norm=batch_norm, dtype=dtype, rngs=rngs)

    def __call__(self, x: jnp.ndarray, skip: jnp.ndarray) -> jnp.ndarray:
        return self.convs(jnp.concatenate([skip, self.up(x)], axis=-1))


class UNet(nnx.Module):
    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        depth: int = 4,
        base_filters: int = 64,
        num_classes: int = 1,
        dropout: float = 0.5,
        batch_norm: bool = False,
    ):
        if depth < 1 or base_filters < 1 or num_classes < 1:
            raise ValueError(
                f"unet: depth {depth}, base_filters {base_filters}, num_classes {num_classes} must be >= 1"
            )
        del image_size  # any input size works (padded to a multiple of 2**depth)
        kw = dict(batch_norm=batch_norm, dtype=dtype, rngs=rngs)
        self.depth = depth
        self.dtype = dtype
        widths = [base_filters * 2**level for level in range(depth + 1)]
        down, width = [], in_channels
        for level in range(depth):
            down.append(DoubleConv(width, widths[level], **kw))
            width = widths[level]
        self.down = nnx.List(down)
        self.bottleneck = DoubleConv(width, widths[depth], **kw)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.up = nnx.List([UpBlock(widths[level + 1], widths[level], **kw) for level in reversed(range(depth))])
        self.head = nnx.Conv(base_filters, num_classes, (1, 1), kernel_init=_HE, dtype=dtype, rngs=rngs)
        self.num_features = base_filters
        self.num_classes = num_classes

    def _decode_padded(self, x: jnp.ndarray) -> jnp.ndarray:
        multiple = 2**self.depth
        height, width = x.shape[1:3]
        pad_h, pad_w = -height % multiple, -width % multiple
        x = x.astype(self.dtype)
        if pad_h or pad_w:
            x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = layers.max_pool(x, 2, 2)
        x = self.dropout(self.bottleneck(x))
        for block, skip in zip(self.up, reversed(skips)):
            x = block(x, skip)
        return x

    def decode(self, x: jnp.ndarray) -> jnp.ndarray:
        """(B, H, W, C) -> (B, H, W, base_filters): the last decoder feature map."""
        return self._decode_padded(x)[:, : x.shape[1], : x.shape[2]]

    def segment(self, x: jnp.ndarray) -> jnp.ndarray:
        """(B, H, W, C) -> (B, H, W, num_classes) float32 logits (sigmoid for the hand mask)."""
        return self.head(self.decode(x)).astype(jnp.float32)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return layers.global_avg_pool(self.decode(x))


SEGMENTATION_NETWORKS.register("unet", UNet)
