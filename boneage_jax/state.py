"""The model as arrays: its split, abstract form, creation on the devices, and checkpoints.

A model splits (:func:`split`) into a graph definition and three pytrees: ``params``
(``nnx.Param``), ``rng_state`` (the dropout RNG streams, ``nnx.RngState``) and ``rest`` (batch
statistics and any other variable); :func:`merge` joins them back. The graph definition comes
in two modes, training (dropout on, batch statistics updated; the frozen modules of
``config.freeze`` in inference mode, ``boneage_jax.freeze``) and evaluation (:class:`Graphs`).

Models are created inside one compiled program (:func:`build`, :func:`create`), compiled as a
one-off program (:func:`one_off_options`: LLVM level 0 on the CPU, where XLA's default level
spent 41 s compiling EfficientNet-Lite0's initialiser). Weights read from a file go into the
abstract model first (``nnx.eval_shape``), so the initialiser computes only what the file does
not set.

The training state is a dict ``{"step", "params", "rest", "opt_state"}``, replicated over a
``data`` mesh of all devices (:func:`make_mesh`, :func:`create`); ``opt_state`` is the optimiser's state of
the trainable parameters only (:func:`init_opt_state`). A checkpoint (Orbax, one
folder per step) keeps each part as its own item: ``params``, ``rest``, ``opt_state``,
``step``, ``data_iter`` (the grain iterator) and ``meta`` (JSON: best validation value,
early-stopping and plateau counters, label statistics). Inference restores ``params`` and
``rest`` alone (:func:`restore_weights`), so it needs no optimiser. Runs written before this
layout kept step, params, rest and optimiser state in one ``state`` item (``LEGACY_ITEM``);
both functions restore them too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding

from boneage_jax import freeze as freeze_lib
from boneage_jax import models

ARRAY_ITEMS = ("params", "rest", "opt_state", "step")
KEEP_STEPS = 2  # per manager: the step before the newest survives damage to the newest
LEGACY_ITEM = "state"  # before the split: {step, params, rest, opt_state} in one item


def _as_item(name: str, tree):
    """The tree saved under item ``name`` (Orbax's standard handler saves no bare scalar)."""
    return {"step": tree} if name == "step" else tree


def _from_item(name: str, tree):
    return tree["step"] if name == "step" else tree


# ----------------------------------------------------------------------------- split and merge


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """(graphdef, params, rng_state, rest) of a model."""
    return nnx.split(model, nnx.Param, nnx.RngState, ...)


def merge(graphdef: nnx.GraphDef, params, rng_state, rest) -> nnx.Module:
    """The model that :func:`split` took apart."""
    return nnx.merge(graphdef, params, rng_state, rest)


@dataclasses.dataclass(frozen=True)
class Graphs:
    """The model's graph definition in training mode and in evaluation mode."""

    train: nnx.GraphDef
    eval: nnx.GraphDef


def model_factory(config: ml_collections.ConfigDict, *, in_channels: int, num_outputs: int,
                  task: str) -> Callable[[], nnx.Module]:
    """A function that builds the configured model (the same weights on every call)."""

    def create() -> nnx.Module:
        return models.create_model(config.model, in_channels=in_channels, image_size=config.data.image_size,
                                   num_outputs=num_outputs, seed=config.seed, task=task)

    return create


def abstract(create: Callable[[], nnx.Module],
             freeze: freeze_lib.Freeze = freeze_lib.NOTHING) -> tuple[Graphs, nnx.State, nnx.State]:
    """The graphs and the shapes of ``params`` and ``rest``, without allocating any weight; the
    training graph runs ``freeze``'s frozen modules in inference mode."""
    model = nnx.eval_shape(create)
    freeze_lib.train_mode(model, freeze)
    train_graphdef, params, _, rest = split(model)
    model.eval()
    eval_graphdef = split(model)[0]
    return Graphs(train_graphdef, eval_graphdef), params, rest


def rng_state(create: Callable[[], nnx.Module]) -> nnx.State:
    """The dropout RNG state of a fresh model (not checkpointed: training reseeds it per step)."""
    return jax.jit(lambda: split(create())[2], compiler_options=one_off_options())()


def one_off_options() -> dict:
    """XLA options for a program that runs once (a model's initialiser): on the CPU, LLVM at
    optimisation level 0. The initialiser of ``create_backbone("efficientnet_lite0",
    in_channels=1, image_size=32)`` (``jax.jit(...).lower().compile()``, then one call) took 41.4 s
    to compile and 0.06 s to run at XLA:CPU's default level 2; 4.8 s and 0.22 s at level 0. Its
    values differ from level 2's by rounding (at most 1.8e-7)."""
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def build(create: Callable[[], nnx.Module], load: Callable[[nnx.Module], object] | None = None) -> nnx.Module:
    """``create()`` computed in one compiled program (eagerly, each initialiser compiles on its own).

    With ``load`` (a weight loader, e.g. ``lambda m: weights.load_arrays(m, arrays, "torch")``), the
    model is first built abstractly (``nnx.eval_shape``) and ``load`` fills it; only what it left
    unset is computed by the initialiser, in a program from which XLA drops the rest: converting
    EfficientNet-Lite0's ImageNet file (every weight set) compiles no initialiser at all, where a
    full one took 6 s on this machine."""
    model = nnx.eval_shape(create)
    if load is not None:
        load(model)
    graphdef, values = nnx.split(model)
    missing = [path for path, variable in nnx.to_flat_state(values) if _is_abstract(variable)]
    if missing:
        def compute() -> list:
            fresh = dict(nnx.to_flat_state(nnx.state(create())))
            return [fresh[path].get_value() for path in missing]

        _set(values, missing, jax.jit(compute, compiler_options=one_off_options())())
    return nnx.merge(graphdef, values)


def _is_abstract(variable: nnx.Variable) -> bool:
    return isinstance(variable.get_value(), jax.ShapeDtypeStruct)


def _set(values: nnx.State, paths: list[tuple], arrays: list) -> None:
    """Sets the variables of ``values`` at ``paths`` (``nnx.to_flat_state``'s) to ``arrays``."""
    by_path = dict(nnx.to_flat_state(values))
    for path, array in zip(paths, arrays, strict=True):
        by_path[path].set_value(array)


# ----------------------------------------------------------------------------- creation


def make_mesh() -> jax.sharding.Mesh:
    """A 1-d ``data`` mesh of all devices; the compiler propagates shardings (Auto axes)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def init_opt_state(tx: optax.GradientTransformation, params: nnx.State, freeze: freeze_lib.Freeze):
    """The optimiser's initial state: over the trainable parameters alone."""
    return tx.init(freeze.split(params)[0])


def opt_state_target(tx: optax.GradientTransformation, params: nnx.State, freeze: freeze_lib.Freeze,
                     sharding: NamedSharding):
    """Shapes, dtypes and sharding of :func:`init_opt_state`'s result (a restore target), without
    allocating it."""
    shapes = jax.eval_shape(functools.partial(init_opt_state, tx, freeze=freeze), params)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def create(config: ml_collections.ConfigDict, create_model: Callable[[], nnx.Module],
           tx: optax.GradientTransformation, sharding: NamedSharding,
           freeze: freeze_lib.Freeze = freeze_lib.NOTHING) -> tuple[Graphs, dict, nnx.State]:
    """Builds the model inside ``jax.jit`` so its state lands replicated on every device of every
    process. With ``config.init_from``, the pretrained part (backbone or segmentation network)
    starts from weights written by ``python -m boneage_jax.weights``, or for ``imagenet`` from
    the installed ImageNet weight package of the model (``weights.init_pretrained``); the head
    is fresh.

    ``tx`` is built over the parameters that ``freeze`` leaves trainable. Returns (graphs,
    training state, dropout RNG state)."""
    paths, pretrained = [], []
    if config.init_from:
        from boneage_jax import weights  # pylint: disable=import-outside-toplevel

        # Read into the abstract model: the initialiser is compiled once, below, and XLA drops the
        # draws of whatever the file sets.
        part = nnx.eval_shape(create_model).pretrained_part()
        weights.init_pretrained(part, config.init_from, config.model.name)
        # Parameters and batch statistics only (RNG state, the dropout keys, is not a weight),
        # those the file set.
        loaded = [(path, variable) for path, variable in
                  nnx.to_flat_state(nnx.state(part, (nnx.Param, nnx.BatchStat))) if not _is_abstract(variable)]
        paths = [path for path, _ in loaded]
        pretrained = [np.asarray(variable.get_value()) for _, variable in loaded]

    def init(pretrained):
        model = create_model()
        if pretrained:
            part_state = nnx.state(model.pretrained_part(), (nnx.Param, nnx.BatchStat))
            _set(part_state, paths, pretrained)
            nnx.update(model.pretrained_part(), part_state)
        _, params, rngs, rest = split(model)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
                 "opt_state": init_opt_state(tx, params, freeze)}
        return state, rngs

    graphs = abstract(create_model, freeze)[0]
    state, rngs = jax.jit(init, out_shardings=sharding, compiler_options=one_off_options())(pretrained)
    return graphs, state, rngs


def abstract_state(state: dict) -> dict:
    """Shapes, dtypes and shardings of a training state (a restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_managers(workdir: str) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
    """``checkpoints/latest`` (for resuming) and ``checkpoints/best`` (by the validation metric)."""
    root = os.path.join(os.path.abspath(workdir), "checkpoints")

    def manager(name: str) -> ocp.CheckpointManager:
        # Both managers may save the same step at once: their multi-process barriers need
        # distinct names.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=KEEP_STEPS, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
        )
        return ocp.CheckpointManager(os.path.join(root, name), options=options)

    return manager("latest"), manager("best")


def save(manager: ocp.CheckpointManager, state: dict, iterator, meta: dict) -> None:
    """Saves the training state's parts, the data iterator and ``meta`` as separate items."""
    step = int(jax.device_get(state["step"]))
    # An empty part (``rest`` of a model without batch statistics) has no item: Orbax saves no
    # empty tree.
    items = {name: ocp.args.StandardSave(_as_item(name, state[name])) for name in ARRAY_ITEMS
             if jax.tree.leaves(state[name])}
    manager.save(step, args=ocp.args.Composite(**items, data_iter=grain.checkpoint.CheckpointSave(iterator),
                                               meta=ocp.args.JsonSave(meta)), force=True)


_DENIED = ("PERMISSION_DENIED", "Permission denied", "Read-only file system")


class _DeniedWriteFilter(logging.Filter):
    """Drops Orbax's background-thread error records about a write that was refused."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
        return not any(word in text for word in _DENIED)


@contextlib.contextmanager
def quiet_refused_saves() -> Iterator[None]:
    """While inside: Orbax's background save threads log nothing about a write that the file
    system refused (a workdir made read-only mid-save logs one traceback per array and thread),
    and the ``Event loop is closed`` tracebacks of their callbacks after such a failure go
    unprinted. The failure itself still reaches the caller: the next ``save`` or
    ``wait_until_finished`` raises it."""
    handler_filter = _DeniedWriteFilter()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(handler_filter)
    handlers = [h for h in absl_logger.handlers + logging.getLogger().handlers]
    for handler in handlers:  # absl's handler sits on the root logger: records reach it there
        handler.addFilter(handler_filter)
    previous = sys.unraisablehook

    def unraisablehook(unraisable) -> None:
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = unraisablehook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        absl_logger.removeFilter(handler_filter)
        for handler in handlers:
            handler.removeFilter(handler_filter)


def is_legacy(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether ``step`` was saved in the one-item layout of runs from before the split."""
    return os.path.isdir(os.path.join(str(manager.directory), str(step), LEGACY_ITEM))


class DamagedCheckpointError(ValueError):
    """A checkpoint step cannot be read; the message names the step and, where found, the file."""


_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")


def damaged_file(step_dir: str, error: BaseException) -> str | None:
    """The file of a checkpoint step that is damaged: a JSON file of Orbax's, grain's or ours that
    does not parse, or else the file that the error names."""
    for folder, _, files in sorted(os.walk(step_dir)):
        for name in sorted(files):
            if name in _JSON_FILES or name.endswith(".json") or os.path.basename(folder) == "array_metadatas":
                path = os.path.join(folder, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        json.load(f)
                except (OSError, ValueError):
                    return path
    named = re.findall(r'(?:local file |file )"?(/[^"\s]+)', str(error))
    return named[-1] if named else None


def _damage(manager: ocp.CheckpointManager, step: int, error: BaseException) -> DamagedCheckpointError:
    step_dir = os.path.join(str(manager.directory), str(step))
    where = damaged_file(step_dir, error)
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return DamagedCheckpointError(f"checkpoint {step_dir} cannot be read" + (f": {where} is damaged" if where else "")
                                  + f" ({type(error).__name__}: {reason})")


def restore(manager: ocp.CheckpointManager, target: dict, iterator=None, step: int | None = None) -> tuple[dict, dict]:
    """(training state, meta) of the manager's ``step`` (default: its latest), restored onto
    ``target``'s shapes and shardings (:func:`abstract_state`); also the data iterator when
    given. :class:`DamagedCheckpointError` names a step that cannot be read."""
    step = manager.latest_step() if step is None else step
    try:
        return _restore(manager, step, target, iterator)
    except Exception as e:  # Orbax, tensorstore and json raise many types for damaged files
        raise _damage(manager, step, e) from e


def _restore(manager: ocp.CheckpointManager, step: int, target: dict, iterator) -> tuple[dict, dict]:
    items = {"meta": ocp.args.JsonRestore()}
    if iterator is not None:
        items["data_iter"] = grain.checkpoint.CheckpointRestore(iterator)
    if is_legacy(manager, step):
        items[LEGACY_ITEM] = ocp.args.StandardRestore(target)
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        return restored[LEGACY_ITEM], restored["meta"]
    saved = [name for name in ARRAY_ITEMS if jax.tree.leaves(target[name])]
    items.update({name: ocp.args.StandardRestore(_as_item(name, target[name])) for name in saved})
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return ({name: _from_item(name, restored[name]) if name in saved else target[name] for name in ARRAY_ITEMS},
            restored["meta"])


def restore_weights(directory: str, params: nnx.State, rest: nnx.State) -> tuple[nnx.State, nnx.State, int]:
    """(params, rest, step) of the latest checkpoint in ``directory``, onto the shapes ``params``
    and ``rest`` (from :func:`abstract`): the optimiser state is not read."""
    target = abstract_state({"params": params, "rest": rest, "step": jax.ShapeDtypeStruct((), np.int32)})
    manager = ocp.CheckpointManager(os.path.abspath(directory))
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        try:
            if is_legacy(manager, step):
                # The optimiser state in that item is left on disk.
                args = {LEGACY_ITEM: ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True)}
                restored = manager.restore(step, args=ocp.args.Composite(**args))[LEGACY_ITEM]
            else:
                saved = [name for name in target if jax.tree.leaves(target[name])]
                args = {name: ocp.args.StandardRestore(_as_item(name, target[name])) for name in saved}
                parts = manager.restore(step, args=ocp.args.Composite(**args))
                restored = {**target, **{name: _from_item(name, parts[name]) for name in saved}}
        except Exception as e:  # Orbax, tensorstore and json raise many types for damaged files
            raise _damage(manager, step, e) from e
    finally:
        manager.close()
    return restored["params"], restored["rest"], int(jax.device_get(restored["step"]))
