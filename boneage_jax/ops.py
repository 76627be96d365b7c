"""Named preprocessing and augmentation ops, composed by a config into a pipeline.

Every op is a small pure numpy/OpenCV function registered under a name. A config chooses ops
with a spec string in the style of big_vision, for example::

    data.preprocess = "resize_pad|clahe(clip_limit=2.0, tile_grid=8)"
    data.augment    = "flip|affine(rotation=20, shift=0.1, zoom=0.1)"
    data.normalize  = "zscore|grey_to_rgb"

Ops are applied left to right. Preprocessing ops map ``image -> image``; augmentation ops map
``(image, rng) -> image`` with a ``numpy.random.Generator`` that grain seeds per example, so
augmentation is reproducible. Images are ``(H, W)`` or ``(H, W, C)``; uint8 until a
normalisation op turns them to float32. Keyword arguments in the spec are Python literals.

``resize_pad`` and ``resize`` take their ``size`` from ``data.image_size`` unless given.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import threading
from collections.abc import Callable

import cv2
import numpy as np

PreprocessFn = Callable[..., np.ndarray]
AugmentFn = Callable[..., np.ndarray]

PREPROCESS_OPS: dict[str, PreprocessFn] = {}
AUGMENT_OPS: dict[str, AugmentFn] = {}

# OpenCV runs its own thread pool inside each call; grain already parallelises over examples.
cv2.setNumThreads(1)


def register_preprocess(name: str) -> Callable[[PreprocessFn], PreprocessFn]:
    def wrap(fn: PreprocessFn) -> PreprocessFn:
        PREPROCESS_OPS[name] = fn
        return fn

    return wrap


def register_augment(name: str) -> Callable[[AugmentFn], AugmentFn]:
    def wrap(fn: AugmentFn) -> AugmentFn:
        AUGMENT_OPS[name] = fn
        return fn

    return wrap


# ----------------------------------------------------------------------------- geometry


def _as_2d(image: np.ndarray) -> np.ndarray:
    return image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image


@register_preprocess("resize_pad")
def resize_pad(image: np.ndarray, *, size: int, pad_value: int = 0) -> np.ndarray:
    """Aspect-preserving resize so the longest side is ``size``, centred on a square canvas.

    ``pad_value`` 0 pads black; 255 pads white (Memon & Cuomo).
    """
    image = _as_2d(image)
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    canvas = np.full((size, size) + image.shape[2:], pad_value, dtype=image.dtype)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


@register_preprocess("resize")
def resize(image: np.ndarray, *, size: int) -> np.ndarray:
    """Plain resize to ``size`` x ``size`` (aspect not kept)."""
    image = _as_2d(image)
    scale = size / max(image.shape[:2])
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


@register_preprocess("grey_to_rgb")
def grey_to_rgb(image: np.ndarray) -> np.ndarray:
    """Repeats a grey image to 3 channels (for ImageNet models with RGB stems)."""
    image = _as_2d(image)
    return np.repeat(image[:, :, None], 3, axis=2)


# ----------------------------------------------------------------------------- contrast

_thread_local = threading.local()


def _clahe(clip_limit: float, tile_grid: int) -> cv2.CLAHE:
    """One CLAHE object per thread and setting: OpenCV's CLAHE is not thread-safe."""
    cache = getattr(_thread_local, "clahe", None)
    if cache is None:
        cache = _thread_local.clahe = {}
    key = (float(clip_limit), int(tile_grid))
    if key not in cache:
        cache[key] = cv2.createCLAHE(clipLimit=key[0], tileGridSize=(key[1], key[1]))
    return cache[key]


@register_preprocess("clahe")
def clahe(image: np.ndarray, *, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 grey image."""
    image = _as_2d(image)
    if image.dtype != np.uint8:
        raise ValueError(f"clahe needs a uint8 image, got {image.dtype}; put it before normalisation")
    return _clahe(clip_limit, tile_grid).apply(image)


# ----------------------------------------------------------------------------- normalisation


@register_preprocess("zscore")
def zscore(image: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    """Per-image zero mean and unit variance, float32."""
    image = image.astype(np.float32)
    return (image - image.mean()) / (image.std() + eps)


@register_preprocess("value_range")
def value_range(image: np.ndarray, *, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Scales uint8 [0, 255] linearly to [low, high], float32."""
    return image.astype(np.float32) * ((high - low) / 255.0) + low


# ----------------------------------------------------------------------------- augmentation


@register_augment("flip")
def random_flip(image: np.ndarray, rng: np.random.Generator, *, p: float = 0.5) -> np.ndarray:
    """Horizontal flip with probability ``p`` (a left hand becomes a right hand)."""
    return np.ascontiguousarray(image[:, ::-1]) if rng.random() < p else image


_BORDER_MODES = {
    "constant": cv2.BORDER_CONSTANT,
    "nearest": cv2.BORDER_REPLICATE,
    "reflect": cv2.BORDER_REFLECT_101,
}


@register_augment("affine")
def random_affine(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    rotation: float = 0.0,
    shift: float = 0.0,
    zoom: float = 0.0,
    fill_mode: str = "constant",
    fill_value: int = 0,
) -> np.ndarray:
    """Random rotation (degrees, uniform in +-rotation), shift (fraction of the side, uniform in
    +-shift) and zoom (scale uniform in [1-zoom, 1+zoom]) as one warp about the centre."""
    if fill_mode not in _BORDER_MODES:
        raise ValueError(f"affine: fill_mode {fill_mode!r}; expected one of {sorted(_BORDER_MODES)}")
    height, width = image.shape[:2]
    angle = rng.uniform(-rotation, rotation) if rotation else 0.0
    scale = rng.uniform(1.0 - zoom, 1.0 + zoom) if zoom else 1.0
    dx, dy = (rng.uniform(-shift, shift, size=2) * (width, height)) if shift else (0.0, 0.0)
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, scale)
    matrix[:, 2] += (dx, dy)
    return cv2.warpAffine(
        image,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=_BORDER_MODES[fill_mode],
        borderValue=fill_value,
    )


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class OpCall:
    name: str
    kwargs: dict


def parse_spec(spec: str) -> list[OpCall]:
    """Parses ``"name|name(k=v, ...)|..."`` into op calls (an empty spec is no op)."""
    calls = []
    for part in (p.strip() for p in spec.split("|")):
        if not part:
            continue
        try:
            node = ast.parse(part, mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"op spec {part!r} in {spec!r} is not name or name(key=value, ...)") from e
        if isinstance(node, ast.Name):
            calls.append(OpCall(node.id, {}))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            calls.append(OpCall(node.func.id, kwargs))
        else:
            raise ValueError(f"op spec {part!r} in {spec!r}: use name or name(key=value, ...)")
    return calls


def _bind(registry: dict, kind: str, call: OpCall, defaults: dict) -> Callable:
    if call.name not in registry:
        raise ValueError(f"unknown {kind} op {call.name!r}; known: {', '.join(sorted(registry))}")
    fn = registry[call.name]
    code = fn.__code__
    accepted = set(code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount])
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    kwargs.update(call.kwargs)
    unknown = set(call.kwargs) - accepted
    if unknown:
        raise ValueError(f"{kind} op {call.name!r} has no argument(s) {sorted(unknown)}; it takes {sorted(accepted)}")
    return functools.partial(fn, **kwargs)


def build_preprocess(spec: str, **defaults) -> Callable[[np.ndarray], np.ndarray]:
    """Composes a preprocessing spec into one function; ``defaults`` fill matching arguments."""
    fns = [_bind(PREPROCESS_OPS, "preprocess", c, defaults) for c in parse_spec(spec)]

    def apply(image: np.ndarray) -> np.ndarray:
        for fn in fns:
            image = fn(image)
        return image

    return apply


def build_augment(spec: str, **defaults) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Composes an augmentation spec into one function of ``(image, rng)``."""
    fns = [_bind(AUGMENT_OPS, "augment", c, defaults) for c in parse_spec(spec)]

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for fn in fns:
            image = fn(image, rng)
        return image

    return apply
