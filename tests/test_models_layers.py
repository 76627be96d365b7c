"""Shared layers: DepthwiseConv against the grouped convolution, TF padding, the initialisers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import normalization as flax_normalization

from helpers import FAST_COMPILE

from boneage_jax.kernels import onednn
from boneage_jax.models import convmixer, layers


# ----------------------------------------------------------------------------- DepthwiseConv


def grouped_reference(x, kernel, strides, pads):
    return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1], precision=jax.lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID", 1])
def test_depthwise_equals_grouped_conv(kernel, strides, padding):
    """Odd height and even width: TF "same" pads asymmetrically at stride 2 on the even axis."""
    rng = np.random.default_rng(kernel * 10 + strides)
    conv = layers.DepthwiseConv(6, kernel, strides, padding=padding, use_bias=True, impl="shift",
                                rngs=nnx.Rngs(0))
    conv.bias.set_value(jnp.asarray(rng.normal(size=6), jnp.float32))
    x = jnp.asarray(rng.normal(size=(2, 11, 12, 6)), jnp.float32)
    pads = padding if isinstance(padding, str) else [(padding, padding)] * 2
    expected = grouped_reference(x, conv.kernel[...], strides, pads) + conv.bias[...]
    got = nnx.jit(lambda c, x: c(x))(conv, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel,strides", [(3, 1), (5, 2)])
def test_depthwise_gradients_equal_grouped(kernel, strides):
    x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4))
    shift = layers.DepthwiseConv(4, kernel, strides, use_bias=False, impl="shift", rngs=nnx.Rngs(0))
    grouped = layers.DepthwiseConv(4, kernel, strides, use_bias=False, impl="grouped", rngs=nnx.Rngs(0))

    def grads(conv):
        return nnx.jit(nnx.grad(lambda c, x: jnp.sum(jnp.sin(c(x))), argnums=(0, 1)))(conv, x)

    (gs_conv, gs_x), (gg_conv, gg_x) = grads(shift), grads(grouped)
    np.testing.assert_allclose(np.asarray(gs_x), np.asarray(gg_x), atol=1e-4)
    np.testing.assert_allclose(np.asarray(gs_conv["kernel"][...]), np.asarray(gg_conv["kernel"][...]), atol=1e-4)


def test_depthwise_bfloat16():
    conv = layers.DepthwiseConv(8, 3, 2, dtype=jnp.bfloat16, impl="shift", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 8))
    y = conv(x)
    assert y.dtype == jnp.bfloat16 and conv.kernel[...].dtype == jnp.float32
    ref = grouped_reference(x, conv.kernel[...], 2, "SAME")
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.05, rtol=0.02)


def test_same_pads_follow_tensorflow():
    for size in range(5, 12):
        for k in (1, 3, 5, 7):
            for s in (1, 2):
                assert layers.same_pads(size, k, s) == tuple(jax.lax.padtype_to_pads((size,), (k,), (s,), "SAME")[0])
    assert layers.same_pads(32, 3, 2) == (0, 1)  # TF pads after; torch would pad (1, 1)
    assert layers.resolve_padding(1, (8, 8), (3, 3), (2, 2)) == [(1, 1), (1, 1)]


def test_initialisers_have_the_reference_statistics():
    key = jax.random.key(0)
    glorot = np.asarray(layers.glorot_uniform(key, (3, 3, 64, 128)))
    limit = np.sqrt(6.0 / (9 * 64 + 9 * 128))
    assert np.abs(glorot).max() <= limit and np.abs(glorot).max() > 0.99 * limit
    kaiming = np.asarray(layers.kaiming_normal_fan_out(key, (3, 3, 64, 128)))
    np.testing.assert_allclose(kaiming.std(), np.sqrt(2.0 / (9 * 128)), rtol=0.02)
    trunc = np.asarray(layers.efficientnet_conv(key, (1, 1, 256, 512)))
    np.testing.assert_allclose(trunc.std(), np.sqrt(2.0 / 512), rtol=0.02)
    assert np.abs(trunc).max() <= 2 * np.sqrt(2.0 / 512) / 0.87962566103423978 + 1e-6
    # deterministic in the key, different across keys
    np.testing.assert_array_equal(glorot, np.asarray(layers.glorot_uniform(key, (3, 3, 64, 128))))
    assert not np.array_equal(glorot, np.asarray(layers.glorot_uniform(jax.random.key(1), (3, 3, 64, 128))))
    # usable under a transformation
    abstract = jax.eval_shape(lambda k: layers.glorot_uniform(k, (3, 3, 4, 8)), key)
    assert abstract.shape == (3, 3, 4, 8)


def test_depthwise_auto_is_one_rule(monkeypatch):
    """``impl="auto"`` resolves once, in ``layers``; ConvMixer only adds its memory limit. On the
    CPU it is oneDNN's grouped kernel when the oneDNN convolutions are in use, else "shift"."""
    monkeypatch.setenv(onednn.ENV, "xla")
    assert layers.resolve_depthwise_impl("auto", "cpu") == "shift"
    monkeypatch.setattr(onednn, "use_onednn", lambda backend=None: backend == "cpu")
    assert layers.resolve_depthwise_impl("auto", "cpu") == "grouped"
    assert layers.resolve_depthwise_impl("auto", "gpu") == "grouped"
    assert layers.resolve_depthwise_impl("grouped", "cpu") == "grouped"
    with pytest.raises(ValueError, match="depthwise_impl 'fft'"):
        layers.DepthwiseConv(4, impl="fft", rngs=nnx.Rngs(0))
    for backend in ("cpu", "gpu", "tpu"):
        assert convmixer.depthwise_impl_for("auto", backend) == layers.resolve_depthwise_impl("auto", backend)


def test_a_cpu_without_avx2_keeps_xlas_convolutions_unless_onednn_is_forced(monkeypatch):
    """The oneDNN kernels are validated on AVX2 and AVX-512 CPUs; on an older CPU ``auto`` does
    not use them (a warning names the reason); ``onednn`` mode still does."""
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        pytest.skip("oneDNN convolutions are chosen only on a one-device CPU backend")
    monkeypatch.setattr(onednn, "cpu_flags", lambda: frozenset({"sse2", "sse4_1", "avx"}))
    monkeypatch.setattr(onednn, "load", lambda: None)  # as if the library were built and loaded
    monkeypatch.setenv(onednn.ENV, "auto")
    assert "no AVX2" in onednn.cpu_unsupported()
    assert not onednn.use_onednn("cpu")
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    lowered = jax.jit(lambda x, w: onednn.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(x, w).as_text()
    assert "boneage_onednn_conv" not in lowered
    monkeypatch.setenv(onednn.ENV, "onednn")
    assert onednn.use_onednn("cpu")
    for flags in ({"avx", "avx2", "fma"}, {"avx2", "avx512f"}):
        monkeypatch.setattr(onednn, "cpu_flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setenv(onednn.ENV, "auto")
        assert onednn.cpu_unsupported() is None and onednn.use_onednn("cpu")


@pytest.mark.parametrize("shape, size, stride, padding", [
    ((2, 16, 16, 3), 3, 2, 1),  # ResNet's stem pool (torch-style padding)
    ((2, 15, 15, 4), 3, 2, "SAME"),  # Xception
    ((2, 15, 15, 4), 3, 2, "VALID"),  # Inception
    ((2, 16, 12, 3), 2, 2, "VALID"),  # VGG, U-Net
    ((2, 9, 9, 3), 3, 1, ((1, 1), (1, 1))),  # GoogLeNet's branch pool
])
def test_max_pool_gradient_goes_to_the_first_maximum_as_xla_sends_it(shape, size, stride, padding):
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)  # ReLU'd: windows of tied zeros
    x[:, ::3, ::2] = 1.0  # and ties between positive maxima
    pads = layers.resolve_padding(padding, shape[1:3], (size, size), (stride, stride))

    def reference(x):
        return nnx.max_pool(x, (size, size), strides=(stride, stride), padding=pads)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # one program: eagerly, each op compiles
    def pools_and_gradients(x, weights):
        ours = lambda x: layers.max_pool(x, size, stride, padding)  # noqa: E731
        return (ours(x), reference(x), jax.grad(lambda x: (ours(x) * weights).sum())(x),
                jax.grad(lambda x: (reference(x) * weights).sum())(x))

    out_shape = jax.eval_shape(reference, jax.ShapeDtypeStruct(shape, jnp.float32)).shape
    weights = rng.standard_normal(out_shape).astype(np.float32)
    pooled, expected_pooled, ours, expected = pools_and_gradients(x, weights)
    np.testing.assert_array_equal(pooled, expected_pooled)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)  # a pixel shared by windows: sum order


@pytest.mark.parametrize("shape, size, padding, count_include_pad", [
    ((2, 9, 9, 3), 3, "SAME", False),  # InceptionV3's branch pools (Keras: padding left out of the count)
    ((2, 9, 8, 3), 3, "SAME", True),
    ((2, 7, 9, 2), 3, "VALID", False),
    ((2, 8, 8, 2), 2, "SAME", False),  # uneven SAME padding (0, 1)
    ((1, 6, 6, 2), 5, ((2, 1), (0, 3)), False),
    ((1, 6, 6, 2), 3, ((3, 0), (0, 0)), False),  # padding wider than the window: flax's path
])
def test_stride_1_avg_pool_equals_flax_with_its_gradient(shape, size, padding, count_include_pad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    pads = layers.resolve_padding(padding, shape[1:3], (size, size), (1, 1))

    def reference(x):
        return nnx.avg_pool(x, (size, size), strides=(1, 1), padding=pads, count_include_pad=count_include_pad)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def pools_and_gradients(x, weights):
        ours = lambda x: layers.avg_pool(x, size, 1, padding, count_include_pad=count_include_pad)  # noqa: E731
        return (ours(x), reference(x), jax.grad(lambda x: (ours(x) * weights).sum())(x),
                jax.grad(lambda x: (reference(x) * weights).sum())(x))

    out_shape = jax.eval_shape(reference, jax.ShapeDtypeStruct(shape, jnp.float32)).shape
    weights = rng.standard_normal(out_shape).astype(np.float32)
    pooled, expected_pooled, ours, expected = pools_and_gradients(x, weights)
    np.testing.assert_allclose(pooled, expected_pooled, rtol=1e-6, atol=1e-6)  # the sum's order differs
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(), dict(use_scale=False, momentum=0.99, epsilon=1e-3),
                                    dict(dtype=jnp.bfloat16)])
def test_batch_norm_equals_flax_in_both_modes(kwargs):
    """Same outputs, gradients and running statistics as ``nnx.BatchNorm``, training and inference."""
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 5, 6)), jnp.float32)
    ours, theirs = layers.BatchNorm(6, rngs=nnx.Rngs(0), **kwargs), nnx.BatchNorm(6, rngs=nnx.Rngs(0), **kwargs)

    def loss_and_stats(bn, train):
        bn.train() if train else bn.eval()
        loss = lambda m: (m(x).astype(jnp.float32) ** 3).mean()  # noqa: E731
        value, grads = nnx.jit(nnx.value_and_grad(loss))(bn)
        return value, grads, nnx.state(bn, nnx.BatchStat)

    for train in (True, True, False):  # twice in training: the statistics move from where they were
        got, want = loss_and_stats(ours, train), loss_and_stats(theirs, train)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert not np.allclose(np.asarray(ours.mean[...]), 0.0)


@pytest.mark.parametrize("dtype, use_scale, use_bias", [(jnp.float32, True, True), (jnp.float32, False, True),
                                                        (jnp.float32, True, False), (jnp.bfloat16, True, True)])
def test_batch_norm_gradient_is_autodiffs(dtype, use_scale, use_bias):
    """``batch_norm_training``'s hand-written gradient against JAX's autodiff of flax's arithmetic,
    on a 8 x 12 x 12 x 16 batch (rounding differences show at this size), with cotangents on the
    returned mean and variance too, a channel offset far from zero and a constant channel (its
    variance clipped to 0). The forward values are identical."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 2.0, size=(8, 12, 12, 16)).astype(np.float32)
    x[..., 3] += 40.0  # mean far from zero: a naive sum(dy * x) - mean * sum(dy) would cancel
    x[..., 5] = 1.5  # constant: variance 0
    x = jnp.asarray(x, dtype)
    scale = jnp.asarray(rng.normal(1.0, 0.3, 16), dtype) if use_scale else None
    bias = jnp.asarray(rng.normal(0.0, 0.3, 16), dtype) if use_bias else None
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def flax_arithmetic(x, scale, bias):
        mean, var = flax_normalization._compute_stats(x, (0, 1, 2), dtype=dtype, use_fast_variance=True)
        return flax_normalization._normalize(x, mean, var, scale, bias, (0, 1, 2), (3,), dtype, 1e-3), mean, var

    def ours(x, scale, bias):
        return layers.batch_norm_training(x, scale, bias, feature_axes=(3,), dtype=dtype, epsilon=1e-3)

    def loss(fn):
        def value(x, scale, bias):
            y, mean, var = fn(x, scale, bias)
            return (jnp.tanh(y.astype(jnp.float32)) * weights).sum() + (0.3 * mean).sum() + (0.7 * var).sum()
        return value

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def both(x, scale, bias):
        argnums = tuple(i for i, v in enumerate((x, scale, bias)) if v is not None)
        return ([flax_arithmetic(x, scale, bias), ours(x, scale, bias)],
                [jax.grad(loss(fn), argnums)(x, scale, bias) for fn in (flax_arithmetic, ours)])

    (expected_out, got_out), (expected, got) = both(x, scale, bias)
    for a, b in zip(got_out, expected_out):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
    for a, b in zip(got, expected):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())
    assert np.abs(np.asarray(got[0], np.float32)).max() > 0


def test_batch_norm_update_does_not_walk_the_trace(monkeypatch):
    """Tracing a training-mode update never builds JAX's origin message of a tracer (a walk over
    everything traced so far: what made flax's update quadratic in depth)."""
    from jax._src.interpreters import partial_eval

    calls = []
    original = partial_eval.DynamicJaxprTracer._origin_msg
    monkeypatch.setattr(partial_eval.DynamicJaxprTracer, "_origin_msg",
                        lambda self: calls.append(1) or original(self))
    x = jnp.ones((2, 4, 4, 3))
    for cls, walks in ((nnx.BatchNorm, True), (layers.BatchNorm, False)):
        calls.clear()
        bn = cls(3, rngs=nnx.Rngs(0))
        nnx.jit(lambda m, x: m(x))(bn, x)
        assert bool(calls) == walks, cls


def test_rngs_draw_flax_keys_without_walking_the_trace(monkeypatch):
    """``layers.Rngs`` draws the keys ``nnx.Rngs`` draws, eagerly and under ``jit``, and building a
    network under ``eval_shape`` never builds a tracer's origin message (flax's counter update did,
    once per parameter)."""
    from jax._src.interpreters import partial_eval

    def draws(rngs):
        return [jax.random.key_data(rngs.params()) for _ in range(3)] + [jax.random.key_data(rngs.dropout())]

    for traced in (False, True):
        run = jax.jit(lambda: draws(layers.Rngs(params=3, dropout=4))) if traced else (
            lambda: draws(layers.Rngs(params=3, dropout=4)))
        reference = jax.jit(lambda: draws(nnx.Rngs(params=3, dropout=4)))()
        for got, want in zip(run(), reference):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    calls = []
    original = partial_eval.DynamicJaxprTracer._origin_msg
    monkeypatch.setattr(partial_eval.DynamicJaxprTracer, "_origin_msg",
                        lambda self: calls.append(1) or original(self))
    for rngs_class, walks in ((nnx.Rngs, True), (layers.Rngs, False)):
        calls.clear()
        nnx.eval_shape(lambda: convmixer.ConvMixer(in_channels=1, image_size=32, dim=8, depth=2, rngs=rngs_class(0)))
        assert bool(calls) == walks, rngs_class
