"""CaffeNet: the BVLC reference CaffeNet (``models/bvlc_reference_caffenet/deploy.prototxt``).

The AlexNet variant shipped with Caffe, as used by Lee et al. (2017), layer by layer:

=====  ========================================================  ===================
layer  definition                                                output at 227 px
=====  ========================================================  ===================
conv1  96 x 11x11, stride 4, no padding, ReLU                    55 x 55 x 96
pool1  max 3x3, stride 2 (Caffe rounds the output size up)       27 x 27 x 96
norm1  LRN across channels: local_size 5, alpha 1e-4, beta 0.75  27 x 27 x 96
conv2  256 x 5x5, pad 2, group 2, ReLU                           27 x 27 x 256
pool2  max 3x3, stride 2                                         13 x 13 x 256
norm2  LRN as norm1                                              13 x 13 x 256
conv3  384 x 3x3, pad 1, ReLU                                    13 x 13 x 384
conv4  384 x 3x3, pad 1, group 2, ReLU                           13 x 13 x 384
conv5  256 x 3x3, pad 1, group 2, ReLU                           13 x 13 x 256
pool5  max 3x3, stride 2                                         6 x 6 x 256
fc6    InnerProduct 4096, ReLU, Dropout 0.5                      4096
fc7    InnerProduct 4096, ReLU, Dropout 0.5                      4096 (the features)
=====  ========================================================  ===================

``fc8`` (1000 classes) is the head's job. fc6 flattens pool5, so its size depends on the input:
``image_size`` (227 in the reference) fixes it. Caffe's LRN (``ACROSS_CHANNELS``):
``y = x / (k + alpha / n * sum_{j in window(i)} x_j^2) ** beta`` with ``k = 1``, ``n =
local_size`` and a window of ``n`` channels centred on channel ``i``, zero-padded at the ends.
Pooling uses Caffe's ceil rounding (the last window may hang over the edge).

Grouped convolutions: the first half of the output channels sees the first half of the input
channels (Caffe's and torch's ``groups`` convention, flax's ``feature_group_count``).

Parameters: 56,868,224 in the backbone; with fc8 (4096*1000 + 1000) the reference's 60,965,224.

``load_torch`` reads a state dict with the Caffe layer names (``conv1.weight`` (96, 3, 11, 11),
``conv1.bias``, ..., ``fc6.weight`` (4096, 9216), ``fc7.*``; ``fc8.*`` ignored), as a Caffe->torch
conversion of ``bvlc_reference_caffenet.caffemodel`` names them. fc6's input order is Caffe's
(channel, row, column) flattening and is permuted to ours (row, column, channel). The original
weights expect BGR input in 0-255 with the ImageNet mean subtracted; for a 1-channel stem conv1
is summed over its input channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import BACKBONES
from boneage_jax.weights import loaders
from boneage_jax.models.googlenet import ceil_pads, max_pool_ceil

LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 1.0
# name: (out channels, kernel, stride, pad, groups)
CONVS = {
    "conv1": (96, 11, 4, 0, 1),
    "conv2": (256, 5, 1, 2, 2),
    "conv3": (384, 3, 1, 1, 1),
    "conv4": (384, 3, 1, 1, 2),
    "conv5": (256, 3, 1, 1, 2),
}
POOL = (3, 2)  # pool1, pool2, pool5: max 3x3 stride 2


def lrn(
    x: jnp.ndarray, local_size: int = LRN_SIZE, alpha: float = LRN_ALPHA, beta: float = LRN_BETA, k: float = LRN_K
) -> jnp.ndarray:
    """Caffe's across-channel local response normalisation on NHWC, computed in float32."""
    if local_size % 2 != 1:
        raise ValueError(f"LRN local_size {local_size}: Caffe supports odd sizes only")
    x32 = x.astype(jnp.float32)
    half = (local_size - 1) // 2
    window_sum = jax.lax.reduce_window(
        x32 * x32, 0.0, jax.lax.add, (1, 1, 1, local_size), (1, 1, 1, 1), ((0, 0), (0, 0), (0, 0), (half, half))
    )
    return (x32 * (k + (alpha / local_size) * window_sum) ** -beta).astype(x.dtype)


def _pool_out(size: int) -> int:
    before, after = ceil_pads(size, *POOL)
    return (size + before + after - POOL[0]) // POOL[1] + 1


def pool5_size(image_size: int) -> int:
    """Side of pool5 for a square input (6 for the reference's 227); raises if it is too small."""
    size = (image_size - 11) // 4 + 1  # conv1
    for stage in ("pool1", "pool2", "pool5"):  # conv2-5 keep the size
        if size < POOL[0]:
            raise ValueError(
                f"caffenet: image_size {image_size} is too small ({size} px before {stage}; at least 55 px)"
            )
        size = _pool_out(size)
    return size


class CaffeNet(nnx.Module):
    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 227,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        dropout: float = 0.5,
    ):
        self.in_channels = in_channels
        self.image_size = image_size
        self.dtype = dtype
        width = in_channels
        for name, (cout, kernel, stride, pad, groups) in CONVS.items():
            conv = nnx.Conv(
                width,
                cout,
                (kernel, kernel),
                strides=stride,
                padding=((pad, pad), (pad, pad)),
                feature_group_count=groups,
                dtype=dtype,
                rngs=rngs,
            )
            setattr(self, name, conv)
            width = cout
        self.pool5_side = pool5_size(image_size)
        self.fc6 = nnx.Linear(width * self.pool5_side**2, 4096, dtype=dtype, rngs=rngs)
        self.fc7 = nnx.Linear(4096, 4096, dtype=dtype, rngs=rngs)
        self.drop6 = nnx.Dropout(dropout, rngs=rngs)
        self.drop7 = nnx.Dropout(dropout, rngs=rngs)
        self.num_features = 4096

    def feature_map(self, x: jnp.ndarray) -> jnp.ndarray:
        """pool5: (B, H, W, C) -> (B, s, s, 256)."""
        x = x.astype(self.dtype)
        x = lrn(max_pool_ceil(nnx.relu(self.conv1(x)), *POOL))
        x = lrn(max_pool_ceil(nnx.relu(self.conv2(x)), *POOL))
        x = nnx.relu(self.conv3(x))
        x = nnx.relu(self.conv4(x))
        return max_pool_ceil(nnx.relu(self.conv5(x)), *POOL)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = self.feature_map(x)
        if x.shape[1:3] != (self.pool5_side, self.pool5_side):
            raise ValueError(
                f"caffenet: built for {self.image_size} px (pool5 {self.pool5_side}x{self.pool5_side}), "
                f"got input {x.shape} at pool5"
            )
        x = x.reshape(x.shape[0], -1)
        x = self.drop6(nnx.relu(self.fc6(x)))
        return self.drop7(nnx.relu(self.fc7(x)))

    def load_torch(self, tensors: dict[str, np.ndarray]) -> None:
        source = loaders.TorchTensors(tensors, ignore=r"^fc8\.")
        for name in CONVS:
            stem_channels = self.in_channels if name == "conv1" else None
            loaders.torch_conv(getattr(self, name), source, name, in_channels=stem_channels)
        weight = source.take("fc6.weight")
        side, channels = self.pool5_side, CONVS["conv5"][0]
        if weight.ndim != 2 or weight.shape[1] != channels * side * side:
            raise loaders.WeightMismatchError(
                f"layer fc6.weight: the model expects shape (4096, {channels * side * side}) "
                f"(pool5 {side}x{side}x{channels} at {self.image_size} px), the file has {weight.shape}"
            )
        # Caffe flattens pool5 as (C, H, W); ours is (H, W, C).
        outputs = weight.shape[0]
        kernel = weight.reshape(outputs, channels, side, side).transpose(2, 3, 1, 0).reshape(-1, outputs)
        loaders.assign(self.fc6.kernel, kernel, "fc6.weight")
        loaders.assign(self.fc6.bias, source.take("fc6.bias"), "fc6.bias")
        loaders.torch_linear(self.fc7, source, "fc7")
        source.finish()


BACKBONES.register("caffenet", CaffeNet)
