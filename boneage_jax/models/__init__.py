"""Model families, found by name in two registries, and the models the training loop runs.

- ``BACKBONES``: networks mapping images (B, H, W, C) to pooled features (B, F), exposing
  ``num_features``; ``config.task="boneage"`` joins one with the sex-fusion head of
  ``heads`` into a ``BoneAgeModel``.
- ``SEGMENTATION_NETWORKS``: networks with ``segment(images) -> (B, H, W, classes)`` logits (the
  U-Net); ``config.task="segmentation"`` wraps one in a ``SegmentationModel``.

Each family module registers its class once per architecture, the one way to register::

    BACKBONES.register("resnet50_keras", KerasResNet, depth=50, aliases=("resnet50",))

which stores ``functools.partial(KerasResNet, depth=50)``. Every family class takes the same
keywords, ``in_channels``, ``image_size``, ``dtype`` and ``rngs`` (``image_size`` fixes the layers
of those whose weights depend on the input size, CaffeNet's fc6, the attention head's locally
connected layer, the flattening CNNs; the others accept any size), plus its own options from
``config.model.kwargs``. Names say the layout where two exist (``resnet50_keras``,
``resnet50_torch``); ``aliases`` keep older names (``resnet50``, ``resnet101``, ...) resolving to
the same constructor, so a run's saved ``config.json`` still builds the same model. Family
modules are imported on first use (``_import_families``).

``create_model`` builds the configured model for a task; both wrappers expose
``pretrained_part()``, the part that ``config.init_from`` initialises. Build models with ``Rngs``
(``nnx.Rngs`` with the same keys, cheaper to trace: ``layers.Rngs``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax import lax

from boneage_jax.models.layers import Rngs

_NOT_FAMILIES = {"heads", "layers"}
# config.model.dtype -> the layers' compute dtype. "mixed_bfloat16": float32 layers whose
# convolutions compute in bfloat16 (kernels.onednn.conv_general_dilated_in_bfloat16), the split of
# PyTorch's CPU autocast; faster than "bfloat16" on CPUs with AMX, where XLA's bfloat16
# elementwise work is slow.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "mixed_bfloat16": jnp.float32}


@dataclasses.dataclass
class Registry:
    """Constructors by name: ``register`` stores ``functools.partial(family, **architecture)``."""

    kind: str  # what the entries are, for messages: "backbone", "segmentation network"
    constructors: dict[str, Callable[..., nnx.Module]] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # old name -> registered name

    def register(self, name: str, family: type[nnx.Module], *, aliases: tuple[str, ...] = (), **architecture) -> None:
        """Registers ``family`` with fixed ``architecture`` keywords under ``name`` (and ``aliases``)."""
        for key in (name, *aliases):
            if any(key in registry.constructors or key in registry.aliases for registry in REGISTRIES):
                raise ValueError(f"model {key!r} registered twice")
        self.constructors[name] = functools.partial(family, **architecture)
        self.aliases.update({alias: name for alias in aliases})

    def names(self) -> list[str]:
        """Registered names, without aliases."""
        _import_families()
        return sorted(self.constructors)

    def resolve(self, name: str) -> str | None:
        """The registered name for ``name`` or one of its aliases; None if unknown."""
        _import_families()
        name = self.aliases.get(name, name)
        return name if name in self.constructors else None

    def describe(self) -> str:
        """Registered names, then aliases: ``a, b, c (aliases: old -> new, ...)``."""
        names = ", ".join(self.names())
        aliases = ", ".join(f"{old} -> {new}" for old, new in sorted(self.aliases.items()))
        return f"{names} (aliases: {aliases})" if aliases else names

    def create(
        self, name: str, *, in_channels: int, image_size: int, dtype: str = "float32", rngs: nnx.Rngs, **kwargs
    ) -> nnx.Module:
        """Builds ``name`` (or an alias); ``kwargs`` are the family's options (``config.model.kwargs``)."""
        resolved = self.resolve(name)
        if resolved is None:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.describe()}")
        network = self.constructors[resolved](
            in_channels=in_channels, image_size=image_size, dtype=compute_dtype(dtype), rngs=rngs, **kwargs
        )
        use_cpu_convolutions(network, in_bfloat16=dtype == "mixed_bfloat16")
        return network


def use_cpu_convolutions(module: nnx.Module, *, in_bfloat16: bool = False) -> None:
    """Points every ``nnx.Conv`` of ``module`` at ``kernels.onednn.conv_general_dilated``, which
    runs a convolution through oneDNN on a one-device CPU backend and through
    ``lax.conv_general_dilated`` otherwise (decided when the model is traced); with
    ``in_bfloat16`` at its bfloat16-computing form (``config.model.dtype="mixed_bfloat16"``)."""
    from boneage_jax.kernels import onednn  # pylint: disable=import-outside-toplevel

    convolution = onednn.conv_general_dilated_in_bfloat16 if in_bfloat16 else onednn.conv_general_dilated
    for _, child in nnx.iter_graph(module):
        if isinstance(child, nnx.Conv) and child.conv_general_dilated is lax.conv_general_dilated:
            child.conv_general_dilated = convolution


BACKBONES = Registry("backbone")
SEGMENTATION_NETWORKS = Registry("segmentation network")
REGISTRIES = (BACKBONES, SEGMENTATION_NETWORKS)


def _import_families() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name not in _NOT_FAMILIES:
            importlib.import_module(f"{__name__}.{module.name}")


def available() -> list[str]:
    """Every registered name of every registry, without aliases."""
    return sorted(name for registry in REGISTRIES for name in registry.names())


def registry_of(name: str) -> Registry:
    """The registry holding ``name`` (or an alias of it)."""
    for registry in REGISTRIES:
        if registry.resolve(name) is not None:
            return registry
    raise ValueError(f"unknown model {name!r}; registered: " +
                     "; ".join(f"{r.kind}s: {r.describe()}" for r in REGISTRIES))


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def create_backbone(
    name: str, *, in_channels: int, image_size: int, dtype: str = "float32", rngs: nnx.Rngs, **kwargs
) -> nnx.Module:
    """Builds a registered backbone (``name`` or an alias)."""
    if BACKBONES.resolve(name) is None:
        raise ValueError(f"unknown model {name!r}; registered: {BACKBONES.describe()}")
    return BACKBONES.create(name, in_channels=in_channels, image_size=image_size, dtype=dtype, rngs=rngs, **kwargs)


class BoneAgeModel(nnx.Module):
    """Backbone features fused with sex, then a head: ``model(images, male) -> outputs``."""

    def __init__(self, backbone: nnx.Module, head: nnx.Module):
        self.backbone = backbone
        self.head = head

    def __call__(self, images: jnp.ndarray, male: jnp.ndarray) -> jnp.ndarray:
        return self.head(self.backbone(images), male)

    def pretrained_part(self) -> nnx.Module:
        """The backbone: what ``config.init_from`` initialises (the head starts fresh)."""
        return self.backbone


class SegmentationModel(nnx.Module):
    """A segmentation network behind the training loop's call convention:
    ``model(images, male) -> (B, H, W, classes)`` mask logits; sex is not used."""

    def __init__(self, network: nnx.Module):
        self.network = network

    def __call__(self, images: jnp.ndarray, male: jnp.ndarray) -> jnp.ndarray:
        del male
        return self.network.segment(images)

    def pretrained_part(self) -> nnx.Module:
        """The whole segmentation network: what ``config.init_from`` initialises."""
        return self.network


def _with_head(network: nnx.Module, model_config: ml_collections.ConfigDict, num_outputs: int,
               rngs: nnx.Rngs) -> BoneAgeModel:
    from boneage_jax.models import heads  # pylint: disable=import-outside-toplevel

    head = heads.FusionHead(
        network.num_features,
        fusion=model_config.sex_fusion,
        hidden=tuple(model_config.head_hidden),
        dropout=model_config.dropout,
        num_outputs=num_outputs,
        dtype=compute_dtype(model_config.dtype),
        rngs=rngs,
    )
    return BoneAgeModel(network, head)


def _segmentation(network: nnx.Module, model_config: ml_collections.ConfigDict, num_outputs: int,
                  rngs: nnx.Rngs) -> SegmentationModel:
    del model_config, num_outputs, rngs
    return SegmentationModel(network)


# What each ``config.task`` builds: its registry, and how the network becomes the model.
TASKS = {"boneage": (BACKBONES, _with_head), "segmentation": (SEGMENTATION_NETWORKS, _segmentation)}


def create_model(
    model_config: ml_collections.ConfigDict, *, in_channels: int, image_size: int, num_outputs: int = 1, seed: int,
    task: str = "boneage",
) -> BoneAgeModel | SegmentationModel:
    """Builds the configured model for ``task``; dropout draws from its own ``dropout`` RNG stream.

    ``task="boneage"``: a backbone from ``BACKBONES`` with a sex-fusion head of ``num_outputs``;
    ``task="segmentation"``: a network from ``SEGMENTATION_NETWORKS`` (``num_outputs`` unused)."""
    if task not in TASKS:
        raise ValueError(f"config.task {task!r}; expected one of {sorted(TASKS)}")
    registry, wrap = TASKS[task]
    name = model_config.name
    if registry.resolve(name) is None:
        elsewhere = [r.kind for r in REGISTRIES if r is not registry and r.resolve(name) is not None]
        what = f"is a {elsewhere[0]}, not a {registry.kind}" if elsewhere else f"is not a registered {registry.kind}"
        raise ValueError(f"config.model.name {name!r} {what} (config.task={task!r}); "
                         f"{registry.kind}s: {registry.describe()}")
    rngs = Rngs(params=seed, dropout=seed + 1)
    network = registry.create(name, in_channels=in_channels, image_size=image_size, dtype=model_config.dtype,
                              rngs=rngs, **dict(model_config.kwargs))
    return wrap(network, model_config, num_outputs, rngs)
