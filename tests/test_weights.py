"""Weight import and export: the Keras HDF5 layout, the per-layer loaders' errors, pretrained
directories and the ``python -m boneage_jax.weights`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # for the CLI test's Keras model

import h5py  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from helpers import fast_init, forward, grad_step, keras_forward  # noqa: E402

from boneage_jax import models, weights  # noqa: E402
from boneage_jax.weights import loaders  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keras 3 on numpy 2 warns once per variable read (``__array__`` without ``copy``): noise here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# ----------------------------------------------------------------------------- HDF5 layout


def keras_vgg16_layers(seed=0, depth=16):
    """A VGG's Keras layers as the official notop file lists them, with random weights."""
    rng = np.random.default_rng(seed)
    out = {"input_1": []}
    cin = 3
    for b, (count, width) in enumerate(zip({16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}[depth], (64, 128, 256, 512, 512)), 1):
        for c in range(1, count + 1):
            out[f"block{b}_conv{c}"] = [
                (rng.normal(size=(3, 3, cin, width)) * np.sqrt(2.0 / (9 * cin))).astype(np.float32),
                rng.normal(0, 0.1, width).astype(np.float32),
            ]
            cin = width
        out[f"block{b}_pool"] = []
    return out


def test_written_h5_mirrors_the_official_layout(tmp_path):
    arrays = keras_vgg16_layers()
    path = str(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
    weights.write_keras_h5(path, arrays, {n: [f"{n}/kernel:0", f"{n}/bias:0"][: len(a)] for n, a in arrays.items()})
    with h5py.File(path, "r") as f:
        assert [n.decode() for n in f.attrs["layer_names"]] == list(arrays)
        assert [n.decode() for n in f["block1_conv1"].attrs["weight_names"]] == ["block1_conv1/kernel:0", "block1_conv1/bias:0"]
        assert f["block1_conv1"]["block1_conv1"]["kernel:0"].shape == (3, 3, 3, 64)
        assert len(f["block1_pool"].attrs["weight_names"]) == 0
    read = weights.read_keras_h5(path)
    assert list(read) == list(arrays)
    np.testing.assert_array_equal(read["block5_conv3"][1], arrays["block5_conv3"][1])


def test_full_model_h5_with_model_weights_group(tmp_path):
    arrays = keras_vgg16_layers()
    path = str(tmp_path / "model.h5")
    weights.write_keras_h5(str(tmp_path / "w.h5"), arrays)
    with h5py.File(str(tmp_path / "w.h5"), "r") as src, h5py.File(path, "w") as dst:
        src.copy(src["/"], dst, "model_weights")
        for key, value in src.attrs.items():
            dst["model_weights"].attrs[key] = value
    assert list(weights.read_keras_h5(path)) == list(arrays)


def test_keras_import_errors_name_the_layer():
    model = fast_init(lambda: models.create_backbone("vgg16", in_channels=3, image_size=32, rngs=models.Rngs(0)))
    arrays = keras_vgg16_layers()
    bad = dict(arrays, block3_conv2=[np.zeros((3, 3, 256, 128), np.float32), np.zeros(128, np.float32)])
    with pytest.raises(loaders.WeightMismatchError, match=r"block3_conv2 \(kernel\).*\(3, 3, 256, 256\).*\(3, 3, 256, 128\)"):
        model.load_keras(bad)
    missing = {k: v for k, v in arrays.items() if k != "block4_conv1"}
    with pytest.raises(loaders.WeightMismatchError, match="block4_conv1: missing"):
        model.load_keras(missing)
    with pytest.raises(loaders.WeightMismatchError, match="block3_conv4: missing"):
        vgg19 = fast_init(lambda: models.create_backbone("vgg19", in_channels=3, image_size=32, rngs=models.Rngs(0)))
        vgg19.load_keras(arrays)
    extra = dict(arrays, block6_conv1=[np.zeros(1)])
    with pytest.raises(loaders.WeightMismatchError, match="block6_conv1: in the weight file but not in the model"):
        model.load_keras(extra)
    # A with-top file's classifier layers are ignored.
    model.load_keras(dict(arrays, fc1=[np.zeros((2, 2))], predictions=[np.zeros((2, 2))]))


def test_vgg_load_torch_names():
    """torchvision vgg16 ``features.{i}`` indices: ReLU and MaxPool take slots too."""
    model = fast_init(lambda: models.create_backbone("vgg16", in_channels=1, image_size=32, rngs=models.Rngs(0)))
    assert model.torch_names()[:4] == ["features.0", "features.2", "features.5", "features.7"]
    assert model.torch_names()[-1] == "features.28"
    rng = np.random.default_rng(0)
    tensors, cin = {}, 3
    for name, conv in zip(model.torch_names(), model.conv_names()):
        cout = getattr(model, conv).kernel.shape[-1]
        tensors[f"{name}.weight"] = rng.normal(size=(cout, cin, 3, 3)).astype(np.float32)
        tensors[f"{name}.bias"] = rng.normal(size=cout).astype(np.float32)
        cin = cout
    tensors["classifier.0.weight"] = np.zeros((4096, 25088), np.float32)
    model.load_torch(tensors)
    np.testing.assert_allclose(np.asarray(model.block1_conv1.kernel[...])[:, :, 0, :],
                               tensors["features.0.weight"].sum(1).transpose(1, 2, 0), rtol=1e-6)


# ----------------------------------------------------------------------------- pretrained directories


def test_save_and_load_pretrained_roundtrip(tmp_path):
    source = fast_init(lambda: models.create_backbone("resnet18", in_channels=1, image_size=32, rngs=models.Rngs(0)))
    source.train()
    grad_step(source, jnp.ones((2, 32, 32, 1)))  # moves the batch statistics away from their init
    out = str(tmp_path / "pre")
    weights.save_pretrained(source, out, {"model": "resnet18", "in_channels": 1})
    assert sorted(os.listdir(out)) == ["boneage_jax_weights.json", "state"]
    assert [p for p in os.listdir(tmp_path) if p != "pre"] == []  # no temporary directory left
    target = fast_init(lambda: models.create_backbone("resnet18", in_channels=1, image_size=32, rngs=models.Rngs(5)), 5)
    weights.load_pretrained(target, out)
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(source, (nnx.Param, nnx.BatchStat))),
                    jax.tree_util.tree_leaves(nnx.state(target, (nnx.Param, nnx.BatchStat)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        weights.save_pretrained(source, out, {})
    rgb = fast_init(lambda: models.create_backbone("resnet18", in_channels=3, image_size=32, rngs=models.Rngs(0)))
    with pytest.raises(loaders.WeightMismatchError, match=r"conv1/kernel.*\(7, 7, 3, 64\).*\(7, 7, 1, 64\)"):
        weights.load_pretrained(rgb, out)
    deeper = fast_init(lambda: models.create_backbone("resnet34", in_channels=1, image_size=32, rngs=models.Rngs(0)))
    with pytest.raises(loaders.WeightMismatchError, match=r"layer1/2/.*missing"):
        weights.load_pretrained(deeper, out)


def test_load_pretrained_into_model_backbone_keeps_head_fresh(tmp_path):
    import ml_collections

    config = ml_collections.ConfigDict(
        {"name": "vgg16", "dtype": "float32", "sex_fusion": "concat", "head_hidden": (8,), "dropout": 0.0, "kwargs": {}}
    )
    source = fast_init(lambda: models.create_model(config, in_channels=1, image_size=32, seed=0))
    weights.save_pretrained(source.backbone, str(tmp_path / "pre"), {"model": "vgg16"})
    model = fast_init(lambda: models.create_model(config, in_channels=1, image_size=32, seed=7), 7)
    head_before = [np.asarray(v) for v in jax.tree_util.tree_leaves(nnx.state(model.head, nnx.Param))]
    weights.load_pretrained(model.backbone, str(tmp_path / "pre"))
    np.testing.assert_array_equal(np.asarray(model.backbone.block5_conv3.kernel[...]),
                                  np.asarray(source.backbone.block5_conv3.kernel[...]))
    for a, b in zip(head_before, jax.tree_util.tree_leaves(nnx.state(model.head, nnx.Param))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_cli_end_to_end_on_tiny_keras_vgg16(tmp_path, capsys, host_random):
    """python -m boneage_jax.weights on a Keras VGG16 file; the result equals Keras's output."""
    keras = host_random
    keras.backend.clear_session()
    keras_model = keras.applications.VGG16(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    arrays, names = {}, {}
    for layer in keras_model.layers:
        ws = [np.asarray(w.numpy()) for w in layer.weights]
        if ws:
            ws[1] = rng.normal(0, 0.1, ws[1].shape).astype(np.float32)
            layer.set_weights(ws)
        arrays[layer.name], names[layer.name] = ws, [f"{layer.name}/{w.name}:0" for w in layer.weights]
    source = str(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
    weights.write_keras_h5(source, arrays, names)
    out = str(tmp_path / "vgg16_grey")
    cli = [sys.executable, "-m", "boneage_jax.weights", "--from", "keras", "--model", "vgg16", "--in", source]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    done = subprocess.run(cli + ["--out", out, "--in_channels", "1"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    meta = json.load(open(os.path.join(out, "boneage_jax_weights.json")))
    assert meta == {"model": "vgg16", "in_channels": 1, "image_size": 224, "source": source, "framework": "keras"}
    grey = fast_init(lambda: models.create_backbone("vgg16", in_channels=1, image_size=32, rngs=models.Rngs(3)), 3)
    weights.load_pretrained(grey, out)
    g = rng.uniform(0, 1, (1, 32, 32, 1)).astype(np.float32)
    expected = keras_forward(keras_model, np.repeat(g, 3, -1))
    got = np.asarray(forward(grey, jnp.asarray(g)))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    # A file that does not fit the model fails with the layer name and leaves nothing behind.
    assert weights.main(["--from", "keras", "--model", "vgg19", "--in", source, "--out", str(tmp_path / "vgg19")]) == 2
    assert "block3_conv4: missing" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(source), "vgg16_grey"])


@pytest.mark.parametrize("suffix, framework, match", [
    (".h5", "keras", "not an HDF5 file"),
    (".safetensors", "torch", "not a safetensors file"),
    (".pth", "torch", r"not a torch file \(neither a zip archive nor the legacy torch format\)"),
])
def test_a_file_that_is_not_what_its_extension_says_is_named(tmp_path, suffix, framework, match):
    from boneage_jax import weights

    path = tmp_path / f"fake{suffix}"
    path.write_bytes(b"not weights at all" * 10)
    with pytest.raises(ValueError, match=rf"{path}: {match}"):
        weights.read_weights(str(path), framework)


def test_from_run_writes_the_backbone_of_a_trained_run(tiny_run, tmp_path, capsys):
    """python -m boneage_jax.weights --from run: a run's backbone as a pretrained directory."""
    from boneage_jax import inference, state

    out = str(tmp_path / "from_run")
    assert weights.main(["--from", "run", "--in", tiny_run, "--out", out, "--which", "latest"]) == 0
    run = inference.load_run(tiny_run, "latest")
    meta = json.load(open(os.path.join(out, "boneage_jax_weights.json")))
    assert meta == {"model": run.config.model.name, "in_channels": run.in_channels,
                    "image_size": run.config.data.image_size, "source": run.workdir, "framework": "run",
                    "checkpoint": "latest", "step": run.step}
    create = state.model_factory(run.config, in_channels=run.in_channels, num_outputs=run.objective.num_outputs,
                                 task=run.objective.task)
    fresh = fast_init(create, 9).backbone
    weights.load_pretrained(fresh, out)
    trained = nnx.state(run.model().backbone, (nnx.Param, nnx.BatchStat))
    loaded = nnx.state(fresh, (nnx.Param, nnx.BatchStat))
    assert len(jax.tree_util.tree_leaves(trained)) > 2
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # What the run decides is refused on the command line; a workdir that is not a run is named.
    from absl import app

    with pytest.raises(app.UsageError, match="--model, --in_channels: --from run takes the model"):
        weights.main(["--from", "run", "--in", tiny_run, "--out", out, "--model", "vgg16", "--in_channels", "1"])
    with pytest.raises(app.UsageError, match="--model is required with --from keras"):
        weights.main(["--from", "keras", "--in", "x.h5", "--out", out])
    with pytest.raises(app.UsageError, match="--which is only for --from run"):
        weights.main(["--from", "keras", "--model", "vgg16", "--in", "x.h5", "--out", out, "--which", "best"])
    capsys.readouterr()
    assert weights.main(["--from", "run", "--in", str(tmp_path), "--out", str(tmp_path / "none")]) == 2
    assert f"{tmp_path}/config.json is missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none")
