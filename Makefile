# boneage_jax: set-up, demo and tests. Every target creates or updates .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Exact versions (with hashes) of everything the package, its tests and extras install: `make lock`.
LOCK := requirements.lock
UV_VERSION := 0.13.8
# The installer make venv uses: uv $(UV_VERSION) with the hashes of its wheels (make lock writes it).
UV_LOCK := requirements-uv.lock
UV := $(VENV)/bin/uv

# Python caches the bytecode of what it imports (.pyc beside the source, in .venv and the repo) even
# where the environment says not to: the suite starts dozens of Python processes (xdist workers, the
# commands its CLI tests run), and without that cache each spends about 6 s compiling jax, flax and
# the rest again (importing boneage_jax.train: 9.9 s without, 4.0 s with).
export PYTHONDONTWRITEBYTECODE :=

PHANTOM_DIR := data/phantom
DEMO_WORKDIR := runs/demo
DEMO_TRAIN ?= 2000
DEMO_VALIDATION ?= 200
DEMO_TEST ?= 200

.PHONY: venv lock demo test test-slow test-reliability bench-peers clean-demo

# The oneDNN convolution library (boneage_jax/kernels) is compiled here when its source or
# jaxlib changed; without it convolutions fall back to XLA's CPU path (a warning says so).
venv: $(STAMP)
	$(PY) -m boneage_jax.kernels.build || echo "warning: the oneDNN convolutions were not built; XLA's slower CPU convolutions will be used"

# The versions of requirements.lock, each file checked against its hash, then the package itself
# (editable, its dependencies already there); the check fails if setup.cfg asks for something the
# lock lacks (run make lock). uv installs them (itself pinned, with its hashes, in $(UV_LOCK)):
# 21 s for the lock where pip took 67 s, both into a fresh venv on this machine. Python compiles
# the bytecode of what is imported on first use (most of the installed modules never are).
$(STAMP): setup.cfg pyproject.toml $(LOCK) $(UV_LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r $(UV_LOCK)
	$(UV) pip install --quiet --python $(PY) --require-hashes -r $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	$(UV) pip check --python $(PY)
	touch $(STAMP)

# Refreshes requirements.lock from setup.cfg (install_requires and the test, pretrained and browser
# extras), and $(UV_LOCK) from UV_VERSION, with uv, installed for the purpose into a throwaway venv:
# one resolution for every platform (environment markers; oneDNN on Linux x86-64 only) and Python
# 3.11 or newer, with hashes.
# Versions already in the lock are kept where setup.cfg still allows them; to move on:
#   make lock LOCK_ARGS=--upgrade                   # the newest of everything
#   make lock LOCK_ARGS="--upgrade-package jax"     # one package (and what it needs)
lock:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp" && "$$tmp/bin/pip" install --quiet uv==$(UV_VERSION) && \
	"$$tmp/bin/uv" pip compile setup.cfg --extra test --extra pretrained --extra browser --universal \
		--python-version 3.11 --generate-hashes --custom-compile-command "make lock" --quiet -o $(LOCK) $(LOCK_ARGS) && \
	echo "uv==$(UV_VERSION)" | "$$tmp/bin/uv" pip compile - --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command "make lock" --quiet -o $(UV_LOCK)
	@echo "$(LOCK): $$(grep -c '^[a-zA-Z]' $(LOCK)) packages pinned"

# Phantom radiographs -> TFDS build -> train configs/demo.py -> test MAE beside the baseline.
demo: venv
	test -f $(PHANTOM_DIR)/boneage-training-dataset.csv || $(PY) -m tfds_rsna.phantom --out $(PHANTOM_DIR) \
		--num_train $(DEMO_TRAIN) --num_validation $(DEMO_VALIDATION) --num_test $(DEMO_TEST) --seed 0 --num_workers 2
	$(PY) -m boneage_jax.main --config=configs/demo.py --workdir=$(DEMO_WORKDIR)

# The default suite (not the slow marker); the slowest tests are listed at the end. The JAX
# compilation cache it fills lives in .pytest_cache/jax (tests/conftest.py).
# Tests spread over one worker per core (pytest-xdist); the files with a module-scoped trained
# run keep their tests on one worker (xdist_group), so that run is built once.
test: venv
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=10 tests

# The papers' resolutions and long checks (minutes to hours on a CPU).
test-slow: venv
	$(PY) -m pytest -q -m slow tests

# SIGKILL at random points, KILLS times (default 50), each resumed run checked against an unbroken one.
test-reliability: venv
	$(PY) -m pytest -q -s -m reliability tests/reliability

# Our CPU training step beside PyTorch's and Keras's on the same workload (benchmarks/peers/run.py):
# writes benchmarks/results/peers_cpu_256px_b8.md and .json. The peers' venvs are created under
# benchmarks/peers/.venvs on first use (minutes) unless ARGS names interpreters; flags go in ARGS, e.g.
#   make bench-peers ARGS="--networks=resnet50 --torch_python=/path/to/torch/bin/python"
bench-peers: venv
	$(PY) -m benchmarks.peers.run $(ARGS)

clean-demo:
	rm -rf $(PHANTOM_DIR) data/tfds $(DEMO_WORKDIR)
