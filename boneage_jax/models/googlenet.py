"""GoogLeNet (Inception v1, Szegedy et al., 2015) in torchvision's layout.

torchvision ``googlenet`` (``torchvision/models/googlenet.py``), layer by layer:

- ``BasicConv2d``: convolution without bias, BatchNorm (eps 0.001), ReLU (torchvision's port of
  the TensorFlow-trained weights; the 2014 paper had no BatchNorm);
- stem: conv1 7x7/2 (64, pad 3), max pool 3/2, conv2 1x1 (64), conv3 3x3 (192, pad 1), max pool
  3/2;
- inception 3a, 3b, max pool 3/2, 4a-4e, max pool 2/2, 5a, 5b; every max pool with torch's
  ``ceil_mode=True`` (the last window may hang over the bottom/right edge);
- global average pooling and Dropout(0.2): 1024 features (torchvision's ``fc`` is the head).

Each inception block concatenates four branches: 1x1; 1x1 -> 3x3; 1x1 -> "5x5"; 3x3/1 max pool
(pad 1, ceil mode) -> 1x1. **Deviation from the paper:** like torchvision (its known bug,
pytorch/vision#906, kept for weight compatibility) the "5x5" branch uses a 3x3 convolution by
default; ``branch3_kernel=5`` gives the paper's 5x5 (then torchvision weights no longer fit that
branch). The auxiliary classifiers (aux1, aux2) are training-time heads and not part of the
backbone; ``load_torch`` ignores ``aux1.*``, ``aux2.*`` and ``fc.*``.

Parameters: 5,599,904 in the backbone; with torchvision's ``fc`` (1024*1000 + 1000) that is
torchvision's documented 6,624,904 (``aux_logits=False``, as the pretrained model is shipped).

``transform_input=True`` reproduces torchvision's pretrained-model input transform (ImageNet
mean/std-normalised RGB re-scaled to the [-1, 1] range the ported weights expect); 3 channels only.
For a 1-channel stem ``load_torch`` sums conv1's RGB kernel over its input channels.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import BACKBONES, layers
from boneage_jax.weights import loaders

# (in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj), torchvision's table
INCEPTIONS = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}
# max pool (kernel, stride) after these blocks
POOL_AFTER = {"inception3b": (3, 2), "inception4e": (2, 2)}

# torchvision's transform_input: x * std / 0.5 + (mean - 0.5) / 0.5 per RGB channel
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_transform_input(x: jnp.ndarray) -> jnp.ndarray:
    """torchvision's ``transform_input`` on NHWC RGB: per channel ``x * std / 0.5 + (mean - 0.5) / 0.5``."""
    std = jnp.asarray(_IMAGENET_STD, jnp.float32) / 0.5
    shift = (jnp.asarray(_IMAGENET_MEAN, jnp.float32) - 0.5) / 0.5
    return x.astype(jnp.float32) * std + shift


def ceil_pads(size: int, kernel: int, stride: int, pad: int = 0) -> tuple[int, int]:
    """(before, after) padding that gives torch's (and Caffe's) ``ceil_mode`` pooling output.

    Output ``ceil((size + 2 pad - kernel) / stride) + 1``, less one if the last window would start
    in the right padding (torch's rule; Caffe's is the same for the pad-0 pools CaffeNet uses); the
    extra right padding is filled with -inf by ``layers.max_pool``.
    """
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return pad, max((out - 1) * stride + kernel - size - pad, 0)


def max_pool_ceil(x: jnp.ndarray, kernel: int, stride: int, pad: int = 0) -> jnp.ndarray:
    """torch ``MaxPool2d(kernel, stride, pad, ceil_mode=True)`` / Caffe MAX pooling on NHWC."""
    pads = [ceil_pads(n, kernel, stride, pad) for n in x.shape[1:3]]
    return layers.max_pool(x, kernel, stride, padding=pads)


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm(eps 0.001) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, pad: int = 0, dtype, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            cin,
            cout,
            (kernel, kernel),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=dtype,
            rngs=rngs,
        )
        self.bn = layers.BatchNorm(cout, epsilon=1e-3, momentum=0.9, dtype=dtype, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return nnx.relu(self.bn(self.conv(x)))

    def load_torch(self, source: loaders.TorchTensors, prefix: str, *, in_channels: int | None = None) -> None:
        loaders.torch_conv(self.conv, source, f"{prefix}.conv", in_channels=in_channels)
        loaders.torch_bn(self.bn, source, f"{prefix}.bn")


class Inception(nnx.Module):
    def __init__(
        self,
        cin: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        *,
        branch3_kernel: int = 3,
        dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, rngs=rngs)
        self.branch1 = BasicConv2d(cin, ch1x1, 1, **kw)
        self.branch2_reduce = BasicConv2d(cin, ch3x3red, 1, **kw)
        self.branch2 = BasicConv2d(ch3x3red, ch3x3, 3, pad=1, **kw)
        self.branch3_reduce = BasicConv2d(cin, ch5x5red, 1, **kw)
        self.branch3 = BasicConv2d(ch5x5red, ch5x5, branch3_kernel, pad=branch3_kernel // 2, **kw)
        self.branch4 = BasicConv2d(cin, pool_proj, 1, **kw)
        self.num_features = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.concatenate(
            [
                self.branch1(x),
                self.branch2(self.branch2_reduce(x)),
                self.branch3(self.branch3_reduce(x)),
                self.branch4(max_pool_ceil(x, 3, 1, 1)),
            ],
            axis=-1,
        )

    def load_torch(self, source: loaders.TorchTensors, prefix: str) -> None:
        self.branch1.load_torch(source, f"{prefix}.branch1")
        self.branch2_reduce.load_torch(source, f"{prefix}.branch2.0")
        self.branch2.load_torch(source, f"{prefix}.branch2.1")
        self.branch3_reduce.load_torch(source, f"{prefix}.branch3.0")
        self.branch3.load_torch(source, f"{prefix}.branch3.1")
        self.branch4.load_torch(source, f"{prefix}.branch4.1")


class GoogLeNet(nnx.Module):
    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        dropout: float = 0.2,
        branch3_kernel: int = 3,
        transform_input: bool = False,
    ):
        del image_size  # any input size works
        if branch3_kernel not in (3, 5):
            raise ValueError(f"googlenet: branch3_kernel {branch3_kernel}; expected 3 (torchvision) or 5 (paper)")
        if transform_input and in_channels != 3:
            raise ValueError("googlenet: transform_input needs RGB input (in_channels=3)")
        kw = dict(dtype=dtype, rngs=rngs)
        self.in_channels = in_channels
        self.dtype = dtype
        self.transform_input = transform_input
        self.conv1 = BasicConv2d(in_channels, 64, 7, stride=2, pad=3, **kw)
        self.conv2 = BasicConv2d(64, 64, 1, **kw)
        self.conv3 = BasicConv2d(64, 192, 3, pad=1, **kw)
        for name, channels in INCEPTIONS.items():
            setattr(self, name, Inception(*channels, branch3_kernel=branch3_kernel, **kw))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.num_features = self.inception5b.num_features

    def feature_map(self, x: jnp.ndarray) -> jnp.ndarray:
        """(B, H, W, C) -> (B, ~H/32, ~W/32, 1024), the output of inception5b."""
        if self.transform_input:
            x = torchvision_transform_input(x)
        x = x.astype(self.dtype)
        x = max_pool_ceil(self.conv1(x), 3, 2)
        x = max_pool_ceil(self.conv3(self.conv2(x)), 3, 2)
        for name in INCEPTIONS:
            x = getattr(self, name)(x)
            if name in POOL_AFTER:
                x = max_pool_ceil(x, *POOL_AFTER[name])
        return x

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.dropout(layers.global_avg_pool(self.feature_map(x)))

    def load_torch(self, tensors: dict[str, np.ndarray]) -> None:
        """torchvision ``googlenet`` state dict; ``fc.*``, ``aux1.*``, ``aux2.*`` are ignored."""
        source = loaders.TorchTensors(tensors, ignore=r"^(fc|aux1|aux2)\.")
        self.conv1.load_torch(source, "conv1", in_channels=self.in_channels)
        self.conv2.load_torch(source, "conv2")
        self.conv3.load_torch(source, "conv3")
        for name in INCEPTIONS:
            getattr(self, name).load_torch(source, name)
        source.finish()


BACKBONES.register("googlenet", GoogLeNet, aliases=("inception_v1",))
