"""config_check: every paper config passes; each bad value is one line naming its key."""

from __future__ import annotations

import importlib

import ml_collections
import pytest

from boneage_jax import config_check

CONFIGS = ("demo", "xception", "convmixer", "vgg19_attention", "age_classes", "googlenet_sex_specific",
           "unet_segmentation", "unet_cnn", "inception_v3", "efficientnet_b0")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", ["", "tiny"])
def test_every_config_passes(name, variant):
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    config.data.manual_dir = "/some/rsna"
    config_check.check(config)


NUMBERS_OUT_OF_RANGE = [
    ("data.image_size", 0, r"config.data.image_size is 0; expected an integer >= 16 and <= 4096"),
    ("data.image_size", 64.5, r"config.data.image_size is 64.5; expected an integer"),
    ("batch_size", 0, r"config.batch_size is 0; expected an integer >= 1"),
    ("data.validation_fraction", 1.5, r"config.data.validation_fraction is 1.5; expected a number in \(0, 1\)"),
    ("data.min_age", 300.0, r"config.data.min_age is 300.0; expected a number in \[0, 240\]"),
    ("data.num_folds", 1, r"config.data.num_folds=1, config.data.fold=0"),
]
NOT_ONE_OF_THE_CHOICES = [
    ("model.sex_fusion", "add", r"config.model.sex_fusion is 'add'; expected one of \('none', 'concat'"),
    ("model.head", "ordinal", r"config.model.head is 'ordinal'; expected one of"),
    ("data.sex", "boys", r"config.data.sex is 'boys'; expected one of \('both', 'male', 'female'\)"),
    ("data.builder_config", "max256", r"config.data.builder_config is 'max256'"),
    ("schedule", "linear", r"config.schedule is 'linear'"),
    ("on_damaged_checkpoint", "ignore", r"config.on_damaged_checkpoint is 'ignore'"),
]
UNKNOWN_OR_MISSING = [
    ("data.manual_dir", "", r"config.data.manual_dir is empty"),
    ("model.name", "resnet9000", r"unknown model 'resnet9000'"),
    ("data.preprocess", "resize_pad|sharpen", r"data.preprocess: unknown preprocess op 'sharpen'"),
    ("data.augment", "flip(p=0.5, q=1)", r"data.augment: augment op 'flip' has no argument\(s\) \['q'\]"),
    ("model.class_edges", (0.0, 100.0), r"config.model.class_edges is \(0.0, 100.0\)"),
]


@pytest.mark.parametrize("key, value, message", NUMBERS_OUT_OF_RANGE + NOT_ONE_OF_THE_CHOICES + UNKNOWN_OR_MISSING)
def test_a_bad_value_names_its_key(key, value, message):
    published = importlib.import_module("configs.demo").get_config()
    config = ml_collections.ConfigDict(published.to_dict(), type_safe=False)  # any type, as JSON or a typo gives
    config.data.manual_dir = "/some/rsna"
    node = config
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(ValueError, match=message):
        config_check.check(config)
