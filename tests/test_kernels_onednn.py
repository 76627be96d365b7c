"""oneDNN convolutions (boneage_jax/kernels): the same values and gradients as XLA's
convolution for every geometry the models use, the fallbacks, and a model's training loss."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from helpers import fast_init

from boneage_jax import models
from boneage_jax.kernels import build, onednn


@pytest.fixture(scope="module", autouse=True)
def library():
    """The library built for this source (``make venv`` builds it; built here when missing),
    on a CPU it is used on."""
    if onednn.cpu_unsupported() is not None:
        pytest.skip(f"oneDNN convolutions are not used here: {onednn.cpu_unsupported()}")
    if onednn.mode() == "xla":
        pytest.skip(f"oneDNN convolutions are turned off here ({onednn.ENV}=xla)")
    if onednn.load() is not None:
        try:
            build.compile_library(quiet=True)
        except (FileNotFoundError, RuntimeError) as e:
            pytest.skip(f"the oneDNN convolution library cannot be built here: {str(e).splitlines()[0]}")
        onednn.load.cache_clear()
    assert onednn.load() is None
    if jax.device_count() != 1:
        pytest.skip("oneDNN convolutions run on a one-device CPU backend")


def _uses_onednn(fn, *args) -> bool:
    """Whether ``fn`` lowers to a oneDNN custom call (traced anew: jit caches traces by function)."""
    return "boneage_onednn_conv" in jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


def _conv(impl, x, w, strides, padding, dilation):
    kwargs = dict(rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                  feature_group_count=x.shape[3] // w.shape[2])
    return impl(x, w, strides, padding, **kwargs)


def _supported(x, w, strides, padding, dilation) -> bool:
    """What the library says of this convolution (a direct kernel for its forward and gradients)."""
    geometry = onednn.geometry_of(x.shape, w.shape, strides, padding, dilation, x.shape[3] // w.shape[2])
    y = jax.eval_shape(lambda x, w: _conv(lax.conv_general_dilated, x, w, strides, padding, dilation), x, w)
    return onednn.supported(jnp.dtype(x.dtype).name, x.shape, w.shape, y.shape, geometry)


# Dilated kernels: oneDNN 2023.2 has only its GEMM fallback for them on AVX2 (XLA's path there).
MAY_FALL_BACK = {"dilated"}
GEOMETRIES = [
    # (x shape, kernel shape, strides, padding, dilation)
    ((2, 9, 11, 5), (3, 3, 5, 7), (1, 1), "SAME", (1, 1)),
    ((2, 9, 11, 5), (3, 3, 5, 7), (2, 2), "SAME", (1, 1)),
    ((2, 10, 10, 4), (3, 3, 4, 6), (2, 2), "VALID", (1, 1)),
    ((1, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), (1, 1)),  # torchvision's stem
    ((2, 8, 8, 16), (1, 1, 16, 32), (1, 1), "VALID", (1, 1)),  # 1x1 over 128 rows: a matmul
    ((2, 72, 72, 8), (1, 1, 8, 4), (1, 1), "VALID", (1, 1)),  # 1x1 over 10,368 rows: a convolution
    ((2, 8, 8, 16), (1, 1, 16, 8), (2, 2), "VALID", (1, 1)),  # strided 1x1 shortcut
    ((2, 12, 9, 4), (1, 7, 4, 4), (1, 1), ((0, 0), (3, 3)), (1, 1)),  # Inception's 1x7
    ((2, 12, 12, 4), (3, 3, 4, 4), (1, 1), ((0, 1), (1, 0)), (1, 1)),  # asymmetric
    pytest.param((2, 12, 12, 4), (3, 3, 4, 5), (1, 1), "SAME", (2, 2), id="dilated"),
    ((2, 9, 9, 6), (3, 3, 1, 6), (1, 1), "SAME", (1, 1)),  # depthwise
    ((2, 9, 9, 6), (5, 5, 1, 6), (2, 2), ((1, 2), (1, 2)), (1, 1)),  # depthwise, strided, TF padding
    ((2, 8, 8, 6), (3, 3, 2, 9), (1, 1), "SAME", (1, 1)),  # 3 groups of 2 -> 3
]


@pytest.mark.parametrize("x_shape, w_shape, strides, padding, dilation", GEOMETRIES)
def test_values_and_gradients_equal_xla(request, x_shape, w_shape, strides, padding, dilation):
    """Through oneDNN where it has a direct kernel (every geometry but those in MAY_FALL_BACK, on
    every CPU the kernels run on), else XLA's path: the same value and gradients either way."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32) * 0.3)
    cotangent = jnp.asarray(rng.standard_normal(_conv(lax.conv_general_dilated, x, w, strides, padding,
                                                            dilation).shape, np.float32))

    def loss(impl):
        return lambda x, w: (_conv(impl, x, w, strides, padding, dilation) * cotangent).sum()

    ours = jax.jit(jax.value_and_grad(loss(onednn.conv_general_dilated), argnums=(0, 1)))
    reference = jax.jit(jax.value_and_grad(loss(lax.conv_general_dilated), argnums=(0, 1)))
    direct = _supported(x, w, strides, padding, dilation)
    assert direct or request.node.callspec.id in MAY_FALL_BACK
    assert _uses_onednn(lambda x, w: _conv(onednn.conv_general_dilated, x, w, strides, padding, dilation), x, w) == direct
    (value, (dx, dw)), (value_ref, (dx_ref, dw_ref)) = ours(x, w), reference(x, w)
    np.testing.assert_allclose(value, value_ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-3)


def test_bfloat16():
    """oneDNN's bfloat16 convolutions on AVX-512 CPUs; without AVX-512 (oneDNN 2023.2 has none
    there) XLA's path. The values and the weight gradient in bfloat16 either way."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16), np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 8), np.float32) * 0.2, jnp.bfloat16)

    def forward(impl):
        return jax.jit(lambda x, w: _conv(impl, x, w, (1, 1), "SAME", (1, 1)))

    direct = _supported(x, w, (1, 1), "SAME", (1, 1))
    if "avx512bw" in onednn.cpu_flags():
        assert direct
    if not onednn.cpu_flags() & {"avx512f", "avx_ne_convert"}:
        assert not direct
    y = forward(onednn.conv_general_dilated)(x, w)
    assert y.dtype == jnp.bfloat16 and _uses_onednn(forward(onednn.conv_general_dilated), x, w) == direct
    expected = forward(lax.conv_general_dilated)(x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=3e-2, atol=3e-2)
    dw = jax.grad(lambda w: _conv(onednn.conv_general_dilated, x, w, (1, 1), "SAME", (1, 1)).astype(
        jnp.float32).sum())(w)
    dw_ref = jax.grad(lambda w: _conv(lax.conv_general_dilated, x.astype(jnp.float32), w, (1, 1), "SAME",
                                      (1, 1)).sum())(w.astype(jnp.float32))
    assert dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), dw_ref, rtol=3e-2, atol=0.5)


def _implementations(dtype, x_shape, w_shape, strides=(1, 1), padding="VALID") -> list[str | None]:
    """What the library runs for this convolution's forward, data gradient and weight gradient."""
    geometry = onednn.geometry_of(x_shape, w_shape, strides, padding, None, 1)
    y_shape = jax.eval_shape(lambda x, w: _conv(lax.conv_general_dilated, x, w, strides, padding, (1, 1)),
                             jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(w_shape, dtype)).shape
    return [onednn.implementation(kind, dtype, x_shape, w_shape, y_shape, geometry) for kind in onednn.TARGETS]


def test_a_1x1_convolution_over_few_rows_runs_as_a_matmul():
    """Stride 1, no padding, up to 2,048 rows (8,192 for the weight gradient): oneDNN's matmul on
    CPUs that have its direct (brgemm) kernel, every AVX-512 one; more rows, a stride or a wider
    kernel: a convolution. ``BONEAGE_ONEDNN_MATMUL=0`` (read once per process) turns it off."""
    avx512 = "avx512f" in onednn.cpu_flags()
    few = _implementations("float32", (2, 8, 8, 16), (1, 1, 16, 32))
    assert all(name.split()[0] == ("matmul" if avx512 else name.split()[0]) for name in few), few
    assert all(name.split()[0] in ("matmul", "convolution") for name in few), few
    # 4,608 rows: the weight gradient alone is a matmul
    middle = [name.split()[0] for name in _implementations("float32", (2, 48, 48, 8), (1, 1, 8, 4))]
    assert middle[:2] == ["convolution", "convolution"] and middle[2] == ("matmul" if avx512 else middle[2])
    many = _implementations("float32", (2, 72, 72, 8), (1, 1, 8, 4))
    strided = _implementations("float32", (2, 8, 8, 16), (1, 1, 16, 32), strides=(2, 2))
    wide = _implementations("float32", (2, 8, 8, 16), (3, 3, 16, 32), padding="SAME")
    assert all(name.startswith("convolution ") for name in many + strided + wide), (many, strided, wide)
    if "avx512bw" in onednn.cpu_flags():  # bfloat16 too, and the same product as XLA's in float32
        # oneDNN's bfloat16 matmul (brgemm) needs AVX512-BF16; plain AVX-512 gets its emulated
        # jit_bf16_1x1 convolution (an Intel Xeon @ 2.60GHz with AVX512-VNNI, 2026-12-02).
        kernels = _implementations("bfloat16", (2, 8, 8, 16), (1, 1, 16, 32))
        expected = ("matmul ",) if "avx512_bf16" in onednn.cpu_flags() else ("matmul ", "convolution ")
        assert all(name is not None and name.startswith(expected) for name in kernels), kernels
        rng = np.random.default_rng(2)
        x = jnp.asarray(rng.standard_normal((2, 8, 8, 16), np.float32), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((1, 1, 16, 32), np.float32) * 0.2, jnp.bfloat16)
        y = jax.jit(lambda x, w: _conv(onednn.conv_general_dilated, x, w, (1, 1), "VALID", (1, 1)))(x, w)
        expected = _conv(lax.conv_general_dilated, x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), "VALID",
                         (1, 1))
        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match=r"kind='sideways'; expected one of \('forward', 'backward_data'"):
        onednn.implementation("sideways", "float32", (2, 8, 8, 16), (1, 1, 16, 32), (2, 8, 8, 32),
                              ((1, 1), (0, 0), (0, 0), (1, 1), 1))
    program = ("from boneage_jax.kernels import onednn; assert onednn.load() is None; "
               "print(onednn.implementation('backward_weights', 'float32', (2, 8, 8, 16), (1, 1, 16, 32), "
               "(2, 8, 8, 32), ((1, 1), (0, 0), (0, 0), (1, 1), 1)))")
    off = subprocess.run([sys.executable, "-c", program], env={**os.environ, "BONEAGE_ONEDNN_MATMUL": "0"},
                         capture_output=True, text=True, timeout=120)
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip().startswith("convolution "), off.stdout


def test_what_oneDNN_does_not_take_goes_to_xla():
    x = jnp.ones((2, 8, 8, 4))
    batch_groups = lambda x, w: onednn.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", batch_group_count=2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    reference = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", batch_group_count=2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    w = jnp.ones((3, 3, 4, 4))
    assert not _uses_onednn(batch_groups, x, w)
    np.testing.assert_array_equal(jax.jit(batch_groups)(x, w), jax.jit(reference)(x, w))
    dilated_input = lambda x, w: onednn.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert not _uses_onednn(dilated_input, x, w)
    nchw = lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), "SAME")  # noqa: E731  (NCHW / OIHW)
    assert not _uses_onednn(nchw, jnp.ones((2, 4, 8, 8)), jnp.ones((5, 4, 3, 3)))
    mixed = lambda x, w: onednn.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert not _uses_onednn(mixed, x.astype(jnp.float16), jnp.ones((3, 3, 4, 4), jnp.float16))


def test_a_convolution_without_a_direct_kernel_goes_to_xla(monkeypatch):
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    conv = lambda x, w: onednn.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert _uses_onednn(conv, x, w)
    monkeypatch.setattr(onednn, "supported", lambda *args: False)
    for mode in ("auto", "onednn"):
        monkeypatch.setenv(onednn.ENV, mode)
        assert not _uses_onednn(conv, x, w)


def test_supported_asks_the_library():
    same = ((1, 1), (1, 1), (1, 1), (1, 1), 1)
    assert onednn.supported("float32", (4, 8, 8, 64), (3, 3, 64, 64), (4, 8, 8, 64), same)
    assert not onednn.supported("float32", (4, 8, 8, 63), (3, 3, 64, 64), (4, 8, 8, 64), same)  # channels
    assert not onednn.supported("float16", (4, 8, 8, 64), (3, 3, 64, 64), (4, 8, 8, 64), same)


def test_mode_from_the_environment(monkeypatch):
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    conv = lambda x, w: onednn.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    monkeypatch.setenv(onednn.ENV, "xla")
    assert not _uses_onednn(conv, x, w)
    monkeypatch.setenv(onednn.ENV, "onednn")
    assert _uses_onednn(conv, x, w)
    monkeypatch.setenv(onednn.ENV, "mkl")
    with pytest.raises(ValueError, match=r"BONEAGE_CPU_CONV='mkl'; expected one of \('auto', 'onednn', 'xla'\)"):
        jax.jit(lambda x, w: conv(x, w)).lower(x, w)


def test_missing_library_falls_back_in_auto_mode_and_fails_in_onednn_mode(monkeypatch, caplog):
    monkeypatch.setattr(onednn, "load", lambda: "the oneDNN convolution library is not built (test)")
    conv = lambda x, w: onednn.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    assert not _uses_onednn(conv, x, w)
    monkeypatch.setenv(onednn.ENV, "onednn")
    with pytest.raises(RuntimeError, match="BONEAGE_CPU_CONV=onednn but the oneDNN convolution library is not built"):
        jax.jit(conv).lower(x, w)


def test_mixed_bfloat16_computes_the_convolutions_in_bfloat16_and_the_rest_in_float32():
    """config.model.dtype="mixed_bfloat16": float32 layers, parameters and output; each
    convolution rounds its operands to bfloat16 (PyTorch's CPU autocast); grouped ones do not."""
    build = lambda dtype: fast_init(lambda: models.create_backbone(  # noqa: E731
        "resnet18_torch", in_channels=3, image_size=32, dtype=dtype, rngs=models.Rngs(0)))
    mixed, plain = build("mixed_bfloat16"), build("float32")
    mixed.eval(), plain.eval()  # stored BatchNorm statistics: a smooth function of the input
    convs = [m for _, m in nnx.iter_graph(mixed) if isinstance(m, nnx.Conv)]
    assert convs and all(c.conv_general_dilated is onednn.conv_general_dilated_in_bfloat16 for c in convs)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32))
    out, expected = (nnx.jit(lambda m, x: m(x))(model, x) for model in (mixed, plain))
    assert out.dtype == jnp.float32 and not np.array_equal(out, expected)
    np.testing.assert_allclose(out, expected, rtol=0.05, atol=0.05 * float(jnp.abs(expected).max()))
    text = jax.jit(lambda m, x: m(x)).lower(mixed, x).as_text()
    assert "bf16" in text
    w = jnp.ones((3, 3, 1, 4), jnp.float32)  # depthwise: kept in float32
    y = onednn.conv_general_dilated_in_bfloat16(jnp.ones((1, 8, 8, 4)), w, (1, 1), "SAME", feature_group_count=4,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert "bf16" not in jax.jit(lambda w: onednn.conv_general_dilated_in_bfloat16(
        jnp.ones((1, 8, 8, 4)), w, (1, 1), "SAME", feature_group_count=4,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(w).as_text() and y.dtype == jnp.float32


def test_models_built_by_the_registry_use_it_and_train_to_the_same_loss(monkeypatch):
    """The torchvision ResNet-18 layout (7x7/2 stem, 3x3 and strided 1x1 convolutions, BatchNorm)
    at 64 px, down to 2 x 2 feature maps (where oneDNN on AVX2 has only the GEMM fallback that
    crashed training steps: XLA's path there): the same loss and gradients through oneDNN as
    through XLA's convolutions at the same parameters, and three training steps with the same
    losses. (Parameters after several steps are not compared: BatchNorm over 16 values per
    channel makes them chaotic; a relative change of 1e-6 in the initial parameters moves them
    by 5e-3 after three steps of XLA's own path.)"""
    model = fast_init(lambda: models.create_backbone("resnet18_torch", in_channels=3, image_size=64,
                                                     rngs=models.Rngs(0)))
    convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
    assert convs and all(c.conv_general_dilated is onednn.conv_general_dilated for c in convs)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 64, 3), np.float32))
    target = jnp.arange(4, dtype=jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.05)  # Adam would magnify rounding

    def steps():
        """Loss and gradients at the model's parameters, and the losses of three SGD steps from there."""

        @jax.jit  # traced anew for each call (reads BONEAGE_CPU_CONV); compiled at the suite's level: it runs six steps
        def step(params, rest, opt_state):
            model = nnx.merge(graphdef, params, rest)
            loss, grads = nnx.value_and_grad(lambda m: ((m(x).mean(axis=1) - target) ** 2).mean())(model)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), nnx.split(model, nnx.Param, ...)[2], opt_state, loss, grads

        state = (params, rest, tx.init(params))
        *state, loss, grads = step(*state)
        losses = [float(loss)]
        for _ in range(2):
            *state, next_loss, _ = step(*state)
            losses.append(float(next_loss))
        return loss, jax.tree.leaves(grads), losses

    loss, grads, losses = steps()
    monkeypatch.setenv(onednn.ENV, "xla")
    loss_xla, grads_xla, losses_xla = steps()
    np.testing.assert_allclose(loss, loss_xla, rtol=1e-5)
    for a, b in zip(grads, grads_xla):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(b).max()))
    np.testing.assert_allclose(losses, losses_xla, rtol=1e-3)
