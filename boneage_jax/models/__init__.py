"""Model families, found by name through a registry.

Each family lives in its own module and registers a backbone constructor with
``@register("name")``. A backbone is an ``nnx.Module`` mapping images (B, H, W, C) to pooled
features (B, F) and exposing ``num_features``. ``create_model`` joins a backbone with the
sex-fusion head chosen by the config.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
from flax import nnx

BACKBONES: dict[str, Callable[..., nnx.Module]] = {}
_NOT_FAMILIES = {"heads"}


def register(*names: str) -> Callable:
    """Registers a backbone constructor under one or more names."""

    def wrap(fn: Callable) -> Callable:
        for name in names:
            if name in BACKBONES:
                raise ValueError(f"model {name!r} registered twice")
            BACKBONES[name] = fn
        return fn

    return wrap


def _import_families() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name not in _NOT_FAMILIES:
            importlib.import_module(f"{__name__}.{module.name}")


def available() -> list[str]:
    _import_families()
    return sorted(BACKBONES)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def create_backbone(
    name: str, *, in_channels: int, image_size: int, dtype: str = "float32", rngs: nnx.Rngs, **kwargs
) -> nnx.Module:
    """Builds a registered backbone; ``image_size`` reaches those whose layers depend on it."""
    _import_families()
    if name not in BACKBONES:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(BACKBONES))}")
    constructor = BACKBONES[name]
    # A class's own __init__: nnx.Module's metaclass hides it from inspect.signature(class).
    signature = inspect.signature(constructor.__init__ if inspect.isclass(constructor) else constructor)
    if "image_size" in signature.parameters:
        kwargs["image_size"] = image_size
    return constructor(in_channels=in_channels, dtype=compute_dtype(dtype), rngs=rngs, **kwargs)


class BoneAgeModel(nnx.Module):
    """Backbone features fused with sex, then a head: ``model(images, male) -> outputs``."""

    def __init__(self, backbone: nnx.Module, head: nnx.Module):
        self.backbone = backbone
        self.head = head

    def __call__(self, images: jnp.ndarray, male: jnp.ndarray) -> jnp.ndarray:
        return self.head(self.backbone(images), male)


class SegmentationModel(nnx.Module):
    """A segmentation network (the ``unet`` family) behind the training loop's call
    convention: ``model(images, male) -> (B, H, W, 1)`` mask logits; sex is not used."""

    def __init__(self, network: nnx.Module):
        self.network = network

    def __call__(self, images: jnp.ndarray, male: jnp.ndarray) -> jnp.ndarray:
        del male
        return self.network.segment(images)


def create_model(
    model_config: ml_collections.ConfigDict, *, in_channels: int, image_size: int, num_outputs: int = 1, seed: int,
    task: str = "boneage",
) -> BoneAgeModel | SegmentationModel:
    """Builds the configured model; dropout draws from its own ``dropout`` RNG stream.

    ``task="segmentation"`` wraps a network with a ``segment`` method (the U-Net) instead of
    adding a sex-fusion head."""
    from boneage_jax.models import heads  # pylint: disable=import-outside-toplevel

    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    if task == "segmentation":
        network = create_backbone(model_config.name, in_channels=in_channels, image_size=image_size,
                                  dtype=model_config.dtype, rngs=rngs, **dict(model_config.get("kwargs", {})))
        if not hasattr(network, "segment"):
            raise ValueError(f"config.task='segmentation' needs a segmentation network such as 'unet'; "
                             f"{model_config.name!r} has no segment method")
        return SegmentationModel(network)
    backbone = create_backbone(
        model_config.name,
        in_channels=in_channels,
        image_size=image_size,
        dtype=model_config.dtype,
        rngs=rngs,
        **dict(model_config.get("kwargs", {})),
    )
    head = heads.FusionHead(
        backbone.num_features,
        fusion=model_config.sex_fusion,
        hidden=tuple(model_config.head_hidden),
        dropout=model_config.dropout,
        num_outputs=num_outputs,
        dtype=compute_dtype(model_config.dtype),
        rngs=rngs,
    )
    return BoneAgeModel(backbone, head)
