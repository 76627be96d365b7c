"""Per-layer loaders that copy Keras and torch weight arrays into our layers.

- ``WeightMismatchError``: raised by every loader, naming the layer and both shapes.
- ``assign``: shape-checked copy of an array into a parameter or batch statistic.
- ``KerasLayers``: the layers of a Keras weight file, consumed by name, with auto-generated names
  such as ``conv2d_7`` resolved in creation order; ``TorchTensors``: a state dict consumed by name.
  Both reject, in ``finish()``, weighted layers of the file that the model did not use.
- ``keras_conv``, ``keras_depthwise``, ``keras_separable``, ``keras_bn``, ``keras_dense``,
  ``keras_load`` (dispatch on the layer type) and ``load_keras_named`` (a model whose attributes
  are named like the Keras layers); ``torch_conv``, ``torch_bn``, ``torch_linear``;
  ``stem_kernel`` (an RGB stem kernel adapted to a 1-channel input by summing).

The model families call these from their ``load_keras``/``load_torch`` methods; the protocol is
described in ``boneage_jax.weights``.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from boneage_jax.models.layers import DepthwiseConv, SeparableConv


class WeightMismatchError(ValueError):
    """A weight file does not fit the model: names the first mismatching layer and shapes."""


def assign(variable: nnx.Variable, value: np.ndarray, name: str) -> None:
    """Copies ``value`` into a parameter or batch statistic, checking its shape first."""
    value = np.asarray(value)
    current = variable.get_value()
    if tuple(current.shape) != tuple(value.shape):
        raise WeightMismatchError(
            f"layer {name}: the model expects shape {tuple(current.shape)}, the file has {tuple(value.shape)}"
        )
    # device_put, not jnp.asarray: jax 0.10 stages a numpy array through a compiled identity, one
    # compilation per distinct shape (0.1-0.2 s each; 47 of them to load EfficientNet-Lite0).
    variable.set_value(jax.device_put(value.astype(current.dtype)))


# Top-of-network and preprocessing layers a backbone never uses; a file may carry them.
KERAS_IGNORED = re.compile(r"^(predictions|fc1|fc2|normalization(_\d+)?|rescaling(_\d+)?|probs|logits)$")


def _suffix(name: str, prefix: str) -> int:
    rest = name[len(prefix):]
    return 0 if rest == "" else int(rest[1:])


class KerasLayers:
    """The weighted layers of a Keras weight file, consumed by the loaders.

    ``layers`` maps Keras layer names to their weight arrays in Keras order (layers without
    weights may be present with empty lists; they are ignored). ``take(name)`` returns one
    layer's arrays or raises ``WeightMismatchError`` naming the missing layer. Layers Keras named
    automatically (``conv2d``, ``conv2d_1``, ... for unnamed ``Conv2D`` in InceptionV3 and
    Xception) carry a session-dependent counter: ``auto(prefix)`` lists them sorted by that
    counter, which is their creation order whatever the offset (the official ImageNet files start
    at ``conv2d_1``, a fresh Keras 3 session at ``conv2d``). ``finish()`` raises if a weighted
    layer of the file was not consumed (other than top/preprocessing layers).
    """

    def __init__(self, layers: dict[str, Sequence[np.ndarray]]):
        self.layers = {name: list(ws) for name, ws in layers.items() if len(ws)}
        self.used: set[str] = set()

    def take(self, name: str) -> list[np.ndarray]:
        if name not in self.layers:
            raise WeightMismatchError(f"layer {name}: missing from the weight file")
        self.used.add(name)
        return self.layers[name]

    def auto(self, prefix: str, count: int) -> list[str]:
        pattern = re.compile(rf"^{re.escape(prefix)}(_\d+)?$")
        names = sorted((n for n in self.layers if pattern.match(n)), key=lambda n: _suffix(n, prefix))
        if len(names) != count:
            raise WeightMismatchError(
                f"layers {prefix}*: the model expects {count} automatically named layers, the file has {len(names)}"
            )
        return names

    def finish(self) -> None:
        extra = [n for n in self.layers if n not in self.used and not KERAS_IGNORED.match(n)]
        if extra:
            raise WeightMismatchError(
                f"layer {extra[0]}: in the weight file but not in the model ({len(extra)} unused)"
            )


class TorchTensors:
    """A torch state dict (name -> array) consumed by name; ``finish`` rejects unused tensors.

    ``num_batches_tracked`` buffers and names matching ``ignore`` (e.g. the classifier ``fc.``) are
    not required to be consumed.
    """

    def __init__(self, tensors: dict[str, np.ndarray], ignore: str = r"^$"):
        self.tensors = dict(tensors)
        self.used: set[str] = set()
        self.ignore = re.compile(ignore)

    def take(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise WeightMismatchError(f"layer {name}: missing from the weight file")
        self.used.add(name)
        return np.asarray(self.tensors[name])

    def finish(self) -> None:
        extra = [
            n for n in self.tensors
            if n not in self.used and not n.endswith("num_batches_tracked") and not self.ignore.search(n)
        ]
        if extra:
            raise WeightMismatchError(
                f"layer {extra[0]}: in the weight file but not in the model ({len(extra)} unused)"
            )


def _expect(weights: Sequence[np.ndarray], count: int, name: str) -> None:
    if len(weights) != count:
        raise WeightMismatchError(
            f"layer {name}: the model expects {count} weight arrays, the file has {len(weights)}"
        )


def stem_kernel(kernel: np.ndarray, in_channels: int, name: str) -> np.ndarray:
    """Adapts an RGB stem kernel ``(kh, kw, 3, out)`` to ``in_channels``.

    For a 1-channel stem the kernel is summed over its input channels: on a grey image repeated
    to RGB the summed kernel gives exactly the same output (as Deeplasia does).
    """
    if kernel.shape[2] == in_channels:
        return kernel
    if in_channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    raise WeightMismatchError(
        f"layer {name}: the model's stem has {in_channels} input channels, the file's kernel {kernel.shape[2]}"
    )


def keras_conv(conv: nnx.Conv, weights: Sequence[np.ndarray], name: str, *, in_channels: int | None = None) -> None:
    """Keras ``Conv2D``: [kernel (kh, kw, in, out)] + [bias] when the layer has one."""
    _expect(weights, 2 if conv.bias is not None else 1, name)
    kernel = np.asarray(weights[0])
    if in_channels is not None:
        kernel = stem_kernel(kernel, in_channels, name)
    assign(conv.kernel, kernel, f"{name} (kernel)")
    if conv.bias is not None:
        assign(conv.bias, weights[1], f"{name} (bias)")


def keras_depthwise(conv: DepthwiseConv, weights: Sequence[np.ndarray], name: str) -> None:
    """Keras ``DepthwiseConv2D``: [depthwise_kernel (kh, kw, C, 1)] + [bias]."""
    _expect(weights, 2 if conv.bias is not None else 1, name)
    kernel = np.asarray(weights[0])
    if kernel.ndim != 4 or kernel.shape[3] != 1:
        raise WeightMismatchError(
            f"layer {name}: expected a depthwise kernel (kh, kw, C, 1), the file has {kernel.shape}"
        )
    assign(conv.kernel, kernel.transpose(0, 1, 3, 2), f"{name} (depthwise_kernel)")
    if conv.bias is not None:
        assign(conv.bias, weights[1], f"{name} (bias)")


def keras_separable(conv: SeparableConv, weights: Sequence[np.ndarray], name: str) -> None:
    """Keras ``SeparableConv2D``: [depthwise_kernel (kh, kw, C, 1), pointwise_kernel (1, 1, C, F)] + [bias]."""
    has_bias = conv.pointwise.bias is not None
    _expect(weights, 3 if has_bias else 2, name)
    keras_depthwise(conv.depthwise, weights[:1], name)
    keras_conv(conv.pointwise, weights[1:], f"{name} (pointwise)")


def keras_bn(bn: nnx.BatchNorm, weights: Sequence[np.ndarray], name: str) -> None:
    """Keras ``BatchNormalization``: [gamma] (if scale) + [beta] (if center) + mean + variance."""
    expected = ([bn.scale] if bn.scale is not None else []) + ([bn.bias] if bn.bias is not None else [])
    expected += [bn.mean, bn.var]
    _expect(weights, len(expected), name)
    labels = (["gamma"] if bn.scale is not None else []) + (["beta"] if bn.bias is not None else [])
    labels += ["moving_mean", "moving_variance"]
    for variable, value, label in zip(expected, weights, labels):
        assign(variable, value, f"{name} ({label})")


def keras_dense(dense: nnx.Linear, weights: Sequence[np.ndarray], name: str) -> None:
    _expect(weights, 2 if dense.bias is not None else 1, name)
    assign(dense.kernel, weights[0], f"{name} (kernel)")
    if dense.bias is not None:
        assign(dense.bias, weights[1], f"{name} (bias)")


def keras_load(
    module: nnx.Module, weights: Sequence[np.ndarray], name: str, *, in_channels: int | None = None
) -> None:
    """Dispatches on the layer type: Conv, DepthwiseConv, SeparableConv, BatchNorm or Linear."""
    if isinstance(module, nnx.Conv):
        keras_conv(module, weights, name, in_channels=in_channels)
    elif isinstance(module, DepthwiseConv):
        keras_depthwise(module, weights, name)
    elif isinstance(module, SeparableConv):
        keras_separable(module, weights, name)
    elif isinstance(module, nnx.BatchNorm):
        keras_bn(module, weights, name)
    elif isinstance(module, nnx.Linear):
        keras_dense(module, weights, name)
    else:
        raise TypeError(f"layer {name}: no Keras loader for {type(module).__name__}")


def load_keras_named(
    model: nnx.Module, weights: dict[str, Sequence[np.ndarray]], names: Sequence[str], *, stem: str, in_channels: int
) -> None:
    """Loads a model whose submodules are attributes named like the Keras layers.

    ``names`` lists the attribute names in creation order; the layer ``stem`` gets its RGB
    kernel adapted to ``in_channels``. Every weighted layer of the file must be consumed.
    """
    source = KerasLayers(weights)
    for name in names:
        keras_load(getattr(model, name), source.take(name), name, in_channels=in_channels if name == stem else None)
    source.finish()


def torch_conv(
    conv: nnx.Conv | DepthwiseConv, tensors: TorchTensors, prefix: str, *, in_channels: int | None = None
) -> None:
    """torch ``Conv2d``: ``{prefix}.weight`` (out, in, kh, kw) [+ ``{prefix}.bias``].

    Also loads a ``DepthwiseConv`` from a torch depthwise ``Conv2d(C, C, k, groups=C)``, whose
    weight (C, 1, kh, kw) transposes to our (kh, kw, 1, C).
    """
    weight = tensors.take(f"{prefix}.weight")
    if weight.ndim != 4:
        raise WeightMismatchError(f"layer {prefix}.weight: expected a 4-d conv weight, the file has {weight.shape}")
    kernel = weight.transpose(2, 3, 1, 0)
    if in_channels is not None:
        kernel = stem_kernel(kernel, in_channels, f"{prefix}.weight")
    assign(conv.kernel, kernel, f"{prefix}.weight")
    if conv.bias is not None:
        assign(conv.bias, tensors.take(f"{prefix}.bias"), f"{prefix}.bias")
    elif f"{prefix}.bias" in tensors.tensors:
        raise WeightMismatchError(f"layer {prefix}.bias: the model's conv has no bias, the file has one")


def torch_bn(bn: nnx.BatchNorm, tensors: TorchTensors, prefix: str) -> None:
    """torch ``BatchNorm2d``: weight, bias, running_mean, running_var (num_batches_tracked unused)."""
    assign(bn.scale, tensors.take(f"{prefix}.weight"), f"{prefix}.weight")
    assign(bn.bias, tensors.take(f"{prefix}.bias"), f"{prefix}.bias")
    assign(bn.mean, tensors.take(f"{prefix}.running_mean"), f"{prefix}.running_mean")
    assign(bn.var, tensors.take(f"{prefix}.running_var"), f"{prefix}.running_var")
    if f"{prefix}.num_batches_tracked" in tensors.tensors:
        tensors.used.add(f"{prefix}.num_batches_tracked")


def torch_linear(dense: nnx.Linear, tensors: TorchTensors, prefix: str) -> None:
    """torch ``Linear``: weight (out, in) [+ bias]."""
    assign(dense.kernel, tensors.take(f"{prefix}.weight").T, f"{prefix}.weight")
    if dense.bias is not None:
        assign(dense.bias, tensors.take(f"{prefix}.bias"), f"{prefix}.bias")


