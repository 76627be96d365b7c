"""Shared fixtures: a small phantom dataset and a tiny training config."""

from __future__ import annotations

import os

import pytest

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> str:
    """48 train / 16 validation / 16 test phantom radiographs at 160x128, official layout."""
    from tfds_rsna import phantom

    out = str(tmp_path_factory.mktemp("phantom") / "manual")
    phantom.write_dataset(out, num_train=48, num_validation=16, num_test=16, seed=0, height=160, width=128)
    return out


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_demo_config(phantom_dir: str, data_root: str, num_train_steps: int = 6):
    """configs/demo.py shrunk to seconds: 32 px, batch 8, a few steps (for module-scoped runs too)."""
    from configs import demo

    config = demo.get_config()
    config.data.manual_dir = phantom_dir
    config.data.data_dir = data_root
    config.data.image_size = 32
    config.data.num_threads = 1
    config.data.prefetch = 8
    config.model.kwargs.filters = (4, 8)
    config.model.head_hidden = (8,)
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = num_train_steps
    config.warmup_steps = 0
    config.log_every = 2
    config.eval_every = 3
    config.checkpoint_every = 2
    return config


@pytest.fixture
def tiny_config(phantom_dir, data_root):
    """configs/demo.py shrunk to seconds: 32 px, batch 8, 6 steps."""
    return tiny_demo_config(phantom_dir, data_root)
