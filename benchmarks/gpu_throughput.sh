#!/usr/bin/env bash
# Training throughput of the paper configs on a GPU, in bfloat16, on phantom radiographs.
#
#     OUT=/path/to/results bash benchmarks/gpu_throughput.sh
#
# From the repository root of a machine with a CUDA build of JAX. For each paper config
# (configs/xception.py, efficientnet_b0.py, inception_v3.py, vgg19_attention.py,
# googlenet_sex_specific.py) at its own resolution and batch size, it runs
# benchmarks/train_throughput.py with --config.model.dtype=bfloat16 and writes
# $OUT/train_throughput_<config>.json (the report) and $OUT/gpu_throughput.log (everything printed).
# A few minutes in all: phantom images (tfds_rsna.phantom, as `make demo` makes them) and their
# two prepared stores (max512, and max1024 for efficientnet_b0) first, then per config its
# compilation, WARMUP untimed steps and SECONDS_PER_CONFIG timed seconds.
#
# Settings (environment): OUT (default benchmarks/results/gpu), PYTHON (default .venv/bin/python if
# there, else python3), SECONDS_PER_CONFIG (15), WARMUP (5), DATA (a scratch folder under /tmp),
# CONFIGS (space-separated names, default the five above), NUM_TRAIN (512), VARIANT (empty; `tiny`
# tries the script's plumbing on a CPU in seconds).
# If the interpreter lacks the project's dependencies (grain, tensorflow-datasets,
# ml-collections, ...), wheels in .whl/ are installed into /tmp/site first (see the README's
# "Training throughput" section); a dependency still missing stops the script with one line.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
SECONDS_PER_CONFIG=${SECONDS_PER_CONFIG:-15}
WARMUP=${WARMUP:-5}
NUM_TRAIN=${NUM_TRAIN:-512}
DATA=${DATA:-/tmp/boneage_gpu_throughput}
CONFIGS=${CONFIGS:-xception efficientnet_b0 inception_v3 vgg19_attention googlenet_sex_specific}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$DATA"
LOG="$OUT/gpu_throughput.log"
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  say "installing $(ls .whl/*.whl | wc -l) wheels from .whl into /tmp/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$LOG" || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# What the benchmark imports beyond JAX's own stack (the H200 image of this workplace lacks
# grain, tensorflow-datasets and ml-collections, and the first three below them).
missing=$("$PYTHON" - <<'EOF'
import importlib
names = ["jax", "flax", "optax", "orbax.checkpoint", "cv2", "absl", "grain", "ml_collections", "tensorflow_datasets",
         "tensorflow_metadata", "array_record", "immutabledict", "promise", "toml", "portpicker"]
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as e:
        missing.append(e.name or name)
if not missing:
    try:
        importlib.import_module("boneage_jax.train")
    except ImportError as e:
        missing.append(e.name or str(e))
print(" ".join(dict.fromkeys(missing)))
EOF
)
if [ -n "$missing" ]; then
  say "error: $PYTHON cannot import: $missing (bring them as wheels in .whl/, see the README)"
  exit 3
fi
"$PYTHON" -c "import jax; d = jax.devices()[0]; print(f'jax {jax.__version__}: {jax.device_count()} x {d.device_kind} ({d.platform})')" \
  2>&1 | tee -a "$LOG"

# Phantom radiographs at the generator's default 640x512 (hand masks beside them).
PHANTOM="$DATA/phantom"
if [ ! -f "$PHANTOM/boneage-training-dataset.csv" ]; then
  start=$(date +%s)
  "$PYTHON" -m tfds_rsna.phantom --out "$PHANTOM" --num_train "$NUM_TRAIN" --num_validation 128 --num_test 64 \
    --seed 0 --num_workers "$(nproc)" 2>&1 | tail -n 2 | tee -a "$LOG"
  say "phantoms: $(( $(date +%s) - start )) s"
fi

status=0
for name in $CONFIGS; do
  extra=()
  # Nguyen et al. draw 1024 test images from validation; the phantoms have 128 (the test
  # split is not read while training, so this changes nothing timed).
  [ "$name" = vgg19_attention ] && extra+=(--config.data.test_from_validation=0)
  say "=== $name"
  start=$(date +%s)
  timeout 300 "$PYTHON" benchmarks/train_throughput.py --config="configs/$name.py${VARIANT:+:$VARIANT}" \
    --config.model.dtype=bfloat16 \
    --config.data.manual_dir="$PHANTOM" --config.data.data_dir="$DATA/tfds" \
    --config.data.mask_cache="$PHANTOM/hand-masks" "${extra[@]}" \
    --seconds="$SECONDS_PER_CONFIG" --warmup_steps="$WARMUP" --out="$OUT/train_throughput_$name.json" \
    2>&1 | grep -v "^W[0-9]\{4\} " | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  say "$name: exit $rc after $(( $(date +%s) - start )) s"
  [ "$rc" -ne 0 ] && status=1
done
exit $status
