"""VGG19 with the attention head of Nguyen et al. (after K. Scott Mader's Kaggle attention model).

On the last VGG19 feature map (``block5_pool`` of ``keras.applications.VGG19(include_top=False)``,
512 channels, ``image_size // 32`` on a side; ``vgg.VGG(19).features``), layer by layer:

1. BatchNorm (Keras defaults: momentum 0.99, epsilon 1e-3): ``bn_features``;
2. Conv 1x1 -> 64, ReLU;
3. Conv 1x1 -> 16, ReLU;
4. LocallyConnected 1x1 -> 1 channel, sigmoid: the attention map. A locally connected layer has
   its own weights at every position (kernel ``(h*w, 16, 1)``, bias ``(h, w, 1)``, Keras's
   ``LocallyConnected2D`` layout), so ``image_size`` fixes it;
5. Conv 1x1 -> 512 without bias whose kernel is fixed to ones (``FixedWeight``, an
   ``nnx.Variable`` that is not an ``nnx.Param``: never trained, not counted as a parameter, kept
   in the model state): it copies the map to all 512 channels;
6. multiply with ``bn_features`` (the BatchNorm output, as in the reference Keras code);
7. "RescaleGAP": global average pool of the product divided by the global average pool of the
   broadcast map (``rescale_gap``);
8. Dropout(``dropout``, 0.5), Dense 1024 + ReLU, Dropout(``dense_dropout``, 0.5): the 1024
   features. The shared ``FusionHead`` adds the output layer ("Dense 1"). (Mader's kernel used
   0.25 for the last dropout; Nguyen et al. 0.5.)

The attention map for plotting: ``model.attention_map(images) -> (B, h, w)`` in [0, 1] (call
``model.eval()`` first for inference-mode BatchNorm). It is a separate method rather than a
``sow``n intermediate so the training state keeps a fixed structure.

Parameters (3 input channels, 384 px, 12x12 map): 20,024,384 in VGG19 + 1,024 (BatchNorm) +
32,832 + 1,040 (1x1 convs) + 2,448 (locally connected) + 525,312 (Dense 1024) = 20,587,040;
Keras's ``count_params`` would add the 1,024 BatchNorm statistics and the 512 fixed ones.

Weights: ``load_torch`` / ``load_keras`` fill the VGG19 part from torchvision's ``vgg19`` /
Keras's VGG19 notop file (``vgg.VGG``'s loaders); the attention head keeps its initialisation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import BACKBONES, layers, vgg

FEATURE_CHANNELS = 512


class FixedWeight(nnx.Variable):
    """A weight that is part of the network but never trained (Keras ``trainable=False``)."""


class LocallyConnected1x1(nnx.Module):
    """Keras ``LocallyConnected2D(filters, kernel_size=1)``: a 1x1 conv with weights per position."""

    def __init__(self, height: int, width: int, cin: int, cout: int, *, dtype, rngs: nnx.Rngs):
        self.height, self.width = height, width
        init = nnx.initializers.glorot_uniform(in_axis=1, out_axis=2, batch_axis=(0,))
        self.kernel = nnx.Param(init(rngs.params(), (height * width, cin, cout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((height, width, cout), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, h, w, c = x.shape
        if (h, w) != (self.height, self.width):
            raise ValueError(f"LocallyConnected1x1: built for {self.height}x{self.width} maps, got {h}x{w}")
        kernel = self.kernel[...].astype(self.dtype).reshape(h, w, c, -1)
        y = jnp.einsum("bhwc,hwco->bhwo", x.astype(self.dtype), kernel, preferred_element_type=jnp.float32)
        return (y + self.bias[...]).astype(self.dtype)


def rescale_gap(features: jnp.ndarray, attention: jnp.ndarray) -> jnp.ndarray:
    """"RescaleGAP": GAP(features * attention) / GAP(attention), both (B, h, w, C) -> (B, C)."""
    f32 = jnp.float32
    numerator = (features.astype(f32) * attention.astype(f32)).mean(axis=(1, 2))
    return (numerator / attention.astype(f32).mean(axis=(1, 2))).astype(features.dtype)


def feature_map_side(image_size: int) -> int:
    side = image_size
    for _ in range(5):  # five 2x2/2 VALID max pools
        side //= 2
    if side < 1:
        raise ValueError(f"vgg19_attention: image_size {image_size} is too small (at least 32 px)")
    return side


class VGG19Attention(nnx.Module):
    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 384,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        dropout: float = 0.5,
        dense_units: int = 1024,
        dense_dropout: float = 0.5,
    ):
        c = FEATURE_CHANNELS
        self.dtype = dtype
        self.image_size = image_size
        self.vgg = vgg.VGG(19, in_channels=in_channels, dtype=dtype, rngs=rngs)
        side = feature_map_side(image_size)
        self.map_side = side
        self.bn = layers.BatchNorm(c, momentum=0.99, epsilon=1e-3, dtype=dtype, rngs=rngs)
        self.attn_conv1 = nnx.Conv(c, 64, (1, 1), dtype=dtype, rngs=rngs)
        self.attn_conv2 = nnx.Conv(64, 16, (1, 1), dtype=dtype, rngs=rngs)
        self.attn_map = LocallyConnected1x1(side, side, 16, 1, dtype=dtype, rngs=rngs)
        self.fan_out = FixedWeight(jnp.ones((1, 1, 1, c), jnp.float32))  # Conv 1x1 -> 512, ones, no bias
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.dense = nnx.Linear(c, dense_units, dtype=dtype, rngs=rngs)
        self.dense_dropout = nnx.Dropout(dense_dropout, rngs=rngs)
        self.num_features = dense_units

    def _attend(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Images -> (bn_features (B, h, w, 512), attention (B, h, w, 1))."""
        features = self.bn(self.vgg.features(x))
        a = nnx.relu(self.attn_conv1(features))
        a = nnx.relu(self.attn_conv2(a))
        return features, nnx.sigmoid(self.attn_map(a))

    def attention_map(self, x: jnp.ndarray) -> jnp.ndarray:
        """(B, H, W, C) images -> (B, h, w) attention in [0, 1], for plotting."""
        return self._attend(x)[1][..., 0].astype(jnp.float32)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features, attention = self._attend(x)
        fan_out = self.fan_out[...].astype(self.dtype)[0, 0]  # (1, 512)
        attention = jnp.einsum("bhwk,kc->bhwc", attention, fan_out)  # the fixed ones 1x1 conv
        gap = rescale_gap(features, attention)
        return self.dense_dropout(nnx.relu(self.dense(self.dropout(gap))))

    def load_torch(self, tensors: dict[str, np.ndarray]) -> None:
        """torchvision ``vgg19`` (``features.*``) into the VGG19 part; the head is not touched."""
        self.vgg.load_torch(tensors)

    def load_keras(self, weights: dict[str, list[np.ndarray]]) -> None:
        """Keras VGG19 (notop) into the VGG19 part; the head is not touched."""
        self.vgg.load_keras(weights)


BACKBONES.register("vgg19_attention", VGG19Attention)
