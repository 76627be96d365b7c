"""The model registry, the listing command and the sex-fusion head."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from boneage_jax import models
from boneage_jax.models import heads


def _model_config(**changes):
    config = {"name": "cnn_memon", "kwargs": {"pool": "avg", "filters": (4, 8)}, "sex_fusion": "concat",
              "head_hidden": (), "dropout": 0.0, "dtype": "float32"}
    config.update(changes)
    return ml_collections.ConfigDict(config)


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'; registered: .*cnn_memon"):
        models.create_backbone("resnet9000", in_channels=3, image_size=32, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fusion, extra", [("none", 0), ("concat", 1), ("winner16bit", 32)])
def test_fusion_modes(fusion, extra):
    head = heads.FusionHead(10, fusion=fusion, rngs=nnx.Rngs(0))
    if fusion == "winner16bit":
        assert head.hidden[0].in_features == 10 + extra and head.hidden[0].out_features == 1000
        assert [layer.out_features for layer in head.hidden] == [1000, 1000]
    else:
        assert head.out.in_features == 10 + extra
    out = head(jnp.ones((2, 10)), jnp.array([0.0, 1.0]))
    assert out.shape == (2, 1)
    if fusion == "none":
        assert out[0, 0] == out[1, 0]  # sex-agnostic
    else:
        assert out[0, 0] != out[1, 0]


def test_model_forward_and_bfloat16():
    model = models.create_model(_model_config(), in_channels=1, image_size=32, num_outputs=3, seed=0)
    assert model(jnp.ones((2, 32, 32, 1)), jnp.ones((2,))).shape == (2, 3)
    bf16 = models.create_model(_model_config(dtype="bfloat16"), in_channels=1, image_size=32, seed=0)
    assert bf16.backbone(jnp.ones((2, 32, 32, 1))).dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    with pytest.raises(ValueError, match="config.model.dtype"):
        models.create_model(_model_config(dtype="float8"), in_channels=1, image_size=32, seed=0)


def test_cnn_memon_is_the_papers_network():
    backbone = models.create_backbone("cnn_memon", in_channels=1, image_size=256, rngs=nnx.Rngs(0))
    assert [c.out_features for c in backbone.convs] == [16, 32, 64, 128]
    assert all(c.kernel_size == (3, 3) for c in backbone.convs)
    assert backbone.num_features == 16 * 16 * 128  # flattened after four 2x2 poolings of 256 px
    assert backbone(jnp.ones((1, 256, 256, 1))).shape == (1, 32768)


def test_image_size_reaches_class_backbones():
    """The flattening CNN is a class; its image_size must not fall back to the default 256."""
    model = models.create_model(ml_collections.ConfigDict({"name": "cnn_memon", "sex_fusion": "winner16bit",
                                                           "head_hidden": (), "dropout": 0.0, "dtype": "float32"}),
                                in_channels=1, image_size=64, seed=0)
    assert model.backbone.num_features == 4 * 4 * 128
    assert model(jnp.ones((2, 64, 64, 1)), jnp.ones((2,))).shape == (2, 1)


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
