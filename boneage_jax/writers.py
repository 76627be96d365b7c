"""Run outputs: ``metrics.jsonl`` (one JSON object per event, with its wall-clock ``time``) and
TensorBoard event files. Other files are written atomically through ``boneage_jax.io``.

TensorBoard files are written by tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax

from boneage_jax import io


class MetricWriter:
    """Writes events on process 0 only; other processes ignore writes."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        if resume_step and os.path.exists(self.path):
            _truncate_after(self.path, resume_step)
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step or None)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        event = {"step": int(step), "split": split, **{k: io.jsonable(v) for k, v in metrics.items()},
                 "time": round(time.time(), 3)}  # wall clock (Unix seconds), for reports
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{split}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Drops events logged after ``step``: a resumed run logs them again."""
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    io.write_text(path, "".join(kept))

