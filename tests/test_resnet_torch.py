"""torchvision-layout ResNets: state-dict names, shapes, counts, import and forward semantics.

torch may be absent, so the tests build torchvision's state dicts themselves from the layout of
``torchvision/models/resnet.py`` (names and shapes below), save them as ``.safetensors`` and
import them. The forward pass is checked against an independent NCHW reference written with
``jax.lax`` directly on the torch tensors (OIHW kernels, symmetric torch padding, -inf max-pool
padding), and the stem against a plain numpy computation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from helpers import FAST_COMPILE, fast_init, forward, grad_step

from boneage_jax import models, state, weights
from boneage_jax.models import layers
from boneage_jax.weights import loaders

# torchvision: block type and blocks per stage; parameter counts with the 1000-class fc.
TORCHVISION = {
    18: ("basic", (2, 2, 2, 2), 11_689_512),
    34: ("basic", (3, 4, 6, 3), 21_797_672),
    50: ("bottleneck", (3, 4, 6, 3), 25_557_032),
    101: ("bottleneck", (3, 4, 23, 3), 44_549_160),
    152: ("bottleneck", (3, 8, 36, 3), 60_192_808),
}
NAMES = {depth: f"resnet{depth}_torch" for depth in (18, 34, 50, 101, 152)}


@pytest.fixture(autouse=True)
def slow_only_when_selected(request):
    """``@pytest.mark.slow`` tests run only when ``-m`` names ``slow`` (``make test-slow``), even
    when this file is run without ``-m "not slow"``."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: run with -m slow")


def torchvision_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """The state dict of ``torchvision.models.resnet{depth}()``: name -> shape, in order."""
    kind, stages, _ = TORCHVISION[depth]
    expansion = 1 if kind == "basic" else 4
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix, c):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{suffix}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, (blocks, planes) in enumerate(zip(stages, (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{i}.{b}"
            stride = 2 if (i > 1 and b == 0) else 1
            if kind == "basic":
                shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
            else:
                shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                bn(f"{p}.bn3", planes * 4)
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                shapes[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    shapes["fc.weight"] = (1000, 512 * expansion)
    shapes["fc.bias"] = (1000,)
    return shapes


def is_parameter(name: str) -> bool:
    return not name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def random_state_dict(depth: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in torchvision_shapes(depth).items():
        if name.endswith("num_batches_tracked"):
            out[name] = np.array(7, np.int64)
        elif name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif len(shape) == 4:  # He init keeps activations O(1) through the depth
            fan_in = shape[1] * shape[2] * shape[3]
            out[name] = (rng.normal(0, 1, shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:
            out[name] = rng.normal(0, 0.1, shape).astype(np.float32)
    return out


def creator(depth: int, in_channels: int = 3, dtype: str = "float32"):
    """What builds resnet``depth`` (torchvision layout) at 32 px."""
    return lambda: models.create_backbone(NAMES[depth], in_channels=in_channels, image_size=32, dtype=dtype,
                                          rngs=models.Rngs(params=0, dropout=1))


def build(depth: int, in_channels: int = 3, dtype: str = "float32"):
    return fast_init(creator(depth, in_channels, dtype))


def imported(depth: int, tmp_path, in_channels: int = 3, seed: int = 0):
    sd = random_state_dict(depth, seed)
    path = str(tmp_path / f"resnet{depth}.safetensors")
    save_file(sd, path)
    model = state.build(creator(depth, in_channels), load=lambda m: weights.import_weights(m, path, "torch"))
    model.eval()
    return model, sd


# ----------------------------------------------------------------------------- reference (NCHW)


def ref_conv(x, w, stride, pad):
    return jax.lax.conv_general_dilated(
        x, jnp.asarray(w), (stride, stride), [(pad, pad), (pad, pad)], dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=jax.lax.Precision.HIGHEST,
    )


def ref_bn(x, sd, p, eps=1e-5):
    shape = (1, -1, 1, 1)
    scale = sd[f"{p}.weight"] / jnp.sqrt(sd[f"{p}.running_var"] + eps)
    return (x - sd[f"{p}.running_mean"].reshape(shape)) * scale.reshape(shape) + sd[f"{p}.bias"].reshape(shape)


def ref_maxpool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), [(0, 0), (0, 0), (1, 1), (1, 1)])


def reference_features(sd, depth, x_nhwc):
    """torchvision's ResNet.forward up to avgpool+flatten, on the torch tensors (one compiled
    program: eagerly, each operation compiles on its own)."""
    return np.asarray(_reference_features(sd, x_nhwc, depth))


@functools.partial(jax.jit, static_argnums=2, compiler_options=FAST_COMPILE)
def _reference_features(sd, x_nhwc, depth):
    kind, stages, _ = TORCHVISION[depth]
    relu = jax.nn.relu
    x = jnp.asarray(x_nhwc).transpose(0, 3, 1, 2)
    x = ref_maxpool(relu(ref_bn(ref_conv(x, sd["conv1.weight"], 2, 3), sd, "bn1")))
    for i, blocks in enumerate(stages, start=1):
        for b in range(blocks):
            p = f"layer{i}.{b}"
            stride = 2 if (i > 1 and b == 0) else 1
            identity = x
            if f"{p}.downsample.0.weight" in sd:
                identity = ref_bn(ref_conv(x, sd[f"{p}.downsample.0.weight"], stride, 0), sd, f"{p}.downsample.1")
            if kind == "basic":
                y = relu(ref_bn(ref_conv(x, sd[f"{p}.conv1.weight"], stride, 1), sd, f"{p}.bn1"))
                y = ref_bn(ref_conv(y, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
            else:
                y = relu(ref_bn(ref_conv(x, sd[f"{p}.conv1.weight"], 1, 0), sd, f"{p}.bn1"))
                y = relu(ref_bn(ref_conv(y, sd[f"{p}.conv2.weight"], stride, 1), sd, f"{p}.bn2"))
                y = ref_bn(ref_conv(y, sd[f"{p}.conv3.weight"], 1, 0), sd, f"{p}.bn3")
            x = relu(y + identity)
    return x.mean(axis=(2, 3))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("depth", sorted(TORCHVISION))
def test_state_dict_table_and_parameter_counts(depth):
    """Our table reproduces torchvision's known counts; our model has them minus fc."""
    shapes = torchvision_shapes(depth)
    total = sum(int(np.prod(s)) for n, s in shapes.items() if is_parameter(n))
    assert total == TORCHVISION[depth][2]
    fc = sum(int(np.prod(shapes[n])) for n in ("fc.weight", "fc.bias"))
    model = build(depth)
    assert layers.count_params(model) == total - fc
    assert model.num_features == shapes["fc.weight"][1]


@pytest.mark.parametrize("depth", [18, 50])
def test_import_and_forward_match_reference(depth, tmp_path):
    model, sd = imported(depth, tmp_path)
    np.testing.assert_array_equal(np.asarray(model.conv1.kernel[...]), sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.layer2[0].downsample[1].var[...]), sd["layer2.0.downsample.1.running_var"])
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    got = np.asarray(forward(model, jnp.asarray(x)))
    expected = reference_features(sd, depth, x)
    assert got.shape == expected.shape == (2, model.num_features)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_stem_matches_numpy(tmp_path):
    """conv1 (7x7/2, pad 3, no bias) + bn1 + ReLU + maxpool (3x3/2, pad 1) by hand in numpy,
    on an odd-sized input so torch's symmetric padding differs from TF "same"."""
    model, sd = imported(18, tmp_path)
    x = np.random.default_rng(2).normal(size=(1, 21, 22, 3))
    w = sd["conv1.weight"].astype(np.float64)  # (64, 3, 7, 7)
    xp = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
    ho, wo = (21 + 6 - 7) // 2 + 1, (22 + 6 - 7) // 2 + 1
    conv = np.zeros((1, ho, wo, 64))
    for i in range(7):
        for j in range(7):
            patch = xp[:, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2, :]
            conv += patch @ w[:, :, i, j].T
    bn = (conv - sd["bn1.running_mean"]) / np.sqrt(sd["bn1.running_var"] + 1e-5) * sd["bn1.weight"] + sd["bn1.bias"]
    act = np.maximum(bn, 0.0)
    padded = np.pad(act, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    po, pw = (ho + 2 - 3) // 2 + 1, (wo + 2 - 3) // 2 + 1
    pooled = np.full((1, po, pw, 64), -np.inf)
    for i in range(3):
        for j in range(3):
            pooled = np.maximum(pooled, padded[:, i:i + 2 * (po - 1) + 1:2, j:j + 2 * (pw - 1) + 1:2, :])
    got = np.asarray(model.stem(jnp.asarray(x, jnp.float32)))
    assert got.shape == pooled.shape == (1, 6, 6, 64)
    np.testing.assert_allclose(got, pooled, rtol=1e-4, atol=1e-4 * np.abs(pooled).max())


def test_grey_stem_sums_rgb_kernel(tmp_path):
    model, sd = imported(18, tmp_path)
    grey, _ = imported(18, tmp_path, in_channels=1)
    np.testing.assert_allclose(np.asarray(grey.conv1.kernel[...])[:, :, 0], sd["conv1.weight"].sum(1).transpose(1, 2, 0), rtol=1e-6)
    g = np.random.default_rng(3).normal(size=(1, 32, 32, 1)).astype(np.float32)
    a = np.asarray(forward(model, jnp.asarray(np.repeat(g, 3, -1))))
    b = np.asarray(forward(grey, jnp.asarray(g)))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_wrong_shape_missing_and_extra_tensors_are_named(tmp_path):
    sd = random_state_dict(18)
    # (shapes are all a loader checks: the abstract model, nothing compiled)
    model = nnx.eval_shape(creator(18))
    bad = dict(sd, **{"layer2.0.conv1.weight": np.zeros((128, 64, 5, 5), np.float32)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(loaders.WeightMismatchError, match=r"layer2\.0\.conv1\.weight.*\(3, 3, 64, 128\).*\(5, 5, 64, 128\)"):
        weights.import_weights(model, str(tmp_path / "bad.safetensors"), "torch")
    missing = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(loaders.WeightMismatchError, match=r"layer3\.1\.bn2\.running_var: missing"):
        weights.import_weights(model, str(tmp_path / "missing.safetensors"), "torch")
    extra = dict(sd, **{"layer5.0.conv1.weight": np.zeros((1,), np.float32)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(loaders.WeightMismatchError, match=r"layer5\.0\.conv1\.weight: in the weight file but not in the model"):
        weights.import_weights(model, str(tmp_path / "extra.safetensors"), "torch")
    # A resnet50 file into resnet18 fails on the first differing layer.
    save_file(random_state_dict(50), str(tmp_path / "r50.safetensors"))
    with pytest.raises(loaders.WeightMismatchError, match=r"layer1\.0\.conv1\.weight"):
        weights.import_weights(model, str(tmp_path / "r50.safetensors"), "torch")


def test_a_pth_that_is_not_a_torch_file_is_named(tmp_path):
    """.pth files are read without torch (``boneage_jax.weights.pth``); garbage is named."""
    path = tmp_path / "resnet18.pth"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match=rf"{path}: not a torch file"):
        weights.read_weights(str(path), "torch")


def train_step_check(name, in_channels, dtype="float32", size=32):
    """One jitted forward + gradient of the mean feature in train mode: finite
    float32 gradients, a non-zero stem gradient, and moved BatchNorm statistics."""
    model = fast_init(lambda: models.create_backbone(name, in_channels=in_channels, image_size=size, dtype=dtype,
                                                     rngs=models.Rngs(params=0, dropout=1)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, in_channels)), jnp.float32)
    model.train()
    before = np.asarray(model.bn1.mean[...]).copy()

    (loss, y), grads = grad_step(model, x)
    assert y.shape == (2, model.num_features) and y.dtype == jnp.dtype(dtype)
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() and g.dtype == jnp.float32 for g in leaves)  # numpy: no compiles
    assert np.abs(np.asarray(grads["conv1"]["kernel"][...])).max() > 0
    assert not np.allclose(np.asarray(model.bn1.mean[...]), before)  # batch statistics moved
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}


def test_forward_and_train_step_bfloat16():
    """BasicBlock ResNet with a 1-channel stem in bfloat16 compute (float32 parameters)."""
    train_step_check("resnet18_torch", 1, "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NAMES.values()))
def test_forward_and_train_step_all(name):
    train_step_check(name, 3)


@pytest.mark.slow
@pytest.mark.parametrize("size", [256, 384, 500, 512])
@pytest.mark.parametrize("name", ["resnet18_torch", "resnet50_torch"])
def test_papers_resolutions(name, size):
    train_step_check(name, 1, size=size)
