"""The training loop: data-parallel AdamW training, periodic evaluation, Orbax checkpoints.

Read top to bottom: ``train_and_evaluate`` prepares the data, builds the model and optimiser,
restores the latest checkpoint if there is one, runs the jit-compiled train step over a
``data`` mesh of all devices, evaluates on validation every ``eval_every`` steps (keeping the
best checkpoint by the objective's validation metric), and finally scores the best checkpoint
on validation and test into ``results.json``.

With ``config.freeze`` the step trains the parameters the patterns leave trainable (the
optimiser sees only those; frozen modules run in inference mode), and with
``config.unfreeze_at`` training has two phases, each with its own optimiser state and compiled
step (:class:`Phase`); the state of step ``s`` belongs to the phase of ``s``, so resuming finds
the right one (``freeze.py`` says what freezing means). With ``config.cache_features`` the head
trains on backbone features computed once (``feature_cache.py``).

This module keeps the loop, its schedule and optimiser only. The model's split, creation and
checkpoint items: ``state.py``; predicting and scoring a split: ``evaluation.py``; what the
outputs mean and how they are trained, logged and tabulated: ``objectives.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from boneage_jax import allocator, config_check, data, evaluation, feature_cache, inference, input_pipeline, io
from boneage_jax import objectives
from boneage_jax import freeze as freeze_lib
from boneage_jax import state as state_lib
from boneage_jax import writers


LOCK_FILE = ".lock"  # in the workdir, held while a run trains there


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


def written_paths(workdir: str) -> list[str]:
    """What a run writes in ``workdir``: the folder, its checkpoint folders, TensorBoard's folder
    and the metrics file it appends to (those that do not exist yet stand for their parent)."""
    checkpoints = os.path.join(workdir, "checkpoints")
    return [workdir, checkpoints, os.path.join(checkpoints, "latest"), os.path.join(checkpoints, "best"),
            os.path.join(workdir, "tensorboard"), os.path.join(workdir, "metrics.jsonl")]


def _kept_step(workdir: str) -> int | None:
    """The newest finished step in ``checkpoints/latest`` (Orbax renames a step's folder to its
    number once written), or None."""
    folder = os.path.join(workdir, "checkpoints", "latest")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=None)


def check_writable(workdir: str) -> None:
    """Raises :class:`io.NotWritableError` naming ``workdir`` and the folder or file in it that
    cannot be written, with the step a re-run would resume from."""
    where = io.unwritable(written_paths(workdir))
    if where is None:
        return
    kept = _kept_step(workdir)
    resume = (f"the checkpoint of step {kept} is kept and a re-run of the same command resumes from it"
              if kept is not None else "a re-run of the same command starts it")
    raise io.NotWritableError(f"workdir {workdir} is not writable ({where} cannot be written): make it writable "
                              f"(e.g. chmod -R u+w {workdir}) or choose another; {resume}")


# ----------------------------------------------------------------------------- set-up


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    if config.num_epochs:
        return max(1, math.ceil(config.num_epochs * num_train_examples / config.batch_size))
    if config.num_train_steps <= 0:
        raise ValueError("set config.num_train_steps (> 0) or config.num_epochs")
    return config.num_train_steps


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        ) if warmup else optax.constant_schedule(lr)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(total_steps, warmup + 1), end_value=lr * config.final_lr_fraction
        )
    raise ValueError(f"config.schedule {config.schedule!r}; expected 'constant' or 'cosine'")


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW on the schedule, then a scale that reduce-on-plateau lowers (its ``step_size``)."""
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(
        optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                    weight_decay=config.weight_decay)
    )
    parts.append(optax.inject_hyperparams(optax.scale)(step_size=1.0))
    return optax.chain(*parts)


def lr_scale(opt_state) -> float:
    return float(opt_state[-1].hyperparams["step_size"])


def set_lr_scale(opt_state, value: float):
    old = opt_state[-1].hyperparams["step_size"]
    new = np.asarray(value, old.dtype)
    opt_state[-1].hyperparams["step_size"] = jax.make_array_from_process_local_data(old.sharding, new)
    return opt_state


# ----------------------------------------------------------------------------- steps


def train_step(state: dict, batch: dict, rng_state, base_key, *, graphdef, tx, objective: objectives.Task,
               freeze: freeze_lib.Freeze = freeze_lib.NOTHING):
    """One AdamW step; pure, compiled once per phase. Returns the new state and the step's metrics.

    Only the parameters ``freeze`` leaves trainable get gradients and updates (``tx`` and the
    optimiser state are over those alone); the frozen ones pass through untouched. A batch of
    cached backbone features trains the head alone (``inference.outputs``). Dropout draws from a
    key folded from ``base_key`` and the step number, so a resumed run repeats the same masks.
    """
    model = state_lib.merge(graphdef, state["params"], rng_state, state["rest"])
    nnx.reseed(model, dropout=jax.random.fold_in(base_key, state["step"]))

    def loss_fn(model):
        outputs = inference.outputs(model, batch)
        return objective.batch_loss(outputs, batch), outputs

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, freeze.trainable()), has_aux=True)
    (value, outputs), grads = grad_fn(model)
    rest = state_lib.split(model)[3]  # updated batch statistics (the frozen modules' stay as they were)
    trainable, frozen = freeze.split(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    params = freeze.merge(optax.apply_updates(trainable, updates), frozen)
    step_metrics = {"loss": value, **objective.step_metrics(outputs, batch), "grad_norm": optax.tree.norm(grads)}
    new_state = {"step": state["step"] + 1, "params": params, "rest": rest, "opt_state": opt_state}
    return new_state, step_metrics


@dataclasses.dataclass(frozen=True)
class Phase:
    """A span of training with one set of frozen parameters: its optimiser and compiled step."""

    first_step: int
    freeze: freeze_lib.Freeze
    tx: optax.GradientTransformation
    step_fn: Callable


def make_phase(config: ml_collections.ConfigDict, schedule: optax.Schedule, first_step: int,
               freeze: freeze_lib.Freeze, create: Callable[[], nnx.Module], objective: objectives.Task) -> Phase:
    """The phase from ``first_step`` on. Its optimiser state starts afresh there, so its schedule
    is shifted to go on from the global step."""
    shifted = schedule if not first_step else (lambda count: schedule(count + first_step))
    tx = make_optimizer(config, shifted)
    graphdef = state_lib.abstract(create, freeze)[0].train
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, objective=objective, freeze=freeze),
                      donate_argnums=(0,))
    return Phase(first_step, freeze, tx, step_fn)


# ----------------------------------------------------------------------------- the loop


def _resume(config: ml_collections.ConfigDict, latest, target: Callable[[int], dict], train_iter
            ) -> tuple[dict, dict]:
    """The latest checkpoint's (state, meta), restored onto ``target(step)``. If it cannot be
    read, the step before it (the manager keeps two) is offered, and taken with
    ``config.on_damaged_checkpoint='previous'``: the damaged step then moves to
    ``checkpoints/damaged/``. Never a silent restart from scratch."""
    newest = latest.latest_step()
    try:
        return state_lib.restore(latest, target(newest), train_iter, step=newest)
    except state_lib.DamagedCheckpointError as e:
        earlier = [s for s in latest.all_steps() if s < newest]
        if not earlier:
            raise state_lib.DamagedCheckpointError(
                f"{e}; no earlier step is kept: delete {latest.directory} to train from the start") from e
        if config.on_damaged_checkpoint != "previous":
            raise state_lib.DamagedCheckpointError(
                f"{e}; step {earlier[-1]} before it is kept: re-run with --config.on_damaged_checkpoint=previous "
                f"to resume from it") from e
        aside = os.path.join(os.path.dirname(str(latest.directory)), "damaged", f"latest-{newest}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            os.replace(os.path.join(str(latest.directory), str(newest)), aside)
        latest.reload()
        io.log(f"warning: {e}; moved to {aside}, resuming from step {earlier[-1]}")
        return state_lib.restore(latest, target(earlier[-1]), train_iter, step=earlier[-1])


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run trains with, before any state exists: the mesh's shardings (the state replicated,
    batches split over ``data``), the splits, objective and model factory, the schedule and the
    phases (:class:`Phase`; a second one from step ``switch`` with ``config.unfreeze_at``)."""

    replicated: NamedSharding
    batch_sharding: NamedSharding
    splits: dict[str, data.SplitSelection]
    stats: objectives.LabelStats
    objective: objectives.Task
    in_channels: int
    total_steps: int
    schedule: optax.Schedule
    create: Callable[[], nnx.Module]
    switch: int
    phases: list[Phase]

    def phase_at(self, step: int) -> Phase:
        """The phase that the state after ``step`` steps belongs to."""
        return self.phases[-1] if step >= self.phases[-1].first_step else self.phases[0]


def setup(config: ml_collections.ConfigDict, workdir: str | None = None) -> Setup:
    """Checks ``config`` (and that ``workdir``, if given, can be written), prepares the data and
    builds the objective, model factory, schedule and compiled-step phases that
    :func:`train_and_evaluate` trains with (the throughput benchmark,
    ``benchmarks/train_throughput.py``, times the same). Writes nothing but the prepared data."""
    config_check.check(config)
    if workdir is not None:
        check_writable(workdir)  # before the data are prepared: a read-only workdir is said at once
    mesh = state_lib.make_mesh()
    if config.batch_size % jax.device_count() or config.eval_batch_size % jax.device_count():
        raise ValueError(
            f"batch_size {config.batch_size} and eval_batch_size {config.eval_batch_size} must be "
            f"divisible by the {jax.device_count()} devices"
        )
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    # Data.
    builder = data.prepare(config.data)
    splits = data.select_splits(config.data, builder, config.seed)
    stats = objectives.label_stats(config.model, splits["train"].boneage)
    objective = objectives.make_objective(config, stats)
    in_channels = input_pipeline.input_channels(config.data)
    total_steps = num_train_steps(config, len(splits["train"].indices))
    io.log(
        f"Data: {len(splits['train'].indices)} train, {len(splits['validation'].indices)} validation"
        + (f", {len(splits['test'].indices)} test" if "test" in splits else "")
        + f" images at {(config.data.image_size, config.data.image_size, in_channels)}; label mean {stats.mean:.1f} sd {stats.std:.1f} months"
    )

    # Model and optimiser: one phase, or two when the frozen part trains from ``switch`` on.
    schedule = make_schedule(config, total_steps)
    create = state_lib.model_factory(config, in_channels=in_channels, num_outputs=objective.num_outputs,
                                     task=objective.task)
    switch = freeze_lib.unfreeze_step(config, len(splits["train"].indices))
    if switch >= total_steps:
        raise ValueError(f"config.unfreeze_at{'_epoch' if config.unfreeze_at_epoch else ''} gives step {switch}, "
                         f"but the run ends at step {total_steps}: the frozen parameters would never train")
    phases = [make_phase(config, schedule, 0, freeze_lib.freeze_of(config), create, objective)]
    if switch:
        phases.append(make_phase(config, schedule, switch, freeze_lib.NOTHING, create, objective))

    return Setup(replicated, batch_sharding, splits, stats, objective, in_channels, total_steps, schedule, create,
                 switch, phases)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, step_callback: Callable[[int], None] | None = None
) -> dict[str, dict[str, float]]:
    """Trains, evaluates and checkpoints into ``workdir``; returns ``results.json``'s content.

    Re-running with the same workdir resumes from the latest checkpoint. ``step_callback`` is
    called with the step number after every step (for progress hooks and tests).
    """
    # Everything is checked before anything is written: a command that fails here leaves the
    # workdir (and a finished run in it) as it was.
    run = setup(config, workdir)
    replicated, batch_sharding, splits, stats = run.replicated, run.batch_sharding, run.splits, run.stats
    objective, total_steps, schedule, create = run.objective, run.total_steps, run.schedule, run.create
    switch, phases, phase_at = run.switch, run.phases, run.phase_at

    graphs, state, rng_state = state_lib.create(config, create, phases[0].tx, replicated, phases[0].freeze)

    def target(step: int) -> dict:
        """Shapes and shardings of the state after ``step`` steps (its phase's optimiser state)."""
        phase = phase_at(step)
        return {**state_lib.abstract_state({k: v for k, v in state.items() if k != "opt_state"}),
                "opt_state": state_lib.opt_state_target(phase.tx, state["params"], phase.freeze, replicated)}

    def counts(step: int) -> freeze_lib.Counts:
        return freeze_lib.count(state["params"], state["rest"], phase_at(step).freeze)

    if config.init_from:
        from boneage_jax import weights  # pylint: disable=import-outside-toplevel

        source = (f"ImageNet ({weights.imagenet_file(config.model.name)})" if config.init_from == weights.IMAGENET
                  else config.init_from)
        io.log(f"Backbone initialised from {source}")
    base_key = jax.jit(lambda: jax.random.key(config.seed), out_shardings=replicated)()
    first = counts(0)
    io.log(f"Model: {config.model.name} ({first.describe()}"
         + (f"; all of them train from step {switch}" if switch else "")
         + f"), {total_steps} steps, batch {config.batch_size} on {jax.device_count()} device(s) in "
         f"{jax.process_count()} process(es)")

    predict_jit = jax.jit(functools.partial(inference.predict_step, graphdef=graphs.eval, objective=objective))

    def predict(batch: dict) -> dict[str, jax.Array]:
        return predict_jit(state["params"], state["rest"], rng_state, batch)

    caches: dict[str, feature_cache.FeatureCache] = {}  # config.cache_features: train and validation

    def predict_validation() -> dict[str, np.ndarray]:
        if caches:
            return evaluation.predict_batches(
                predict, feature_cache.eval_batches(caches["validation"], config.eval_batch_size), batch_sharding,
                objective)
        return evaluation.predict_split(predict, config, splits["validation"], batch_sharding, objective)

    # One run per workdir: a second run in it stops here, naming the holder (the lock of a
    # killed run goes with its process).
    lock = io.FileLock(os.path.join(workdir, LOCK_FILE), f"workdir {workdir}")
    if jax.process_index() == 0:
        lock.acquire()
    quiet = contextlib.ExitStack()
    quiet.enter_context(state_lib.quiet_refused_saves())  # a read-only workdir: one error, below
    refused = False
    try:
        saved, as_json = os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort())
        if os.path.isfile(saved) and jax.process_index() == 0:
            with open(saved, encoding="utf-8") as f:
                try:
                    differs = json.load(f) != as_json
                except ValueError:
                    differs = True
            if differs:
                io.log(f"note: {saved} differs from this run's config; it now holds this run's")
        io.write_json(saved, as_json)
        io.write_json(os.path.join(workdir, "label_stats.json"), dataclasses.asdict(stats))
        # The frozen backbone's features, once (it is frozen for the whole run, so the initial
        # state's backbone is the one any checkpoint of this run holds).
        if config.cache_features:
            started = time.perf_counter()
            features_jit = jax.jit(functools.partial(feature_cache.backbone_features, graphdef=graphs.eval))
            for name in ("train", "validation"):
                caches[name] = feature_cache.compute(
                    lambda batch: features_jit(state["params"], state["rest"], rng_state, batch), config,
                    splits[name], batch_sharding)
            io.log(f"Feature cache: {len(caches['train'])} train and {len(caches['validation'])} validation images "
                 f"through the frozen backbone in {time.perf_counter() - started:.1f} s; the head trains on their "
                 f"{caches['train'].features.shape[1]} features")
        # Resume.
        if caches:
            train_iter = iter(feature_cache.train_dataset(caches["train"], config.data, splits["train"],
                                                          config.batch_size, config.seed))
        else:
            train_iter = iter(input_pipeline.train_dataset(config.data, splits["train"], config.batch_size,
                                                           config.seed, num_steps=total_steps))
        latest, best = state_lib.checkpoint_managers(workdir)
        meta = {"best_value": None, "best_step": None, "evals_since_best": 0, "evals_since_lr_drop": 0,
                "label_mean": stats.mean, "label_std": stats.std, "stopped_early": False}
        if latest.latest_step() is not None:
            state, meta = _resume(config, latest, target, train_iter)
            io.log(f"Resumed from {latest.directory} at step {int(state['step'])}")
        start_step = int(jax.device_get(state["step"]))
        # A run killed after saving ``best`` but before ``latest`` left best checkpoints from beyond
        # the step it resumes at; the resumed run will reach (and save) those steps again.
        for ahead in [s for s in best.all_steps() if s > start_step]:
            best.delete(ahead)
        writer = writers.MetricWriter(workdir, resume_step=start_step)
        if start_step == 0:
            writer.write(0, "info", {"num_params": first.total, "trainable_params": first.trainable,
                                     "frozen_params": first.frozen, "total_steps": total_steps})

        def unfreeze(state: dict, step: int) -> dict:
            """The state with the next phase's fresh optimiser state (the plateau scale kept)."""
            phase = phase_at(step)
            init = jax.jit(functools.partial(state_lib.init_opt_state, phase.tx, freeze=phase.freeze),
                           out_shardings=replicated)
            opt_state = set_lr_scale(init(state["params"]), lr_scale(state["opt_state"]))
            now = counts(step)
            writer.write(step, "info", {"trainable_params": now.trainable, "frozen_params": now.frozen})
            io.log(f"step {step:>6}  unfrozen: {now.describe()}")
            return {**state, "opt_state": opt_state}

        pending: list[dict] = []  # step metrics not yet fetched from the device

        def flush(step: int, images_per_s: float | None = None) -> None:
            """Fetches pending step metrics, stops on a non-finite loss, logs their mean."""
            if not pending:
                return
            fetched = jax.device_get(pending)
            pending.clear()
            losses = np.array([m["loss"] for m in fetched])
            if not np.all(np.isfinite(losses)):
                bad = step - len(losses) + int(np.flatnonzero(~np.isfinite(losses))[0]) + 1
                kept = (f"the last good checkpoint is kept in {latest.directory}" if latest.latest_step() is not None
                        else f"no checkpoint had been saved yet (the first is due at step {config.checkpoint_every})")
                raise NonFiniteLossError(f"non-finite loss at step {bad}; stopping: {kept} (lower "
                                         f"config.learning_rate or set config.grad_clip_norm)")
            averaged = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
            averaged["lr"] = float(schedule(step)) * lr_scale(state["opt_state"])
            if images_per_s is not None:
                averaged["images_per_s"] = images_per_s
            writer.write(step, "train", averaged)
            shown = "".join(f"  {k.removesuffix('_months')} {v:.3f}" for k, v in averaged.items()
                            if k not in ("loss", "grad_norm", "lr", "images_per_s"))  # the objective's metrics
            io.log(f"step {step:>6}/{total_steps}  loss {averaged['loss']:.4f}{shown}  "
                 f"lr {averaged['lr']:.2e}" + (f"  {images_per_s:.1f} img/s" if images_per_s else ""))

        def evaluate_validation(step: int) -> bool:
            """Scores validation, keeps the best checkpoint, applies plateau and early stopping.

            Returns True when early stopping ends the run."""
            result = objective.score(predict_validation())
            allocator.release()  # the CPU default keeps freed memory: give evaluation's back
            writer.write(step, "validation", result)
            io.log(f"step {step:>6}  validation " + objective.summary(result))
            value = result[objective.monitor]
            sign = -1.0 if objective.higher_is_better else 1.0
            if meta["best_value"] is None or sign * value < sign * meta["best_value"] - config.min_delta:
                meta.update(best_value=value, best_step=step, evals_since_best=0, evals_since_lr_drop=0)
                state_lib.save(best, state, train_iter, meta)
                return False
            meta["evals_since_best"] += 1
            meta["evals_since_lr_drop"] += 1
            if config.plateau_patience and meta["evals_since_lr_drop"] >= config.plateau_patience:
                scale = max(lr_scale(state["opt_state"]) * config.plateau_factor, config.plateau_min_scale)
                state["opt_state"] = set_lr_scale(state["opt_state"], scale)
                meta["evals_since_lr_drop"] = 0
                io.log(f"step {step:>6}  validation {objective.monitor} plateaued: learning rate scaled to {scale:.3g}")
            if config.early_stopping_patience and meta["evals_since_best"] >= config.early_stopping_patience:
                io.log(f"step {step:>6}  early stopping: no improvement in {meta['evals_since_best']} evaluations")
                meta["stopped_early"] = True
                return True
            return False

        # Train.
        step = start_step
        tick, tick_step = time.perf_counter(), step
        stop = False
        try:
            while step < total_steps and not stop:
                batch = evaluation.global_batch(next(train_iter), batch_sharding)
                state, step_metrics = phase_at(step).step_fn(state, batch, rng_state, base_key)
                pending.append(step_metrics)
                step += 1
                if switch and step == switch:
                    state = unfreeze(state, step)
                if step_callback is not None:
                    step_callback(step)
                check_writable(workdir)  # before any of this step's writes (a few os.access calls)
                last = step == total_steps
                if step % config.log_every == 0 or last:
                    jax.block_until_ready(state)
                    now = time.perf_counter()
                    flush(step, (step - tick_step) * config.batch_size / (now - tick))
                    tick, tick_step = now, step
                    allocator.release()  # bounds the kept heap's fragmentation (see allocator.py)
                if step % config.eval_every == 0 or last:
                    flush(step)
                    stop = evaluate_validation(step)
                if step % config.checkpoint_every == 0 or last or stop:
                    flush(step)
                    state_lib.save(latest, state, train_iter, meta)
                if tick_step == step:  # leave evaluation and checkpointing out of the throughput
                    tick = time.perf_counter()
        finally:  # let checkpoints already started finish, also when training fails
            latest.wait_until_finished()
            best.wait_until_finished()

        # Final evaluation of the best checkpoint.
        if best.latest_step() is not None:
            state, _ = state_lib.restore(best, target(best.latest_step()))
        results = {}
        for name in ("validation", "test"):
            if name in splits:
                predictions = evaluation.predict_split(predict, config, splits[name], batch_sharding, objective)
                results[name] = objective.score(predictions)
                if jax.process_index() == 0:
                    objective.write_artefacts(workdir, name, predictions)
                checkpoint_step = int(jax.device_get(state["step"]))
                results[name]["checkpoint_step"] = checkpoint_step
                results[name]["trainable_params"] = counts(checkpoint_step).trainable
                results[name]["frozen_params"] = counts(checkpoint_step).frozen
                writer.write(step, f"final_{name}", results[name])
        io.write_json(os.path.join(workdir, "results.json"), results)
        writer.close()
        latest.close()
        best.close()
        io.log(objective.results_table(results))
        return results
    except (OSError, ValueError) as e:
        # A workdir made read-only mid-run fails in whichever writer comes first (Orbax's
        # background saves raise ValueError): the one error says what to do about it.
        if not isinstance(e, io.NotWritableError) and io.unwritable(written_paths(workdir)) is None:
            raise
        refused = True
        if isinstance(e, io.NotWritableError):
            raise
        check_writable(workdir)
        raise
    finally:
        lock.release()
        if not refused:  # else Orbax's save threads may still be failing: they stay quiet to the end
            quiet.close()

