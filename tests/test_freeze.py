"""Frozen and staged fine-tuning (boneage_jax/freeze.py) and head training on cached features
(boneage_jax/feature_cache.py): frozen parameters and their batch statistics stay bit-identical,
the phase switch and resuming across it, the reported counts, Nguyen et al.'s table."""

from __future__ import annotations

import json
import os
from contextlib import redirect_stdout
from io import StringIO

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_demo_config
from flax import nnx

from boneage_jax import freeze, input_pipeline, state, train


def _read_events(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _latest(workdir: str) -> tuple[dict, dict]:
    """(params, rest) of the latest checkpoint, as nested dicts of numpy arrays."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), rest=ocp.args.StandardRestore()))
    manager.close()
    return restored["params"], restored["rest"]


def _initial(config) -> tuple[dict, dict]:
    """(params, rest) of the configured model before training (the factory gives the same weights,
    computed as training computes them: one program compiled with ``state.one_off_options``)."""
    create = state.model_factory(config, in_channels=input_pipeline.input_channels(config.data), num_outputs=1,
                                 task=config.task)
    _, params, _, rest = state.split(state.build(create))
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _flat(tree: dict) -> dict[str, np.ndarray]:
    """Dotted path -> array (a checkpoint's leaves end in ``.value``, a pure dict's do not)."""
    return {freeze.dotted(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)).removesuffix(".value"):
            np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- patterns


def test_patterns_freeze_what_they_name_and_everything_beneath():
    f = freeze.Freeze(("backbone", "!backbone.block5_*"))
    assert f.is_frozen(("backbone", "block1_conv1", "kernel"))
    assert f.is_frozen(("backbone",))
    assert not f.is_frozen(("backbone", "block5_conv4", "bias"))
    assert not f.is_frozen(("head", "out", "kernel"))
    stages = freeze.Freeze(("backbone.block[1-4]_*",))
    assert stages.is_frozen(("backbone", "block4_conv2", "kernel"))
    assert not stages.is_frozen(("backbone", "block5_conv1", "kernel"))
    lists = freeze.Freeze(("backbone.*.0",))  # list indices are path components
    assert lists.is_frozen(("backbone", "convs", 0, "kernel")) and lists.is_frozen(("backbone", "norms", 0))
    assert not lists.is_frozen(("backbone", "convs", 1, "kernel"))
    assert not freeze.NOTHING.is_frozen(("backbone", "convs", 0, "kernel"))


def test_unfreeze_step_in_steps_or_epochs(tiny_config):
    tiny_config.freeze = ("backbone",)
    tiny_config.unfreeze_at = 5
    assert freeze.unfreeze_step(tiny_config, num_train_examples=48) == 5
    tiny_config.unfreeze_at_epoch = 0.5  # overrides: half of 48 images at batch 8 is 3 steps
    assert freeze.unfreeze_step(tiny_config, num_train_examples=48) == 3
    tiny_config.unfreeze_at, tiny_config.unfreeze_at_epoch = 0, 0.0
    assert freeze.unfreeze_step(tiny_config, num_train_examples=48) == 0  # never


# ----------------------------------------------------------------------------- Nguyen et al.


def test_vgg19_attention_config_matches_nguyen_parameter_table():
    """Their table: 563,681 trainable of 20,589,601 parameters (Keras counts BatchNorm statistics
    and the fixed ones of the map's 1x1 convolution as non-trainable parameters)."""
    from configs import vgg19_attention

    config = vgg19_attention.get_config()
    create = state.model_factory(config, in_channels=input_pipeline.input_channels(config.data), num_outputs=1,
                                 task=config.task)
    _, params, rest = state.abstract(create)  # shapes only: nothing is computed
    counts = freeze.count(params, rest, freeze.freeze_of(config))
    assert counts.trainable == 563_681
    assert counts.frozen == 20_024_384  # exactly VGG19 (Keras notop)
    assert counts.state == 1_024 + 512
    assert counts.trainable + counts.frozen + counts.state == 20_589_601


# ----------------------------------------------------------------------------- frozen training


def test_frozen_parameters_and_their_batch_statistics_stay_bit_identical(tiny_config, tmp_path, capsys):
    """The first stage frozen (``backbone.*.0``: convs.0 and norms.0), AdamW with weight decay, 3 steps."""
    tiny_config.freeze = ("backbone.*.0",)
    tiny_config.weight_decay = 0.1  # would move a frozen parameter if it reached one
    tiny_config.num_train_steps = 3
    tiny_config.eval_every = 3
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(tiny_config, workdir)
    params0, rest0 = map(_flat, _initial(tiny_config))
    params, rest = map(_flat, _latest(workdir))
    assert set(params) == set(params0) and set(rest) == set(rest0)
    frozen = {k for k in params if k.startswith(("backbone.convs.0.", "backbone.norms.0."))}
    assert frozen == {"backbone.convs.0.kernel", "backbone.norms.0.scale", "backbone.norms.0.bias"}
    for key in params:
        assert _same(params[key], params0[key]) == (key in frozen), key
    # Frozen BatchNorm: inference mode, its statistics unchanged; the trainable one's statistics move.
    for key in rest:
        assert _same(rest[key], rest0[key]) == key.startswith("backbone.norms.0."), key

    # Counts: in the log, metrics.jsonl and results.json.
    num_frozen = sum(params0[k].size for k in frozen)
    num_total = sum(v.size for v in params0.values())
    counts = f"{num_total:,} parameters: {num_total - num_frozen:,} trainable, {num_frozen:,} frozen"
    assert counts in capsys.readouterr().out
    info = next(e for e in _read_events(workdir) if e["split"] == "info")
    assert (info["trainable_params"], info["frozen_params"]) == (num_total - num_frozen, num_frozen)
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    for split in ("validation", "test"):
        assert (saved[split]["trainable_params"], saved[split]["frozen_params"]) == (num_total - num_frozen, num_frozen)


def _staged(config):
    """Head first (2 steps), then everything (2 steps), a checkpoint every step, dropout on."""
    config.freeze = ("backbone",)
    config.unfreeze_at = 2
    config.num_train_steps = 4
    config.checkpoint_every = 1
    config.eval_every = 4
    config.model.dropout = 0.2
    return config


@pytest.fixture(scope="module")
def staged_run(phantom_dir, data_root, tmp_path_factory) -> tuple[str, dict, str]:
    """(workdir, results, printed output) of the unbroken two-phase run."""
    workdir = str(tmp_path_factory.mktemp("staged") / "unbroken")
    printed = StringIO()
    with redirect_stdout(printed):
        results = train.train_and_evaluate(_staged(tiny_demo_config(phantom_dir, data_root)), workdir)
    return workdir, results, printed.getvalue()


def test_unfreeze_at_switches_phase(staged_run, tiny_config):
    workdir, results, printed = staged_run
    assert "all of them train from step 2" in printed
    assert "step      2  unfrozen:" in printed
    params0 = _flat(_initial(_staged(tiny_config))[0])
    params = _flat(_latest(workdir)[0])
    assert all(not _same(params[k], params0[k]) for k in params)  # the backbone trained in phase 2
    info = [e for e in _read_events(workdir) if e["split"] == "info"]
    num_total = sum(v.size for v in params0.values())
    num_backbone = sum(v.size for k, v in params0.items() if k.startswith("backbone."))
    assert [(e["step"], e["trainable_params"], e["frozen_params"]) for e in info] == [
        (0, num_total - num_backbone, num_backbone), (2, num_total, 0)]
    assert (results["test"]["trainable_params"], results["test"]["frozen_params"]) == (num_total, 0)


@pytest.mark.parametrize("stop_at, resumes_at", [(2, 1), (3, 2)])
def test_a_run_stopped_on_either_side_of_the_switch_resumes_in_its_phase(staged_run, tiny_config, tmp_path, capsys,
                                                                        stop_at, resumes_at):
    """Stopped at step 2 before its checkpoint, the run resumes from step 1 (phase 1) and crosses
    the switch; stopped at 3, it resumes from step 2 (phase 2). Both end with the unbroken run's
    parameters."""
    class Killed(Exception):
        pass

    def stop(step: int) -> None:
        if step == stop_at:
            raise Killed

    config, workdir = _staged(tiny_config), str(tmp_path / "run")
    with pytest.raises(Killed):
        train.train_and_evaluate(config, workdir, step_callback=stop)
    capsys.readouterr()
    train.train_and_evaluate(config, workdir)
    assert f"at step {resumes_at}" in capsys.readouterr().out
    resumed, unbroken = _flat(_latest(workdir)[0]), _flat(_latest(staged_run[0])[0])
    assert set(resumed) == set(unbroken)
    for key in unbroken:
        assert _same(resumed[key], unbroken[key]), key


def test_a_switch_after_the_last_step_is_refused(tiny_config, tmp_path):
    tiny_config.freeze = ("backbone",)
    tiny_config.unfreeze_at = 6
    with pytest.raises(ValueError, match=r"config.unfreeze_at gives step 6, but the run ends at step 6"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- feature cache


def test_cached_features_train_the_head_as_frozen_training_on_images(tiny_config, tmp_path, capsys):
    tiny_config.freeze = ("backbone",)
    tiny_config.data.augment = ""
    tiny_config.model.dropout = 0.2  # the head's dropout masks must match too
    tiny_config.num_train_steps = 4
    tiny_config.eval_every = 2
    tiny_config.checkpoint_every = 2
    images = str(tmp_path / "images")
    on_images = train.train_and_evaluate(tiny_config, images)
    assert "Feature cache" not in capsys.readouterr().out
    tiny_config.cache_features = True
    cached = str(tmp_path / "cached")
    on_features = train.train_and_evaluate(tiny_config, cached)
    assert "Feature cache: 48 train and 16 validation images through the frozen backbone" in capsys.readouterr().out

    a, b = _flat(_latest(images)[0]), _flat(_latest(cached)[0])
    for key in a:
        if key.startswith("backbone."):
            assert _same(a[key], b[key]), key
        else:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
    validation = {w: [e["mae"] for e in _read_events(w) if e["split"] == "validation"] for w in (images, cached)}
    assert len(validation[images]) == 2
    np.testing.assert_allclose(validation[cached], validation[images], rtol=1e-5)
    for split in ("validation", "test"):
        np.testing.assert_allclose(on_features[split]["mae"], on_images[split]["mae"], rtol=1e-5)
