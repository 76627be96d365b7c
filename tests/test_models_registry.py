"""The model registries, their aliases, ``create_model`` per task, the listing command and the
sex-fusion head."""

from __future__ import annotations

import functools
import inspect
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import fast_init, forward

from boneage_jax import models
from boneage_jax.models import heads


def _model_config(**changes):
    config = {"name": "cnn_memon", "kwargs": {"pool": "avg", "filters": (4, 8)}, "sex_fusion": "concat",
              "head_hidden": (), "dropout": 0.0, "dtype": "float32"}
    config.update(changes)
    return ml_collections.ConfigDict(config)


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'; registered: .*cnn_memon"):
        models.create_backbone("resnet9000", in_channels=3, image_size=32, rngs=models.Rngs(0))


def test_every_family_takes_the_same_constructor_keywords():
    """One way to register: a partial of the family class, called with in_channels, image_size,
    dtype and rngs whatever the family."""
    for registry in models.REGISTRIES:
        for name in registry.names():
            constructor = registry.constructors[name]
            assert isinstance(constructor, functools.partial) and inspect.isclass(constructor.func), name
            parameters = inspect.signature(constructor.func.__init__).parameters
            assert {"in_channels", "image_size", "dtype", "rngs"} <= set(parameters), name


@pytest.mark.parametrize("alias, name, build", [
    ("resnet50", "resnet50_keras", True), ("resnet18", "resnet18_torch", True), ("resnet34", "resnet34_torch", False),
    ("resnet101", "resnet101_torch", False), ("resnet152", "resnet152_torch", False), ("inception_v1", "googlenet", True)])
def test_old_names_are_aliases_of_the_layout_names(alias, name, build):
    """A run's config.json written with an old name builds the same network, parameter paths
    included (built for one alias of each family; the deeper torch ResNets resolve alike)."""
    models.available()  # the families (and their aliases) register on import
    assert models.BACKBONES.aliases[alias] == name and models.BACKBONES.resolve(alias) == name
    assert alias not in models.available() and name in models.available()
    if not build:
        return
    old, new = (nnx.eval_shape(lambda n=n: models.create_backbone(n, in_channels=1, image_size=32, rngs=models.Rngs(0)))
                for n in (alias, name))
    assert type(old) is type(new)
    assert jax.tree.map(lambda x: x.shape, nnx.state(old)) == jax.tree.map(lambda x: x.shape, nnx.state(new))


def test_registering_a_name_twice_fails():
    models.available()  # the families register on import: vgg16 must be there before the second try
    with pytest.raises(ValueError, match="model 'vgg16' registered twice"):
        models.BACKBONES.register("vgg16", object)
    with pytest.raises(ValueError, match="model 'resnet50' registered twice"):
        models.SEGMENTATION_NETWORKS.register("resnet50", object)


def test_segmentation_networks_have_their_own_registry():
    assert models.SEGMENTATION_NETWORKS.names() == ["unet"]
    assert "unet" not in models.BACKBONES.names() and "unet" in models.available()
    with pytest.raises(ValueError, match="unknown model 'unet'; registered: .*cnn_memon"):
        models.create_backbone("unet", in_channels=1, image_size=32, rngs=models.Rngs(0))


def test_create_model_dispatches_by_task_and_names_the_registry():
    unet = _model_config(name="unet", kwargs={"depth": 1, "base_filters": 2})
    model = fast_init(lambda: models.create_model(unet, in_channels=1, image_size=16, seed=0, task="segmentation"))
    assert isinstance(model, models.SegmentationModel) and model.pretrained_part() is model.network
    assert forward(model, jnp.ones((2, 16, 16, 1)), jnp.ones((2,))).shape == (2, 16, 16, 1)
    boneage = nnx.eval_shape(lambda: models.create_model(_model_config(), in_channels=1, image_size=32, seed=0))
    assert isinstance(boneage, models.BoneAgeModel) and boneage.pretrained_part() is boneage.backbone
    with pytest.raises(ValueError, match=r"^config.model.name 'unet' is a segmentation network, not a backbone "
                                         r"\(config.task='boneage'\); backbones: .*cnn_memon"):
        models.create_model(unet, in_channels=1, image_size=16, seed=0)
    with pytest.raises(ValueError, match=r"^config.model.name 'cnn_memon' is a backbone, not a segmentation network "
                                         r"\(config.task='segmentation'\); segmentation networks: unet$"):
        models.create_model(_model_config(), in_channels=1, image_size=32, seed=0, task="segmentation")
    with pytest.raises(ValueError, match=r"^config.model.name 'resnet9000' is not a registered backbone"):
        models.create_model(_model_config(name="resnet9000"), in_channels=1, image_size=32, seed=0)
    with pytest.raises(ValueError, match=r"^config.task 'detection'; expected one of \['boneage', 'segmentation'\]"):
        models.create_model(_model_config(), in_channels=1, image_size=32, seed=0, task="detection")


def test_parameter_paths_are_unchanged():
    """Checkpoints of earlier runs restore: the wrappers keep their attribute names."""
    model = nnx.eval_shape(lambda: models.create_model(_model_config(), in_channels=1, image_size=32, seed=0))
    paths = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert paths == {"backbone/convs/0/kernel", "backbone/convs/0/bias", "backbone/convs/1/kernel",
                     "backbone/convs/1/bias", "head/out/kernel", "head/out/bias"}
    unet_config = _model_config(name="unet", kwargs={"depth": 1, "base_filters": 2})
    unet = nnx.eval_shape(lambda: models.create_model(unet_config, in_channels=1, image_size=16, seed=0,
                                                      task="segmentation"))
    paths = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(unet, nnx.Param))}
    assert "network/down/0/conv1/kernel" in paths and "network/head/kernel" in paths


@pytest.mark.parametrize("fusion, extra", [("none", 0), ("concat", 1), ("winner16bit", 32)])
def test_fusion_modes(fusion, extra):
    head = fast_init(lambda: heads.FusionHead(10, fusion=fusion, rngs=models.Rngs(0)))
    if fusion == "winner16bit":
        assert head.hidden[0].in_features == 10 + extra and head.hidden[0].out_features == 1000
        assert [layer.out_features for layer in head.hidden] == [1000, 1000]
    else:
        assert head.out.in_features == 10 + extra
    out = np.asarray(forward(head, jnp.ones((2, 10)), jnp.array([0.0, 1.0])))
    assert out.shape == (2, 1)
    if fusion == "none":
        assert out[0, 0] == out[1, 0]  # sex-agnostic
    else:
        assert out[0, 0] != out[1, 0]


def test_model_forward_and_bfloat16():
    model = fast_init(lambda: models.create_model(_model_config(), in_channels=1, image_size=32, num_outputs=3, seed=0))
    assert forward(model, jnp.ones((2, 32, 32, 1)), jnp.ones((2,))).shape == (2, 3)
    bf16 = fast_init(lambda: models.create_model(_model_config(dtype="bfloat16"), in_channels=1, image_size=32, seed=0))
    assert forward(bf16.backbone, jnp.ones((2, 32, 32, 1))).dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    with pytest.raises(ValueError, match="config.model.dtype"):
        models.create_model(_model_config(dtype="float8"), in_channels=1, image_size=32, seed=0)


def test_cnn_memon_is_the_papers_network():
    backbone = fast_init(lambda: models.create_backbone("cnn_memon", in_channels=1, image_size=256, rngs=models.Rngs(0)))
    assert [c.out_features for c in backbone.convs] == [16, 32, 64, 128]
    assert all(c.kernel_size == (3, 3) for c in backbone.convs)
    assert backbone.num_features == 16 * 16 * 128  # flattened after four 2x2 poolings of 256 px
    assert forward(backbone, jnp.ones((1, 256, 256, 1))).shape == (1, 32768)


def test_image_size_reaches_class_backbones():
    """The flattening CNN is a class; its image_size must not fall back to the default 256."""
    model = fast_init(lambda: models.create_model(_model_config(kwargs={}, sex_fusion="winner16bit"), in_channels=1,
                                                  image_size=64, seed=0))
    assert model.backbone.num_features == 4 * 4 * 128
    assert forward(model, jnp.ones((2, 64, 64, 1)), jnp.ones((2,))).shape == (2, 1)


def _listing(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "boneage_jax.models", *args], capture_output=True, text=True,
                          timeout=900)


def test_listing_command_prints_json_counts():
    result = _listing("cnn_memon", "vgg16", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout)
    assert counts["cnn_memon"] == sum(9 * i * o + o for i, o in ((3, 16), (16, 32), (32, 64), (64, 128)))
    assert counts["vgg16"] == 14_714_688  # keras.applications.VGG16(include_top=False)


@pytest.mark.slow
def test_listing_covers_every_family():
    result = _listing("--json")
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout)
    assert set(counts) == set(models.available())
    assert all(isinstance(v, int) and v > 0 for v in counts.values())
