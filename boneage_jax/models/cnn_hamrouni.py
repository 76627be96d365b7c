"""The "customized model" of Hamrouni & Hassen: a small conv / batch-norm / dropout CNN.

The paper describes its network only as a stack of convolution, batch normalisation and dropout
layers; its exact layer list is not available to us. **This is a documented stand-in that follows
that description, not a verified copy of the paper's network:**

- ``len(filters)`` blocks (default 4, with 32, 64, 128, 128 filters), each
  Conv 3x3 ("same", no bias: BatchNorm's offset replaces it) -> BatchNorm -> ReLU ->
  MaxPool 2x2/2 -> Dropout(``dropout``, default 0.25);
- global average pooling: ``filters[-1]`` features (default 128).

BatchNorm uses Keras's defaults (momentum 0.99, epsilon 1e-3).

Parameters with the defaults and 1 input channel: 240,608 (+ the head's).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from boneage_jax.models import BACKBONES, layers

FILTERS = (32, 64, 128, 128)


class ConvBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, dropout: float, dtype, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), padding="SAME", use_bias=False, dtype=dtype, rngs=rngs)
        self.bn = layers.BatchNorm(cout, momentum=0.99, epsilon=1e-3, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nnx.relu(self.bn(self.conv(x)))
        return self.dropout(layers.max_pool(x, 2, 2))


class CnnHamrouni(nnx.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        filters: tuple[int, ...] = FILTERS,
        dropout: float = 0.25,
    ):
        del image_size  # any input size works
        if not filters:
            raise ValueError("cnn_hamrouni: filters must name at least one block")
        blocks, width = [], in_channels
        for f in filters:
            blocks.append(ConvBlock(width, int(f), dropout=dropout, dtype=dtype, rngs=rngs))
            width = int(f)
        self.blocks = nnx.List(blocks)
        self.dtype = dtype
        self.num_features = width

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(self.dtype)
        for block in self.blocks:
            x = block(x)
        return layers.global_avg_pool(x)


BACKBONES.register("cnn_hamrouni", CnnHamrouni)
