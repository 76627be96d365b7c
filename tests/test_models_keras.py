"""Parity with keras.applications: our backbones, fed Keras weights, give Keras's features.

Each test builds the Keras model (``weights=None, include_top=False, pooling="avg"``, JAX
backend) with random weights (biases, BN gamma/beta and moving mean/variance randomised too),
writes them in the legacy HDF5 layout of the official ImageNet files, imports that file with
``boneage_jax.weights`` and compares pooled features in eval mode on random inputs at the
smallest size each network accepts, plus parameter counts against ``count_params()``.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from boneage_jax import models, weights  # noqa: E402
from boneage_jax.models import layers  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
    pytest.skip(f"needs Keras on its JAX backend, got {keras.backend.backend()}", allow_module_level=True)

APPS = keras.applications
# our name -> (Keras constructor, input size, preprocessing Keras applies inside the model)
CASES = {
    "vgg16": (APPS.VGG16, 32, None),
    "vgg19": (APPS.VGG19, 32, None),
    "resnet50": (APPS.ResNet50, 32, None),
    "inception_v3": (APPS.InceptionV3, 75, None),
    "xception": (APPS.Xception, 71, None),
    **{f"efficientnet_b{i}": (getattr(APPS, f"EfficientNetB{i}"), 32, "rescale255") for i in range(8)},
}
# Keras layers holding preprocessing weights our backbones leave out (EfficientNet).
PREPROCESSING_LAYERS = ("Normalization", "Rescaling")


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


def keras_and_ours(name: str, tmp_path, in_channels: int = 3, seed: int = 0):
    constructor, size, _ = CASES[name]
    keras.backend.clear_session()
    keras_model = constructor(weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3))
    arrays, names = randomise(keras_model, seed)
    path = str(tmp_path / f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5")
    weights.write_keras_h5(path, arrays, names)
    ours = models.create_backbone(name, in_channels=in_channels, image_size=size, rngs=nnx.Rngs(1))
    weights.import_weights(ours, path, "keras")
    ours.eval()
    return keras_model, ours


def keras_preprocessing_params(keras_model) -> int:
    return sum(layer.count_params() for layer in keras_model.layers if type(layer).__name__ in PREPROCESSING_LAYERS)


def check_parity(name: str, tmp_path, seed: int = 0) -> None:
    _, size, preprocessing = CASES[name]
    keras_model, ours = keras_and_ours(name, tmp_path, seed=seed)
    x = np.random.default_rng(seed + 1).uniform(-1.0, 1.0, (2, size, size, 3)).astype(np.float32)
    keras_input = x
    if preprocessing == "rescale255":  # Keras: Rescaling(1/255), then Normalization (identity untrained)
        keras_input = (x + 1.0) * 127.5
        x = keras_input / 255.0
    expected = np.asarray(keras_model(keras_input, training=False))
    got = np.asarray(ours(jnp.asarray(x)))
    assert got.shape == expected.shape == (2, ours.num_features)
    scale = float(np.abs(expected).max())
    assert scale > 0
    assert float(np.abs(got - expected).max()) <= 1e-4 * scale, (name, float(np.abs(got - expected).max()), scale)
    assert layers.count_params(ours, batch_stats=True) == keras_model.count_params() - keras_preprocessing_params(keras_model)


@pytest.mark.parametrize("name", ["vgg16", "vgg19", "resnet50", "inception_v3", "xception", "efficientnet_b0", "efficientnet_b3"])
def test_keras_parity(name, tmp_path):
    check_parity(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"efficientnet_b{i}" for i in (1, 2, 4, 5, 6, 7)])
def test_keras_parity_efficientnet_slow(name, tmp_path):
    check_parity(name, tmp_path)


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "xception"])
def test_grey_stem_equals_rgb_on_repeated_grey(name, tmp_path):
    """RGB weights imported into a 1-channel stem: grey input gives Keras's output on grey*3."""
    _, size, _ = CASES[name]
    keras_model, _ = keras_and_ours(name, tmp_path)
    path = str(tmp_path / f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5")
    grey_model = models.create_backbone(name, in_channels=1, image_size=size, rngs=nnx.Rngs(2))
    weights.import_weights(grey_model, path, "keras")
    grey_model.eval()
    g = np.random.default_rng(3).uniform(-1.0, 1.0, (1, size, size, 1)).astype(np.float32)
    expected = np.asarray(keras_model(np.repeat(g, 3, axis=-1), training=False))
    got = np.asarray(grey_model(jnp.asarray(g)))
    assert float(np.abs(got - expected).max()) <= 1e-4 * float(np.abs(expected).max())


def test_keras3_weights_h5_is_read(tmp_path):
    """Keras 3's own ``save_weights`` layout (layers/NAME/vars/i) imports too."""
    keras.backend.clear_session()
    keras_model = APPS.VGG16(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3))
    randomise(keras_model)
    path = str(tmp_path / "vgg16.weights.h5")
    keras_model.save_weights(path)
    ours = models.create_backbone("vgg16", in_channels=3, image_size=32, rngs=nnx.Rngs(0))
    weights.import_weights(ours, path, "keras")
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(keras_model(x))
    assert np.abs(np.asarray(ours(jnp.asarray(x))) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_inception_auto_names_with_offset(tmp_path):
    """Auto-named layers are paired by creation order whatever the session's counter offset
    (the official files start at conv2d_1; a second model in a session at conv2d_94)."""
    keras.backend.clear_session()
    APPS.InceptionV3(weights=None, include_top=False, input_shape=(75, 75, 3))  # bumps the counters
    keras_model = APPS.InceptionV3(weights=None, include_top=False, pooling="avg", input_shape=(75, 75, 3))
    assert "conv2d" not in [layer.name for layer in keras_model.layers]
    arrays, names = randomise(keras_model)
    path = str(tmp_path / "inception.h5")
    weights.write_keras_h5(path, arrays, names)
    ours = models.create_backbone("inception_v3", in_channels=3, image_size=75, rngs=nnx.Rngs(0))
    weights.import_weights(ours, path, "keras")
    ours.eval()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 75, 75, 3)).astype(np.float32)
    expected = np.asarray(keras_model(x, training=False))
    assert np.abs(np.asarray(ours(jnp.asarray(x))) - expected).max() <= 1e-4 * np.abs(expected).max()
