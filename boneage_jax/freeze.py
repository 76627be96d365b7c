"""Frozen parameters (``config.freeze``) and two-phase training (``config.unfreeze_at``).

**Which parts freeze.** ``config.freeze`` is a tuple of glob patterns (``fnmatch``: ``*``, ``?``,
``[1-4]``) over dotted paths of the model, as ``nnx.state(model)`` names them: the model's
``backbone`` and ``head`` (a segmentation model's ``network``), then the family's own layer
names, with list indices as numbers (``backbone.convs.0.kernel``). A pattern freezes what it
names and everything beneath it: a parameter is frozen when a pattern matches its path or the
path of a module above it. A pattern starting with ``!`` unfreezes what it matches, and the
last matching pattern decides (as in ``.gitignore``). Examples:

- ``("backbone",)``: the whole backbone; only the head trains;
- ``("backbone.vgg",)``: the VGG19 of ``vgg19_attention`` (Nguyen et al.), its attention head trains;
- ``("backbone", "!backbone.block5_*")``: a VGG backbone but its last block (all but the last
  stage); ``("backbone.block[1-4]_*",)`` says the same.

A pattern that matches no parameter stops the run before it starts, naming what exists where
the pattern stops matching (``config_check``).

**What frozen means** (Keras ``trainable=False``): a frozen parameter gets no gradient, no
update and no weight decay; the optimiser is built over the trainable parameters alone
(:meth:`Freeze.split`), so frozen ones stay bit-identical and carry no AdamW moments. A frozen
*module* (a pattern matches its path or an ancestor's) runs in inference mode during training:
its BatchNorm normalises with the stored statistics and leaves them unchanged, and its Dropout
is off (Keras keeps dropout active in a non-trainable layer; a frozen part here is a fixed
function, which is what lets ``config.cache_features`` compute it once). :func:`train_mode`
sets these modes on the training graph.

**Two phases.** With ``config.unfreeze_at`` (a step) or ``config.unfreeze_at_epoch`` (epochs,
overriding it), the frozen parts train from that step on (:func:`unfreeze_step`): the head
first, then everything. Each phase has its own optimiser state; at the switch AdamW starts
afresh over all parameters (zero moments, as a second Keras ``compile``), the learning-rate
schedule continues from the global step and a reduce-on-plateau scale carries over. The state
of step ``s`` belongs to the phase of ``s``, so a run resumed on either side of the switch
restores the right one (``boneage_jax.train``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re

import jax
import ml_collections
from flax import nnx

Path = tuple  # a path in a model's state: its keys (str, or int for list indices)
GLOB = re.compile(r"[*?\[]")


def dotted(path: Path) -> str:
    return ".".join(str(k) for k in path)


def _matches(pattern: str, path: Path) -> bool:
    """Whether ``pattern`` matches ``path`` or one of its ancestors."""
    return any(fnmatch.fnmatchcase(dotted(path[:k]), pattern) for k in range(1, len(path) + 1))


@dataclasses.dataclass(frozen=True)
class Freeze:
    """The frozen part of a model, from ``config.freeze``'s patterns (empty: everything trains)."""

    patterns: tuple[str, ...] = ()

    def is_frozen(self, path: Path) -> bool:
        """Whether the parameter or module at ``path`` is frozen (the last matching pattern decides)."""
        frozen = False
        for pattern in self.patterns:
            if _matches(pattern.removeprefix("!"), path):
                frozen = not pattern.startswith("!")
        return frozen

    def trainable(self) -> nnx.filterlib.Filter:
        """The nnx filter of the trainable parameters."""
        if not self.patterns:
            return nnx.Param
        return nnx.All(nnx.Param, lambda path, _: not self.is_frozen(path))

    def split(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(trainable, frozen) parameters; :func:`merge` joins them back into ``params``'s structure."""
        return nnx.split_state(params, self.trainable(), ...)

    @staticmethod
    def merge(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
        return nnx.merge_state(trainable, frozen)


NOTHING = Freeze()


def train_mode(model: nnx.Module, freeze: Freeze) -> None:
    """Puts ``model`` in training mode, its frozen modules in inference mode (BatchNorm on its
    stored statistics, Dropout off)."""
    model.train()
    if freeze.patterns:
        model.set_attributes(lambda path, _: freeze.is_frozen(path), deterministic=True, use_running_average=True,
                             raise_if_not_found=False)


@dataclasses.dataclass(frozen=True)
class Counts:
    """Parameter counts of a model under a :class:`Freeze`.

    ``state``: the values of its other variables (BatchNorm statistics, fixed weights such as
    ``vgg19_attention``'s ``FixedWeight``), which Keras's ``count_params`` counts as
    non-trainable parameters and ``nnx.Param`` does not."""

    trainable: int
    frozen: int
    state: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def describe(self) -> str:
        text = f"{self.total:,} parameters: {self.trainable:,} trainable, {self.frozen:,} frozen"
        return text + (f" (+{self.state:,} batch statistics and fixed weights)" if self.state else "")


def count(params: nnx.State, rest: nnx.State, freeze: Freeze) -> Counts:
    """Counts from ``params`` and ``rest`` (arrays or shapes, e.g. from ``state.abstract``)."""
    trainable, frozen = freeze.split(params)
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    return Counts(trainable=size(trainable), frozen=size(frozen), state=size(rest))


# ----------------------------------------------------------------------------- config


def freeze_of(config: ml_collections.ConfigDict) -> Freeze:
    return Freeze(tuple(config.freeze))


def unfreeze_step(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """The step from which everything trains: ``unfreeze_at_epoch`` epochs (if > 0) in steps,
    else ``unfreeze_at``; 0 when the frozen part stays frozen (or nothing is frozen)."""
    if config.unfreeze_at_epoch:
        return max(1, math.ceil(config.unfreeze_at_epoch * num_train_examples / config.batch_size))
    return config.unfreeze_at


def model_paths(model: nnx.Module) -> tuple[list[Path], list[Path]]:
    """(parameter paths, module paths) of a model (abstract or concrete)."""
    params = [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    modules = [path for path, _ in nnx.iter_modules(model) if path]
    return params, modules


def pattern_errors(patterns, model: nnx.Module) -> list[str]:
    """One message per pattern that matches no parameter path of ``model``, naming what exists
    where the pattern stops matching; and one if the patterns freeze nothing or everything."""
    params, modules = model_paths(model)
    known = params + modules
    errors = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.removeprefix("!"):
            errors.append(f"config.freeze has {pattern!r}; expected a dotted path pattern such as 'backbone'")
            continue
        bare = pattern.removeprefix("!")
        if not any(_matches(bare, path) for path in params):
            errors.append(f"config.freeze has {pattern!r}, which matches no parameter; " + _what_exists(bare, known))
    if not errors:
        freeze = Freeze(tuple(patterns))
        frozen = sum(freeze.is_frozen(path) for path in params)
        if patterns and frozen == 0:
            errors.append(f"config.freeze is {tuple(patterns)!r}, which freezes no parameter")
        elif frozen == len(params):
            errors.append(f"config.freeze is {tuple(patterns)!r}, which freezes every parameter: nothing would train")
    return errors


def _what_exists(pattern: str, known: list[Path]) -> str:
    """'under backbone.vgg there are: block1_conv1, ...' for the deepest existing literal prefix."""
    prefix: list[str] = []
    for part in pattern.split("."):
        if GLOB.search(part) or not any(dotted(path[:len(prefix) + 1]) == ".".join([*prefix, part])
                                        for path in known if len(path) > len(prefix)):
            break
        prefix.append(part)
    children = sorted({str(path[len(prefix)]) for path in known
                       if len(path) > len(prefix) and dotted(path[:len(prefix)]) == ".".join(prefix)},
                      key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    where = f"under {'.'.join(prefix)}" if prefix else "the model has"
    return f"{where}: {', '.join(children)}"


MODE_ATTRIBUTES = ("deterministic", "use_running_average")  # what ``Module.train``/``eval`` switch


def not_frozen_under(model: nnx.Module, freeze: Freeze, prefix: Path) -> list[str]:
    """Dotted paths, sorted, of what under ``prefix`` would change or act differently in training:
    the parameters ``freeze`` leaves trainable and the modules with a training mode (BatchNorm,
    Dropout) it leaves in it."""
    params = model_paths(model)[0]
    modes = [path for path, module in nnx.iter_modules(model)
             if any(hasattr(module, name) for name in MODE_ATTRIBUTES)]
    return sorted(dotted(path) for path in [*params, *modes]
                  if path[:len(prefix)] == tuple(prefix) and not freeze.is_frozen(path))
