r"""Training throughput of a config: real train steps fed by its real input pipeline.

    python benchmarks/train_throughput.py --config=configs/NAME.py[:variant] [--config.key=value ...] \
        [--seconds=30] [--warmup_steps=5] [--peak_tflops=F] [--out=FILE.json]

What ``boneage_jax.train`` runs, set up by the same code (``train.setup``): the dataset prepared
and split as the config says, its training batches from ``input_pipeline.train_dataset`` (decode,
preprocessing, augmentation, the config's batch size), the model, AdamW and the first phase's
jitted ``train.train_step`` with the state replicated and batches split over the ``("data",)``
mesh of all devices. The step is lowered and compiled ahead of time (``compile_s``), run once
alone (``first_step_s``), then ``--warmup_steps - 1`` more untimed steps, then as many steps as
fit in ``--seconds``, keeping one step in flight while the next batch is fetched, as the
training loop's asynchronous dispatch does. Pretrained weights (``config.init_from``) are not
loaded: they change no step's cost.

The report (printed as a summary, then as JSON on the last line; ``--out`` writes the JSON):

- ``images_per_s``: timed steps x batch size / timed wall time;
- ``step_s_median``, ``step_s_mean``: seconds between consecutive step completions;
- ``input_wait_fraction``: the part of the timed wall time spent blocked in ``next(iterator)``;
- ``compile_s``: lowering + compiling the train step; ``first_step_s``: its first run;
- ``peak_memory_bytes`` and ``peak_memory_source``: the device's ``peak_bytes_in_use`` (the
  largest over the devices), or on a CPU the process's peak resident memory;
- ``flops_per_step``: XLA's cost analysis of the compiled step (per device, times the devices);
- ``mfu``: flops_per_step / step_s_mean / (peak FLOP/s per device x devices), the peak from
  ``PEAK_TFLOPS`` by ``device_kind`` (bf16 dense) or ``--peak_tflops``; null with ``mfu_note``
  saying why when neither gives one.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from boneage_jax import cli, evaluation, input_pipeline, io, train  # noqa: E402
from boneage_jax import freeze as freeze_lib  # noqa: E402
from boneage_jax import state as state_lib  # noqa: E402

FLAGS = flags.FlagValues()
_CONFIG = flags.DEFINE_string("config", None, "Training configuration file, path.py or path.py:variant; "
                              "--config.key=value overrides its values.", flag_values=FLAGS)
_SECONDS = flags.DEFINE_float("seconds", 30.0, "Timed seconds of training steps.", lower_bound=0.0,
                              flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer("warmup_steps", 5, "Untimed steps first (the first one is timed alone as "
                               "first_step_s).", lower_bound=1, flag_values=FLAGS)
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device, for the MFU (default: the known "
                           "bf16 dense peak of the device kind, if any).", lower_bound=0.0, flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "", "Also write the JSON report here (atomically).", flag_values=FLAGS)
flags.mark_flag_as_required("config", flag_values=FLAGS)

# Dense bf16 peak TFLOP/s per device (GPU, TPU chip), by the start of ``device.device_kind``;
# the first match wins, so the specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("NVIDIA H200", 989.5, "NVIDIA H200 datasheet: BF16 tensor core 1,979 TFLOPS with sparsity, half dense"),
    ("NVIDIA H100 PCIe", 756.0, "NVIDIA H100 datasheet (PCIe): BF16 1,513 TFLOPS with sparsity, half dense"),
    ("NVIDIA H100 NVL", 835.5, "NVIDIA H100 datasheet (NVL): BF16 1,671 TFLOPS with sparsity, half dense"),
    ("NVIDIA H100", 989.5, "NVIDIA H100 datasheet (SXM): BF16 1,979 TFLOPS with sparsity, half dense"),
    ("NVIDIA A100", 312.0, "NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS dense (624 with sparsity)"),
    ("TPU v4", 275.0, "Google Cloud TPU v4 system architecture: 275 bf16 TFLOPS per chip"),
    ("TPU v5 lite", 197.0, "Google Cloud TPU v5e: 197 bf16 TFLOPS per chip"),
    ("TPU v5e", 197.0, "Google Cloud TPU v5e: 197 bf16 TFLOPS per chip"),
    ("TPU v5p", 459.0, "Google Cloud TPU v5p: 459 bf16 TFLOPS per chip"),
    ("TPU v5", 459.0, "Google Cloud TPU v5p (device_kind 'TPU v5'): 459 bf16 TFLOPS per chip"),
    ("TPU v6 lite", 918.0, "Google Cloud TPU v6e (Trillium): 918 bf16 TFLOPS per chip"),
    ("TPU v6e", 918.0, "Google Cloud TPU v6e (Trillium): 918 bf16 TFLOPS per chip"),
)


def known_peak(device_kind: str) -> tuple[float, str] | None:
    """(bf16 dense peak TFLOP/s, its source) of a device kind in ``PEAK_TFLOPS``, else None."""
    for prefix, tflops, source in PEAK_TFLOPS:
        if device_kind.startswith(prefix):
            return tflops, source
    return None


def flops_of(compiled) -> float | None:
    """FLOPs of one run of a compiled program per device (XLA's cost analysis: a dict, or a list
    of dicts in older JAX, one per program); None where the backend does not count them."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(analysis, dict):
        analysis = [analysis]
    counts = [a.get("flops") for a in analysis or () if isinstance(a, dict)]
    counts = [float(c) for c in counts if c is not None and math.isfinite(float(c)) and float(c) > 0]
    return sum(counts) if counts else None


def peak_memory(devices: Sequence[jax.Device]) -> tuple[int, str]:
    """(bytes, what they are): the largest ``peak_bytes_in_use`` of ``devices``, or where they do
    not report it (CPU) the peak resident memory of this process."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - not every backend has memory statistics
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), f"device peak_bytes_in_use (largest of {len(peaks)} device(s))"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss if sys.platform == "darwin" else rss * 1024), "process peak RSS (no device memory statistics, e.g. CPU)"


def mfu(flops_per_step: float | None, step_s: float, num_devices: int, device_kind: str,
        peak_tflops: float | None) -> dict:
    """``mfu``, ``peak_tflops`` (per device), ``peak_tflops_source`` and, when ``mfu`` is null,
    ``mfu_note`` saying why. ``peak_tflops`` (the flag) overrides the table."""
    if peak_tflops:
        peak, source = peak_tflops, "--peak_tflops"
    else:
        found = known_peak(device_kind)
        if found is None:
            return {"mfu": None, "peak_tflops": None, "peak_tflops_source": None,
                    "mfu_note": f"no known peak for device kind {device_kind!r}: pass --peak_tflops"}
        peak, source = found
    if not flops_per_step:
        return {"mfu": None, "peak_tflops": peak, "peak_tflops_source": source,
                "mfu_note": "XLA's cost analysis gave no FLOP count for the step"}
    return {"mfu": flops_per_step / step_s / (peak * 1e12 * num_devices), "peak_tflops": peak,
            "peak_tflops_source": source, "mfu_note": None}


def _benchmark_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
    """A copy of ``config`` for timing (no pretrained weights to load) and notes on what differs."""
    if config.cache_features:
        raise ValueError("config.cache_features: the head trains on cached backbone features, not on the input "
                         "pipeline; time the image steps with --config.cache_features=False")
    config = ml_collections.ConfigDict(config.to_dict())
    notes = []
    if config.init_from:
        notes.append(f"config.init_from={config.init_from!r} not loaded (weights change no step's cost)")
        config.init_from = ""
    if config.unfreeze_at or config.unfreeze_at_epoch:
        notes.append("the first phase's step is timed (config.freeze applies); the unfrozen phase is not")
    return config, notes


def measure(config: ml_collections.ConfigDict, *, seconds: float, warmup_steps: int = 5,
            peak_tflops: float | None = None) -> dict:
    """Times ``config``'s training steps fed by its input pipeline (module docstring); returns the report."""
    config, notes = _benchmark_config(config)
    run = train.setup(config)
    phase = run.phase_at(0)
    _, state, rng_state = state_lib.create(config, run.create, phase.tx, run.replicated, phase.freeze)
    base_key = jax.device_put(jax.random.key(config.seed), run.replicated)
    counts = freeze_lib.count(state["params"], state["rest"], phase.freeze)
    iterator = iter(input_pipeline.train_dataset(config.data, run.splits["train"], config.batch_size, config.seed,
                                                 num_steps=run.total_steps))

    def batch() -> tuple[dict, float]:
        """The next global batch and the seconds blocked waiting for it."""
        start = time.perf_counter()
        host = next(iterator)
        waited = time.perf_counter() - start
        return evaluation.global_batch(host, run.batch_sharding), waited

    first, _ = batch()
    start = time.perf_counter()
    compiled = phase.step_fn.lower(state, first, rng_state, base_key).compile()
    compile_s = time.perf_counter() - start
    flops_per_device = flops_of(compiled)

    start = time.perf_counter()
    state, metrics = compiled(state, first, rng_state, base_key)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup_steps - 1):
        state, metrics = compiled(state, batch()[0], rng_state, base_key)
    jax.block_until_ready((state, metrics))

    # Timed: fetch and dispatch step i, then wait for step i-1 (one step in flight).
    waited, done, pending = 0.0, [], None
    start = time.perf_counter()
    while True:
        global_batch, wait = batch()
        waited += wait
        state, metrics = compiled(state, global_batch, rng_state, base_key)
        if pending is not None:
            jax.block_until_ready(pending)
            done.append(time.perf_counter())
        pending = metrics
        if time.perf_counter() - start >= seconds:
            break
    jax.block_until_ready((state, pending))
    done.append(time.perf_counter())
    wall = done[-1] - start
    steps = len(done)
    intervals = np.diff([start, *done])
    last_loss = float(jax.device_get(pending["loss"]))

    devices = list(run.replicated.mesh.devices.flat)
    device_kind = devices[0].device_kind
    step_s_mean = wall / steps
    flops_per_step = flops_per_device * len(devices) if flops_per_device else None
    memory, memory_source = peak_memory([d for d in devices if d.process_index == jax.process_index()])
    return {
        "model": config.model.name,
        "task": config.task,
        "dtype": config.model.dtype,
        "image_size": config.data.image_size,
        "batch_size": config.batch_size,
        "trainable_params": counts.trainable,
        "frozen_params": counts.frozen,
        "devices": len(devices),
        "device_kind": device_kind,
        "platform": devices[0].platform,
        "jax_version": jax.__version__,
        "warmup_steps": warmup_steps,
        "timed_steps": steps,
        "timed_s": wall,
        "images_per_s": steps * config.batch_size / wall,
        "step_s_median": float(statistics.median(intervals)),
        "step_s_mean": step_s_mean,
        "input_wait_s": waited,
        "input_wait_fraction": min(1.0, waited / wall),
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
        "flops_per_step": flops_per_step,
        "flops_per_step_per_device": flops_per_device,
        "achieved_tflops_per_device": flops_per_device / step_s_mean / 1e12 if flops_per_device else None,
        **mfu(flops_per_step, step_s_mean, len(devices), device_kind, peak_tflops),
        "last_loss": last_loss,
        "notes": notes,
    }


def summary(report: dict) -> str:
    """The report for people: a few lines."""
    memory = report["peak_memory_bytes"] / 2**30
    flops = (f"{report['flops_per_step']:.4g} FLOP/step ({report['achieved_tflops_per_device']:.3g} "
             "TFLOP/s per device)" if report["flops_per_step"] else "FLOPs unknown")
    utilisation = (f"MFU {100 * report['mfu']:.2f}% of {report['peak_tflops']:g} TFLOP/s per device "
                   f"({report['peak_tflops_source']})" if report["mfu"] is not None else f"MFU n/a: {report['mfu_note']}")
    lines = [
        f"{report.get('config') or report['model']}: {report['model']} ({report['task']}, {report['dtype']}), {report['image_size']} px, batch "
        f"{report['batch_size']}, on {report['devices']} x {report['device_kind']} ({report['platform']}), "
        f"jax {report['jax_version']}",
        f"  {report['images_per_s']:.2f} images/s over {report['timed_steps']} steps in {report['timed_s']:.2f} s: "
        f"step {report['step_s_median'] * 1e3:.1f} ms median, {report['step_s_mean'] * 1e3:.1f} ms mean; "
        f"waiting for input {100 * report['input_wait_fraction']:.1f}% of the time",
        f"  compile {report['compile_s']:.2f} s, first step {report['first_step_s']:.2f} s; peak memory "
        f"{memory:.2f} GiB ({report['peak_memory_source']})",
        f"  {flops}; {utilisation}",
    ]
    lines += [f"  note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Parses the flags and ``--config.*`` overrides, measures, prints the summary and the JSON."""
    overrides = cli.parse(FLAGS, argv, config_overrides=True)
    config = cli.load_config_file(_CONFIG.value, overrides)
    report = measure(config, seconds=_SECONDS.value, warmup_steps=_WARMUP.value, peak_tflops=_PEAK.value)
    report = {"config": _CONFIG.value, "overrides": list(overrides), **report}
    print(summary(report))
    if _OUT.value:
        io.write_json(_OUT.value, report)
    print(json.dumps(report, sort_keys=True, default=io.jsonable), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
