"""Layers and helpers shared by the model families.

- ``DepthwiseConv``: a depthwise convolution written as k*k shifted multiply-adds (several times
  faster forward+backward than ``feature_group_count`` on XLA:CPU; ``python
  benchmarks/depthwise.py`` measures it), kernel in flax's grouped-conv layout ``(kh, kw, 1, C)``;
  ``resolve_depthwise_impl`` is the one rule for ``impl="auto"`` (shifted on the CPU, grouped on
  accelerators). ``SeparableConv``: Keras ``SeparableConv2D`` (depthwise, then 1x1 pointwise).
- Padding: ``same_pads`` (TensorFlow/Keras ``"same"``: asymmetric for stride 2, the extra pixel
  goes after) and ``resolve_padding`` (``"SAME"``, ``"VALID"``, a torch-style symmetric int, or
  explicit ``(lo, hi)`` pairs); ``max_pool``/``avg_pool`` accept the same, ``global_avg_pool``.
- Kernel initialisers of the reference frameworks, as flax variance-scaling initialisers:
  ``glorot_uniform`` (Keras's default; ``depthwise_glorot_uniform`` for a depthwise kernel),
  ``kaiming_normal_fan_out`` (torchvision ResNet's), ``efficientnet_conv``/``_depthwise`` (Keras
  EfficientNet's).
- ``BatchNorm``: ``nnx.BatchNorm`` with a training-mode update of the running statistics that
  costs nothing extra to trace and a hand-written gradient (``batch_norm_training``: two passes
  over the activation instead of autodiff's four to six; every model family builds its BatchNorm
  layers from it); ``Rngs``:
  ``nnx.Rngs`` whose key draws cost nothing extra to trace (models are built with it).
- ``count_params``: parameters (and optionally batch statistics) of a module.

The loaders that copy Keras/torch weight files into these layers live in
``boneage_jax.weights.loaders``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import normalization as flax_normalization

from boneage_jax.kernels import onednn


# ----------------------------------------------------------------------------- initialisers

# Keras's default Conv2D/Dense kernel initialiser, torchvision ResNet's kaiming_normal_(fan_out, relu),
# and Keras EfficientNet's CONV_KERNEL_INITIALIZER (a truncated normal: JAX, like Keras, truncates
# at 2 standard deviations and rescales to keep the variance). Fans are Keras's: for a depthwise
# kernel, stored here as (kh, kw, 1, C), Keras computes them on its (kh, kw, C, 1) layout, so the
# input axis is the last one.
glorot_uniform = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
kaiming_normal_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
efficientnet_conv = nnx.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
efficientnet_depthwise = nnx.initializers.variance_scaling(2.0, "fan_out", "truncated_normal", in_axis=-1, out_axis=-2)
depthwise_glorot_uniform = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-1, out_axis=-2)


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

DEPTHWISE_IMPLS = ("auto", "shift", "grouped")


def resolve_depthwise_impl(impl: str = "auto", backend: str | None = None) -> str:
    """Resolves ``"auto"`` to the faster form (``backend`` defaults to JAX's): ``"grouped"``,
    except on a CPU where the oneDNN convolutions are not in use (``kernels.onednn.use_onednn``:
    not built, ``BONEAGE_CPU_CONV=xla``, or several CPU devices), where XLA's grouped
    convolution is 5-9x slower than ``"shift"``. oneDNN's depthwise kernel is in turn 5-12x
    faster than ``"shift"`` (``benchmarks/depthwise.py``). ``"shift"`` and ``"grouped"`` are
    returned as they are."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl {impl!r}; expected one of {DEPTHWISE_IMPLS}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "cpu" and not onednn.use_onednn(backend):
        return "shift"
    return "grouped"


class DepthwiseConv(nnx.Module):
    """Depthwise 2D convolution (one filter per channel, depth multiplier 1).

    ``kernel`` has shape ``(kh, kw, 1, C)`` (flax's grouped-conv layout, so
    ``lax.conv_general_dilated(x, kernel, ..., feature_group_count=C)`` computes the same thing);
    ``bias`` has shape ``(C,)`` when ``use_bias``. ``padding`` is ``"SAME"`` (TF/Keras rule),
    ``"VALID"``, a torch-style symmetric int, or ``((top, bottom), (left, right))``.

    ``impl="shift"`` sums ``kh*kw`` strided slices of the padded input times one kernel tap each;
    XLA fuses them into a single loop, which on XLA:CPU runs forward+backward 5-9x faster than
    XLA's grouped convolution (at a large memory cost: its backward keeps every slice).
    ``impl="grouped"`` is the convolution with ``feature_group_count=C``, through
    ``kernels.onednn.conv_general_dilated``: oneDNN's depthwise kernel on the CPU (5-12x faster
    than "shift", no extra memory), cuDNN on GPU (1.2-2x faster than "shift" on an H100).
    ``impl="auto"`` (default) is ``resolve_depthwise_impl``'s choice: "grouped", or "shift" on a
    CPU without oneDNN. Both accumulate in float32 and return ``dtype``; they agree to float32
    rounding.
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
        kernel_init=depthwise_glorot_uniform,
        rngs: nnx.Rngs,
    ):
        resolve_depthwise_impl(impl)  # validates the name
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
        if resolve_depthwise_impl(self.impl) == "grouped":
            y = onednn.conv_general_dilated(  # oneDNN's depthwise kernel on the CPU, else XLA's
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


# ----------------------------------------------------------------------------- batch norm


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` (same arguments, variables and numbers) whose training-mode update of the
    running statistics is cheap to trace.

    flax 0.12's update (``self.mean[...] = new``) compares the new value's ``sharding`` with the
    old one's; on a tracer that attribute raises an AttributeError whose message JAX builds by
    walking everything traced so far (``Tracer._origin_msg``), so each BatchNorm costs time in
    proportion to the network before it and tracing grows with the square of the depth: 2.3 s of
    the 9 s it took to trace ResNet-50's train step (cProfile of ``TrainStep.lower``). Here the
    same arithmetic replaces the whole value (``set_value``), which skips that comparison.
    Inference mode is flax's own call.
    """

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average or use_running_average is None:  # flax's call (or its error message)
            return super().__call__(x, use_running_average, mask=mask)
        feature_axes = flax_normalization._canonicalize_axes(x.ndim, self.axis)
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
        if mask is None and self.axis_name is None and self.use_fast_variance:
            y, mean, var = batch_norm_training(x, scale, bias, feature_axes=feature_axes, dtype=self.dtype,
                                               epsilon=self.epsilon)
        else:  # flax's arithmetic, differentiated by JAX
            mean, var = flax_normalization._compute_stats(
                x, reduction_axes, dtype=self.dtype, axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups, use_fast_variance=self.use_fast_variance, mask=mask)
            y = flax_normalization._normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, self.dtype,
                                              self.epsilon)
        stop_gradient = jax.lax.stop_gradient if (self.mean._can_update or self.var._can_update) else (lambda v: v)
        self.mean.set_value(stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * mean))
        self.var.set_value(stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * var))
        return y


def batch_norm_training(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, *,
                        feature_axes: Sequence[int], dtype, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch normalisation: ``(y, batch mean, batch variance)`` with flax's
    arithmetic (``_compute_stats`` with the fast variance, then ``_normalize``: the same values)
    and a hand-written gradient.

    Autodiff of that arithmetic keeps ``x - mean`` and reads and writes the activation-sized
    tensors four to six times; the gradient here keeps only ``x`` and the per-channel statistics
    and makes two passes: one reduction for ``sum(dy)`` and ``sum(dy * (x - mean))``, one
    elementwise pass for ``dx`` (the textbook form, e.g. Ioffe & Szegedy 2015, section 3). It
    differs from autodiff's by float32 rounding only; ``tests/test_models_layers.py`` checks
    both. Statistics are float32 (or wider) as in flax; so is the gradient's arithmetic."""
    feature_axes = tuple(int(a) % x.ndim for a in feature_axes)
    return _batch_norm_training(x, scale, bias, feature_axes, jnp.dtype(dtype) if dtype is not None else None,
                                float(epsilon))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm_training(x, scale, bias, feature_axes, dtype, epsilon):
    return _batch_norm_training_forward(x, scale, bias, feature_axes, dtype, epsilon)[0]


def _batch_norm_training_forward(x, scale, bias, feature_axes, dtype, epsilon):
    reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    mean, var = flax_normalization._compute_stats(x, reduction_axes, dtype=dtype, use_fast_variance=True)
    y = flax_normalization._normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, dtype, epsilon)
    return (y, mean, var), (x, mean, var, scale, bias)


def _batch_norm_training_backward(feature_axes, dtype, epsilon, residuals, cotangents):
    """``dx = k * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n)`` with ``k = scale / std`` and
    ``xhat = (x - mean) / std``, plus the (usually zero) cotangents of the returned statistics;
    where flax's clipped variance is 0 the variance carries no gradient, as in autodiff."""
    x, mean, var, scale, bias = residuals
    dy, d_mean, d_var = cotangents
    reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    n = 1
    for a in reduction_axes:
        n *= x.shape[a]
    stats_shape = tuple(1 if a in reduction_axes else x.shape[a] for a in range(x.ndim))
    compute = mean.dtype  # float32 at least, as the statistics

    def per_feature(v):
        return v.reshape(stats_shape)

    centred = x.astype(compute) - per_feature(mean)
    dy_c = dy.astype(compute)
    sum_dy = dy_c.sum(reduction_axes)
    sum_dy_centred = (dy_c * centred).sum(reduction_axes)
    inv = jax.lax.rsqrt(var + epsilon)
    k = inv * scale.astype(compute) if scale is not None else inv
    # Through the variance: zero where it was clipped (flax's jnp.maximum(0, ...) passes no gradient there).
    through_var = (var > 0).astype(compute) * (2.0 / n) * (d_var.astype(compute) - 0.5 * k * inv * inv * sum_dy_centred)
    through_mean = (d_mean.astype(compute) - k * sum_dy) / n
    dx = per_feature(k) * dy_c + per_feature(through_var) * centred + per_feature(through_mean)
    d_scale = (inv * sum_dy_centred).astype(scale.dtype) if scale is not None else None
    d_bias = sum_dy.astype(bias.dtype) if bias is not None else None
    return dx.astype(x.dtype), d_scale, d_bias


_batch_norm_training.defvjp(_batch_norm_training_forward, _batch_norm_training_backward)


class _RngStream(nnx.RngStream):
    """``nnx.RngStream`` (same keys: ``fold_in(key, count)``, then ``count + 1``) whose counter
    update replaces the whole value, like ``BatchNorm`` above: flax's ``self.count[...] += 1``
    reads a tracer's ``sharding``, whose AttributeError message JAX builds by walking everything
    traced so far, so building a network under ``jax.jit`` or ``nnx.eval_shape`` (one draw per
    parameter) took time growing with the square of its size: 16 of the 44 s of the EfficientNet-B3
    Keras parity test (cProfile)."""

    def __call__(self) -> jax.Array:
        self.count._check_can_update()
        key = jax.random.fold_in(self.key[...], self.count[...])
        self.count.set_value(self.count[...] + 1)
        return key


class Rngs(nnx.Rngs):
    """``nnx.Rngs`` (same arguments, streams and keys) with streams that are cheap to trace; pass it
    wherever a model is built (``create_model`` does)."""

    def __init__(self, default=None, **rngs):
        super().__init__(default, **rngs)
        for tag, stream in list(self.items()):
            setattr(self, tag, _RngStream(stream.key.get_value(), tag=tag))


# ----------------------------------------------------------------------------- counting


def count_params(module: nnx.Module, *, batch_stats: bool = False) -> int:
    """Number of parameters; with ``batch_stats`` also BatchNorm running means and variances
    (Keras's ``count_params()`` counts those; torch's ``parameters()`` does not)."""
    kinds = (nnx.Param, nnx.BatchStat) if batch_stats else nnx.Param
    state = nnx.state(module, kinds)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(state)))


# ----------------------------------------------------------------------------- small blocks


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C) -> (B, C), averaged in float32 (as Keras ``pooling="avg"``)."""
    return x.astype(jnp.float32).mean(axis=(1, 2)).astype(x.dtype)


def max_pool(x: jnp.ndarray, size: int, stride: int, padding="VALID") -> jnp.ndarray:
    """Max pooling with TF ``"same"``/``"valid"`` or explicit torch-style padding (pads with -inf).

    The forward is the maximum of the window's ``size * size`` strided slices of the padded input
    (:func:`window_slices`; the same values as ``nnx.max_pool``'s reduce-window, which XLA:CPU
    runs 2-9x slower: 31.3 against 11.7 ms for Xception's 8 x 125 x 125 x 128 pool). The
    gradient goes to the first maximum of each window in row-major order, as XLA's
    ``select_and_scatter`` sends it, but is computed without a scatter (:func:`_max_pool_backward`):
    on XLA:CPU, whose select-and-scatter becomes iota + reduce-window + scatter, the forward +
    backward is 5.6-6.8x faster than autodiff of ``nnx.max_pool`` for the 3x3/2 pools of ResNet-50
    and Xception at 256 px (``python benchmarks/layers.py``; 3.7-5.4x with the reduce-window forward)."""
    pads = tuple(resolve_padding(padding, x.shape[1:3], (size, size), (stride, stride)))
    return _max_pool(x, size, stride, pads)


def window_slices(x: jnp.ndarray, size: int, stride: int, pads, pad_value: float = 0.0) -> list[jnp.ndarray]:
    """The ``size * size`` taps of a pooling window over ``x`` (B, H, W, C) padded by ``pads``
    (``((top, bottom), (left, right))``) with ``pad_value``, row-major: tap ``(i, j)`` is the
    (B, OH, OW, C) array of each window's pixel ``(i, j)``. XLA fuses an elementwise reduction of
    them into one pass over ``x``."""
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)), constant_values=pad_value)
    (batch, hp, wp, channels) = xp.shape
    ho, wo = (hp - size) // stride + 1, (wp - size) // stride + 1
    return [jax.lax.slice(xp, (0, i, j, 0), (batch, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, channels),
                          (1, stride, stride, 1))
            for i in range(size) for j in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jnp.ndarray, size: int, stride: int, pads) -> jnp.ndarray:
    return functools.reduce(jnp.maximum, window_slices(x, size, stride, pads, -jnp.inf))


def _max_pool_forward(x, size, stride, pads):
    y = _max_pool(x, size, stride, pads)
    return y, (x, y)


def _max_pool_backward(size, stride, pads, residuals, dy):
    """Two fused passes, no scatter. First, per output pixel, the index of the first window tap
    (row-major) equal to the window's maximum. Then the padded input's gradient, one stride phase
    at a time: a pixel of phase ``(a, b)`` (row ``a`` mod ``stride``, column ``b``) is reached only
    by taps ``(a + stride * m, b + stride * l)``, from output pixel ``(p - m, q - l)``, so each
    phase is a sum of a few shifted ``where(first == tap, dy, 0)``; the phases are interleaved by a
    reshape. (The previous form, one interior-padded add per tap, wrote ``size * size``
    input-sized buffers: 116 ms against 21.5 ms for the backward of Xception's 8 x 125 x 125 x 128
    pool.)"""
    x, y = residuals
    hp, wp = x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1])  # the padded input's height and width
    ho, wo = y.shape[1:3]
    batch, channels = dy.shape[0], dy.shape[3]
    first = jnp.full(y.shape, size * size, jnp.int32)
    taps = window_slices(x, size, stride, pads, -jnp.inf)
    for tap in reversed(range(size * size)):  # the last assignment is the first tap that matches
        first = jnp.where(taps[tap] == y, tap, first)
    rows, cols = -(-hp // stride), -(-wp // stride)  # pixels per phase
    zero = jnp.zeros((), dy.dtype)
    phase_rows = []
    for a in range(stride):
        phase_row = []
        for b in range(stride):
            phase = jnp.zeros((batch, rows, cols, channels), dy.dtype)
            for i in range(a, size, stride):
                for j in range(b, size, stride):
                    m, l = (i - a) // stride, (j - b) // stride
                    sent = jnp.where(first == i * size + j, dy, zero)
                    phase = phase + jax.lax.pad(sent, zero, ((0, 0, 0), (m, rows - ho - m, 0), (l, cols - wo - l, 0),
                                                             (0, 0, 0)))
            phase_row.append(phase)
        phase_rows.append(jnp.stack(phase_row, axis=3))  # (N, rows, cols, b, C)
    # (N, rows, a, cols, b, C): row a + stride * p of the padded input is phase a's row p.
    dxp = jnp.stack(phase_rows, axis=2).reshape(batch, rows * stride, cols * stride, channels)
    h, w = x.shape[1:3]
    return (dxp[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w, :],)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def avg_pool(x: jnp.ndarray, size: int, stride: int, padding="VALID", count_include_pad: bool = False) -> jnp.ndarray:
    """Average pooling. Keras ``AveragePooling2D(padding="same")`` excludes the padding from the
    count (``count_include_pad=False``), torch's default includes it.

    With stride 1 (InceptionV3's branch pools) the window sum is the sum of its taps
    (:func:`window_slices`) times a per-pixel reciprocal count fixed when tracing, and its gradient
    is the same window sum over the padded cotangent: on XLA:CPU the forward + backward is 2.6-4.4x
    faster than autodiff of ``nnx.avg_pool``'s reduce-window at InceptionV3's pools (8 x 29 x 29 x
    288: 19.0 -> 4.3 ms; ``python benchmarks/layers.py``). The values agree with ``nnx.avg_pool``
    within float32 rounding (the sum's order can differ). Other strides, and padding wider than the
    window less one, use ``nnx.avg_pool``."""
    pads = tuple(tuple(int(v) for v in pad) for pad in resolve_padding(padding, x.shape[1:3], (size, size),
                                                                        (stride, stride)))
    if stride != 1 or max(max(pad) for pad in pads) > size - 1:
        return nnx.avg_pool(x, (size, size), strides=(stride, stride), padding=pads,
                            count_include_pad=count_include_pad)
    scale = _window_reciprocal_counts(x.shape[1:3], size, pads, count_include_pad)
    return _window_mean(x, jnp.asarray(scale[None, :, :, None], x.dtype), size, pads)


def _window_reciprocal_counts(hw, size: int, pads, count_include_pad: bool) -> np.ndarray:
    """(OH, OW) float32: 1 / the number of pixels each stride-1 window averages."""
    if count_include_pad:
        inside = np.ones((hw[0] + sum(pads[0]), hw[1] + sum(pads[1])), np.float64)
    else:
        inside = np.pad(np.ones(hw, np.float64), pads)
    ho, wo = inside.shape[0] - size + 1, inside.shape[1] - size + 1
    counts = sum(inside[i:i + ho, j:j + wo] for i in range(size) for j in range(size))
    return (1.0 / counts).astype(np.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _window_mean(x: jnp.ndarray, scale: jnp.ndarray, size: int, pads) -> jnp.ndarray:
    return functools.reduce(jnp.add, window_slices(x, size, 1, pads)) * scale


def _window_mean_forward(x, scale, size, pads):
    return _window_mean(x, scale, size, pads), scale


def _window_mean_backward(size, pads, scale, dy):
    """``dx[p] = sum over the windows o that hold p of scale[o] * dy[o]``: the window sum of
    ``scale * dy`` padded by ``size - 1 - pad`` on the low side (and what keeps ``dx``'s shape on
    the high side); the scale is a constant of the trace (no gradient)."""
    g = dy * scale
    h, w = dy.shape[1] - 1 + size - sum(pads[0]), dy.shape[2] - 1 + size - sum(pads[1])  # x's height and width
    low = (size - 1 - pads[0][0], size - 1 - pads[1][0])
    back = ((low[0], h + size - 1 - dy.shape[1] - low[0]), (low[1], w + size - 1 - dy.shape[2] - low[1]))
    return functools.reduce(jnp.add, window_slices(g, size, 1, back)), jnp.zeros_like(scale)


_window_mean.defvjp(_window_mean_forward, _window_mean_backward)
