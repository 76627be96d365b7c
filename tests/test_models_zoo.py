"""The model zoo families: ConvMixer, GoogLeNet, CaffeNet, cnn_hamrouni, VGG19-attention, U-Net.

Per family: registration, parameter counts against the reference networks, a jitted training
step (forward + ``jax.grad``) at a small resolution, hand-computed checks of the first layers
against numpy / ``lax`` references fed the torch-layout weights, ``load_torch`` from a
``.safetensors`` state dict written here with the reference's exact names and shapes, and the
error naming the layer when an entry has the wrong shape or is missing. The papers' resolutions
run under ``-m slow``.

Models are built with ``fast_init``: kernels filled with numpy, everything else from the
networks' own initialisers in one compiled call. JAX's random initialisers compile once per
parameter shape (0.5-2 s each on the shared 2-core CPU, a minute for GoogLeNet); these tests only
need weights of the right shapes, or set their own. The U-Net is built from its own registry
(``models.SEGMENTATION_NETWORKS``), the others from ``models.BACKBONES``.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import FAST_COMPILE, fast_init, forward

from boneage_jax import models, weights
from boneage_jax.kernels import onednn
from boneage_jax.models import caffenet, convmixer, googlenet, layers, unet, vgg19_attention
from boneage_jax.weights import loaders

safetensors_numpy = pytest.importorskip("safetensors.numpy")

ZOO = (
    "convmixer",
    "convmixer_1536_20",
    "convmixer_768_32",
    "convmixer_1024_20_ks9_p14",
    "convmixer_256_8",
    "convmixer_128_4",
    "googlenet",
    "inception_v1",
    "caffenet",
    "cnn_hamrouni",
    "vgg19_attention",
    "unet",
)

def build(name: str, *, in_channels: int = 3, image_size: int = 32, **kwargs):
    return fast_init(
        lambda: models.registry_of(name).create(
            name, in_channels=in_channels, image_size=image_size, rngs=models.Rngs(params=0, dropout=1), **kwargs
        )
    )


def abstract(name: str, *, in_channels: int = 3, image_size: int = 224, **kwargs):
    return nnx.eval_shape(
        lambda: models.registry_of(name).create(
            name, in_channels=in_channels, image_size=image_size, rngs=models.Rngs(params=0, dropout=1), **kwargs
        )
    )


def output_shape(name: str, fn, input_shape, *, in_channels: int = 3, image_size: int = 224, **kwargs):
    """Shape/dtype of ``fn(model, zeros(input_shape))``, traced without running anything."""

    def run():
        model = models.registry_of(name).create(
            name, in_channels=in_channels, image_size=image_size, rngs=models.Rngs(params=0, dropout=1), **kwargs
        )
        model.eval()
        return fn(model, jnp.zeros(input_shape, jnp.float32))

    return jax.eval_shape(run)


def train_step(model, x: jnp.ndarray):
    """One jitted SGD step in train mode: returns (features, loss, grads); updates the model."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(params, rest, x):
        model = nnx.merge(graphdef, params, rest)

        def loss_fn(model):
            features = model(x)
            return (features.astype(jnp.float32) ** 2).mean(), features

        (loss, features), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        params = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
        rest = nnx.split(model, nnx.Param, ...)[2]  # updated batch statistics, RNG counts
        return features, loss, grads, params, rest

    features, loss, grads, params, rest = step(params, rest, x)
    nnx.update(model, params, rest)
    return features, loss, grads


def check_step(model, x: jnp.ndarray, num_features: int):
    features, loss, grads = train_step(model, x)
    assert features.shape == (x.shape[0], num_features)
    assert model.num_features == num_features
    assert np.isfinite(float(loss))
    leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]  # numpy: no per-shape compiles
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(np.abs(g).sum()) for g in leaves) > 0
    return features, grads


def save_and_import(model, tensors: dict[str, np.ndarray], tmp_path) -> None:
    """Writes ``tensors`` as .safetensors and imports it the way the weights CLI does."""
    path = str(tmp_path / "weights.safetensors")
    safetensors_numpy.save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, path)
    weights.import_weights(model, path, "torch")


def bn_tensors(prefix: str, channels: int, rng) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.weight": rng.uniform(0.5, 1.5, channels),
        f"{prefix}.bias": rng.normal(0, 0.1, channels),
        f"{prefix}.running_mean": rng.normal(0, 0.1, channels),
        f"{prefix}.running_var": rng.uniform(0.5, 1.5, channels),
        f"{prefix}.num_batches_tracked": np.array(7.0),
    }


# ----------------------------------------------------------------------------- numpy / lax references


def torch_conv(x_nchw, weight, bias=None, stride=1, pad=0, groups=1):
    """torch ``F.conv2d`` semantics (NCHW, OIHW) through ``lax`` (the reference, not our code)."""
    y = jax.lax.conv_general_dilated(
        jnp.asarray(x_nchw, jnp.float32),
        jnp.asarray(weight, jnp.float32),
        (stride, stride),
        [(pad, pad), (pad, pad)],
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32)[None, :, None, None]
    return np.asarray(y)


def torch_bn_eval(x_nchw, t: dict, prefix: str, eps: float):
    scale = t[f"{prefix}.weight"] / np.sqrt(t[f"{prefix}.running_var"] + eps)
    shift = t[f"{prefix}.bias"] - t[f"{prefix}.running_mean"] * scale
    return x_nchw * scale[None, :, None, None] + shift[None, :, None, None]


def numpy_conv_nchw(x, w, b, stride):
    """Direct loops: x (N, C, H, W), w (O, C, k, k), no padding."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w) + b
    return out


def numpy_max_pool_ceil(x, k, s, pad=0):
    """torch/Caffe ceil-mode max pooling (NCHW) by brute force."""
    n, c, h, w = x.shape

    def out_size(size):
        o = math.ceil((size + 2 * pad - k) / s) + 1
        if (o - 1) * s >= size + pad:
            o -= 1
        return o

    ho, wo = out_size(h), out_size(w)
    out = np.full((n, c, ho, wo), -np.inf)
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * s - pad, j * s - pad
            rows = slice(max(r0, 0), min(r0 + k, h))
            cols = slice(max(c0, 0), min(c0 + k, w))
            out[:, :, i, j] = x[:, :, rows, cols].max(axis=(2, 3))
    return out


def numpy_lrn(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
    """Caffe LRN ACROSS_CHANNELS, written from the formula with explicit channel loops (NCHW)."""
    c = x.shape[1]
    half = (size - 1) // 2
    out = np.empty_like(x)
    for i in range(c):
        lo, hi = max(0, i - half), min(c, i + half + 1)
        scale = k + alpha / size * (x[:, lo:hi] ** 2).sum(axis=1)
        out[:, i] = x[:, i] / scale**beta
    return out


def flax_kernel(weight):
    """torch conv weight (out, in, kh, kw) -> flax kernel (kh, kw, in, out), float32."""
    return np.asarray(weight).transpose(2, 3, 1, 0).astype(np.float32)


def summed_stem(weight):
    """The 1-channel stem kernel a torch RGB conv weight becomes: summed over input channels."""
    return np.asarray(weight).sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)


def nhwc(x):
    return np.transpose(np.asarray(x, np.float64), (0, 2, 3, 1))


def nchw(x):
    return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


# ----------------------------------------------------------------------------- registry and counts


def test_registered():
    names = models.available()
    for name in ZOO:
        assert models.registry_of(name).resolve(name) in names
    assert models.BACKBONES.aliases["inception_v1"] == "googlenet"
    assert models.SEGMENTATION_NETWORKS.resolve("unet") == "unet"


@pytest.mark.parametrize("name", ["convmixer", "googlenet", "caffenet", "cnn_hamrouni", "vgg19_attention", "unet"])
def test_graphdef_is_hashable(name):
    """Static module attributes must be hashable: jit caches on the GraphDef (e.g. as a static arg)."""
    graphdef, _ = nnx.split(abstract(name, image_size=96))
    hash(graphdef)


def test_parameter_counts_against_references():
    # torchvision googlenet (aux_logits=False, as shipped pretrained): 6,624,904 with fc(1024 -> 1000).
    g = abstract("googlenet")
    assert layers.count_params(g) + 1024 * 1000 + 1000 == 6_624_904
    assert layers.count_params(g) == 5_599_904
    # BVLC CaffeNet: 60,965,224 with fc8 (4096 -> 1000); pool5 is 6x6 at 227 (and at 224).
    c = abstract("caffenet", image_size=227)
    assert layers.count_params(c) + 4096 * 1000 + 1000 == 60_965_224
    assert c.pool5_side == 6 and caffenet.pool5_size(224) == 6 and caffenet.pool5_size(512) == 15
    # ConvMixer paper, Table 1 (1000-class head): 1536/20 51.6M, 768/32 21.1M.
    m = abstract("convmixer_1536_20")
    assert layers.count_params(m) + 1536 * 1000 + 1000 == 51_625_960
    m = abstract("convmixer_768_32")
    assert m.activation == "relu"
    assert layers.count_params(m) + 768 * 1000 + 1000 == 21_110_248
    # Keras VGG19 notop: 20,024,384; the attention head on a 12x12 map (384 px) adds 562,656.
    a = abstract("vgg19_attention", image_size=384)
    assert layers.count_params(a.vgg) == 20_024_384
    head = 1024 + (512 * 64 + 64) + (64 * 16 + 16) + (144 * 16 + 144) + (512 * 1024 + 1024)
    assert layers.count_params(a) == 20_024_384 + head == 20_587_040
    # zhixuhao/unet (Keras, 1 input channel): 31,031,685, ending in Conv(2, 3x3) + Conv(1, 1x1);
    # ours ends in a single Conv(1, 1x1).
    u = abstract("unet", in_channels=1)
    assert layers.count_params(u) == 31_031_685 - (64 * 9 * 2 + 2) - (2 + 1) + (64 + 1) == 31_030_593
    # cnn_hamrouni (1 channel): 3x3 convs without bias + BN scale/offset per block.
    h = abstract("cnn_hamrouni", in_channels=1)
    widths = (1, 32, 64, 128, 128)
    assert layers.count_params(h) == sum(9 * a * b + 2 * b for a, b in zip(widths, widths[1:])) == 240_608


def test_convmixer_depthwise_impl_choice(monkeypatch):
    monkeypatch.setenv(onednn.ENV, "xla")  # XLA's CPU convolutions: "shift" unless memory forbids
    assert convmixer.depthwise_impl_for("auto", "cpu") == "shift"
    assert convmixer.depthwise_impl_for("auto", "cpu", dim=256, depth=8) == "shift"
    assert convmixer.depthwise_impl_for("auto", "cpu", dim=768, depth=32) == "grouped"  # memory
    assert convmixer.depthwise_impl_for("auto", "gpu") == "grouped"
    assert convmixer.depthwise_impl_for("shift", "gpu") == "shift"
    assert convmixer.depthwise_impl_for("grouped", "cpu") == "grouped"
    with pytest.raises(ValueError, match="depthwise_impl"):
        convmixer.depthwise_impl_for("fft")
    m = abstract("convmixer", kernel_size=9, depthwise_impl="grouped")
    assert m.blocks[0].depthwise.impl == "grouped"


def test_convmixer_generic_kwargs_and_single_channel():
    m = abstract("convmixer", in_channels=1, dim=48, depth=3, kernel_size=5, patch_size=4)
    assert (m.dim, m.depth, m.kernel_size, m.patch_size, m.num_features) == (48, 3, 5, 4, 48)
    assert m.stem.kernel.get_value().shape == (4, 4, 1, 48)
    assert m.blocks[0].depthwise.kernel.get_value().shape == (5, 5, 1, 48)
    assert len(m.blocks) == 3
    with pytest.raises(ValueError, match="activation"):
        abstract("convmixer", activation="swish")


def test_googlenet_shapes_at_224():
    g = abstract("googlenet")
    out = output_shape("googlenet", lambda m, x: m.feature_map(x), (1, 224, 224, 3))
    assert out.shape == (1, 7, 7, 1024)  # torchvision: N x 1024 x 7 x 7
    assert g.inception3a.branch3.conv.kernel.get_value().shape == (3, 3, 16, 32)  # torchvision's "5x5"
    paper = abstract("googlenet", branch3_kernel=5)
    assert paper.inception3a.branch3.conv.kernel.get_value().shape == (5, 5, 16, 32)


@pytest.mark.parametrize("size", [5, 6, 7, 8, 14, 27, 55, 56, 112, 113])
@pytest.mark.parametrize("kernel, stride, pad", [(3, 2, 0), (2, 2, 0), (3, 1, 1)])
def test_ceil_mode_pool_sizes(size, kernel, stride, pad):
    """torch's ceil_mode output size formula, and our pooling matches brute force."""
    before, after = googlenet.ceil_pads(size, kernel, stride, pad)
    expected = math.ceil((size + 2 * pad - kernel) / stride) + 1
    if (expected - 1) * stride >= size + pad:
        expected -= 1
    assert (size + before + after - kernel) // stride + 1 == expected


def test_max_pool_ceil_values():
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 7))
    for k, s, p in [(3, 2, 0), (2, 2, 0), (3, 1, 1)]:
        ours = googlenet.max_pool_ceil(jnp.asarray(nhwc(x), jnp.float32), k, s, p)
        np.testing.assert_allclose(nchw(ours), numpy_max_pool_ceil(x, k, s, p), rtol=1e-6)


# ----------------------------------------------------------------------------- training steps


@pytest.mark.parametrize(
    "name, kwargs, in_channels, size, num_features",
    [
        ("convmixer", dict(dim=16, depth=2, kernel_size=3, patch_size=4, depthwise_impl="shift"), 3, 32, 16),
        # k=9 through the grouped path: the shifted one takes ~40 s to compile its gradient here
        (
            "convmixer",
            dict(dim=16, depth=1, kernel_size=9, patch_size=7, activation="relu", depthwise_impl="grouped"),
            1,
            32,
            16,
        ),
        ("googlenet", {}, 3, 32, 1024),
        ("caffenet", {}, 1, 67, 4096),
        ("cnn_hamrouni", {}, 1, 32, 128),
        ("vgg19_attention", {}, 3, 64, 1024),
        ("unet", dict(base_filters=4, depth=2), 1, 20, 4),
    ],
)
def test_training_step(name, kwargs, in_channels, size, num_features):
    model = build(name, in_channels=in_channels, image_size=size, **kwargs)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, in_channels)), jnp.float32)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    check_step(model, x, num_features)
    after = nnx.state(model, nnx.Param)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), before, after)
    assert any(jax.tree_util.tree_leaves(changed))


def test_bfloat16_compute_keeps_float32_params():
    model = build("cnn_hamrouni", in_channels=1, dtype="bfloat16", filters=(4, 8))
    model.eval()
    y = forward(model, jnp.ones((1, 16, 16, 1)))
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 8)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------- ConvMixer


def convmixer_state_dict(dim, depth, kernel, patch, in_channels=3, classes=10, seed=0, layout="sequential"):
    """The reference's nn.Sequential names and shapes (or timm's), with random values."""
    rng = np.random.default_rng(seed)
    t = {}
    stem, stem_bn = ("stem.0", "stem.2") if layout == "timm" else ("0", "2")
    t[f"{stem}.weight"] = rng.normal(0, 0.2, (dim, in_channels, patch, patch))
    t[f"{stem}.bias"] = rng.normal(0, 0.1, dim)
    t.update(bn_tensors(stem_bn, dim, rng))
    for i in range(depth):
        b = f"blocks.{i}" if layout == "timm" else str(3 + i)
        t[f"{b}.0.fn.0.weight"] = rng.normal(0, 0.2, (dim, 1, kernel, kernel))
        t[f"{b}.0.fn.0.bias"] = rng.normal(0, 0.1, dim)
        t.update(bn_tensors(f"{b}.0.fn.2", dim, rng))
        t[f"{b}.1.weight"] = rng.normal(0, 0.3, (dim, dim, 1, 1))
        t[f"{b}.1.bias"] = rng.normal(0, 0.1, dim)
        t.update(bn_tensors(f"{b}.3", dim, rng))
    head = "head" if layout == "timm" else str(5 + depth)
    t[f"{head}.weight"] = rng.normal(0, 0.1, (classes, dim))
    t[f"{head}.bias"] = np.zeros(classes)
    return t


def convmixer_reference(x_nchw, t, depth, kernel, act):
    """The reference forward pass (NCHW, torch weights) in lax/numpy, eval-mode BatchNorm."""
    x = act(torch_conv(x_nchw, t["0.weight"], t["0.bias"], stride=t["0.weight"].shape[-1]))
    x = torch_bn_eval(x, t, "2", 1e-5)
    dim = x.shape[1]
    for i in range(depth):
        b = str(3 + i)
        pad = kernel // 2
        y = act(torch_conv(x, t[f"{b}.0.fn.0.weight"], t[f"{b}.0.fn.0.bias"], pad=pad, groups=dim))
        x = x + torch_bn_eval(y, t, f"{b}.0.fn.2", 1e-5)
        x = torch_bn_eval(act(torch_conv(x, t[f"{b}.1.weight"], t[f"{b}.1.bias"])), t, f"{b}.3", 1e-5)
    return x.mean(axis=(2, 3))


def exact_gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


@pytest.mark.parametrize("impl", ["shift", "grouped"])
def test_convmixer_load_torch_matches_reference(tmp_path, impl):
    dim, depth, kernel, patch = 8, 2, 9, 7
    t = convmixer_state_dict(dim, depth, kernel, patch)
    model = build("convmixer", dim=dim, depth=depth, kernel_size=kernel, patch_size=patch, depthwise_impl=impl)
    save_and_import(model, t, tmp_path)
    np.testing.assert_array_equal(model.stem.kernel.get_value(), flax_kernel(t["0.weight"]))
    np.testing.assert_array_equal(
        model.blocks[1].depthwise.kernel.get_value(), flax_kernel(t["4.0.fn.0.weight"])
    )
    np.testing.assert_array_equal(model.blocks[1].pointwise_bn.var.get_value(), t["4.3.running_var"].astype(np.float32))
    x = np.random.default_rng(1).normal(size=(2, 3, 30, 30))  # 30 px: a 4x4 grid of 7x7 patches, 2 px dropped
    model.eval()
    ours = forward(model, jnp.asarray(nhwc(x), jnp.float32))
    ref = convmixer_reference(x, t, depth, kernel, exact_gelu)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-4, atol=2e-4)


def test_convmixer_patch_embedding_vs_lax():
    model = build("convmixer", dim=6, depth=1, kernel_size=3, patch_size=5, in_channels=1)
    x = np.random.default_rng(2).normal(size=(1, 1, 23, 23))
    ours = nnx.jit(lambda m, x: m.stem(x))(model, jnp.asarray(nhwc(x), jnp.float32))
    weight = np.asarray(model.stem.kernel.get_value()).transpose(3, 2, 0, 1)  # back to OIHW
    ref = torch_conv(x, weight, model.stem.bias.get_value(), stride=5)
    assert ours.shape == (1, 4, 4, 6)
    np.testing.assert_allclose(nchw(ours), ref, rtol=1e-5, atol=1e-5)


def test_convmixer_timm_layout_and_single_channel_stem(tmp_path):
    t = convmixer_state_dict(8, 1, 3, 4, layout="timm")
    model = build("convmixer", dim=8, depth=1, kernel_size=3, patch_size=4, in_channels=1)
    save_and_import(model, t, tmp_path)
    np.testing.assert_allclose(
        model.stem.kernel.get_value(), summed_stem(t["stem.0.weight"]), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_array_equal(model.blocks[0].pointwise.bias.get_value(), t["blocks.0.1.bias"].astype(np.float32))


def test_convmixer_wrong_and_missing_entries(tmp_path):
    model = build("convmixer", dim=8, depth=2, kernel_size=3, patch_size=4)
    t = convmixer_state_dict(8, 2, 3, 4)
    bad = dict(t, **{"4.0.fn.0.weight": np.zeros((8, 1, 5, 5))})
    with pytest.raises(loaders.WeightMismatchError, match=r"4\.0\.fn\.0\.weight"):
        save_and_import(model, bad, tmp_path)
    missing = {k: v for k, v in t.items() if k != "3.3.running_mean"}
    with pytest.raises(loaders.WeightMismatchError, match=r"3\.3\.running_mean"):
        model.load_torch(missing)
    deeper = convmixer_state_dict(8, 3, 3, 4)  # a file with one block too many
    with pytest.raises(loaders.WeightMismatchError, match=r"^layer 5\.0\.fn\.0"):
        model.load_torch(deeper)


def test_convmixer_weights_cli(tmp_path):
    """python -m boneage_jax.weights --from torch --model convmixer ... and back."""
    t = convmixer_state_dict(256, 8, 9, 7, classes=1000)
    src = str(tmp_path / "convmixer.safetensors")
    safetensors_numpy.save_file({k: np.asarray(v, np.float32) for k, v in t.items()}, src)
    out = str(tmp_path / "pretrained")
    assert weights.main(["--from", "torch", "--model", "convmixer", "--in", src, "--out", out]) == 0
    fresh = build("convmixer", dim=256, depth=8, kernel_size=9, patch_size=7)
    weights.load_pretrained(fresh, out)
    np.testing.assert_array_equal(fresh.blocks[7].pointwise.kernel.get_value(), flax_kernel(t["10.1.weight"]))


# ----------------------------------------------------------------------------- GoogLeNet


def googlenet_state_dict(in_channels=3, seed=0, aux=True):
    """torchvision googlenet names and shapes (BasicConv2d: conv without bias + bn)."""
    rng = np.random.default_rng(seed)
    t = {}

    def basic(prefix, cin, cout, k):
        t[f"{prefix}.conv.weight"] = rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k))
        t.update(bn_tensors(f"{prefix}.bn", cout, rng))

    basic("conv1", in_channels, 64, 7)
    basic("conv2", 64, 64, 1)
    basic("conv3", 64, 192, 3)
    for name, (cin, c1, c3r, c3, c5r, c5, pp) in googlenet.INCEPTIONS.items():
        basic(f"{name}.branch1", cin, c1, 1)
        basic(f"{name}.branch2.0", cin, c3r, 1)
        basic(f"{name}.branch2.1", c3r, c3, 3)
        basic(f"{name}.branch3.0", cin, c5r, 1)
        basic(f"{name}.branch3.1", c5r, c5, 3)
        basic(f"{name}.branch4.1", cin, pp, 1)
    if aux:
        for name, cin in (("aux1", 512), ("aux2", 528)):
            basic(f"{name}.conv", cin, 128, 1)
            t[f"{name}.fc1.weight"] = rng.normal(0, 0.01, (1024, 2048))
            t[f"{name}.fc1.bias"] = np.zeros(1024)
            t[f"{name}.fc2.weight"] = rng.normal(0, 0.01, (1000, 1024))
            t[f"{name}.fc2.bias"] = np.zeros(1000)
    t["fc.weight"] = rng.normal(0, 0.01, (1000, 1024))
    t["fc.bias"] = np.zeros(1000)
    return t


def test_googlenet_load_torch_and_first_layers(tmp_path):
    t = googlenet_state_dict()
    trainable = [v.size for k, v in t.items() if not re.search(r"running_|num_batches|^aux", k)]
    assert sum(trainable) == 6_624_904  # torchvision's documented googlenet count
    model = build("googlenet")
    save_and_import(model, t, tmp_path)
    np.testing.assert_array_equal(
        model.inception4e.branch4.conv.kernel.get_value(), flax_kernel(t["inception4e.branch4.1.conv.weight"])
    )
    running_mean = t["inception5b.branch3.0.bn.running_mean"].astype(np.float32)
    np.testing.assert_array_equal(model.inception5b.branch3_reduce.bn.mean.get_value(), running_mean)
    # conv1 (7x7/2 pad 3, BN eps 1e-3, ReLU) + maxpool1 (3/2, ceil) against the lax reference.
    model.eval()
    x = np.random.default_rng(3).normal(size=(1, 3, 31, 31))
    ours = nnx.jit(lambda m, x: googlenet.max_pool_ceil(m.conv1(x), 3, 2))(model, jnp.asarray(nhwc(x), jnp.float32))
    ref = np.maximum(torch_bn_eval(torch_conv(x, t["conv1.conv.weight"], stride=2, pad=3), t, "conv1.bn", 1e-3), 0)
    ref = numpy_max_pool_ceil(ref, 3, 2)
    assert ours.shape == (1, 8, 8, 64)  # conv1 16x16 -> ceil(13 / 2) + 1 = 8 (floor mode: 7)
    np.testing.assert_allclose(nchw(ours), ref, rtol=1e-4, atol=1e-4)


def test_googlenet_inception_block_matches_reference(tmp_path):
    t = googlenet_state_dict(aux=False)
    model = build("googlenet")
    model.load_torch(t)
    model.eval()
    x = np.random.default_rng(4).normal(size=(1, 192, 5, 5))
    ours = nnx.jit(lambda m, x: m.inception3a(x))(model, jnp.asarray(nhwc(x), jnp.float32))

    def basic(v, prefix, pad=0):
        return np.maximum(torch_bn_eval(torch_conv(v, t[f"{prefix}.conv.weight"], pad=pad), t, f"{prefix}.bn", 1e-3), 0)

    p = "inception3a"
    ref = np.concatenate(
        [
            basic(x, f"{p}.branch1"),
            basic(basic(x, f"{p}.branch2.0"), f"{p}.branch2.1", pad=1),
            basic(basic(x, f"{p}.branch3.0"), f"{p}.branch3.1", pad=1),
            basic(numpy_max_pool_ceil(x, 3, 1, 1), f"{p}.branch4.1"),
        ],
        axis=1,
    )
    assert ours.shape == (1, 5, 5, 256)
    np.testing.assert_allclose(nchw(ours), ref, rtol=1e-4, atol=1e-4)


def test_googlenet_transform_input():
    x = np.random.default_rng(11).normal(size=(1, 2, 2, 3))
    ours = np.asarray(googlenet.torchvision_transform_input(jnp.asarray(x, jnp.float32)))
    for c, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        np.testing.assert_allclose(ours[..., c], x[..., c] * (std / 0.5) + (mean - 0.5) / 0.5, rtol=1e-5, atol=1e-6)
    assert abstract("googlenet", transform_input=True).transform_input
    with pytest.raises(ValueError, match="transform_input"):
        abstract("googlenet", in_channels=1, transform_input=True)


def test_googlenet_weight_errors_and_single_channel():
    t = googlenet_state_dict(aux=False)
    model = build("googlenet", in_channels=1)
    model.load_torch(t)
    np.testing.assert_allclose(
        model.conv1.conv.kernel.get_value(), summed_stem(t["conv1.conv.weight"]), rtol=1e-5, atol=1e-7
    )
    bad = dict(t, **{"inception4c.branch3.1.conv.weight": np.zeros((64, 24, 5, 5))})  # the paper's 5x5
    with pytest.raises(loaders.WeightMismatchError, match=r"inception4c\.branch3\.1\.conv\.weight"):
        model.load_torch(bad)
    extra = dict(t, **{"inception6a.branch1.conv.weight": np.zeros((8, 8, 1, 1))})
    with pytest.raises(loaders.WeightMismatchError, match="inception6a"):
        model.load_torch(extra)


# ----------------------------------------------------------------------------- CaffeNet


def caffenet_state_dict(in_channels=3, side=6, seed=0):
    """Caffe layer names, torch layouts: conv (out, in/groups, k, k), fc (out, in) with (C, H, W) inputs."""
    rng = np.random.default_rng(seed)
    t, cin = {}, in_channels
    for name, (cout, k, _, _, groups) in caffenet.CONVS.items():
        t[f"{name}.weight"] = rng.normal(0, np.sqrt(2 / (cin // groups * k * k)), (cout, cin // groups, k, k))
        t[f"{name}.bias"] = rng.normal(0, 0.1, cout)
        cin = cout
    for name, (fin, fout) in {"fc6": (256 * side * side, 4096), "fc7": (4096, 4096), "fc8": (4096, 1000)}.items():
        t[f"{name}.weight"] = rng.normal(0, np.sqrt(1 / fin), (fout, fin)).astype(np.float32)
        t[f"{name}.bias"] = rng.normal(0, 0.1, fout)
    return t


def test_caffenet_lrn_formula():
    x = np.random.default_rng(5).normal(0, 30, size=(2, 7, 3, 4))  # big values so LRN matters
    ours = caffenet.lrn(jnp.asarray(nhwc(x), jnp.float32))
    np.testing.assert_allclose(nchw(ours), numpy_lrn(x), rtol=1e-5)
    assert not np.allclose(numpy_lrn(x), x, rtol=1e-3)


def test_caffenet_first_layers_against_numpy(tmp_path):
    """conv1 + ReLU + pool1 (ceil) + LRN, then conv2 (group 2, pad 2) against direct numpy loops."""
    t = caffenet_state_dict(side=caffenet.pool5_size(67))  # 67 px: a small fc6 keeps the file small
    model = build("caffenet", image_size=67)
    save_and_import(model, t, tmp_path)
    x = np.random.default_rng(6).uniform(0, 255, size=(1, 3, 39, 39))  # conv1 8x8 -> pool1 4x4 (ceil)

    def first(m, x):
        y = caffenet.lrn(googlenet.max_pool_ceil(nnx.relu(m.conv1(x)), 3, 2))
        return y, m.conv2(y)

    norm1, conv2 = nnx.jit(first)(model, jnp.asarray(nhwc(x), jnp.float32))
    ref = numpy_conv_nchw(x, t["conv1.weight"], t["conv1.bias"], 4)
    assert ref.shape[2:] == (8, 8)
    ref = numpy_lrn(numpy_max_pool_ceil(np.maximum(ref, 0), 3, 2))
    assert norm1.shape == (1, 4, 4, 96)
    np.testing.assert_allclose(nchw(norm1), ref, rtol=1e-4, atol=1e-3)
    # grouped conv2: output channels 0-127 see input channels 0-47, 128-255 see 48-95.
    padded = np.pad(ref, ((0, 0), (0, 0), (2, 2), (2, 2)))
    w, b = t["conv2.weight"], t["conv2.bias"]
    ref2 = np.concatenate(
        [
            numpy_conv_nchw(padded[:, :48], w[:128], b[:128], 1),
            numpy_conv_nchw(padded[:, 48:], w[128:], b[128:], 1),
        ],
        axis=1,
    )
    np.testing.assert_allclose(nchw(conv2), ref2, rtol=1e-3, atol=1e-2)


def test_caffenet_fc6_reads_caffe_flattening():
    side = caffenet.pool5_size(67)
    t = caffenet_state_dict(in_channels=1, side=side)
    model = build("caffenet", in_channels=1, image_size=67)
    model.load_torch(t)
    np.testing.assert_allclose(
        model.conv1.kernel.get_value(), summed_stem(t["conv1.weight"]), rtol=1e-5, atol=1e-7
    )
    pool5 = np.random.default_rng(7).normal(size=(2, 256, side, side))
    ours = nnx.jit(lambda m, p: m.fc6(p.reshape(p.shape[0], -1)))(model, jnp.asarray(nhwc(pool5), jnp.float32))
    ref = pool5.reshape(2, -1) @ t["fc6.weight"].T + t["fc6.bias"]  # Caffe: (C, H, W) flattening
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4)


def test_caffenet_weight_errors():
    model = build("caffenet", image_size=67)
    t = caffenet_state_dict(side=caffenet.pool5_size(227))  # fc6 for 227 px: 9216 inputs
    with pytest.raises(loaders.WeightMismatchError, match=r"fc6\.weight.*\(4096, 256\).*\(4096, 9216\)"):
        model.load_torch(t)
    t = caffenet_state_dict(side=caffenet.pool5_size(67))
    t["conv4.weight"] = np.zeros((384, 384, 3, 3))  # without the group split
    with pytest.raises(loaders.WeightMismatchError, match=r"conv4\.weight"):
        model.load_torch(t)
    with pytest.raises(ValueError, match="too small"):
        abstract("caffenet", image_size=48)


# ----------------------------------------------------------------------------- VGG19 attention


def test_vgg19_attention_map_and_rescale_gap():
    model = abstract("vgg19_attention", image_size=384)
    assert model.map_side == 12
    out = output_shape("vgg19_attention", lambda m, x: m.attention_map(x), (2, 384, 384, 3), image_size=384)
    assert out.shape == (2, 12, 12)
    assert model.attn_map.kernel.get_value().shape == (144, 16, 1)
    assert vgg19_attention.feature_map_side(500) == 15 and vgg19_attention.feature_map_side(512) == 16
    # RescaleGAP = GAP(features * map) / GAP(map), the map broadcast to all channels.
    rng = np.random.default_rng(8)
    features = rng.normal(size=(2, 3, 3, 5))
    amap = rng.uniform(0.05, 1, size=(2, 3, 3, 1))
    broadcast = np.broadcast_to(amap, features.shape)
    ours = vgg19_attention.rescale_gap(jnp.asarray(features, jnp.float32), jnp.asarray(broadcast, jnp.float32))
    ref = (features * broadcast).mean(axis=(1, 2)) / broadcast.mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5)


def test_vgg19_attention_forward_pieces_and_fixed_ones():
    model = build("vgg19_attention", image_size=64)  # 2x2 map
    model.eval()
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 64, 64, 3)), jnp.float32)

    def pieces(m, x):
        features, attention = m._attend(x)  # pylint: disable=protected-access
        return features, attention, m.attention_map(x), m(x)

    features, attention, amap, out = nnx.jit(pieces)(model, x)
    assert amap.shape == (2, 2, 2) and np.all((np.asarray(amap) > 0) & (np.asarray(amap) < 1))
    np.testing.assert_allclose(np.asarray(amap), np.asarray(attention)[..., 0], rtol=1e-6)
    # eval mode: the features are relu(Dense(RescaleGAP(bn_features, map broadcast by the ones conv)))
    f, a = np.asarray(features, np.float64), np.asarray(attention, np.float64)
    gap = (f * a).mean(axis=(1, 2)) / a.mean(axis=(1, 2))
    dense = np.maximum(gap @ np.asarray(model.dense.kernel.get_value()) + np.asarray(model.dense.bias.get_value()), 0)
    np.testing.assert_allclose(np.asarray(out), dense, rtol=1e-4, atol=1e-5)
    # the ones 1x1 conv is a fixed weight: in the model state, not a parameter
    assert isinstance(model.fan_out, vgg19_attention.FixedWeight) and not isinstance(model.fan_out, nnx.Param)
    np.testing.assert_array_equal(model.fan_out.get_value(), np.ones((1, 1, 1, 512)))
    assert "fan_out" not in nnx.state(model, nnx.Param)


def test_vgg19_attention_load_torch_fills_vgg19(tmp_path):
    rng = np.random.default_rng(10)
    t, index, cin = {}, 0, 1
    for count, width in zip((2, 2, 4, 4, 4), (64, 128, 256, 512, 512)):
        for _ in range(count):  # torchvision vgg19: features.{index}, ReLU and MaxPool take slots
            t[f"features.{index}.weight"] = rng.normal(0, 0.01, (width, 3 if index == 0 else cin, 3, 3))
            t[f"features.{index}.bias"] = rng.normal(0, 0.01, width)
            index, cin = index + 2, width
        index += 1
    t["classifier.0.weight"] = np.zeros((4096, 25088))
    model = build("vgg19_attention", in_channels=1, image_size=64)
    save_and_import(model, t, tmp_path)
    np.testing.assert_allclose(
        model.vgg.block1_conv1.kernel.get_value(), summed_stem(t["features.0.weight"]), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_array_equal(model.vgg.block5_conv4.bias.get_value(), t["features.34.bias"].astype(np.float32))
    t["features.34.weight"] = np.zeros((512, 512, 1, 1))
    with pytest.raises(loaders.WeightMismatchError, match=r"features\.34\.weight"):
        model.load_torch(t)


# ----------------------------------------------------------------------------- U-Net (more in test_unet.py)


def test_unet_shapes_any_size():
    for h, w in [(64, 64), (50, 37)]:
        logits = output_shape("unet", lambda m, x: m.segment(x), (2, h, w, 1), in_channels=1, base_filters=8)
        assert logits.shape == (2, h, w, 1) and logits.dtype == jnp.float32
        pooled = output_shape("unet", lambda m, x: m(x), (2, h, w, 1), in_channels=1, base_filters=8)
        assert pooled.shape == (2, 8)
    model = abstract("unet", in_channels=1, base_filters=8)
    assert isinstance(model, unet.UNet) and model.num_features == 8


# ----------------------------------------------------------------------------- papers' resolutions


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, kwargs, in_channels, size",
    [
        ("googlenet", {}, 3, 224),
        ("googlenet", {}, 1, 512),
        ("caffenet", {}, 3, 227),
        ("caffenet", {}, 1, 500),
        ("cnn_hamrouni", {}, 1, 500),
        ("vgg19_attention", {}, 3, 384),
        ("vgg19_attention", {}, 1, 512),
        ("convmixer_768_32", {}, 1, 256),
        ("convmixer_1536_20", {"depthwise_impl": "grouped"}, 1, 384),
        ("unet", {}, 1, 256),
        ("unet", {}, 1, 512),
    ],
)
def test_papers_resolutions(request, name, kwargs, in_channels, size):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the papers' resolutions take minutes on CPU: run with -m slow")
    model = build(name, in_channels=in_channels, image_size=size, **kwargs)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, size, size, in_channels)), jnp.float32)
    check_step(model, x, model.num_features)
    model.eval()
    features = forward(model, x)
    assert features.shape == (1, model.num_features) and np.all(np.isfinite(np.asarray(features)))
    if name == "unet":
        logits = nnx.jit(lambda m, x: m.segment(x))(model, x)
        assert logits.shape == (1, size, size, 1)
    if name == "vgg19_attention":
        amap = nnx.jit(lambda m, x: m.attention_map(x))(model, x)
        assert amap.shape == (1, size // 32, size // 32)
