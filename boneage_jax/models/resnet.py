"""ResNets in two layouts: ``keras.applications`` (ResNet v1) and torchvision ("ResNet v1.5").

===================  =============  ======  ==================================
registered name      alias          layout  reference
===================  =============  ======  ==================================
``resnet50_keras``   ``resnet50``   Keras   ``keras.applications.ResNet50``
``resnet101_keras``                 Keras   ``keras.applications.ResNet101``
``resnet152_keras``                 Keras   ``keras.applications.ResNet152``
``resnet18_torch``   ``resnet18``   torch   ``torchvision.models.resnet18``
``resnet34_torch``   ``resnet34``   torch   ``torchvision.models.resnet34``
``resnet50_torch``                  torch   ``torchvision.models.resnet50``
``resnet101_torch``  ``resnet101``  torch   ``torchvision.models.resnet101``
``resnet152_torch``  ``resnet152``  torch   ``torchvision.models.resnet152``
===================  =============  ======  ==================================

The aliases are the names these networks had before the layout was part of every name (so
``resnet50`` is the Keras layout and the deeper plain names torchvision's); saved runs that use
them build the same network.

Keras layout (``KerasResNet``): ``conv1_pad`` (zero padding 3), 7x7/2 ``conv1_conv`` with bias,
``conv1_bn``, ReLU, ``pool1_pad`` (zero padding 1), 3x3/2 max pooling; bottleneck blocks
``convN_blockM`` whose stride sits on the first 1x1 convolution (``_1_conv``) and on the 1x1
projection shortcut (``_0_conv``, first block of each stage only), all convolutions with bias,
BatchNorm epsilon 1.001e-5 and momentum 0.99. ImageNet weights:
``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`` (``caffe`` preprocessing).

torch layout (``TorchResNet``): 7x7/2 ``conv1`` (padding 3, no bias), ``bn1``, ReLU, 3x3/2 max
pooling (padding 1), ``layer1`` ... ``layer4`` of ``BasicBlock`` (18, 34) or ``Bottleneck`` (50,
101, 152) with the stride on the 3x3 convolution (v1.5), convolutions without bias, symmetric
torch padding, BatchNorm epsilon 1e-5 and momentum 0.1 (flax momentum 0.9), projection shortcut
``downsample.0`` (1x1 conv) + ``downsample.1`` (BN). Submodules carry torchvision's names, so
``load_torch`` reads a torchvision state dict (``fc.*`` is ignored). One difference in training
mode only: torch updates ``running_var`` with the unbiased batch variance, flax with the biased.

Both end with global average pooling: 2048 features (512 for resnet18/34).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import BACKBONES, layers
from boneage_jax.weights import loaders

KERAS_BN = {"epsilon": 1.001e-5, "momentum": 0.99}
TORCH_BN = {"epsilon": 1e-5, "momentum": 0.9}
KERAS_STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
TORCH_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
WIDTHS = (64, 128, 256, 512)


# ----------------------------------------------------------------------------- Keras layout


class KerasResNet(nnx.Module):
    """``keras.applications.ResNet50/101/152`` with ``include_top=False, pooling="avg"``.

    Every layer is an attribute named like the Keras layer (``conv1_conv``,
    ``conv2_block1_0_conv``, ``conv2_block1_1_bn``, ...).
    """

    def __init__(
        self, depth: int = 50, *, in_channels: int = 3, image_size: int | None = None, dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        del image_size  # any input size works
        if depth not in KERAS_STAGES:
            raise ValueError(f"Keras ResNet depth {depth}; expected one of {sorted(KERAS_STAGES)}")
        self.in_channels = in_channels
        self.dtype = dtype
        names = []

        def conv(name, cin, cout, k, stride=1, padding="VALID"):
            setattr(self, name, nnx.Conv(
                cin, cout, (k, k), (stride, stride), padding=padding, kernel_init=layers.glorot_uniform, dtype=dtype,
                rngs=rngs,
            ))
            names.append(name)

        def bn(name, c):
            setattr(self, name, layers.BatchNorm(c, **KERAS_BN, dtype=dtype, rngs=rngs))
            names.append(name)

        conv("conv1_conv", in_channels, 64, 7, 2)
        bn("conv1_bn", 64)
        blocks, width = [], 64
        for s, (count, filters) in enumerate(zip(KERAS_STAGES[depth], WIDTHS), start=2):
            for b in range(1, count + 1):
                prefix = f"conv{s}_block{b}"
                stride = (1 if s == 2 else 2) if b == 1 else 1
                if b == 1:
                    conv(f"{prefix}_0_conv", width, 4 * filters, 1, stride)
                    bn(f"{prefix}_0_bn", 4 * filters)
                conv(f"{prefix}_1_conv", width, filters, 1, stride)
                bn(f"{prefix}_1_bn", filters)
                conv(f"{prefix}_2_conv", filters, filters, 3, 1, "SAME")
                bn(f"{prefix}_2_bn", filters)
                conv(f"{prefix}_3_conv", filters, 4 * filters, 1)
                bn(f"{prefix}_3_bn", 4 * filters)
                blocks.append((prefix, b == 1))
                width = 4 * filters
        self.keras_names = tuple(names)
        self.blocks = tuple(blocks)
        self.num_features = width

    def features(self, x: jnp.ndarray) -> jnp.ndarray:
        """The last feature map (``conv5_blockN_out``, stride 32)."""
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (3, 3), (3, 3), (0, 0)))
        x = nnx.relu(self.conv1_bn(self.conv1_conv(x)))
        x = layers.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), 3, 2)
        for prefix, projection in self.blocks:
            shortcut = x
            if projection:
                shortcut = getattr(self, f"{prefix}_0_bn")(getattr(self, f"{prefix}_0_conv")(x))
            y = nnx.relu(getattr(self, f"{prefix}_1_bn")(getattr(self, f"{prefix}_1_conv")(x)))
            y = nnx.relu(getattr(self, f"{prefix}_2_bn")(getattr(self, f"{prefix}_2_conv")(y)))
            y = getattr(self, f"{prefix}_3_bn")(getattr(self, f"{prefix}_3_conv")(y))
            x = nnx.relu(shortcut + y)
        return x

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return layers.global_avg_pool(self.features(x))

    def load_keras(self, weights: dict[str, list[np.ndarray]]) -> None:
        loaders.load_keras_named(self, weights, self.keras_names, stem="conv1_conv", in_channels=self.in_channels)


# ----------------------------------------------------------------------------- torch layout


def _conv(cin, cout, k, stride, padding, dtype, rngs):
    return nnx.Conv(
        cin, cout, (k, k), (stride, stride), padding=((padding, padding), (padding, padding)),
        use_bias=False, kernel_init=layers.kaiming_normal_fan_out, dtype=dtype, rngs=rngs,
    )


def _bn(c, dtype, rngs):
    return layers.BatchNorm(c, **TORCH_BN, dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, planes, 3, stride, 1, dtype, rngs)
        self.bn1 = _bn(planes, dtype, rngs)
        self.conv2 = _conv(planes, planes, 3, 1, 1, dtype, rngs)
        self.bn2 = _bn(planes, dtype, rngs)
        self.downsample = (
            nnx.List([_conv(cin, planes, 1, stride, 0, dtype, rngs), _bn(planes, dtype, rngs)])
            if stride != 1 or cin != planes else None
        )

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return nnx.relu(y + shortcut)

    def load_torch(self, source: loaders.TorchTensors, prefix: str) -> None:
        for i in (1, 2):
            loaders.torch_conv(getattr(self, f"conv{i}"), source, f"{prefix}.conv{i}")
            loaders.torch_bn(getattr(self, f"bn{i}"), source, f"{prefix}.bn{i}")
        if self.downsample is not None:
            loaders.torch_conv(self.downsample[0], source, f"{prefix}.downsample.0")
            loaders.torch_bn(self.downsample[1], source, f"{prefix}.downsample.1")


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, planes, 1, 1, 0, dtype, rngs)
        self.bn1 = _bn(planes, dtype, rngs)
        self.conv2 = _conv(planes, planes, 3, stride, 1, dtype, rngs)
        self.bn2 = _bn(planes, dtype, rngs)
        self.conv3 = _conv(planes, 4 * planes, 1, 1, 0, dtype, rngs)
        self.bn3 = _bn(4 * planes, dtype, rngs)
        self.downsample = (
            nnx.List([_conv(cin, 4 * planes, 1, stride, 0, dtype, rngs), _bn(4 * planes, dtype, rngs)])
            if stride != 1 or cin != 4 * planes else None
        )

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return nnx.relu(y + shortcut)

    def load_torch(self, source: loaders.TorchTensors, prefix: str) -> None:
        for i in (1, 2, 3):
            loaders.torch_conv(getattr(self, f"conv{i}"), source, f"{prefix}.conv{i}")
            loaders.torch_bn(getattr(self, f"bn{i}"), source, f"{prefix}.bn{i}")
        if self.downsample is not None:
            loaders.torch_conv(self.downsample[0], source, f"{prefix}.downsample.0")
            loaders.torch_bn(self.downsample[1], source, f"{prefix}.downsample.1")


class TorchResNet(nnx.Module):
    """``torchvision.models.resnetNN`` without ``fc`` (``avgpool`` + flatten = our pooling)."""

    def __init__(
        self, depth: int = 50, *, in_channels: int = 3, image_size: int | None = None, dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        del image_size  # any input size works
        if depth not in TORCH_STAGES:
            raise ValueError(f"torch ResNet depth {depth}; expected one of {sorted(TORCH_STAGES)}")
        block = BasicBlock if depth < 50 else Bottleneck
        self.in_channels = in_channels
        self.dtype = dtype
        self.conv1 = _conv(in_channels, 64, 7, 2, 3, dtype, rngs)
        self.bn1 = _bn(64, dtype, rngs)
        width = 64
        for i, (count, planes) in enumerate(zip(TORCH_STAGES[depth], WIDTHS), start=1):
            stage = []
            for b in range(count):
                stage.append(block(width, planes, (1 if i == 1 else 2) if b == 0 else 1, dtype=dtype, rngs=rngs))
                width = planes * block.expansion
            setattr(self, f"layer{i}", nnx.List(stage))
        self.num_features = width

    def stem(self, x: jnp.ndarray) -> jnp.ndarray:
        """conv1, bn1, ReLU, max pooling (stride 4)."""
        x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        return layers.max_pool(x, 3, 2, padding=1)

    def features(self, x: jnp.ndarray) -> jnp.ndarray:
        """The last feature map (``layer4`` output, stride 32)."""
        x = self.stem(x)
        for i in range(1, 5):
            for block in getattr(self, f"layer{i}"):
                x = block(x)
        return x

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return layers.global_avg_pool(self.features(x))

    def load_torch(self, tensors: dict[str, np.ndarray]) -> None:
        source = loaders.TorchTensors(tensors, ignore=r"^fc\.")
        loaders.torch_conv(self.conv1, source, "conv1", in_channels=self.in_channels)
        loaders.torch_bn(self.bn1, source, "bn1")
        for i in range(1, 5):
            for b, block in enumerate(getattr(self, f"layer{i}")):
                block.load_torch(source, f"layer{i}.{b}")
        source.finish()


# ----------------------------------------------------------------------------- registry


# Names say the layout; the older names stay as aliases (``resnet50`` was, and still is, the Keras
# layout; ``resnet18/34/101/152`` torchvision's).
for _depth in KERAS_STAGES:
    BACKBONES.register(f"resnet{_depth}_keras", KerasResNet, depth=_depth,
                       aliases=("resnet50",) if _depth == 50 else ())
for _depth in TORCH_STAGES:
    BACKBONES.register(f"resnet{_depth}_torch", TorchResNet, depth=_depth,
                       aliases=() if _depth == 50 else (f"resnet{_depth}",))
