"""boneage_jax.state: split and merge, checkpoint items, and runs saved in the layout from before
the split (one ``state`` item), which must still evaluate, predict and resume."""

from __future__ import annotations

import json
import os
import shutil

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_demo_config
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from boneage_jax import data, evaluation, inference, input_pipeline, objectives, state, train

# Its module-scoped trained run is built once: every test of the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_state")


def save_legacy(manager: ocp.CheckpointManager, train_state: dict, iterator, meta: dict) -> None:
    """``train.save_checkpoint`` as the code wrote checkpoints before ``state.py`` (commit 0a0e2d5):
    step, params, rest and optimiser state in one ``state`` item."""
    step = int(jax.device_get(train_state["step"]))
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(train_state),
            data_iter=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def rewrite_as_legacy(workdir: str, legacy: str) -> None:
    """A copy of ``workdir`` whose checkpoints are in the legacy one-item layout."""
    shutil.copytree(workdir, legacy, ignore=shutil.ignore_patterns("checkpoints"))
    config = inference.read_config(workdir)
    config.model.kwargs.filters = tuple(config.model.kwargs.filters)
    config.model.head_hidden = tuple(config.model.head_hidden)
    with open(os.path.join(workdir, "label_stats.json")) as f:
        stats = objectives.LabelStats(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()})
    objective = objectives.make_objective(config, stats)
    create = state.model_factory(config, in_channels=input_pipeline.input_channels(config.data),
                                 num_outputs=objective.num_outputs, task=objective.task)
    tx = train.make_optimizer(config, train.make_schedule(config, config.num_train_steps))
    replicated = NamedSharding(state.make_mesh(), P())
    _, fresh, _ = state.create(config, create, tx, replicated)
    splits = data.select_splits(config.data, data.prepare(config.data), config.seed)
    for which in ("latest", "best"):
        iterator = iter(input_pipeline.train_dataset(config.data, splits["train"], config.batch_size, config.seed))
        source = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", which))
        restored, meta = state.restore(source, state.abstract_state(fresh), iterator)
        source.close()
        target = ocp.CheckpointManager(os.path.join(legacy, "checkpoints", which),
                                       options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        save_legacy(target, restored, iterator, meta)
        target.wait_until_finished()
        target.close()


def _config(phantom_dir: str, data_root: str, steps: int) -> ml_collections.ConfigDict:
    config = tiny_demo_config(phantom_dir, data_root, num_train_steps=steps)
    config.eval_every = 2
    config.model.dropout = 0.2
    return config


@pytest.fixture(scope="module")
def runs(phantom_dir, data_root, tmp_path_factory) -> tuple[str, str]:
    """(a run of 4 steps saved as today, the same run's checkpoints in the legacy layout)."""
    root = tmp_path_factory.mktemp("state")
    workdir, legacy = str(root / "current"), str(root / "legacy")
    train.train_and_evaluate(_config(phantom_dir, data_root, 4), workdir)
    rewrite_as_legacy(workdir, legacy)
    return workdir, legacy


def _step_dir(workdir: str, which: str) -> str:
    folder = os.path.join(workdir, "checkpoints", which)
    return os.path.join(folder, max(os.listdir(folder), key=lambda n: int(n) if n.isdigit() else -1))


def test_checkpoint_items_are_separate(runs):
    workdir, legacy = runs
    items = set(os.listdir(_step_dir(workdir, "latest")))
    assert {"params", "rest", "opt_state", "step", "data_iter", "meta"} <= items and "state" not in items
    assert {"state", "data_iter", "meta"} <= set(os.listdir(_step_dir(legacy, "latest")))
    assert "params" not in os.listdir(_step_dir(legacy, "latest"))


def test_split_and_merge_are_inverse(runs):
    run = inference.load_run(runs[0])
    model = run.model()
    graphdef, params, rng_state, rest = state.split(model)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(run.params), strict=True):
        np.testing.assert_array_equal(x, y)
    again = state.merge(graphdef, params, rng_state, rest)
    images, male = np.zeros((2, 32, 32, 1), np.float32), np.ones(2, np.float32)
    np.testing.assert_array_equal(again(images, male), model(images, male))
    assert isinstance(again, nnx.Module)


def test_legacy_run_evaluates_and_predicts_the_same(runs):
    workdir, legacy = runs
    new, old = evaluation.evaluate(workdir, split="test", verbose=False), evaluation.evaluate(legacy, split="test",
                                                                                        verbose=False)
    assert old.result["checkpoint_step"] == new.result["checkpoint_step"]
    np.testing.assert_array_equal(old.predictions["pred_boneage"], new.predictions["pred_boneage"])
    assert old.result["mae"] == new.result["mae"]
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 1)).astype(np.float32)
    male = np.array([1, 0, 1], np.float32)
    a = inference.load_run(workdir, which="latest").predict({"image": images, "male": male})
    b = inference.load_run(legacy, which="latest").predict({"image": images, "male": male})
    np.testing.assert_array_equal(np.asarray(a["boneage"]), np.asarray(b["boneage"]))


def test_legacy_run_resumes_like_a_current_one(runs, phantom_dir, data_root, tmp_path):
    """Both layouts resume to 6 steps with the same parameters and early-stopping counters."""
    finals = []
    for source in runs:
        workdir = str(tmp_path / os.path.basename(source))
        shutil.copytree(source, workdir)
        train.train_and_evaluate(_config(phantom_dir, data_root, 6), workdir)
        manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
        assert manager.latest_step() == 6 and not state.is_legacy(manager, 6)
        restored = manager.restore(6, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                              meta=ocp.args.JsonRestore()))
        manager.close()
        finals.append(restored)
    for x, y in zip(jax.tree.leaves(finals[0]["params"]), jax.tree.leaves(finals[1]["params"]), strict=True):
        np.testing.assert_array_equal(x, y)
    assert finals[0]["meta"] == finals[1]["meta"]


def test_build_gives_the_eager_model_compiled_as_a_one_off_program(monkeypatch):
    """``state.build(create)``: the model ``create()`` makes (the eager values, up to rounding),
    computed by one program compiled with ``one_off_options`` (LLVM level 0 on the CPU)."""
    from boneage_jax import models

    def create():
        return models.create_backbone("cnn_memon", in_channels=1, image_size=32, rngs=models.Rngs(0))

    assert state.one_off_options() == {"xla_backend_optimization_level": 0}
    options = []
    jit = jax.jit
    monkeypatch.setattr(jax, "jit", lambda *a, **k: options.append(k.get("compiler_options")) or jit(*a, **k))
    built = state.build(create)
    assert options == [state.one_off_options()]
    eager = create()
    got, want = nnx.state(built, nnx.Param), nnx.state(eager, nnx.Param)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert type(built) is type(eager)


def test_build_with_a_loader_computes_only_what_it_left_unset(monkeypatch):
    """``state.build(create, load)``: what ``load`` sets into the abstract model is kept as set;
    the rest equals ``state.build(create)``, from a program compiled only when something is left
    (a loader that sets every variable compiles nothing)."""
    from boneage_jax import models

    def create():
        return models.create_backbone("cnn_memon", in_channels=1, image_size=32, rngs=models.Rngs(0))

    reference = state.build(create)
    flat = dict(nnx.to_flat_state(nnx.state(reference)))
    first = next(path for path, v in flat.items() if isinstance(v, nnx.Param) and v.get_value().ndim == 4)
    ones = np.ones(flat[first].get_value().shape, np.float32)

    def load_first(model):
        dict(nnx.to_flat_state(nnx.state(model)))[first].set_value(jax.device_put(ones))

    built = dict(nnx.to_flat_state(nnx.state(state.build(create, load=load_first))))
    assert built.keys() == flat.keys()
    np.testing.assert_array_equal(np.asarray(built[first].get_value()), ones)
    for path, variable in flat.items():
        if path != first and isinstance(variable, (nnx.Param, nnx.BatchStat)):
            np.testing.assert_array_equal(np.asarray(built[path].get_value()), np.asarray(variable.get_value()))

    values = {path: v.get_value() for path, v in flat.items()}

    def load_all(model):
        for path, variable in nnx.to_flat_state(nnx.state(model)):
            variable.set_value(values[path])

    calls = []
    jit = jax.jit
    monkeypatch.setattr(jax, "jit", lambda *a, **k: calls.append(a) or jit(*a, **k))
    state.build(create, load=load_all)
    assert calls == []
