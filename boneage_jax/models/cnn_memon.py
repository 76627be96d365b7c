"""The 4-layer CNN of Memon & Cuomo (2019).

Four 3x3 convolutions with 16, 32, 64 and 128 filters, each followed by ReLU and 2x2 max
pooling; the paper flattens the last feature map into its dense layers (``pool="flatten"``,
which fixes the input size). Options beyond the paper: ``pool="avg"`` (global average pooling,
any input size), ``batch_norm=True`` (BatchNorm after each convolution, for faster training) and
other ``filters``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from boneage_jax.models import BACKBONES, layers

FILTERS = (16, 32, 64, 128)


class CnnMemon(nnx.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        pool: str = "flatten",
        image_size: int = 256,
        filters: tuple[int, ...] = FILTERS,
        batch_norm: bool = False,
    ):
        if pool not in ("flatten", "avg"):
            raise ValueError(f"cnn_memon: pool {pool!r}; expected 'flatten' or 'avg'")
        convs, norms, width = [], [], in_channels
        for f in filters:
            convs.append(nnx.Conv(width, f, (3, 3), padding="SAME", use_bias=not batch_norm, dtype=dtype, rngs=rngs))
            norms.append(layers.BatchNorm(f, momentum=0.9, dtype=dtype, rngs=rngs) if batch_norm else None)
            width = f
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.pool = pool
        self.dtype = dtype
        side = image_size // 2 ** len(filters)
        self.num_features = width * side * side if pool == "flatten" else width

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(self.dtype)
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            if norm is not None:
                x = norm(x)
            x = nnx.max_pool(nnx.relu(x), (2, 2), strides=(2, 2))
        if self.pool == "avg":
            return x.mean(axis=(1, 2))
        return x.reshape(x.shape[0], -1)


BACKBONES.register("cnn_memon", CnnMemon)
