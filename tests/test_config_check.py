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


# configs/demo.py's model: backbone.convs.0-4 and backbone.norms.0-4 (cnn_memon), head.hidden.0 and head.out.
FROZEN_PARTS = [
    ("freeze", "backbone", r"config.freeze is 'backbone'; expected a tuple of parameter path patterns"),
    ("freeze", ("backbone", ""), r"config.freeze is \('backbone', ''\); expected a tuple of parameter path patterns"),
    ("freeze", ("backbone.conv",),
     r"^config.freeze has 'backbone.conv', which matches no parameter; under backbone: convs, norms$"),
    ("freeze", ("backbone.convs.7",),
     r"config.freeze has 'backbone.convs.7', which matches no parameter; under backbone.convs: 0, 1, 2, 3, 4$"),
    ("freeze", ("backbone.*.9*",),
     r"config.freeze has 'backbone.\*.9\*', which matches no parameter; under backbone: convs, norms$"),
    ("freeze", ("vgg",), r"config.freeze has 'vgg', which matches no parameter; the model has: backbone, head$"),
    ("freeze", ("!backbone",), r"config.freeze is \('!backbone',\), which freezes no parameter"),
    ("freeze", ("*",), r"config.freeze is \('\*',\), which freezes every parameter: nothing would train"),
    ("unfreeze_at", -1, r"config.unfreeze_at is -1; expected an integer >= 0"),
    ("unfreeze_at", 100, r"config.unfreeze_at is 100 but config.freeze is empty: nothing to unfreeze"),
    ("unfreeze_at_epoch", 2.0, r"config.unfreeze_at_epoch is 2.0 but config.freeze is empty"),
    ("cache_features", "yes", r"config.cache_features is 'yes'; expected True or False"),
    ("cache_features", True, r"config.cache_features needs the whole backbone frozen, but config.freeze is empty"),
]


def _bad_config(changes: dict) -> ml_collections.ConfigDict:
    """configs/demo.py with ``changes`` (dotted keys), any type allowed, as JSON or a typo gives."""
    published = importlib.import_module("configs.demo").get_config()
    config = ml_collections.ConfigDict(published.to_dict(), type_safe=False)
    config.data.manual_dir = "/some/rsna"
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


@pytest.mark.parametrize("key, value, message",
                         NUMBERS_OUT_OF_RANGE + NOT_ONE_OF_THE_CHOICES + UNKNOWN_OR_MISSING + FROZEN_PARTS)
def test_a_bad_value_names_its_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        config_check.check(_bad_config({key: value}))


CACHE_REFUSALS = [
    ({"freeze": ("backbone.convs",)},
     r"^config.cache_features needs the whole backbone frozen, but config.freeze=\('backbone.convs',\) leaves "
     r"backbone.norms.0, backbone.norms.0.bias, backbone.norms.0.scale, backbone.norms.1 and 11 more unfrozen "
     r"\(add 'backbone' to config.freeze\)$"),
    ({"freeze": ("backbone", "!backbone.norms.4")},
     r"leaves backbone.norms.4, backbone.norms.4.bias, backbone.norms.4.scale unfrozen \("),
    ({"data.augment": "flip|affine(rotation=10)"},
     r"^config.cache_features needs a training pipeline without random ops, but it has flip, affine "
     r"\(config.data.augment='flip\|affine\(rotation=10\)'\); set config.data.augment=''$"),
    ({"unfreeze_at": 100}, r"needs the backbone frozen for the whole run, but config.unfreeze_at is 100; set it to 0"),
    ({"task": "segmentation", "model.name": "unet", "model.kwargs": {}, "freeze": ("network.down",)},
     r"config.cache_features needs a backbone and a head \(config.task='boneage'\), not task 'segmentation'"),
]


@pytest.mark.parametrize("changes, message", CACHE_REFUSALS)
def test_feature_cache_refuses_in_one_line(changes, message):
    """The cache needs the whole backbone frozen for the whole run and no random ops."""
    ok = {"freeze": ("backbone",), "data.augment": "", "cache_features": True}
    config_check.check(_bad_config(ok))
    with pytest.raises(ValueError, match=message):
        config_check.check(_bad_config({**ok, **changes}))
