"""InceptionV3 in the layout of ``keras.applications.InceptionV3`` (``include_top=False,
pooling="avg"``): 2048 features, smallest input 75x75.

Every convolution is Keras's ``conv2d_bn``: ``Conv2D`` without bias, ``BatchNormalization``
with ``scale=False`` (no gamma), epsilon 1e-3, momentum 0.99, then ReLU. Stem: 3x3/2 valid, 3x3
valid, 3x3 same, 3x3/2 max pooling, 1x1 valid, 3x3 valid, 3x3/2 max pooling; then ``mixed0`` ...
``mixed10``. Branch average pooling is 3x3/1 ``"same"`` excluding the padding from the count
(as Keras/TensorFlow). torchvision's ``inception_v3`` differs (its own weights, BN, input
transform); Keras is the reference here.

Keras names these layers automatically (``conv2d``, ``conv2d_1``, ...; ``batch_normalization``,
...), with a counter that depends on the session (the official
``inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`` has ``conv2d_1`` ...
``conv2d_94``): ``load_keras`` pairs them with our 94 conv+BN units in creation order (sorted by
the counter). ImageNet weights expect ``tf`` preprocessing: RGB scaled to [-1, 1]
(``value_range(low=-1, high=1)``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import BACKBONES, layers
from boneage_jax.weights import loaders

NUM_UNITS = 94


class ConvBN(nnx.Module):
    """Keras ``conv2d_bn``: conv (no bias), BN without scale (eps 1e-3), ReLU."""

    def __init__(self, cin, cout, kernel, strides=1, padding="SAME", *, dtype, rngs):
        self.conv = nnx.Conv(cin, cout, kernel, (strides, strides), padding=padding, use_bias=False,
                             kernel_init=layers.glorot_uniform, dtype=dtype, rngs=rngs)
        self.bn = layers.BatchNorm(cout, use_scale=False, epsilon=1e-3, momentum=0.99, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class _Build:
    """Walks the network on channel counts, creating the units in Keras's creation order."""

    def __init__(self, dtype, rngs):
        self.units, self.dtype, self.rngs = [], dtype, rngs

    def cb(self, c, filters, kh, kw, strides=1, padding="SAME"):
        self.units.append(ConvBN(c, filters, (kh, kw), strides, padding, dtype=self.dtype, rngs=self.rngs))
        return filters

    def max_pool(self, c):
        return c

    def avg_pool(self, c):
        return c

    def concat(self, cs):
        return sum(cs)


class _Apply:
    def __init__(self, units):
        self.units, self.i = units, 0

    def cb(self, x, *args, **kwargs):
        unit = self.units[self.i]
        self.i += 1
        return unit(x)

    def max_pool(self, x):
        return layers.max_pool(x, 3, 2)

    def avg_pool(self, x):
        return layers.avg_pool(x, 3, 1, "SAME", count_include_pad=False)

    def concat(self, xs):
        return jnp.concatenate(xs, axis=-1)


def _network(x, op):
    """InceptionV3 as written in keras.applications, over an abstract ``op``."""
    cb = op.cb
    x = cb(x, 32, 3, 3, strides=2, padding="VALID")
    x = cb(x, 32, 3, 3, padding="VALID")
    x = cb(x, 64, 3, 3)
    x = op.max_pool(x)
    x = cb(x, 80, 1, 1, padding="VALID")
    x = cb(x, 192, 3, 3, padding="VALID")
    x = op.max_pool(x)
    for pool_filters in (32, 64, 64):  # mixed0, mixed1, mixed2
        b1 = cb(x, 64, 1, 1)
        b5 = cb(cb(x, 48, 1, 1), 64, 5, 5)
        b3 = cb(cb(cb(x, 64, 1, 1), 96, 3, 3), 96, 3, 3)
        bp = cb(op.avg_pool(x), pool_filters, 1, 1)
        x = op.concat([b1, b5, b3, bp])
    # mixed3
    b3 = cb(x, 384, 3, 3, strides=2, padding="VALID")
    bd = cb(cb(cb(x, 64, 1, 1), 96, 3, 3), 96, 3, 3, strides=2, padding="VALID")
    x = op.concat([b3, bd, op.max_pool(x)])
    for width in (128, 160, 160, 192):  # mixed4 ... mixed7
        b1 = cb(x, 192, 1, 1)
        b7 = cb(cb(cb(x, width, 1, 1), width, 1, 7), 192, 7, 1)
        bd = cb(x, width, 1, 1)
        bd = cb(bd, width, 7, 1)
        bd = cb(bd, width, 1, 7)
        bd = cb(bd, width, 7, 1)
        bd = cb(bd, 192, 1, 7)
        bp = cb(op.avg_pool(x), 192, 1, 1)
        x = op.concat([b1, b7, bd, bp])
    # mixed8
    b3 = cb(cb(x, 192, 1, 1), 320, 3, 3, strides=2, padding="VALID")
    b7 = cb(cb(cb(cb(x, 192, 1, 1), 192, 1, 7), 192, 7, 1), 192, 3, 3, strides=2, padding="VALID")
    x = op.concat([b3, b7, op.max_pool(x)])
    for _ in range(2):  # mixed9, mixed10
        b1 = cb(x, 320, 1, 1)
        b3 = cb(x, 384, 1, 1)
        b3 = op.concat([cb(b3, 384, 1, 3), cb(b3, 384, 3, 1)])
        bd = cb(cb(x, 448, 1, 1), 384, 3, 3)
        bd = op.concat([cb(bd, 384, 1, 3), cb(bd, 384, 3, 1)])
        bp = cb(op.avg_pool(x), 192, 1, 1)
        x = op.concat([b1, b3, bd, bp])
    return x


class InceptionV3(nnx.Module):
    def __init__(self, *, in_channels: int = 3, image_size: int | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
        del image_size  # any input size works
        build = _Build(dtype, rngs)
        self.num_features = _network(in_channels, build)
        assert len(build.units) == NUM_UNITS
        self.units = nnx.List(build.units)
        self.in_channels = in_channels
        self.dtype = dtype

    def features(self, x: jnp.ndarray) -> jnp.ndarray:
        """The ``mixed10`` feature map (stride 32)."""
        if min(x.shape[1:3]) < 75:
            raise ValueError(f"InceptionV3 needs inputs of at least 75x75, got {x.shape[1:3]}")
        return _network(x.astype(self.dtype), _Apply(self.units))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return layers.global_avg_pool(self.features(x))

    def load_keras(self, weights: dict[str, list[np.ndarray]]) -> None:
        source = loaders.KerasLayers(weights)
        convs = source.auto("conv2d", NUM_UNITS)
        bns = source.auto("batch_normalization", NUM_UNITS)
        for i, (unit, conv_name, bn_name) in enumerate(zip(self.units, convs, bns)):
            stem = self.in_channels if i == 0 else None
            loaders.keras_conv(unit.conv, source.take(conv_name), conv_name, in_channels=stem)
            loaders.keras_bn(unit.bn, source.take(bn_name), bn_name)
        source.finish()


BACKBONES.register("inception_v3", InceptionV3)
