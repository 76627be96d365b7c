"""Shared fixtures (a small phantom dataset, the tiny demo config, runs trained on it, Keras drawing its
initial weights on the host) and the session's compile settings.

Compile time dominates the suite on a CPU, so every test process (and, through the environment,
every subprocess a CLI test starts):

- shares one persistent JAX compilation cache (``.pytest_cache/jax``): a step that several tests
  compile with the same shapes is compiled once per run, and once per machine until the code
  changes (``pytest --cache-clear`` empties it);
- compiles with LLVM at optimisation level 1 (``XLA_FLAGS``; XLA:CPU's default is 2): the jitted
  model initialisers compile 3-5 times faster (the U-Net's 25 s -> 5 s) while steps run as fast
  and give the same numbers; level 0 would compile faster still but runs training steps 3-5
  times slower;
- emits fusions with XLA:CPU's older emitters (``--xla_cpu_use_fusion_emitters=false``): three
  tiny config runs (``tests/test_configs.py -k "end_to_end and (xception or rsna_small or
  convmixer)"``, cold cache) took 16-20 s instead of 22-24 s, and the U-Net tests 51 s instead
  of 65 s;
- runs Python's cyclic garbage collector less often (a young-generation threshold of 50,000
  objects instead of 700), with everything imported during collection frozen out of its scans:
  tracing a network creates and drops hundreds of thousands of small objects, and the default
  collector rescans the whole heap of jax, flax, keras and TFDS many times over. Side by side,
  cold cache, one after the other, twice each: ``tests/test_freeze.py tests/test_evaluate.py
  tests/test_models_zoo.py`` took 114 s and 92 s of wall time against 117 s and 106 s, and six
  large-network tests (Keras-layout train steps, three config runs) 49 s and 40 s against 53 s
  and 57 s.
"""

from __future__ import annotations

import gc
import os

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHARED = os.path.abspath(os.path.join(REPO, "..", "shared"))
JAX_CACHE = os.path.join(REPO, ".pytest_cache", "jax")

# Set before JAX is imported, so that this process and its subprocesses read them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
for _flag in ("--xla_backend_optimization_level=1", "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), _flag]).strip()

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

gc.set_threshold(50_000, 20, 100)


def pytest_collection_finish(session) -> None:
    """Everything the test modules imported stays alive to the end: the collector stops scanning it."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> str:
    """48 train / 16 validation / 16 test phantom radiographs at 160x128, official layout."""
    from tfds_rsna import phantom

    out = str(tmp_path_factory.mktemp("phantom") / "manual")
    phantom.write_dataset(out, num_train=48, num_validation=16, num_test=16, seed=0, height=160, width=128)
    return out


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def on_phantoms(config, phantom_dir: str, data_root: str):
    """``config`` reading the phantom fixture: its images, prepared store and hand masks (as a mask cache)."""
    config.data.manual_dir = phantom_dir
    config.data.data_dir = data_root
    config.data.mask_cache = os.path.join(phantom_dir, "hand-masks")
    return config


def check_run_results(workdir: str, results: dict, task: str) -> None:
    """A finished run's results: validation and test scored with the task's metric, and
    ``results.json`` holding exactly what training returned."""
    import json

    assert set(results) >= {"validation", "test"}
    metric = "jaccard" if task == "segmentation" else "mae"
    assert all(metric in r for r in results.values())
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(results))


def tiny_demo_config(phantom_dir: str, data_root: str, num_train_steps: int = 6):
    """``configs/demo.py:tiny`` (32 px, batch 8) on the phantoms, for ``num_train_steps`` steps."""
    from configs import demo

    config = on_phantoms(demo.get_config("tiny"), phantom_dir, data_root)
    config.num_train_steps = num_train_steps
    return config


@pytest.fixture
def tiny_config(phantom_dir, data_root):
    """``configs/demo.py:tiny`` on the phantoms: 32 px, batch 8, 6 steps."""
    return tiny_demo_config(phantom_dir, data_root)


@pytest.fixture(scope="session")
def tiny_run(phantom_dir, data_root, tmp_path_factory) -> str:
    """The workdir of ``configs/demo.py:tiny`` trained on the phantoms (6 steps), once per session.

    Shared by the tests that read a trained run (evaluate, predict, ...): a test that writes into
    a workdir beyond its own named outputs copies this one first."""
    from boneage_jax import train

    workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
    train.train_and_evaluate(tiny_demo_config(phantom_dir, data_root), workdir)
    return workdir


@pytest.fixture(scope="session")
def tiny_gaussian_run(phantom_dir, data_root, tmp_path_factory) -> str:
    """The workdir of ``configs/demo.py:tiny`` with a gaussian head (mean and log-variance: a
    ``std`` in months with every prediction), trained 2 steps on the phantoms, once per session.

    Shared by the tests of Gaussian readouts (export, per-image intervals); the same rule as
    ``tiny_run`` applies to writing into it."""
    from boneage_jax import train

    config = tiny_demo_config(phantom_dir, data_root, num_train_steps=2)
    config.model.head = "gaussian"
    config.eval_every = 2
    workdir = str(tmp_path_factory.mktemp("tiny_gaussian_run") / "run")
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture
def host_random(monkeypatch):
    """Keras (on its JAX backend) drawing its initial weights on the host: its jax.random
    initialisers compile one XLA kernel per weight shape (most of a minute per EfficientNet on 2
    cores), as do its zeros and ones (a broadcast each). The values are random either way; the
    tests overwrite or randomise them again."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("needs keras on its JAX backend (KERAS_BACKEND=jax)")
    import numpy as np

    rng = np.random.default_rng(1234)
    backend_random = keras.src.backend.random

    def as_array(values, dtype):
        # device_put, not jnp.asarray: jax 0.10 stages a numpy array through an identity program
        # compiled once per shape.
        return jax.device_put(np.asarray(values, dtype=keras.backend.standardize_dtype(dtype or "float32")))

    def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        return as_array(rng.normal(mean, stddev, shape), dtype)

    def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
        return as_array(rng.uniform(minval, maxval, shape), dtype)

    def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        values = rng.normal(0.0, 1.0, shape)
        bad = np.abs(values) > 2.0
        while bad.any():
            values[bad] = rng.normal(0.0, 1.0, int(bad.sum()))
            bad = np.abs(values) > 2.0
        return as_array(mean + stddev * values, dtype)

    def constant(value):
        # (the Zeros and Ones initialisers: jnp.zeros compiles a broadcast once per shape)
        return lambda shape, dtype=None: as_array(np.full(shape, value), dtype or keras.backend.floatx())

    monkeypatch.setattr(backend_random, "normal", normal)
    monkeypatch.setattr(backend_random, "uniform", uniform)
    monkeypatch.setattr(backend_random, "truncated_normal", truncated_normal)
    monkeypatch.setattr(keras.src.backend.numpy, "zeros", constant(0.0))
    monkeypatch.setattr(keras.src.backend.numpy, "ones", constant(1.0))
    return keras
