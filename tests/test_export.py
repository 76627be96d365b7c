"""python -m boneage_jax.export: the serialised model runs with JAX alone and matches load_run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from boneage_jax import export, inference

# Its module-scoped trained run is built once: every test of the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_export")

# Runs in a fresh interpreter that may import nothing but jax and numpy.
_RELOAD = """
    import sys
    import jax, numpy as np
    path, inputs, outputs = sys.argv[1:4]
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    arrays = np.load(inputs)
    results = {}
    for n in (3, 5):
        out = exported.call(arrays["images"][:n], arrays["male"][:n])
        results.update({f"{k}_{n}": np.asarray(v) for k, v in out.items()})
    np.savez(outputs, **results)
    foreign = sorted({m.split(".")[0] for m in sys.modules} & {"boneage_jax", "flax", "tfds_rsna", "optax",
                                                                "orbax", "tensorflow_datasets", "configs"})
    assert not foreign, foreign
"""


@pytest.fixture(scope="module")
def run_dir(tiny_gaussian_run) -> str:
    """The conftest ``tiny_gaussian_run``: 2 steps of configs/demo.py:tiny with a gaussian head
    (two outputs: boneage and std)."""
    return tiny_gaussian_run


def test_exported_model_runs_without_this_codebase(run_dir, tmp_path):
    out = str(tmp_path / "model.jaxexport")
    assert export.main(["--workdir", run_dir, "--out", out]) == 0
    with open(out + ".json") as f:
        side = json.load(f)
    assert side["inputs"][0]["shape"] == ["b", 32, 32, 1] and side["inputs"][1]["shape"] == ["b"]
    assert set(side["outputs"]) == {"boneage", "std"}
    assert side["preprocessing"]["preprocess"].startswith("resize_pad") and side["preprocessing"]["image_size"] == 32
    assert side["label_stats"]["std"] > 0 and set(side["platforms"]) == {"cpu", "cuda", "tpu"}

    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 32, 32, 1)).astype(np.float32)
    male = np.array([1, 0, 1, 0, 0], np.float32)
    np.savez(tmp_path / "inputs.npz", images=images, male=male)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_RELOAD), out, str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
        cwd=str(tmp_path), env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = np.load(tmp_path / "out.npz")
    run = inference.load_run(run_dir)
    for n in (3, 5):
        expected = run.predict({"image": images[:n], "male": male[:n]})
        for key in ("boneage", "std"):
            np.testing.assert_allclose(exported[f"{key}_{n}"], np.asarray(expected[key]), atol=1e-5, rtol=1e-6)


def test_fixed_batch_size(run_dir):
    run = inference.load_run(run_dir)
    exported = export.export_run(run, batch_size=2)
    assert [tuple(a.shape) for a in exported.in_avals] == [(2, 32, 32, 1), (2,)]
    images = np.zeros((2, 32, 32, 1), np.float32)
    male = np.ones(2, np.float32)
    np.testing.assert_allclose(np.asarray(exported.call(images, male)["boneage"]),
                               np.asarray(run.predict({"image": images, "male": male})["boneage"]), atol=1e-5)
