"""Keras-layout families: parity with keras.applications, and forward/train-step smoke tests.

Each parity test builds the Keras model (``weights=None, include_top=False, pooling="avg"``, JAX
backend) with random weights (biases, BN gamma/beta and moving mean/variance randomised too),
writes them in the legacy HDF5 layout of the official ImageNet files, imports that file with
``boneage_jax.weights`` and compares pooled features in eval mode on random inputs at the
smallest size each network accepts, plus parameter counts against ``count_params()``.
EfficientNet B0 and B3 are in the default suite; B1, B2, B4-B7 and the Keras ResNet101/152 under
``-m slow``. InceptionV3's default check runs on the session's second InceptionV3, whose
auto-named layers are numbered past the official files' (its first-model check is under
``-m slow``). Keras's side runs as one program compiled like ours (``helpers.keras_forward``).

The smoke tests (no Keras needed) run a forward pass and one jitted training gradient for one
network per family at a small size by default, for every registered name under ``-m slow``,
and at the papers' resolutions (256, 384, 500, 512) under ``-m slow``.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from helpers import fast_init, forward, grad_step, keras_forward  # noqa: E402

from boneage_jax import models, state, weights  # noqa: E402
from boneage_jax.models import layers  # noqa: E402

try:
    import keras
except ImportError:  # the smoke tests below still run
    keras = None

# our name -> (Keras application, smallest input size, preprocessing Keras applies inside the model)
CASES = {
    "vgg16": ("VGG16", 32, None),
    "vgg19": ("VGG19", 32, None),
    "resnet50_keras": ("ResNet50", 32, None),
    "resnet101_keras": ("ResNet101", 32, None),
    "resnet152_keras": ("ResNet152", 32, None),
    "inception_v3": ("InceptionV3", 75, None),
    "xception": ("Xception", 71, None),
    **{f"efficientnet_b{i}": (f"EfficientNetB{i}", 32, "rescale255") for i in range(8)},
}
MIN_SIZE = {"inception_v3": 75, "xception": 71}
# Keras 3 on numpy 2 warns once per variable read (``__array__`` without ``copy``): noise here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(autouse=True)
def slow_only_when_selected(request):
    """``@pytest.mark.slow`` tests run only when ``-m`` names ``slow`` (``make test-slow``), even
    when this file is run without ``-m "not slow"``."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: run with -m slow")
# Keras layers holding preprocessing weights our backbones leave out (EfficientNet).
PREPROCESSING_LAYERS = ("Normalization", "Rescaling")


def run_ours(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(forward(model, jnp.asarray(x)))


def randomise(model, seed: int = 0) -> tuple[dict, dict]:
    """Random biases and BN statistics (kernels keep Keras's random init); returns the layers'
    weights and weight names in model order, as the official files list them."""
    rng = np.random.default_rng(seed)
    arrays, names = {}, {}
    for layer in model.layers:
        ws = []
        for w in layer.weights:
            value = np.asarray(w.numpy())
            kind = w.name
            if kind in ("bias", "beta", "moving_mean"):
                value = rng.normal(0.0, 0.1, value.shape)
            elif kind in ("gamma", "moving_variance"):
                value = rng.uniform(0.5, 1.5, value.shape)
            ws.append(value.astype(np.float32))
        if ws and type(layer).__name__ not in PREPROCESSING_LAYERS:
            layer.set_weights(ws)
        arrays[layer.name] = [np.asarray(w.numpy()) for w in layer.weights]
        names[layer.name] = [f"{layer.name}/{w.name}:0" for w in layer.weights]
    return arrays, names


def keras_and_ours(name: str, tmp_path, in_channels: int = 3, seed: int = 0, offset_names: bool = False):
    """The Keras model with random weights, and ours with them imported. ``offset_names``: a first
    model of the same application is built and dropped, so the auto-named layers of the second
    start past the official files' numbering (conv2d_95 rather than conv2d_1)."""
    application, size, _ = CASES[name]
    keras.backend.clear_session()
    if offset_names:
        getattr(keras.applications, application)(weights=None, include_top=False, input_shape=(size, size, 3))
    keras_model = getattr(keras.applications, application)(
        weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3)
    )
    arrays, names = randomise(keras_model, seed)
    path = str(tmp_path / f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5")
    weights.write_keras_h5(path, arrays, names)
    ours = state.build(lambda: models.create_backbone(name, in_channels=in_channels, image_size=size,
                                                      rngs=models.Rngs(1)),
                       load=lambda m: weights.import_weights(m, path, "keras"))
    ours.eval()
    return keras_model, ours


def keras_preprocessing_params(keras_model) -> int:
    return sum(layer.count_params() for layer in keras_model.layers if type(layer).__name__ in PREPROCESSING_LAYERS)


def check_parity(name: str, tmp_path, seed: int = 0, offset_names: bool = False) -> None:
    _, size, preprocessing = CASES[name]
    keras_model, ours = keras_and_ours(name, tmp_path, seed=seed, offset_names=offset_names)
    if offset_names:
        assert "conv2d" not in [layer.name for layer in keras_model.layers]
    x = np.random.default_rng(seed + 1).uniform(-1.0, 1.0, (2, size, size, 3)).astype(np.float32)
    keras_input = x
    if preprocessing == "rescale255":  # Keras: Rescaling(1/255), then Normalization (identity untrained)
        keras_input = (x + 1.0) * 127.5
        x = keras_input / 255.0
    expected = keras_forward(keras_model, keras_input)
    got = run_ours(ours, x)
    assert got.shape == expected.shape == (2, ours.num_features)
    scale = float(np.abs(expected).max())
    assert scale > 0
    assert float(np.abs(got - expected).max()) <= 1e-4 * scale, (name, float(np.abs(got - expected).max()), scale)
    keras_count = keras_model.count_params() - keras_preprocessing_params(keras_model)
    assert layers.count_params(ours, batch_stats=True) == keras_count


# InceptionV3's parity runs in the default suite with its auto-named layers offset
# (test_inception_auto_names_with_offset); without the offset under -m slow.
DEFAULT_PARITY = ["vgg16", "vgg19", "resnet50_keras", "xception", "efficientnet_b0", "efficientnet_b3"]


@pytest.mark.parametrize("name", DEFAULT_PARITY)
def test_keras_parity(name, tmp_path, host_random):
    check_parity(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(CASES) - set(DEFAULT_PARITY)))
def test_keras_parity_slow(name, tmp_path, host_random):
    check_parity(name, tmp_path)


@pytest.mark.parametrize("name", ["vgg16", pytest.param("resnet50_keras", marks=pytest.mark.slow),
                                  pytest.param("xception", marks=pytest.mark.slow)])
def test_grey_stem_equals_rgb_on_repeated_grey(name, tmp_path, host_random):
    """RGB weights imported into a 1-channel stem: grey input gives Keras's output on grey*3."""
    _, size, _ = CASES[name]
    keras_model, _ = keras_and_ours(name, tmp_path)
    path = str(tmp_path / f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5")
    grey_model = state.build(lambda: models.create_backbone(name, in_channels=1, image_size=size, rngs=models.Rngs(2)),
                             load=lambda m: weights.import_weights(m, path, "keras"))
    grey_model.eval()
    g = np.random.default_rng(3).uniform(-1.0, 1.0, (1, size, size, 1)).astype(np.float32)
    expected = keras_forward(keras_model, np.repeat(g, 3, axis=-1))
    got = run_ours(grey_model, g)
    assert float(np.abs(got - expected).max()) <= 1e-4 * float(np.abs(expected).max())


def test_keras3_weights_h5_is_refused_with_instructions(tmp_path, host_random):
    """Keras 3's ``save_weights`` names layers by type and position (conv2d_7), not by layer
    name: reading it must fail clearly instead of mis-assigning."""
    keras.backend.clear_session()
    keras_model = keras.applications.VGG16(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3))
    path = str(tmp_path / "vgg16.weights.h5")
    keras_model.save_weights(path)
    with pytest.raises(ValueError, match="Keras 3 .weights.h5.*write_keras_h5"):
        weights.read_keras_h5(path)


def test_inception_auto_names_with_offset(tmp_path, host_random):
    """Auto-named layers are paired by creation order whatever the session's counter offset
    (the official files start at conv2d_1; a second model in a session at conv2d_95): the
    InceptionV3 parity check on a second model of the session."""
    check_parity("inception_v3", tmp_path, offset_names=True)


# ----------------------------------------------------------------------------- smoke tests

KERAS_LAYOUT = [
    "vgg16", "vgg19", "resnet50_keras", "resnet101_keras", "resnet152_keras", "inception_v3", "xception",
    *[f"efficientnet_b{i}" for i in range(8)],
]


def stem_path(name: str) -> tuple:
    if name.startswith(("vgg", "xception")):
        return ("block1_conv1", "kernel")
    if name.startswith("resnet"):
        return ("conv1_conv", "kernel")
    if name == "inception_v3":
        return ("units", 0, "conv", "kernel")
    return ("stem_conv", "kernel")


def train_step_check(
    name: str, in_channels: int, size: int, dtype: str = "float32", eval_forward: bool = False
) -> None:
    """One jitted forward + gradient of the mean feature in train mode (BatchNorm on batch
    statistics, drop-connect active): features of the right shape and dtype, finite float32
    gradients reaching the stem, BatchNorm running statistics that moved. ``eval_forward`` also
    compiles the eval-mode forward (the parity tests above already do for each family)."""
    model = fast_init(lambda: models.create_backbone(name, in_channels=in_channels, image_size=size, dtype=dtype,
                                                     rngs=models.Rngs(params=0, dropout=1)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, in_channels)), jnp.float32)
    if eval_forward:
        model.eval()
        y = forward(model, x)
        assert y.shape == (2, model.num_features) and y.dtype == jnp.dtype(dtype)
        assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    model.train()
    stats_before = [np.asarray(v) for v in jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))]

    (loss, y), grads = grad_step(model, x)
    assert y.shape == (2, model.num_features) and y.dtype == jnp.dtype(dtype)
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves(grads)
    # Checked in numpy: eager jnp checks would compile once per leaf shape.
    assert leaves and all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all() for g in leaves)
    stem = grads
    for key in stem_path(name):
        stem = stem[key]
    assert stem.shape[2] == in_channels and np.abs(np.asarray(stem[...])).max() > 0
    stats_after = [np.asarray(v) for v in jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))]
    if stats_before:
        assert any(not np.allclose(a, b) for a, b in zip(stats_before, stats_after))


@pytest.mark.parametrize(
    "name,in_channels",
    [("vgg16", 1), ("resnet50_keras", 3), ("inception_v3", 1), ("xception", 3), ("efficientnet_b0", 1)],
)
def test_train_step(name, in_channels):
    train_step_check(name, in_channels, MIN_SIZE.get(name, 32))


@pytest.mark.slow
@pytest.mark.parametrize("name", KERAS_LAYOUT)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_and_train_step_all(name, dtype):
    train_step_check(name, 3, MIN_SIZE.get(name, 32), dtype, eval_forward=True)


@pytest.mark.slow
@pytest.mark.parametrize("size", [256, 384, 500, 512])
@pytest.mark.parametrize(
    "name", ["vgg16", "resnet50_keras", "inception_v3", "xception", "efficientnet_b0", "efficientnet_b4"]
)
def test_papers_resolutions(name, size):
    train_step_check(name, 1, size)
