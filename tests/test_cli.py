"""boneage_jax.cli: every command's flags live in its own FlagValues, so the commands import side by
side; parsing starts from the defaults; launchers pass on what they do not know; config files
with ``--config.*`` overrides; usage errors end the process with one line and status 1; ``--help``
shows the command's own flags."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from absl import app, flags

from boneage_jax import cli

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

COMMANDS = ("boneage_jax.main", "boneage_jax.evaluate", "boneage_jax.report", "boneage_jax.predict",
            "boneage_jax.serve", "boneage_jax.export", "boneage_jax.segment", "boneage_jax.tools.show", "boneage_jax.weights",
            "boneage_jax.models.__main__", "launch.local", "launch.multihost", "launch.sweep")

# A typical command line of each command with its own FlagValues -> (arguments left, flag values after parsing).
TYPICAL = {
    "boneage_jax.main": (["--config=configs/demo.py", "--workdir=runs/demo", "--multihost", "--process_id=1",
                          "--config.batch_size=8"],
                         ["--config.batch_size=8"], {"config": "configs/demo.py", "workdir": "runs/demo",
                                                     "multihost": True, "process_id": 1}),
    "boneage_jax.evaluate": (["--workdir=runs/demo", "--split=test", "--tta", "--config.eval_batch_size=4"],
                             ["--config.eval_batch_size=4"], {"workdir": "runs/demo", "split": "test", "tta": True}),
    "boneage_jax.predict": (["--workdir=runs/demo", "--sex=F", "--out=p.csv", "hand.png", "scans/"],
                            ["hand.png", "scans/"], {"workdir": "runs/demo", "sex": "F", "out": "p.csv"}),
    "boneage_jax.serve": (["--workdir=runs/demo", "--port=9000", "--max_upload_mb=8", "--tta"], [],
                          {"workdir": "runs/demo", "host": "127.0.0.1", "port": 9000, "max_upload_mb": 8.0,
                           "tta": True}),
    "boneage_jax.export": (["--workdir=runs/demo", "--out=demo.jaxexport", "--batch_size=4"], [],
                           {"workdir": "runs/demo", "out": "demo.jaxexport", "batch_size": 4}),
    "boneage_jax.segment": (["--workdir=runs/unet", "--out=data/unet_masks", "--manual_dir=rsna"], [],
                            {"workdir": "runs/unet", "out": "data/unet_masks", "manual_dir": "rsna", "batch_size": 16}),
    "boneage_jax.tools.show": (["--config=configs/demo.py", "--out=grid.png", "--num=3", "--config.seed=2"],
                               ["--config.seed=2"], {"config": "configs/demo.py", "out": "grid.png", "num": 3}),
    "boneage_jax.weights": (["--from", "torch", "--model", "resnet50_torch", "--in", "r50.safetensors", "--out",
                             "weights/r50", "--in_channels", "1"], [],
                            {"from": "torch", "model": "resnet50_torch", "in": "r50.safetensors", "out": "weights/r50",
                             "in_channels": "1", "overwrite": False}),
    "boneage_jax.models.__main__": (["--json", "--image_size=64", "cnn_memon", "resnet50"], ["cnn_memon", "resnet50"],
                                    {"json": True, "image_size": 64}),
}
# Launchers: their own flags are parsed, every other argument is passed on (without the "--").
TYPICAL_LAUNCHERS = {
    "launch.local": (["--config=configs/demo.py", "--workdir=runs/x", "--cpu_devices=4", "--",
                      "--config.batch_size=64"],
                     ["--config.batch_size=64"], {"config": "configs/demo.py", "workdir": "runs/x", "cpu_devices": 4}),
    "launch.multihost": (["--num_processes=4", "--coordinator=host0:12355", "--print", "--config=configs/x.py",
                          "--workdir=/shared/x", "--config.seed=1"],
                         ["--config.seed=1"], {"num_processes": 4, "coordinator": "host0:12355", "print": True}),
    "launch.sweep": (["--config=configs/demo.py", "--workdir=runs/sweep", "--sweep", "model.sex_fusion=none,concat",
                      "--sweep", "data.image_size=96,128", "--set", "num_train_steps=500", "--folds", "5",
                      "--", "--config.log_every=5"],
                     ["--config.log_every=5"], {"sweep": ["model.sex_fusion=none,concat", "data.image_size=96,128"],
                                                "set": ["num_train_steps=500"], "folds": 5, "print": False}),
}


def test_every_command_imports_beside_the_others_and_parses_its_own_flags():
    modules = {name: importlib.import_module(name) for name in COMMANDS}
    assert all(callable(module.main) for name, module in modules.items() if name != "boneage_jax.report")
    for name, (argv, left, values) in TYPICAL.items():
        flag_values = modules[name].FLAGS
        assert flag_values is not flags.FLAGS, name
        assert cli.parse(flag_values, argv, config_overrides=name in ("boneage_jax.main", "boneage_jax.evaluate",
                                                                       "boneage_jax.tools.show")) == left, name
        assert {key: flag_values[key].value for key in values} == values, name
    for name, (argv, left, values) in TYPICAL_LAUNCHERS.items():
        flag_values = modules[name].FLAGS
        assert cli.parse_known(flag_values, argv) == left, name
        assert {key: flag_values[key].value for key in values} == values, name
    # No command defines a flag in absl's global FlagValues, where two commands would clash.
    assert not {"workdir", "config", "out", "sweep", "from", "num_processes"} & set(flags.FLAGS)


def test_each_parse_starts_from_the_defaults():
    from launch import sweep

    cli.parse_known(sweep.FLAGS, ["--config=a.py", "--workdir=w", "--sweep", "a=1,2", "--print", "--folds=3"])
    cli.parse_known(sweep.FLAGS, ["--config=a.py", "--workdir=w", "--sweep", "b=1"])
    assert sweep.FLAGS.sweep == ["b=1"] and not sweep.FLAGS.print and sweep.FLAGS.folds == 0


def test_usage_errors_name_the_flag():
    from boneage_jax import main, weights

    with pytest.raises(app.UsageError, match="--in must have a value"):
        weights.main(["--from", "keras", "--model", "vgg16", "--out", "o"])
    with pytest.raises(app.UsageError, match="in_channels=2"):
        weights.main(["--from", "keras", "--model", "vgg16", "--in", "x.h5", "--out", "o", "--in_channels", "2"])
    with pytest.raises(app.UsageError, match="Unknown command line flag 'bogus'"):
        cli.parse(weights.FLAGS, ["--from=keras", "--model=vgg16", "--in=x.h5", "--out=o", "--bogus=1"])
    with pytest.raises(app.UsageError, match="unknown config key 'no_such_key'.*configs/demo.py"):
        main.main(["--config=configs/demo.py", "--workdir=unused", "--config.no_such_key=1"])


def test_load_config_file_applies_overrides_and_names_what_is_wrong():
    config = cli.load_config_file("configs/demo.py", ["--config.batch_size", "8", "--config.model.kwargs.filters=(4,8)",
                                                      "--config.data.image_size=64"])
    assert (config.batch_size, tuple(config.model.kwargs.filters), config.data.image_size) == (8, (4, 8), 64)
    with pytest.raises(AttributeError):
        config.no_such_key = 1  # locked, as training expects
    with pytest.raises(app.UsageError, match=r"--config=configs/missing.py: cannot load .*No such file"):
        cli.load_config_file("configs/missing.py")
    with pytest.raises(app.UsageError, match="batch_size=abc"):
        cli.load_config_file("configs/demo.py", ["--config.batch_size=abc"])
    with pytest.raises(app.UsageError, match="unexpected arguments: stray"):
        cli.load_config_file("configs/demo.py", ["stray"])


def test_a_usage_error_ends_the_process_with_one_line_and_status_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch.sweep", "--config=configs/demo.py",
                             f"--workdir={tmp_path / 'sweep'}", "--sweep", "model.dropout"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--sweep 'model.dropout': expected key=value" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "sweep")


def test_help_prints_the_docstring_and_the_command_flags():
    result = subprocess.run([sys.executable, "-m", "launch.multihost", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Multi-process / multi-host training.")
    assert "--num_processes: Number of processes." in result.stdout and "--[no]print" in result.stdout
    assert "--flagfile" not in result.stdout


def test_a_coordinator_on_this_machine_listens_on_the_loopback_only():
    from boneage_jax import main

    assert main.coordinator_bind_address("127.0.0.1:12355", None) == "127.0.0.1:12355"
    assert main.coordinator_bind_address("localhost:9", None) == "127.0.0.1:9"
    assert main.coordinator_bind_address("host0:12355", None) is None  # across hosts: JAX's default
    assert main.coordinator_bind_address("host0:12355", "10.0.0.1:12355") == "10.0.0.1:12355"
    assert main.coordinator_bind_address(None, None) is None
