"""inference: a run's config read over today's defaults."""

from __future__ import annotations

import json

import pytest

from boneage_jax import inference


def test_read_config_fills_keys_an_older_version_did_not_save(tmp_path):
    saved = {"seed": 3, "data": {"image_size": 64, "preprocess": "resize_pad"},
             "model": {"name": "cnn_memon", "kwargs": {"filters": [4, 8]}, "head": "regression"}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = inference.read_config(str(tmp_path))
    assert config.seed == 3 and config.data.image_size == 64 and config.model.kwargs.filters == [4, 8]
    # Keys the old run lacks take the values the old code assumed.
    assert config.task == "boneage" and config.data.mask_in_batch is False and config.data.sampling == "shuffle"
    assert config.data.builder_config == "max512" and config.data.sex == "both" and config.data.num_folds == 0


def test_read_config_names_a_broken_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not a JSON config"):
        inference.read_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        inference.read_config(str(tmp_path / "nothing"))
