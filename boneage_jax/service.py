"""The bone-age web service: an ASGI app (FastAPI) over a loaded run, with a batching queue.

``python -m boneage_jax.serve`` runs it (flags and limits there); this module is the app:

- ``POST /predict`` (multipart/form-data): ``image`` (a PNG, JPEG or DICOM file), ``sex`` (M/F,
  male/female), optional ``age_months`` (chronological age: months, or ``9y6m``; 0-240 months) or
  ``birth_date`` and ``exam_date`` (YYYY-MM-DD), ``force`` (answer
  even for an image the quality check rejects) and ``heatmap`` (default true). JSON back: bone
  age in months and years, the prediction interval where the run's head or test-time
  augmentation gives one (``evaluation.combine``, ``metrics.normal_interval``), the quality
  verdict (``inference.Predictor.unusable_reason``, ``boneage_jax.quality``), the chronological
  age, bone age minus chronological age and RDES14's fields (``chronological.compare``) when
  given, and the heatmap (``explain.overlay`` of
  ``Predictor.saliency``) as a base64 PNG. No standard deviation score: the codebase has no
  reference table of bone-age standard deviations.
- ``GET /health``: the model and the limits. ``GET /openapi.json``: the OpenAPI description.
  ``GET /``: one web page (``boneage_jax/web/index.html``, no external resources) to drop an
  image and see the answer with the heatmap.

Bad requests get a 4xx JSON answer ``{"detail": "one line naming the field and what was
expected"}``: 413 for a body over the upload limit, 415 for a body that is not multipart or an
image that is not PNG/JPEG/DICOM, 422 for a missing or bad field, an image larger than the
dimension limit (read from its header before decoding), an image that cannot be decoded, an
image the quality check rejects (``quality`` in the answer names the reason) or one the
preprocessing fails on. The upload is read into memory (up to the limit) and decoded there;
nothing is written to disk.

Requests are decoded and preprocessed in worker threads; their network inputs go to a
:class:`Batcher`, which runs the model on every input that arrived within ``batch_wait_s`` of
the first, up to ``max_batch`` at a time, in one call on the device (padded to a power of two,
``Predictor.predict_arrays``); each answer says which batch served it and its size.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import importlib.resources
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from boneage_jax import chronological, evaluation, explain, inference, io, metrics

MAX_AGE_MONTHS = chronological.MAX_AGE_MONTHS  # chronological ages accepted
FIELDS = ("image", "sex", "age_months", "birth_date", "exam_date", "force", "heatmap")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the service accepts and how it batches."""

    max_upload_bytes: int = 32 * 1024 * 1024  # the whole request body
    max_side: int = 8192  # px, the longest side an image header may declare
    max_batch: int = 8  # images per call of the model
    batch_wait_s: float = 0.005  # how long a batch waits for more requests after its first

    def check(self) -> None:
        """ValueError naming the first limit out of range."""
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes is {self.max_upload_bytes}; expected at least 1")
        if self.max_side < 1:
            raise ValueError(f"max_side is {self.max_side}; expected at least 1 px")
        if self.max_batch < 1:
            raise ValueError(f"max_batch is {self.max_batch}; expected at least 1")
        if not 0 <= self.batch_wait_s <= 10:
            raise ValueError(f"batch_wait_s is {self.batch_wait_s}; expected 0 to 10 seconds")


class RequestError(Exception):
    """A bad request: its HTTP status, a one-line message and extra JSON fields."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


# ----------------------------------------------------------------------------- batching


@dataclasses.dataclass
class BatchInfo:
    id: int
    size: int


class Batcher:
    """Runs ``fn(items) -> results`` (one result per item) on a worker thread, over the items
    submitted within ``wait_s`` of the first of a batch, at most ``max_batch`` at a time.

    :meth:`submit` returns a future of ``(result, BatchInfo)``; an exception in ``fn`` fails every
    future of its batch. ``batch_sizes`` lists the size of every batch run so far."""

    _STOP = object()

    def __init__(self, fn: Callable[[list], Sequence], max_batch: int, wait_s: float):
        self.fn, self.max_batch, self.wait_s = fn, max(1, max_batch), max(0.0, wait_s)
        self.batch_sizes: list[int] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="boneage-batcher", daemon=True)
        self._thread.start()

    def submit(self, item) -> concurrent.futures.Future:
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        """Stops the worker after the batches already queued."""
        self._queue.put(self._STOP)
        self._thread.join()

    def _collect(self, first) -> tuple[list, bool]:
        """``first`` and what arrives within ``wait_s`` of it (up to ``max_batch``); whether to stop after."""
        entries = [first]
        deadline = time.monotonic() + self.wait_s
        while len(entries) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is self._STOP:
                return entries, True
            entries.append(entry)
        return entries, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is self._STOP:
                return
            entries, stop = self._collect(first)
            live = [(item, future) for item, future in entries if future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batch_sizes.append(len(live))
            info = BatchInfo(id=len(self.batch_sizes), size=len(live))
            try:
                results = self.fn([item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(live)} items")
            except Exception as e:  # pylint: disable=broad-except  # every request of the batch hears of it
                for _, future in live:
                    future.set_exception(e)
                continue
            for (_, future), result in zip(live, results):
                future.set_result((result, info))


# ----------------------------------------------------------------------------- the service


@dataclasses.dataclass
class Job:
    """One image's network input, on its way through the batcher."""

    input: np.ndarray  # (S, S, C) float32
    male: bool
    heatmap: bool


@dataclasses.dataclass
class Upload:
    """The fields of a ``POST /predict`` request, checked."""

    name: str
    data: bytes
    male: bool
    age_months: float | None = None
    force: bool = False
    heatmap: bool = True


class Service:
    """A loaded run (``inference.Predictor``) behind the batching queue, with the request limits
    and test-time augmentation settings."""

    def __init__(self, predictor: inference.Predictor, limits: Limits = Limits(), *, tta: bool = False,
                 tta_flip: bool = True, tta_angles: Sequence[float] = (-5.0, 5.0), which: str = "best"):
        limits.check()
        if predictor.batch_size < limits.max_batch:
            raise ValueError(f"the predictor's batch size {predictor.batch_size} is below max_batch "
                             f"{limits.max_batch}")
        self.predictor, self.limits, self.which = predictor, limits, which
        self.tta, self.tta_flip, self.tta_angles = tta, tta_flip, tuple(float(a) for a in tta_angles)
        self.tta_views = 1 + tta_flip + len(self.tta_angles) if tta else 1
        self.batcher = Batcher(self.run_batch, limits.max_batch, limits.batch_wait_s)
        self._decoding = anyio.CapacityLimiter(max(2, limits.max_batch))  # images decoded at once

    @property
    def run(self) -> inference.LoadedRun:
        return self.predictor.run

    def model_info(self) -> dict:
        run = self.run
        return {"workdir": run.workdir, "checkpoint": self.which, "step": int(run.step),
                "model": run.config.model.name, "head": run.objective.head, "image_size": self.predictor.image_size,
                "tta_views": self.tta_views, "interval_sources": evaluation.interval_sources([run], self.tta_views),
                "heatmap": "attention map" if self.predictor.saliency_kind == "attention" else "gradient saliency",
                "notes": list(self.predictor.notes)}

    def close(self) -> None:
        self.batcher.close()

    # -- on the batcher's thread

    def readout(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray]:
        """The run's readout of network inputs, averaged over the TTA views when ``tta`` is on
        (``evaluation.combine``: their spread becomes ``std``)."""
        if not self.tta:
            return self.predictor.predict_arrays(images, male)
        views = evaluation.tta_views(images, self.tta_flip, self.tta_angles)
        return evaluation.combine([self.predictor.predict_arrays(v, male) for v in views],
                                  class_means=self.run.objective.stats.class_means or None)

    def run_batch(self, jobs: list[Job]) -> list[dict]:
        """One call of the model (and of the saliency map, when a job asks for it) over ``jobs``."""
        images = np.stack([job.input for job in jobs])
        male = np.asarray([job.male for job in jobs], np.float32)
        readout = self.readout(images, male)
        maps = self.predictor.saliency(images, male)[1] if any(job.heatmap for job in jobs) else None
        results = []
        for i, job in enumerate(jobs):
            result = {key: np.asarray(value[i]).item() for key, value in readout.items()}
            result["heat"] = maps[i] if maps is not None and job.heatmap else None
            results.append(result)
        return results

    # -- per request, in worker threads

    def prepare(self, upload: Upload) -> tuple[np.ndarray, np.ndarray, dict]:
        """The upload -> (stored image, network input, quality verdict); RequestError when the
        image is too large, not PNG/JPEG/DICOM, undecodable, rejected (unless ``force``) or
        unprocessable."""
        size = io.image_dimensions(upload.data, upload.name)
        if size is not None and max(size) > self.limits.max_side:
            raise RequestError(422, f"image {upload.name}: {size[0]}x{size[1]} px; the longest side may be at "
                                    f"most {self.limits.max_side} px (--max_side)")
        try:
            image = self.predictor.decode(upload.data, upload.name)
        except io.UnknownFormatError as e:
            raise RequestError(415, f"image {e}") from e
        except io.ImageReadError as e:
            raise RequestError(422, f"image {e}") from e
        reason = self.predictor.unusable_reason(image)
        verdict = {"usable": reason is None, "reason": reason, "forced": bool(reason) and upload.force}
        if reason and not upload.force:
            raise RequestError(422, f"image {upload.name}: rejected: {reason} (send force=true to predict anyway)",
                               quality=verdict)
        try:
            network_input = self.predictor.prepare(image, upload.name, check_quality=False)
        except io.ImageReadError as e:
            raise RequestError(422, f"image {e}", quality=verdict) from e
        return image, network_input, verdict

    def heatmap_png(self, image: np.ndarray, heat: np.ndarray) -> dict:
        """The heatmap over the preprocessed image as a base64 PNG."""
        import cv2  # pylint: disable=import-outside-toplevel

        picture = explain.overlay(self.predictor.preprocessed_uint8(image), heat)
        ok, buffer = cv2.imencode(".png", picture)
        if not ok:
            raise RuntimeError("could not encode the heatmap as PNG")
        kind = "attention map" if self.predictor.saliency_kind == "attention" else "gradient saliency"
        return {"kind": kind, "media_type": "image/png", "width": int(picture.shape[1]),
                "height": int(picture.shape[0]), "png_base64": base64.b64encode(buffer.tobytes()).decode("ascii")}

    def answer(self, upload: Upload, verdict: dict, result: dict, batch: BatchInfo, heatmap: dict | None) -> dict:
        """The JSON answer of one prediction."""
        boneage = float(result["boneage"])
        rdes14 = None if upload.age_months is None else chronological.compare(boneage, upload.age_months)
        out: dict[str, Any] = {
            "file": upload.name, "sex": "M" if upload.male else "F",
            "boneage_months": boneage, "boneage_years": boneage / 12.0,
            "age_class": int(result["class"]) if "class" in result else None,
            "interval": None, "interval_note": None,
            "chronological_age_months": upload.age_months,
            "boneage_minus_chronological_months": None if rdes14 is None else rdes14["difference_months"],
            "rdes14": rdes14,
            "quality": verdict, "heatmap": heatmap, "batch": dataclasses.asdict(batch),
            "model": {"checkpoint": self.which, "step": int(self.run.step), "head": self.run.objective.head,
                      "tta_views": self.tta_views},
        }
        if "std" in result:
            std = float(result["std"])
            levels = {}
            for level in metrics.INTERVAL_LEVELS:
                low, high = metrics.normal_interval(boneage, std, level)
                levels[metrics.level_name(level)] = [float(low), float(high)]
            out["interval"] = {"std_months": std, "levels": levels,
                               "sources": evaluation.interval_sources([self.run], self.tta_views)}
        else:
            out["interval_note"] = (f"no prediction interval: a {self.run.objective.head} head gives no spread of "
                                    "its own (a gaussian head or serve --tta would)")
        return out

    async def predict(self, upload: Upload) -> dict:
        """Decode and preprocess (worker thread), predict (batcher), draw the heatmap (worker thread)."""
        image, network_input, verdict = await anyio.to_thread.run_sync(self.prepare, upload, limiter=self._decoding)
        future = self.batcher.submit(Job(input=network_input, male=upload.male, heatmap=upload.heatmap))
        result, batch = await asyncio.wrap_future(future)
        heatmap = None
        if result["heat"] is not None:
            heatmap = await anyio.to_thread.run_sync(self.heatmap_png, image, result["heat"], limiter=self._decoding)
        return self.answer(upload, verdict, result, batch, heatmap)


# ----------------------------------------------------------------------------- requests


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    too_large = f"the request body is larger than the upload limit of {format_bytes(limit)} (--max_upload_mb)"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"{too_large}: Content-Length {declared}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, too_large)
    return bytes(body)


def format_bytes(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB" if n >= 1024 * 1024 else f"{n} bytes"


@dataclasses.dataclass
class Part:
    name: str
    filename: str | None
    data: bytearray = dataclasses.field(default_factory=bytearray)


def parse_multipart(content_type: str | None, body: bytes, max_parts: int = 16) -> list[Part]:
    """The parts of a multipart/form-data body, in memory; RequestError (415 for another content
    type, 400 for a malformed body)."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise RequestError(415, f"expected a multipart/form-data body with the fields image, sex and optionally "
                                f"{', '.join(FIELDS[2:])} (got Content-Type {content_type or 'none'!r})")
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestError(400, "the multipart/form-data Content-Type has no boundary")
    parts: list[Part] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}
    disposition = bytearray()

    def on_part_begin():
        disposition.clear()

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        if bytes(header["field"]).strip().lower() == b"content-disposition":
            disposition[:] = header["value"]
        header["field"].clear()
        header["value"].clear()

    def on_headers_finished():
        _, params = parse_options_header(bytes(disposition))
        if b"name" not in params:
            raise RequestError(400, "a multipart part has no name in its Content-Disposition header")
        if len(parts) >= max_parts:
            raise RequestError(400, f"more than {max_parts} multipart parts; expected the fields {', '.join(FIELDS)}")
        filename = params.get(b"filename")
        parts.append(Part(name=params[b"name"].decode("utf-8", "replace"),
                          filename=None if filename is None else filename.decode("utf-8", "replace")))

    def on_part_data(data, start, end):
        parts[-1].data += data[start:end]

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise RequestError(400, f"malformed multipart/form-data body: {e}") from e
    return parts


def parse_bool(name: str, value: str) -> bool:
    key = value.strip().lower()
    if key in _TRUE:
        return True
    if key in _FALSE:
        return False
    raise RequestError(422, f"{name} {value!r}: expected true or false")


def upload_from_parts(parts: Sequence[Part]) -> Upload:
    """The checked fields of a ``POST /predict`` body; RequestError (422) naming the first bad one."""
    fields: dict[str, Part] = {}
    for part in parts:
        if part.name not in FIELDS:
            raise RequestError(422, f"unknown field {part.name!r}; expected {', '.join(FIELDS)}")
        if part.name in fields:
            raise RequestError(422, f"field {part.name!r} given twice; expected one")
        fields[part.name] = part
    image = fields.get("image")
    if image is None or image.filename is None:
        raise RequestError(422, f"image: missing; expected {io.IMAGE_FORMATS} uploaded as the file field 'image'")
    if not image.data:
        raise RequestError(422, f"image {image.filename or 'upload'}: the file is empty; expected {io.IMAGE_FORMATS}")

    def text(name: str) -> str | None:
        part = fields.get(name)
        if part is None:
            return None
        if part.filename is not None:
            raise RequestError(422, f"{name}: a file was sent; expected a text field")
        return part.data.decode("utf-8", "replace")

    sex = text("sex")
    if sex is None or not sex.strip():
        raise RequestError(422, "sex: missing; expected M or F (male or female)")
    try:
        male = inference.parse_sex(sex)
    except ValueError as e:
        raise RequestError(422, str(e)) from None
    try:
        age_months = chronological.resolve(text("age_months"), text("birth_date"), text("exam_date"),
                                           names=("age_months", "birth_date", "exam_date"))
    except ValueError as e:
        raise RequestError(422, str(e)) from None
    return Upload(name=image.filename or "upload", data=bytes(image.data), male=male, age_months=age_months,
                  force=parse_bool("force", text("force") or "false"),
                  heatmap=parse_bool("heatmap", text("heatmap") or "true"))


# ----------------------------------------------------------------------------- the app (and its OpenAPI schema)


class Quality(BaseModel):
    usable: bool = Field(description="Whether the quality check accepts the image.")
    reason: str | None = Field(description="Why it does not (boneage_jax.quality), else null.")
    forced: bool = Field(description="Predicted despite a rejection (force=true).")


class Interval(BaseModel):
    std_months: float = Field(description="Standard deviation of the predictive normal distribution, months.")
    levels: dict[str, list[float]] = Field(description="Central intervals by level ('68', '95'): [low, high] months.")
    sources: list[str] = Field(description="Where the spread comes from (gaussian head, TTA views).")


class Heatmap(BaseModel):
    kind: str = Field(description="'gradient saliency' or 'attention map'.")
    media_type: str
    width: int
    height: int
    png_base64: str = Field(description="The map over the preprocessed network input, a base64 PNG.")


class Batch(BaseModel):
    id: int = Field(description="Which batch of the model served this request (counting from 1).")
    size: int = Field(description="How many requests that batch served.")


class Rdes14(BaseModel):
    chronological_age_months: float
    skeletal_age_months: float = Field(description="The predicted bone age.")
    difference_months: float = Field(description="Skeletal minus chronological age.")
    standard_deviation_for_age_months: float | None = Field(description="Null: no reference table (see note).")
    sds: float | None = Field(description="Null: no reference table (see note).")
    determination: str = Field(description="delayed, normal, advanced or (without a reference table) unknown.")
    note: str


class PredictionAnswer(BaseModel):
    file: str
    sex: str = Field(description="M or F.")
    boneage_months: float
    boneage_years: float
    age_class: int | None = Field(description="The age class of a classification head, else null.")
    interval: Interval | None
    interval_note: str | None = Field(description="Why there is no interval, when there is none.")
    chronological_age_months: float | None = Field(description="age_months as sent, else null.")
    boneage_minus_chronological_months: float | None = Field(
        description="Bone age minus chronological age, months (null without age_months). No standard deviation "
                    "score: this codebase has no reference table of bone-age standard deviations.")
    rdes14: Rdes14 | None = Field(description="The ACR/RSNA bone age common data element's fields (null without "
                                                "age_months).")
    quality: Quality
    heatmap: Heatmap | None
    batch: Batch
    model: dict[str, Any]


class ErrorAnswer(BaseModel):
    detail: str = Field(description="One line: the field or image and what was expected.")
    quality: Quality | None = None


_REQUEST_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "sex"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "A PNG, JPEG or DICOM hand radiograph."},
        "sex": {"type": "string", "enum": ["M", "F", "male", "female"], "description": "Any case."},
        "age_months": {"type": "string", "examples": ["114", "100.5", "9y6m", "9.5y"],
                       "description": f"Chronological age (optional): months, or years and months; 0 to "
                                      f"{MAX_AGE_MONTHS:g} months."},
        "birth_date": {"type": "string", "format": "date",
                       "description": "Birth date (YYYY-MM-DD), with exam_date instead of age_months (optional)."},
        "exam_date": {"type": "string", "format": "date", "description": "Exam date (YYYY-MM-DD), with birth_date."},
        "force": {"type": "boolean", "default": False,
                  "description": "Predict even when the quality check rejects the image."},
        "heatmap": {"type": "boolean", "default": True, "description": "Return the heatmap."},
    }}}}}


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorAnswer} for code in codes}


def create_app(service: Service) -> FastAPI:
    """The ASGI app of ``service``; closing the app (its lifespan's end) stops the batcher."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()

    app = FastAPI(title="boneage_jax", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Bone age from a hand radiograph, with its prediction interval, quality verdict and "
                              "heatmap. No standard deviation score (no reference table in this codebase).")
    app.state.service = service
    page = importlib.resources.files("boneage_jax").joinpath("web", "index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": error.message, **error.extra}, status_code=error.status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", summary="The loaded model and the limits")
    async def health() -> dict:
        limits = service.limits
        return {"status": "ok", "model": service.model_info(),
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_side": limits.max_side,
                           "max_batch": limits.max_batch, "batch_wait_ms": 1e3 * limits.batch_wait_s,
                           "max_age_months": MAX_AGE_MONTHS},
                "batches": len(service.batcher.batch_sizes)}

    @app.post("/predict", summary="Bone age of one hand radiograph", response_model=PredictionAnswer,
              responses=_errors(400, 413, 415, 422), openapi_extra={"requestBody": _REQUEST_BODY})
    async def predict(request: Request) -> dict:
        body = await read_body(request, service.limits.max_upload_bytes)
        upload = upload_from_parts(parse_multipart(request.headers.get("content-type"), body))
        return await service.predict(upload)

    return app

