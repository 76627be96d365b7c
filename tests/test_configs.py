"""Every paper config runs end to end on the phantoms at a reduced size and a few steps."""

from __future__ import annotations

import importlib
import json
import os

import pytest

from boneage_jax import train

CONFIGS = ["demo", "xception", "convmixer", "vgg19_attention", "age_classes", "googlenet_sex_specific",
           "unet_cnn", "inception_v3", "efficientnet_b0", "unet_segmentation"]
# Smallest inputs the networks take (InceptionV3 and Xception need about 75 px).
IMAGE_SIZE = {"inception_v3": 80, "xception": 80}
# Configs whose ImageNet-size networks take minutes to compile on 2 CPU cores: the default suite
# runs their data pipeline, head and objective with a tiny CNN in place of the network (every
# family's own training step is compiled in tests/test_models_zoo.py); ``make test-slow`` runs
# them with their own network.
HEAVY = {"xception", "convmixer", "vgg19_attention", "googlenet_sex_specific", "inception_v3", "efficientnet_b0"}


def _shrink(config, phantom_dir: str, data_root: str, name: str):
    config.data.manual_dir = phantom_dir
    config.data.data_dir = data_root
    config.data.builder_config = "max512"
    config.data.image_size = IMAGE_SIZE.get(name, 64)
    config.data.num_threads = 1
    config.data.prefetch = 8
    config.data.mask_cache = os.path.join(phantom_dir, "hand-masks")  # the phantoms' own masks as a cache
    config.data.test_from_validation = min(config.data.test_from_validation, 8)
    config.data.balance_per_bin = min(config.data.balance_per_bin, 4)
    config.batch_size = 4
    config.eval_batch_size = 8
    config.num_epochs = 0.0
    config.num_train_steps = 2
    config.warmup_steps = 0
    config.log_every = config.eval_every = config.checkpoint_every = 2
    if config.model.name == "unet":
        config.model.kwargs.base_filters = 4
        config.model.kwargs.depth = 2
    return config


def test_every_config_file_is_listed():
    here = os.path.join(os.path.dirname(__file__), "..", "configs")
    files = {f[:-3] for f in os.listdir(here) if f.endswith(".py") and f not in ("__init__.py", "common.py")}
    assert files == set(CONFIGS)


def _run(name: str, phantom_dir: str, data_root: str, tmp_path, tiny_network: bool) -> None:
    module = importlib.import_module(f"configs.{name}")
    assert "python -m" in module.__doc__  # the docstring gives the command
    config = _shrink(module.get_config(), phantom_dir, data_root, name)
    if tiny_network:
        config.model.name = "cnn_memon"
        config.model.kwargs = {"pool": "avg", "filters": (4, 8)}
    results = train.train_and_evaluate(config, str(tmp_path / name))
    assert set(results) >= {"validation", "test"}
    metric = "jaccard" if config.task == "segmentation" else "mae"
    assert all(metric in r for r in results.values())
    with open(tmp_path / name / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps(results))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_end_to_end(name, phantom_dir, data_root, tmp_path):
    _run(name, phantom_dir, data_root, tmp_path, tiny_network=name in HEAVY)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_config_runs_with_its_own_network(name, phantom_dir, data_root, tmp_path):
    _run(name, phantom_dir, data_root, tmp_path, tiny_network=False)
