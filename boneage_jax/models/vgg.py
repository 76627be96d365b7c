"""VGG16 and VGG19 in the layout of ``keras.applications`` (``include_top=False, pooling="avg"``).

Five blocks of 3x3 ``"same"`` convolutions with bias and ReLU (VGG16: 2, 2, 3, 3, 3 convs;
VGG19: 2, 2, 4, 4, 4) with 64, 128, 256, 512, 512 filters, each block closed by 2x2 max
pooling with stride 2, then global average pooling: 512 features. No batch normalisation.

Submodules carry the Keras layer names (``block1_conv1`` ... ``block5_conv4``), so
``load_keras`` reads the official ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`` by name.
``load_torch`` reads torchvision's ``vgg16``/``vgg19`` (without BN) ``features.*`` tensors; the
convolutions are identical (torch's ``padding=1`` equals ``"same"`` at stride 1), the classifier
is ignored. Keras's ImageNet weights expect ``caffe`` preprocessing (BGR, ImageNet means
subtracted, 0-255 scale), torchvision's RGB in [0, 1] normalised by the ImageNet mean/std.

``VGG`` is reusable: ``block_outputs(x)`` returns each block's last convolution output (before
its max pooling), ``features(x)`` the last feature map (after ``block5_pool``, the Keras
``include_top=False`` output), ``__call__(x)`` the pooled features.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import BACKBONES, layers
from boneage_jax.weights import loaders

DEPTHS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)


class VGG(nnx.Module):
    """The VGG convolutional feature extractor with global average pooling."""

    def __init__(
        self, depth: int = 16, *, in_channels: int = 3, image_size: int | None = None, dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        del image_size  # any input size works
        if depth not in DEPTHS:
            raise ValueError(f"VGG depth {depth}; expected one of {sorted(DEPTHS)}")
        self.depth = depth
        self.in_channels = in_channels
        self.dtype = dtype
        block_names = []
        width = in_channels
        for b, (count, filters) in enumerate(zip(DEPTHS[depth], WIDTHS), start=1):
            names = []
            for c in range(1, count + 1):
                name = f"block{b}_conv{c}"
                setattr(self, name, nnx.Conv(
                    width, filters, (3, 3), padding="SAME", kernel_init=layers.glorot_uniform, dtype=dtype, rngs=rngs
                ))
                names.append(name)
                width = filters
            block_names.append(tuple(names))
        self.block_names = tuple(block_names)
        self.widths = WIDTHS
        self.num_features = width

    def block_outputs(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        """Each block's last ReLU output before its max pooling (5 maps, strides 1 to 16)."""
        x = x.astype(self.dtype)
        outputs = []
        for b, names in enumerate(self.block_names):
            if b:
                x = layers.max_pool(x, 2, 2)
            for name in names:
                x = nnx.relu(getattr(self, name)(x))
            outputs.append(x)
        return outputs

    def features(self, x: jnp.ndarray) -> jnp.ndarray:
        """The last feature map after ``block5_pool`` (stride 32)."""
        return layers.max_pool(self.block_outputs(x)[-1], 2, 2)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return layers.global_avg_pool(self.features(x))

    def conv_names(self) -> list[str]:
        return [name for names in self.block_names for name in names]

    def load_keras(self, weights: dict[str, list[np.ndarray]]) -> None:
        source = loaders.KerasLayers(weights)
        for i, name in enumerate(self.conv_names()):
            stem = self.in_channels if i == 0 else None
            loaders.keras_conv(getattr(self, name), source.take(name), name, in_channels=stem)
        source.finish()

    def torch_names(self) -> list[str]:
        """torchvision ``features.{i}`` indices of the convolutions (ReLU and MaxPool take slots)."""
        names, index = [], 0
        for b, count in enumerate(DEPTHS[self.depth]):
            for _ in range(count):
                names.append(f"features.{index}")
                index += 2
            index += 1
        return names

    def load_torch(self, tensors: dict[str, np.ndarray]) -> None:
        source = loaders.TorchTensors(tensors, ignore=r"^classifier\.")
        for i, (name, prefix) in enumerate(zip(self.conv_names(), self.torch_names())):
            loaders.torch_conv(getattr(self, name), source, prefix, in_channels=self.in_channels if i == 0 else None)
        source.finish()


BACKBONES.register("vgg16", VGG, depth=16)
BACKBONES.register("vgg19", VGG, depth=19)
