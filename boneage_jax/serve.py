r"""A local web service for a trained run: bone age of an uploaded hand radiograph, over HTTP.

    python -m boneage_jax.serve --workdir runs/demo [--host 127.0.0.1 --port 8080] \
        [--max_upload_mb 32 --max_side 8192 --max_batch 8 --batch_wait_ms 5] [--tta] [--which best]

Loads the run once (``inference.Predictor``, as ``predict`` does) and serves, with uvicorn:

- ``GET /``: a web page to drop or choose an image, pick the sex, give the age, and see the
  answer with the heatmap overlaid (no external resources: it works offline);
- ``POST /predict``: multipart/form-data with ``image`` (PNG, JPEG or DICOM), ``sex`` (M/F),
  optional ``age_months``, ``force`` and ``heatmap``; JSON back with the bone age, the
  prediction interval where the run's head or ``--tta`` gives one, the quality verdict, bone age
  minus chronological age, and the heatmap as a base64 PNG;
- ``GET /health`` and ``GET /openapi.json``.

The answers, status codes and batching are described in ``boneage_jax/service.py``. There is no
standard deviation score (SDS): the codebase has no reference table of bone-age standard
deviations. The service listens on 127.0.0.1 only unless ``--host`` says otherwise, and has no
authentication: a wider ``--host`` lets anyone who reaches the port send images. Uploads are
held in memory, never written to disk. ``--max_upload_mb`` bounds the request body (413),
``--max_side`` the longest side an image header may declare (422). Requests arriving within
``--batch_wait_ms`` of each other are predicted in one batch of at most ``--max_batch``; the
first request of each padded batch size compiles (kept in the persistent compilation cache,
``--cache_dir`` as for ``predict``).
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Sequence

from absl import app, flags

from boneage_jax import cli

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (written by boneage_jax.main).", flag_values=FLAGS)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (127.0.0.1: this machine only).",
                            flag_values=FLAGS)
_PORT = flags.DEFINE_integer("port", 8080, "Port to listen on.", lower_bound=1,
                             upper_bound=65535, flag_values=FLAGS)
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to load.", flag_values=FLAGS)
_MAX_UPLOAD_MB = flags.DEFINE_float("max_upload_mb", 32.0, "Largest request body in MB (413 beyond).",
                                    lower_bound=0.001, flag_values=FLAGS)
_MAX_SIDE = flags.DEFINE_integer("max_side", 8192, "Longest image side in pixels, as its header declares "
                                 "(422 beyond).", lower_bound=1, flag_values=FLAGS)
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Most images per call of the model.", lower_bound=1,
                                  upper_bound=1024, flag_values=FLAGS)
_BATCH_WAIT_MS = flags.DEFINE_float("batch_wait_ms", 5.0, "How long a batch waits for more requests after its "
                                    "first, in milliseconds.", lower_bound=0.0, upper_bound=10000.0,
                                    flag_values=FLAGS)
_TTA = flags.DEFINE_bool("tta", False, "Test-time augmentation: mean over flip and small rotations, whose spread "
                         "gives a prediction interval.", flag_values=FLAGS)
_TTA_FLIP = flags.DEFINE_bool("tta_flip", True, "With --tta: include the horizontal flip.", flag_values=FLAGS)
_TTA_ANGLES = flags.DEFINE_list("tta_angles", ["-5", "5"], "With --tta: rotations in degrees.", flag_values=FLAGS)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, f"Persistent compilation cache (default $BONEAGE_JAX_CACHE or {cli.DEFAULT_CACHE}; '' off).",
    flag_values=FLAGS)
flags.mark_flags_as_required(["workdir"], flag_values=FLAGS)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str]) -> int:
    """``python -m boneage_jax.serve`` with ``argv``; serves until interrupted, returns the exit status."""
    if cli.parse(FLAGS, argv):
        raise app.UsageError(f"unexpected arguments: {' '.join(argv)} (serve takes flags only)")
    try:
        angles = [float(a) for a in _TTA_ANGLES.value]
    except ValueError as e:
        raise app.UsageError(f"--tta_angles must be numbers: {e}") from e
    import uvicorn  # pylint: disable=import-outside-toplevel

    from boneage_jax import inference, service  # pylint: disable=import-outside-toplevel

    cli.enable_compilation_cache(_CACHE_DIR.value)
    limits = service.Limits(max_upload_bytes=round(_MAX_UPLOAD_MB.value * 1024 * 1024), max_side=_MAX_SIDE.value,
                            max_batch=_MAX_BATCH.value, batch_wait_s=_BATCH_WAIT_MS.value / 1e3)
    predictor = inference.Predictor(_WORKDIR.value, which=_WHICH.value, batch_size=limits.max_batch)
    served = service.Service(predictor, limits, tta=_TTA.value, tta_flip=_TTA_FLIP.value, tta_angles=angles,
                             which=_WHICH.value)
    for note in predictor.notes:
        print(f"note: {note}")
    if not is_loopback(_HOST.value):
        print(f"warning: listening on {_HOST.value}: anyone who can reach this port can send images (there is no "
              "authentication)", file=sys.stderr)
    print(f"serving {predictor.run.workdir} (checkpoint {_WHICH.value}, step {predictor.run.step}) on "
          f"http://{_HOST.value}:{_PORT.value}/", flush=True)
    uvicorn.run(service.create_app(served), host=_HOST.value, port=_PORT.value, log_level="info")
    return 0


if __name__ == "__main__":
    cli.run(main)
