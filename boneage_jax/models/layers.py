"""Layers and helpers shared by the model families.

- ``DepthwiseConv``: a depthwise convolution written as k*k shifted multiply-adds (several times
  faster forward+backward than ``feature_group_count`` on XLA:CPU; ``python -m
  boneage_jax.models.layers`` measures it), kernel in flax's grouped-conv layout ``(kh, kw, 1, C)``.
  ``SeparableConv``: Keras ``SeparableConv2D`` (depthwise, then 1x1 pointwise).
- Padding: ``same_pads`` (TensorFlow/Keras ``"same"``: asymmetric for stride 2, the extra pixel
  goes after) and ``resolve_padding`` (``"SAME"``, ``"VALID"``, a torch-style symmetric int, or
  explicit ``(lo, hi)`` pairs); ``max_pool``/``avg_pool`` accept the same, ``global_avg_pool``.
- Initialisers drawn on the host (``variance_scaling``; ``glorot_uniform`` = Keras's default,
  ``kaiming_normal_fan_out`` = torchvision ResNet's, ``efficientnet_conv``/``_depthwise`` =
  Keras EfficientNet's), so that building a large network does not compile one XLA kernel per
  parameter shape.
- Weight import: ``assign`` (shape-checked copy into a Variable), ``KerasLayers`` (the layers of a
  Keras weight file, consumed by name, with auto-generated names such as ``conv2d_7`` resolved
  in creation order), ``TorchTensors`` (a state dict consumed by name), per-layer loaders
  ``keras_conv``, ``keras_depthwise``, ``keras_separable``, ``keras_bn``, ``keras_dense``,
  ``keras_load`` (dispatch on type), ``load_keras_named``, ``torch_conv``, ``torch_bn``,
  ``torch_linear``, and ``stem_kernel`` (RGB stem -> 1 channel by summing). Every loader raises
  ``WeightMismatchError`` naming the layer. The protocol is described in ``boneage_jax.weights``.
- ``count_params``: parameters (and optionally batch statistics) of a module.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
    variable.set_value(jnp.asarray(value.astype(current.dtype)))


# ----------------------------------------------------------------------------- initialisers


def _fans(shape: Sequence[int], depthwise: bool) -> tuple[float, float]:
    """Keras/torch fans of a kernel; for a depthwise kernel (kh, kw, 1, C) as Keras computes them
    on its (kh, kw, C, 1) layout."""
    if len(shape) < 2:
        return float(shape[0]), float(shape[0])
    receptive = float(np.prod(shape[:-2]))
    cin, cout = shape[-2], shape[-1]
    if depthwise:
        cin, cout = cout, cin
    return cin * receptive, cout * receptive


def variance_scaling(scale: float, mode: str, distribution: str, *, depthwise: bool = False):
    """A variance-scaling kernel initialiser drawn on the host with numpy.

    Same distributions as ``jax.nn.initializers.variance_scaling`` / Keras / torch
    (``"truncated_normal"`` truncates at 2 standard deviations as Keras does), seeded from the
    nnx key. Host sampling matters on XLA:CPU: ``jax.random`` initialisers compile one kernel per
    parameter shape (~0.3-0.7 s each), so an eagerly built EfficientNet took about a minute. Under
    a transformation (``nnx.eval_shape``, ``nnx.jit``) the key is a tracer and the jax initialiser
    with the same distribution is used instead.
    """
    if mode not in ("fan_in", "fan_out", "fan_avg") or distribution not in ("uniform", "normal", "truncated_normal"):
        raise ValueError(f"variance_scaling({mode!r}, {distribution!r})")

    def init(key, shape, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer):
            in_axis, out_axis = (-1, -2) if depthwise else (-2, -1)
            fallback = jax.nn.initializers.variance_scaling(scale, mode, distribution, in_axis, out_axis)
            return fallback(key, shape, dtype)
        fan_in, fan_out = _fans(shape, depthwise)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        std = float(np.sqrt(scale / max(1.0, fan)))
        data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        rng = np.random.default_rng([int(v) for v in np.asarray(data).ravel()])
        if distribution == "uniform":
            limit = std * np.sqrt(3.0)
            values = rng.uniform(-limit, limit, shape)
        elif distribution == "normal":
            values = rng.normal(0.0, std, shape)
        else:
            std /= 0.87962566103423978  # std of a standard normal truncated to [-2, 2]
            values = rng.normal(0.0, 1.0, int(np.prod(shape)))
            bad = np.abs(values) > 2.0
            while bad.any():
                values[bad] = rng.normal(0.0, 1.0, int(bad.sum()))
                bad = np.abs(values) > 2.0
            values = values.reshape(shape) * std
        return jnp.asarray(values.astype(dtype))

    return init


# Keras's default Conv2D/Dense kernel initialiser, torchvision ResNet's kaiming_normal_(fan_out, relu),
# and Keras EfficientNet's CONV_KERNEL_INITIALIZER.
glorot_uniform = variance_scaling(1.0, "fan_avg", "uniform")
kaiming_normal_fan_out = variance_scaling(2.0, "fan_out", "normal")
efficientnet_conv = variance_scaling(2.0, "fan_out", "truncated_normal")
efficientnet_depthwise = variance_scaling(2.0, "fan_out", "truncated_normal", depthwise=True)


# ----------------------------------------------------------------------------- padding


def same_pads(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow/Keras ``padding="same"`` for one spatial axis: (before, after).

    The output has ``ceil(size / stride)`` pixels; when the total padding is odd the extra pixel
    goes after (bottom/right). Torch pads symmetrically instead (``padding=k // 2``), which for
    stride 2 on an even input shifts the sampling grid by one pixel relative to TF.
    """
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def resolve_padding(
    padding, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int]
) -> list[tuple[int, int]]:
    """``"SAME"`` (TF rule), ``"VALID"``, an int ``p`` (torch: p on both sides) or (lo, hi) pairs."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "SAME":
            return [same_pads(n, k, s) for n, k, s in zip(spatial, kernel, strides)]
        if mode == "VALID":
            return [(0, 0)] * len(spatial)
        raise ValueError(f"padding {padding!r}; expected 'SAME', 'VALID', an int or (lo, hi) pairs")
    if isinstance(padding, int):
        return [(padding, padding)] * len(spatial)
    pads = [tuple(p) if not isinstance(p, int) else (p, p) for p in padding]
    if len(pads) != len(spatial) or any(len(p) != 2 for p in pads):
        raise ValueError(f"padding {padding!r}; expected one (lo, hi) pair per spatial axis")
    return [(int(lo), int(hi)) for lo, hi in pads]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# ----------------------------------------------------------------------------- depthwise conv


class DepthwiseConv(nnx.Module):
    """Depthwise 2D convolution (one filter per channel, depth multiplier 1).

    ``kernel`` has shape ``(kh, kw, 1, C)`` (flax's grouped-conv layout, so
    ``lax.conv_general_dilated(x, kernel, ..., feature_group_count=C)`` computes the same thing);
    ``bias`` has shape ``(C,)`` when ``use_bias``. ``padding`` is ``"SAME"`` (TF/Keras rule),
    ``"VALID"``, a torch-style symmetric int, or ``((top, bottom), (left, right))``.

    ``impl="shift"`` sums ``kh*kw`` strided slices of the padded input times one kernel tap each;
    XLA fuses them into a single loop, which on XLA:CPU runs forward+backward 5-9x faster than the
    grouped convolution. ``impl="grouped"`` uses ``lax.conv_general_dilated(feature_group_count=C)``,
    which is faster on GPU (cuDNN; 1.2-2x on an H100). ``impl="auto"`` (default) picks "shift" when
    the default backend is the CPU and "grouped" otherwise. Both accumulate in float32 and
    return ``dtype``; they agree to float32 rounding.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | Sequence[int] = 3,
        strides: int | Sequence[int] = 1,
        *,
        padding="SAME",
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        impl: str = "auto",
        kernel_init=variance_scaling(1.0, "fan_avg", "uniform", depthwise=True),
        rngs: nnx.Rngs,
    ):
        if impl not in ("auto", "shift", "grouped"):
            raise ValueError(f"DepthwiseConv impl {impl!r}; expected 'auto', 'shift' or 'grouped'")
        self.channels = channels
        self.kernel_size = _pair(kernel_size)
        self.strides = _pair(strides)
        self.padding = padding
        self.use_bias = use_bias
        self.dtype = dtype
        self.impl = impl
        kh, kw = self.kernel_size
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, 1, channels), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if use_bias else None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if x.shape[-1] != self.channels:
            raise ValueError(f"DepthwiseConv: input has {x.shape[-1]} channels, expected {self.channels}")
        kh, kw = self.kernel_size
        sh, sw = self.strides
        pads = resolve_padding(self.padding, x.shape[1:3], self.kernel_size, self.strides)
        kernel = self.kernel[...]
        impl = self.impl
        if impl == "auto":
            impl = "shift" if jax.default_backend() == "cpu" else "grouped"
        if impl == "grouped":
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype),
                kernel.astype(self.dtype),
                window_strides=self.strides,
                padding=pads,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.channels,
                preferred_element_type=jnp.float32,
            )
        else:
            xp = jnp.pad(x.astype(self.dtype), ((0, 0), pads[0], pads[1], (0, 0)))
            hp, wp = xp.shape[1], xp.shape[2]
            ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
            if ho <= 0 or wo <= 0:
                raise ValueError(f"DepthwiseConv: input {x.shape[1:3]} too small for kernel {self.kernel_size}")
            k = kernel.astype(self.dtype).astype(jnp.float32)
            y = None
            for i in range(kh):
                for j in range(kw):
                    view = jax.lax.slice(
                        xp,
                        (0, i, j, 0),
                        (xp.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, xp.shape[3]),
                        (1, sh, sw, 1),
                    )
                    term = view.astype(jnp.float32) * k[i, j, 0]
                    y = term if y is None else y + term
        if self.use_bias:
            y = y + self.bias[...].astype(self.dtype).astype(jnp.float32)
        return y.astype(self.dtype)


class SeparableConv(nnx.Module):
    """Keras ``SeparableConv2D`` (depth multiplier 1): a ``DepthwiseConv`` without bias, then a
    1x1 convolution (``pointwise``) with an optional bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        strides: int | Sequence[int] = 1,
        *,
        padding="SAME",
        use_bias: bool = True,
        depthwise_impl: str = "auto",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.depthwise = DepthwiseConv(
            in_channels, kernel_size, strides, padding=padding, use_bias=False, impl=depthwise_impl, dtype=dtype,
            rngs=rngs,
        )
        self.pointwise = nnx.Conv(
            in_channels, out_channels, (1, 1), use_bias=use_bias, kernel_init=glorot_uniform, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.pointwise(self.depthwise(x))


# ----------------------------------------------------------------------------- counting


def count_params(module: nnx.Module, *, batch_stats: bool = False) -> int:
    """Number of parameters; with ``batch_stats`` also BatchNorm running means and variances
    (Keras's ``count_params()`` counts those; torch's ``parameters()`` does not)."""
    kinds = (nnx.Param, nnx.BatchStat) if batch_stats else nnx.Param
    state = nnx.state(module, kinds)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(state)))


# ----------------------------------------------------------------------------- weight import

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


# ----------------------------------------------------------------------------- small blocks


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C) -> (B, C), averaged in float32 (as Keras ``pooling="avg"``)."""
    return x.astype(jnp.float32).mean(axis=(1, 2)).astype(x.dtype)


def max_pool(x: jnp.ndarray, size: int, stride: int, padding="VALID") -> jnp.ndarray:
    """Max pooling with TF ``"same"``/``"valid"`` or explicit torch-style padding (pads with -inf)."""
    pads = resolve_padding(padding, x.shape[1:3], (size, size), (stride, stride))
    return nnx.max_pool(x, (size, size), strides=(stride, stride), padding=pads)


def avg_pool(x: jnp.ndarray, size: int, stride: int, padding="VALID", count_include_pad: bool = False) -> jnp.ndarray:
    """Average pooling. Keras ``AveragePooling2D(padding="same")`` excludes the padding from the
    count (``count_include_pad=False``), torch's default includes it."""
    pads = resolve_padding(padding, x.shape[1:3], (size, size), (stride, stride))
    return nnx.avg_pool(x, (size, size), strides=(stride, stride), padding=pads, count_include_pad=count_include_pad)


# ----------------------------------------------------------------------------- benchmark


def benchmark_depthwise(
    batch: int = 8, size: int = 56, channels: int = 144, kernel: int = 3, strides: int = 1, repeats: int = 10
) -> dict[str, float]:
    """Milliseconds per jitted forward+backward of ``DepthwiseConv`` for both ``impl`` choices."""
    import time  # pylint: disable=import-outside-toplevel

    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    times = {}
    for impl in ("shift", "grouped"):
        conv = DepthwiseConv(channels, kernel, strides, use_bias=False, impl=impl, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(conv)

        @jax.jit
        def step(params, x, graphdef=graphdef):
            def loss(params, x):
                return jnp.mean(nnx.merge(graphdef, params)(x) ** 2)

            return jax.grad(loss, argnums=(0, 1))(params, x)

        jax.block_until_ready(step(params, x))
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(step(params, x))
        times[impl] = (time.perf_counter() - start) / repeats * 1e3
    return times


if __name__ == "__main__":
    print(f"backend {jax.default_backend()}; ms per forward+backward (batch 8, 56x56, 144 channels)")
    for k, s in ((3, 1), (3, 2), (5, 1), (5, 2)):
        t = benchmark_depthwise(kernel=k, strides=s)
        print(f"{k}x{k} stride {s}: shift {t['shift']:.2f} ms, grouped {t['grouped']:.2f} ms, "
              f"grouped/shift {t['grouped'] / t['shift']:.1f}x")
