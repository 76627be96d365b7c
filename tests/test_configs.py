"""Every paper config runs end to end on the phantoms as its ``tiny`` variant (configs/common.py)."""

from __future__ import annotations

import importlib
import json
import os

import pytest
from conftest import check_run_results, on_phantoms

from boneage_jax import train
from configs import common

CONFIGS = ["demo", "xception", "convmixer", "vgg19_attention", "age_classes", "googlenet_sex_specific",
           "unet_cnn", "inception_v3", "efficientnet_b0", "unet_segmentation", "rsna_small"]
# Configs whose ImageNet-size networks take minutes to compile on 2 CPU cores: their ``tiny``
# variant runs their data pipeline, head and objective with a tiny CNN in place of the network
# (every family's own training step is compiled in tests/test_models_zoo.py); ``make test-slow``
# runs their ``tiny_own_network`` variant.
HEAVY = {"xception", "convmixer", "vgg19_attention", "googlenet_sex_specific", "inception_v3", "efficientnet_b0",
         "rsna_small"}


def test_every_config_file_is_listed():
    here = os.path.join(os.path.dirname(__file__), "..", "configs")
    files = {f[:-3] for f in os.listdir(here) if f.endswith(".py") and f not in ("__init__.py", "common.py")}
    assert files == set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_variants_keep_the_published_config_and_shrink_it(name):
    module = importlib.import_module(f"configs.{name}")
    assert "python -m" in module.__doc__  # the docstring gives the command
    assert f"configs/{name}.py:tiny" in module.__doc__  # ... and the tiny variant
    published, tiny, own = (module.get_config(v) for v in ("", "tiny", "tiny_own_network"))
    assert published.to_dict() == module.get_config().to_dict()
    assert published.data.image_size > common.TINY_IMAGE_SIZE == tiny.data.image_size
    for config in (tiny, own):
        assert (config.batch_size, config.num_train_steps, config.num_epochs) == (8, 6, 0.0)
        assert config.data.builder_config == "max512" and config.task == published.task
        assert (config.data.preprocess, config.data.augment, config.data.normalize) == (
            published.data.preprocess, published.data.augment, published.data.normalize)
        assert (config.model.head, config.model.sex_fusion) == (published.model.head, published.model.sex_fusion)
    assert own.model.name == published.model.name
    tiny_network = {"name": tiny.model.name, "kwargs": tiny.model.kwargs.to_dict()}
    assert (tiny_network == common.TINY_NETWORK) == (name in HEAVY)
    assert (tiny.to_dict() == own.to_dict()) == (name not in HEAVY)


def test_unknown_variant_names_the_choices():
    from configs import demo

    with pytest.raises(ValueError, match=r"config variant 'huge' is unknown: use one of '', 'tiny', 'tiny_own_network'"):
        demo.get_config("huge")


def _run(name: str, variant: str, phantom_dir: str, data_root: str, tmp_path) -> None:
    module = importlib.import_module(f"configs.{name}")
    config = on_phantoms(module.get_config(variant), phantom_dir, data_root)
    results = train.train_and_evaluate(config, str(tmp_path / name))
    check_run_results(str(tmp_path / name), results, config.task)


# demo's tiny run is the session's shared run; unet_segmentation's (widened and trained longer) is
# tests/test_segmentation.py's fixture: both are checked there.
@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in ("demo", "unet_segmentation")])
def test_config_runs_end_to_end(name, phantom_dir, data_root, tmp_path):
    _run(name, "tiny", phantom_dir, data_root, tmp_path)


def test_demo_config_runs_end_to_end(tiny_run):
    """configs/demo.py:tiny is the session's shared run (conftest ``tiny_run``)."""
    with open(os.path.join(tiny_run, "config.json")) as f:
        assert json.load(f)["model"]["kwargs"]["filters"] == [4, 8]
    with open(os.path.join(tiny_run, "results.json")) as f:
        check_run_results(tiny_run, json.load(f), "boneage")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_config_runs_with_its_own_network(name, phantom_dir, data_root, tmp_path):
    _run(name, "tiny_own_network", phantom_dir, data_root, tmp_path)
