"""Every key of a training config checked up front, each failure one line naming the key.

``check(config)`` runs before a run touches its workdir or its data: a misspelt choice, an
impossible size or fraction, an op spec that does not parse or a model name that is not
registered stops the command with ``config.KEY is VALUE; expected ...`` instead of a traceback
minutes later. The choices come from the modules that own them (objectives, data, models, ops).
``config.freeze`` is checked against the configured model, built abstractly: a pattern that
matches no parameter names what exists where it stops matching (``freeze.pattern_errors``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import ml_collections
from flax import nnx

from boneage_jax import data, feature_cache, freeze, models, objectives, ops, weights

SCHEDULES = ("constant", "cosine")
LOSSES = ("mse", "mae", "huber")
FUSIONS = ("none", "concat", "winner16bit")
BUILDER_CONFIGS = ("original", "max1024", "max512")
SAMPLINGS = ("shuffle", "balanced")
ROIS = ("hand", "roi1", "roi2", "roi3")
DAMAGED_POLICIES = ("stop", "previous")


def _one_of(choices) -> tuple[Callable, str]:
    return (lambda v: v in choices), f"one of {tuple(choices)}"


def _integer(low: int, high: float = float("inf")) -> tuple[Callable, str]:
    def ok(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v <= high

    return ok, f"an integer >= {low}" + ("" if high == float("inf") else f" and <= {high}")


def _number(low: float, high: float = float("inf"), *, open_low: bool = False, open_high: bool = False):
    def ok(v) -> bool:
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            return False
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    left, right = "(" if open_low else "[", ")" if open_high else "]"
    return ok, f"a number in {left}{low:g}, {high:g}{right}"


RULES: dict[str, tuple[Callable, str]] = {
    "seed": _integer(0),
    "task": _one_of(objectives.TASKS),
    "data.builder_config": _one_of(BUILDER_CONFIGS),
    "data.image_size": _integer(16, 4096),
    "data.validation_fraction": _number(0.0, 1.0, open_low=True, open_high=True),
    "data.num_threads": _integer(0),
    "data.prefetch": _integer(1),
    "data.num_workers": _integer(0),
    "data.cache_preprocessed": ((lambda v: v is None or isinstance(v, bool)), "True, False or None (automatic)"),
    "data.normalize_on_device": ((lambda v: isinstance(v, bool)), "True or False"),
    "data.augment_on_device": ((lambda v: isinstance(v, bool)), "True or False"),
    "data.sex": _one_of(data.SEXES),
    "data.min_age": _number(0.0, 240.0),
    "data.max_age": _number(0.0, 240.0),
    "data.num_folds": _integer(0),
    "data.fold": _integer(0),
    "data.sampling": _one_of(SAMPLINGS),
    "data.balance_bins": _integer(1),
    "data.balance_per_bin": _integer(1),
    "data.test_from_validation": _integer(0),
    "data.train_subset": _integer(0),
    "data.roi": _one_of(ROIS),
    "model.sex_fusion": _one_of(FUSIONS),
    "model.head": _one_of(objectives.HEADS),
    "model.num_classes": _integer(2),
    "model.dropout": _number(0.0, 1.0, open_high=True),
    "model.dtype": _one_of(tuple(models.DTYPES)),
    "batch_size": _integer(1),
    "eval_batch_size": _integer(1),
    "num_train_steps": _integer(0),
    "num_epochs": _number(0.0),
    "loss": _one_of(LOSSES),
    "learning_rate": _number(0.0),
    "weight_decay": _number(0.0),
    "adam_b1": _number(0.0, 1.0, open_high=True),
    "adam_b2": _number(0.0, 1.0, open_high=True),
    "schedule": _one_of(SCHEDULES),
    "warmup_steps": _integer(0),
    "final_lr_fraction": _number(0.0, 1.0),
    "grad_clip_norm": _number(0.0),
    "plateau_patience": _integer(0),
    "plateau_factor": _number(0.0, 1.0, open_low=True),
    "plateau_min_scale": _number(0.0, 1.0),
    "early_stopping_patience": _integer(0),
    "log_every": _integer(1),
    "eval_every": _integer(1),
    "checkpoint_every": _integer(1),
    "on_damaged_checkpoint": _one_of(DAMAGED_POLICIES),
    "freeze": ((lambda v: isinstance(v, (tuple, list)) and all(isinstance(p, str) and p.removeprefix("!")
                                                                for p in v)),
               "a tuple of parameter path patterns such as ('backbone',)"),
    "unfreeze_at": _integer(0),
    "unfreeze_at_epoch": _number(0.0),
    "cache_features": ((lambda v: isinstance(v, bool)), "True or False"),
}


def _value(config: ml_collections.ConfigDict, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key whose value cannot work (see the module docstring)."""
    for key, (ok, expected) in RULES.items():
        value = _value(config, key)
        if not ok(value):
            raise ValueError(f"config.{key} is {value!r}; expected {expected}")
    d = config.data
    if d.min_age > d.max_age:
        raise ValueError(f"config.data.min_age {d.min_age} is above config.data.max_age {d.max_age}")
    if d.num_folds == 1 or (d.num_folds and d.fold >= d.num_folds):
        raise ValueError(f"config.data.num_folds={d.num_folds}, config.data.fold={d.fold}; expected num_folds 0 "
                         f"(off) or >= 2, and fold in 0..num_folds-1")
    if not d.manual_dir:
        raise ValueError("config.data.manual_dir is empty: set it to the RSNA download or a phantom folder")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ValueError("config.num_train_steps and config.num_epochs are both 0; set one of them")
    if config.model.class_edges and (len(config.model.class_edges) < 3
                                     or any(b <= a for a, b in zip(config.model.class_edges,
                                                                   config.model.class_edges[1:]))):
        raise ValueError(f"config.model.class_edges is {tuple(config.model.class_edges)}; expected at least 3 "
                         f"increasing ages in months")
    models.registry_of(config.model.name)  # "unknown model ..." with the registered names
    if config.init_from == weights.IMAGENET:
        try:
            weights.imagenet_file(config.model.name)  # the model has a weight package, and it is installed
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"config.init_from is 'imagenet': {e}") from None
    ops.Pipeline.from_config(d)  # each spec parses, names known ops and arguments ("data.preprocess: ...")
    check_freeze(config)


def check_freeze(config: ml_collections.ConfigDict) -> None:
    """``freeze``, ``unfreeze_at`` and ``cache_features`` against the configured model, built
    abstractly (nothing allocated): every pattern matches a parameter path; something is frozen
    before anything unfreezes; the feature cache's conditions (``feature_cache.refusal``)."""
    if (config.unfreeze_at or config.unfreeze_at_epoch) and not config.freeze:
        key = "unfreeze_at_epoch" if config.unfreeze_at_epoch else "unfreeze_at"
        raise ValueError(f"config.{key} is {config[key]!r} but config.freeze is empty: nothing to unfreeze")
    if config.cache_features and not config.freeze:
        raise ValueError("config.cache_features needs the whole backbone frozen, but config.freeze is empty; "
                         "set config.freeze=('backbone',)")
    if not config.freeze:
        return
    try:
        model = nnx.eval_shape(lambda: models.create_model(
            config.model, in_channels=ops.Pipeline.from_config(config.data).num_channels,
            image_size=config.data.image_size, seed=config.seed, task=config.task))
    except TypeError as e:  # a model.kwargs key the family does not take
        raise ValueError(f"config.model.kwargs do not fit model {config.model.name!r}: {e}") from None
    errors = freeze.pattern_errors(tuple(config.freeze), model)
    if errors:
        raise ValueError(errors[0])
    if config.cache_features:
        reason = feature_cache.refusal(config, model)
        if reason:
            raise ValueError(reason)
