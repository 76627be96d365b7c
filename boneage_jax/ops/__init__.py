"""Named preprocessing and augmentation ops, composed by a config into a pipeline.

Every op is a small pure numpy/OpenCV function registered under a name. A config chooses ops
with a spec string in the style of big_vision, for example::

    data.preprocess = "hand_mask(source='dataset')|align|roi_crop(region='hand')|resize_pad|clahe"
    data.augment    = "flip|affine(rotation=20, shift=0.1, zoom=0.1)|gamma_jitter(0.8, 1.2)"
    data.normalize  = "zscore|grey_to_rgb"

Ops are applied left to right to a *sample*: a dict with the ``image`` ((H, W) or (H, W, C),
uint8 until a normalisation op makes it float32) and, where the data has them, the hand
``mask`` ((H, W) uint8, 255 on the hand), the ``keypoints`` ((K, 2) float32 x, y in pixels,
NaN where unknown; names in ``tfds_rsna.keypoints.KEYPOINT_NAMES``) and the record ``id``.
Geometric ops move the mask and the keypoints with the image, so a ROI crop after an
alignment or an augmentation still finds its bones.

Two kinds of op:

* image ops ``fn(image, **kwargs) -> image`` (contrast, filters, normalisation), registered
  with ``@register_preprocess(name)``; augmentations ``fn(image, rng, **kwargs)`` with
  ``@register_augment(name)``. They see only the image.
* sample ops ``fn(sample, **kwargs) -> sample`` (geometry, masks, crops), registered with
  ``on="sample"``; augmentations ``fn(sample, rng, **kwargs)``.

Augmentations draw from a ``numpy.random.Generator`` that the pipeline seeds per example, so
they are reproducible. Keyword arguments in a spec are Python literals. Some arguments default
to data-config fields unless the spec gives them (``spec_defaults``): ``size`` from
``data.image_size``, ``region`` (of ``roi_crop``) from ``data.roi`` and ``cache_dir`` (of
``hand_mask``) from ``data.mask_cache``; so ``--config.data.roi=roi2`` switches a config's crop. ``build_preprocess`` and ``build_augment`` return a function
that takes a sample dict (and returns one) or a bare image (and returns an image).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from collections.abc import Callable

import cv2
import numpy as np

# OpenCV runs its own thread pool inside each call; grain already parallelises over examples.
cv2.setNumThreads(1)

Sample = dict


@dataclasses.dataclass(frozen=True)
class Op:
    fn: Callable
    on: str  # "image" or "sample"


PREPROCESS_OPS: dict[str, Op] = {}
AUGMENT_OPS: dict[str, Op] = {}
# Named augmentation sets that expand to a spec (see augment.py).
AUGMENT_PRESETS: dict[str, str] = {}


def _register(registry: dict, name: str, on: str) -> Callable:
    if on not in ("image", "sample"):
        raise ValueError(f"op {name!r}: on={on!r}; expected 'image' or 'sample'")

    def wrap(fn: Callable) -> Callable:
        if name in registry:
            raise ValueError(f"op {name!r} registered twice")
        registry[name] = Op(fn, on)
        return fn

    return wrap


def register_preprocess(name: str, on: str = "image") -> Callable:
    """Registers ``fn(image, **kw) -> image`` (or ``fn(sample, **kw) -> sample`` with on="sample")."""
    return _register(PREPROCESS_OPS, name, on)


def register_augment(name: str, on: str = "image") -> Callable:
    """Registers ``fn(image, rng, **kw) -> image`` (or ``fn(sample, rng, **kw)`` with on="sample")."""
    return _register(AUGMENT_OPS, name, on)


def as_2d(image: np.ndarray) -> np.ndarray:
    """(H, W, 1) -> (H, W); other shapes unchanged."""
    return image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image


def require_uint8(image: np.ndarray, op: str) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"{op} needs a uint8 image, got {image.dtype}; put it before normalisation")
    return image


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class OpCall:
    name: str
    kwargs: dict


def parse_spec(spec: str, presets: dict[str, str] | None = None) -> list[OpCall]:
    """Parses ``"name|name(k=v, ...)|..."`` into op calls (an empty spec is no op).

    A bare name found in ``presets`` expands to that preset's spec."""
    calls = []
    for part in (p.strip() for p in spec.split("|")):
        if not part:
            continue
        try:
            node = ast.parse(part, mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"op spec {part!r} in {spec!r} is not name or name(key=value, ...)") from e
        if isinstance(node, ast.Name):
            if presets and node.id in presets:
                calls.extend(parse_spec(presets[node.id]))
            else:
                calls.append(OpCall(node.id, {}))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
            try:
                kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            except ValueError as e:
                raise ValueError(f"op spec {part!r} in {spec!r}: arguments must be Python literals") from e
            calls.append(OpCall(node.func.id, kwargs))
        else:
            raise ValueError(f"op spec {part!r} in {spec!r}: use name or name(key=value, ...)")
    return calls


def _keyword_names(fn: Callable) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY}


def _bind(registry: dict, kind: str, call: OpCall, defaults: dict) -> tuple[Callable, str]:
    if call.name not in registry:
        raise ValueError(f"unknown {kind} op {call.name!r}; known: {', '.join(sorted(registry))}")
    op = registry[call.name]
    accepted = _keyword_names(op.fn)
    unknown = set(call.kwargs) - accepted
    if unknown:
        raise ValueError(f"{kind} op {call.name!r} has no argument(s) {sorted(unknown)}; it takes {sorted(accepted)}")
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    kwargs.update(call.kwargs)
    return functools.partial(op.fn, **kwargs), op.on


def _on_sample(fn: Callable, on: str, with_rng: bool) -> Callable:
    if on == "sample":
        return fn
    if with_rng:
        return lambda sample, rng: {**sample, "image": fn(sample["image"], rng)}
    return lambda sample: {**sample, "image": fn(sample["image"])}


def _image_or_sample(apply: Callable) -> Callable:
    @functools.wraps(apply)
    def wrapped(x, *args):
        if isinstance(x, dict):
            return apply(x, *args)
        return apply({"image": x}, *args)["image"]

    return wrapped


def spec_defaults(data_config) -> dict:
    """Op arguments that come from the data config unless a spec sets them."""
    defaults = {"size": data_config.image_size}
    if data_config.get("roi"):
        defaults["region"] = data_config.roi
    if data_config.get("mask_cache"):
        defaults["cache_dir"] = data_config.mask_cache
    return defaults


def build_preprocess(spec: str, **defaults) -> Callable:
    """Composes a preprocessing spec into one function; ``defaults`` fill matching arguments."""
    fns = [_on_sample(*_bind(PREPROCESS_OPS, "preprocess", c, defaults), with_rng=False) for c in parse_spec(spec)]

    def apply(sample: Sample) -> Sample:
        for fn in fns:
            sample = fn(sample)
        return sample

    return _image_or_sample(apply)


def build_augment(spec: str, **defaults) -> Callable:
    """Composes an augmentation spec (presets expanded) into one function of ``(sample, rng)``."""
    calls = parse_spec(spec, AUGMENT_PRESETS)
    fns = [_on_sample(*_bind(AUGMENT_OPS, "augment", c, defaults), with_rng=True) for c in calls]

    def apply(sample: Sample, rng: np.random.Generator) -> Sample:
        for fn in fns:
            sample = fn(sample, rng)
        return sample

    return _image_or_sample(apply)


# The op families register themselves on import; their functions are reachable as ops.<name>.
from boneage_jax.ops.geometry import *  # noqa: E402,F401,F403
from boneage_jax.ops.contrast import *  # noqa: E402,F401,F403
from boneage_jax.ops.normalize import *  # noqa: E402,F401,F403
from boneage_jax.ops.augment import *  # noqa: E402,F401,F403
from boneage_jax.ops.hand import *  # noqa: E402,F401,F403
