"""2D convolutions on the CPU through oneDNN (``onednn_conv.cc``, XLA FFI custom calls).

XLA:CPU runs convolutions through Eigen, which is 2.5-5x slower than oneDNN, the library PyTorch
and TensorFlow use: for the forward and both gradients of a 3x3, 64-channel convolution on
8 x 64 x 64 inputs, 97 ms against 38 ms on this project's first machine (2 cores, AVX-512) and
441 ms against 93 ms on its second (2 cores of an AVX2-only AMD EPYC). jaxlib's
own oneDNN options (``--xla_cpu_experimental_onednn_custom_call``, ``--xla_cpu_use_onednn``)
change nothing there (oneDNN never runs: ``ONEDNN_VERBOSE=1`` prints nothing).

``conv_general_dilated`` has ``lax.conv_general_dilated``'s signature; every ``nnx.Conv`` of a
model built by ``boneage_jax.models`` uses it. It sends a convolution to oneDNN when all of these
hold, and to ``lax.conv_general_dilated`` otherwise (same results within float32 rounding):

- the mode (environment variable ``BONEAGE_CPU_CONV``) is ``auto`` (default) or ``onednn``;
- JAX's default backend is the CPU with one device (a multi-device CPU run, as the tests make
  with ``--xla_force_host_platform_device_count``, keeps XLA's: the custom call has no sharding
  rule);
- 2D, NHWC input and HWIO kernel, no input dilation, no batch groups (feature groups are fine:
  a depthwise convolution is ``feature_group_count`` = channels), float32 or bfloat16 operands
  of one dtype;
- the CPU has AVX2 (``cpu_unsupported``; ``onednn`` mode does not check it);
- the library is built: ``python -m boneage_jax.kernels.build`` (``make venv`` runs it). In
  ``auto`` mode a missing library logs one warning and XLA's path is used; ``onednn`` mode
  raises instead;
- oneDNN has a direct kernel for this convolution's forward and both gradients (``supported``,
  asked of the library while tracing). Its im2col + GEMM fallbacks, which it picks for some
  small feature maps, are not used (one crashed inside training steps on an AVX2 CPU), nor is
  bfloat16 on a CPU without AVX-512, where oneDNN 2023.2 has no bfloat16 convolution. Such a
  convolution takes XLA's path in every mode; the rest of the model keeps oneDNN.

A 1x1 convolution with stride 1 and no padding over few rows (N * H * W up to 2,048 for the
forward and data gradient, 8,192 for the weight gradient) runs as oneDNN's matmul instead, which
is faster there (``onednn_conv.cc`` has the measurements; ``BONEAGE_ONEDNN_MATMUL=0`` turns it
off); :func:`implementation` says which primitive and kernel a convolution gets.

``BONEAGE_CPU_CONV=xla`` turns it off; ``with xla_convolutions():`` turns it off for what is
traced inside (``boneage_jax.export`` does: an exported program must not need this library).
The gradient is a ``jax.custom_vjp`` whose backward pass calls oneDNN's backward-data and
backward-weights convolutions.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import threading
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from boneage_jax.kernels import build

MODES = ("auto", "onednn", "xla")
ENV = "BONEAGE_CPU_CONV"
TARGETS = {kind: f"boneage_onednn_conv_{kind}" for kind in ("forward", "backward_data", "backward_weights")}
NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def mode() -> str:
    """``BONEAGE_CPU_CONV`` (``auto`` when unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}; expected one of {MODES}")
    return value


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_unsupported() -> str | None:
    """Why this CPU does not get the oneDNN convolutions (``None``: it does): they are validated
    on AVX2 and AVX-512 CPUs, and oneDNN's direct kernels start at AVX2 for most shapes."""
    if "avx2" not in cpu_flags():
        return "this CPU has no AVX2 (the oneDNN convolutions are validated on AVX2 and AVX-512 CPUs)"
    return None


_LIBRARY: list[ctypes.CDLL] = []  # the loaded library (load() puts it here)


@functools.cache
def load() -> str | None:
    """Loads the built library and registers its handlers with XLA; returns why it could not
    (``None`` on success)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"oneDNN convolutions are built for Linux x86-64 only (this is {platform.system()} {platform.machine()})"
    path = build.library_path()
    if not os.path.exists(path):
        return f"the oneDNN convolution library is not built ({path} is missing; run python -m boneage_jax.kernels.build)"
    try:
        library = ctypes.cdll.LoadLibrary(path)
    except OSError as error:
        return f"cannot load {path}: {error}"
    try:
        handlers = {target: getattr(library, target) for target in TARGETS.values()}
        query = library.boneage_onednn_conv_supported
        describe = library.boneage_onednn_conv_implementation
    except AttributeError as error:
        return f"{path} lacks a handler ({error}); rebuild it with python -m boneage_jax.kernels.build --force"
    query.restype = ctypes.c_int
    query.argtypes = [ctypes.c_int] + [ctypes.POINTER(ctypes.c_int64)] * 7 + [ctypes.c_int64]
    describe.restype = ctypes.c_int
    describe.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.POINTER(ctypes.c_int64)] * 7 + [
        ctypes.c_int64, ctypes.c_char_p, ctypes.c_int]
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    _LIBRARY.append(library)
    return None


@functools.cache
def supported(dtype: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], y_shape: tuple[int, ...],
              geometry: tuple) -> bool:
    """Whether oneDNN has a direct kernel for this convolution's forward, backward-data and
    backward-weights (``dtype``: ``"float32"`` or ``"bfloat16"``; NHWC / HWIO shapes; ``geometry``
    as ``_conv`` takes it). Asked of the loaded library, which builds the three primitives now."""
    if not _LIBRARY or dtype not in ("float32", "bfloat16"):
        return False
    strides, low, high, dilation, groups = geometry
    answer = _LIBRARY[0].boneage_onednn_conv_supported(
        0 if dtype == "float32" else 1, _array(x_shape), _array(w_shape), _array(y_shape), _array(strides),
        _array(low), _array(high), _array(dilation), groups)
    return answer == 1


def _array(values: Sequence[int]):
    return (ctypes.c_int64 * len(values))(*values)


def implementation(kind: str, dtype: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...],
                   y_shape: tuple[int, ...], geometry: tuple) -> str | None:
    """The oneDNN primitive and kernel that run one ``kind`` (``"forward"``, ``"backward_data"``,
    ``"backward_weights"``) of this convolution, as the library reports it: e.g.
    ``"convolution brgconv_1x1:avx512_core"``, or ``"matmul brg:avx512_core"`` for a 1x1 convolution
    over few rows (``onednn_conv.cc`` says when); ``None`` when it has no direct kernel (or the
    library is not loaded). Arguments as :func:`supported` takes them."""
    if kind not in TARGETS:
        raise ValueError(f"kind={kind!r}; expected one of {tuple(TARGETS)}")
    if not _LIBRARY or dtype not in ("float32", "bfloat16"):
        return None
    strides, low, high, dilation, groups = geometry
    out = ctypes.create_string_buffer(256)
    answer = _LIBRARY[0].boneage_onednn_conv_implementation(
        tuple(TARGETS).index(kind), 0 if dtype == "float32" else 1, _array(x_shape), _array(w_shape),
        _array(y_shape), _array(strides), _array(low), _array(high), _array(dilation), groups, out, len(out))
    if answer == -1:
        raise ValueError(f"oneDNN cannot describe the {kind} convolution of {x_shape} by {w_shape}")
    return out.value.decode() if answer == 1 else None


@functools.cache
def _warn_once(reason: str) -> None:
    logging.warning("Convolutions run on XLA's CPU path (2.5-5x slower than oneDNN's): %s", reason)


_XLA_ONLY = threading.local()


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Within it, convolutions traced in this thread use XLA's path: for ``jax.export``, whose
    serialised programs cannot hold custom calls (they would need this library to run)."""
    previous = getattr(_XLA_ONLY, "active", False)
    _XLA_ONLY.active = True
    try:
        yield
    finally:
        _XLA_ONLY.active = previous


def use_onednn(backend: str | None = None) -> bool:
    """Whether convolutions traced now for ``backend`` (default: JAX's) go to oneDNN (see the
    module docstring)."""
    chosen = mode()
    if chosen == "xla" or getattr(_XLA_ONLY, "active", False):
        return False
    if (backend or jax.default_backend()) != "cpu" or jax.device_count() != 1:
        return False
    reason = load() if chosen == "onednn" else (cpu_unsupported() or load())
    if reason is None:
        return True
    if chosen == "onednn":
        raise RuntimeError(f"{ENV}=onednn but {reason}")
    _warn_once(reason)
    return False


def conv_general_dilated_in_bfloat16(lhs: jax.Array, rhs: jax.Array, *args, feature_group_count: int = 1,
                                     **kwargs) -> jax.Array:
    """:func:`conv_general_dilated` computed in bfloat16: float32 operands are rounded to
    bfloat16 and the result comes back as float32 (``config.model.dtype="mixed_bfloat16"``, the
    split of PyTorch's CPU autocast: convolutions in bfloat16, everything else in float32; on a
    CPU with AMX oneDNN then runs its AMX kernels). Grouped (depthwise) convolutions keep their
    dtype."""
    if feature_group_count != 1 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return conv_general_dilated(lhs, rhs, *args, feature_group_count=feature_group_count, **kwargs)
    out = conv_general_dilated(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), *args, **kwargs)
    return out.astype(jnp.float32)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
) -> jax.Array:
    """``lax.conv_general_dilated``, through oneDNN where the module docstring says it can."""
    fallback = functools.partial(
        lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
        **kwargs)
    if (
        lhs.ndim != 4 or rhs.ndim != 4 or batch_group_count != 1
        or any(d != 1 for d in (lhs_dilation or (1, 1)))
        or lhs.dtype != rhs.dtype or lhs.dtype not in (jnp.float32, jnp.bfloat16)
        or (preferred_element_type is not None and jnp.dtype(preferred_element_type) != lhs.dtype)
        or any(v is not None for v in kwargs.values())
        or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != NHWC
        or not use_onednn()
    ):
        return fallback()
    geometry = geometry_of(lhs.shape, rhs.shape, window_strides, padding, rhs_dilation, feature_group_count)
    if min(geometry[1] + geometry[2]) < 0 or not supported(
            jnp.dtype(lhs.dtype).name, tuple(lhs.shape), tuple(rhs.shape), tuple(_output(lhs, rhs, geometry).shape),
            geometry):
        return fallback()
    return _conv(lhs, rhs, geometry)


def geometry_of(lhs_shape: Sequence[int], rhs_shape: Sequence[int], window_strides: Sequence[int],
                padding: str | Sequence[tuple[int, int]], rhs_dilation: Sequence[int] | None,
                feature_group_count: int) -> tuple:
    """``(strides, padding_low, padding_high, dilation, groups)`` of an NHWC / HWIO convolution,
    with string padding resolved as ``lax.conv_general_dilated`` resolves it: what ``_conv`` and
    ``supported`` take."""
    dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        window = tuple((k - 1) * d + 1 for k, d in zip(rhs_shape[:2], dilation))
        padding = lax.padtype_to_pads(lhs_shape[1:3], window, strides, padding)
    low = tuple(int(p[0]) for p in padding)
    high = tuple(int(p[1]) for p in padding)
    return strides, low, high, dilation, int(feature_group_count)


def _attributes(geometry) -> dict[str, np.ndarray]:
    strides, low, high, dilation, groups = geometry
    attributes = {name: np.asarray(value, np.int64) for name, value in
                  (("strides", strides), ("padding_low", low), ("padding_high", high), ("dilation", dilation))}
    return {**attributes, "groups": np.int64(groups)}


def _output(x, w, geometry) -> jax.ShapeDtypeStruct:
    """The forward's output shape and dtype, by XLA's own shape rule for the same convolution."""
    strides, low, high, dilation, groups = geometry
    return jax.eval_shape(functools.partial(
        lax.conv_general_dilated, window_strides=strides, padding=tuple(zip(low, high)), rhs_dilation=dilation,
        dimension_numbers=NHWC, feature_group_count=groups), x, w)


def _call(kind: str, result: jax.ShapeDtypeStruct, a, b, geometry):
    return jax.ffi.ffi_call(TARGETS[kind], result, vmap_method="sequential")(a, b, **_attributes(geometry))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, geometry):
    return _call("forward", _output(x, w, geometry), x, w, geometry)


def _conv_forward(x, w, geometry):
    return _conv(x, w, geometry), (x, w)


def _conv_backward(geometry, residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    dx = _call("backward_data", jax.ShapeDtypeStruct(x.shape, x.dtype), dy, w, geometry)
    dw = _call("backward_weights", jax.ShapeDtypeStruct(w.shape, w.dtype), x, dy, geometry)
    return dx, dw


_conv.defvjp(_conv_forward, _conv_backward)
