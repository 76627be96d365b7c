"""Named preprocessing and augmentation ops: one registry of ops and the facts they declare,
and :class:`Pipeline`, a data config's specs parsed once.

Every op is a small pure numpy/OpenCV function registered under a name. A config chooses ops
with a spec string in the style of big_vision, for example::

    data.preprocess = "hand_mask(source='dataset')|align|roi_crop(region='hand')|resize_pad|clahe"
    data.augment    = "flip|affine(rotation=20, shift=0.1, zoom=0.1)|gamma_jitter(0.8, 1.2)"
    data.normalize  = "zscore|grey_to_rgb"

Ops are applied left to right to a *sample*: a dict with the ``image`` ((H, W) or (H, W, C),
uint8 until a normalisation op makes it float32) and, where the data has them, the hand
``mask`` ((H, W) uint8, 255 on the hand), the ``keypoints`` ((K, 2) float32 x, y in pixels,
NaN where unknown; names in ``tfds_rsna.keypoints.KEYPOINT_NAMES``) and the record ``id``.

Two kinds of op:

* image ops ``fn(image, **kwargs) -> image`` (contrast, filters, normalisation), registered
  with ``@register_preprocess(name)``; augmentations ``fn(image, rng, **kwargs)`` with
  ``@register_augment(name)``. They see only the image.
* sample ops ``fn(sample, **kwargs) -> sample`` (geometry, masks, crops), registered with
  ``on="sample"``; augmentations ``fn(sample, rng, **kwargs)``.

Each entry of :data:`OPS` (an :class:`Op`) carries the facts the rest of the code asks about,
declared where the op is registered:

* ``random``: an augmentation, drawing from a ``numpy.random.Generator`` that the pipeline
  seeds per example (so it is reproducible); it belongs in ``data.augment`` and nowhere else.
* ``geometric``: it moves pixels (so it moves the mask and keypoints with the image; a sample
  op must say whether it does). ``boneage_jax.segment`` maps masks back through one
  ``resize_pad`` only, so it refuses every other geometric op.
* ``reads``: the annotations (``mask``, ``keypoints``) it uses where the sample has them: the
  input pipeline decodes a record's mask exactly when a preprocessing op reads it.
  ``requires(arguments)`` says which of them it cannot run without, and ``without_mask`` how
  its spec arguments change to make its own mask instead (single images, ``predict``).
* ``config_defaults``: the arguments whose default comes from a data-config field unless the
  spec sets them (``size`` of ``resize_pad`` from ``data.image_size``, ``region`` of
  ``roi_crop`` from ``data.roi``, ``cache_dir`` of ``hand_mask`` from ``data.mask_cache``; so
  ``--config.data.roi=roi2`` switches a config's crop).
* ``channels``: the image channels it outputs (None: as many as it gets), from which the
  pipeline knows the network input's channel count without running it.
* ``matrix((h, w), rng, **kwargs)``: a geometric augmentation that is one affine warp, drawn
  from ``rng`` exactly as the op draws it (None: this draw leaves the image as it is), so that
  an augment chain of such ops is one warp per image that the device can apply
  (:meth:`Chain.draw_warp`, ``data.augment_on_device``).
* ``pointwise``: each output pixel is a function of that pixel's values alone, the same for
  every image (``scale``, ``preprocess_input``, ``grey_to_rgb``); ``levels(image, **kwargs)``:
  the op on a uint8 grey image is a lookup of each grey level in a (256, C) float32 table that
  depends on the image (``zscore``'s statistics). A normalize chain whose first op has one of
  the two and whose later ops are pointwise is one table per image
  (:meth:`Chain.level_table`), which the device can apply (``data.normalize_on_device``).

Keyword arguments in a spec are Python literals. :class:`Chain` is one spec parsed and bound
(``build_preprocess`` and ``build_augment`` make one): a function of a sample dict (returning
one) or of a bare image (returning an image), plus ``rng`` for augmentations.
:class:`Pipeline` holds a data config's three chains (built once per distinct config by
``Pipeline.from_config``), what they read, and the network input's channel count.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import cv2
import numpy as np

# OpenCV runs its own thread pool inside each call; grain already parallelises over examples.
cv2.setNumThreads(1)

Sample = dict
ANNOTATIONS = frozenset({"mask", "keypoints"})
GREY_LEVELS = np.arange(256, dtype=np.uint8).reshape(256, 1)  # the 256 grey levels as a 256 x 1 image


def _no_requirements(arguments: Mapping[str, Any]) -> frozenset[str]:
    del arguments
    return frozenset()


@dataclasses.dataclass(frozen=True)
class Op:
    """A registered op and the facts it declares (see the module docstring)."""

    name: str
    fn: Callable
    on: str  # "image" or "sample"
    random: bool
    geometric: bool
    reads: frozenset[str]
    config_defaults: Mapping[str, str]  # argument -> data-config field that provides its default
    channels: Callable[[Mapping[str, Any]], int | None]  # arguments -> output channels (None: unchanged)
    requires: Callable[[Mapping[str, Any]], frozenset[str]]  # arguments -> annotations it cannot run without
    without_mask: Callable[[dict], dict] | None  # spec arguments -> those that make its own mask
    arguments: Mapping[str, Any]  # keyword-only arguments -> their defaults (inspect.Parameter.empty if none)
    pointwise: bool = False  # a fixed function of each pixel's values
    levels: Callable[..., np.ndarray] | None = None  # (uint8 grey image, **kwargs) -> its (256, C) table
    matrix: Callable[..., np.ndarray | None] | None = None  # ((h, w), rng, **kwargs) -> its 2x3 warp (None: none)


OPS: dict[str, Op] = {}
# Named augmentation sets that expand to a spec (see augment.py).
AUGMENT_PRESETS: dict[str, str] = {}


def register(
    name: str,
    *,
    random: bool,
    on: str = "image",
    geometric: bool | None = None,
    reads: tuple[str, ...] = (),
    config_defaults: Mapping[str, str] | None = None,
    channels: int | Callable[[Mapping[str, Any]], int | None] | None = None,
    requires: Callable[[Mapping[str, Any]], frozenset[str]] | None = None,
    without_mask: Callable[[dict], dict] | None = None,
    pointwise: bool = False,
    levels: Callable[..., np.ndarray] | None = None,
    matrix: Callable[..., np.ndarray | None] | None = None,
) -> Callable:
    """Registers ``fn`` under ``name`` with its facts; ``geometric`` is required for sample ops.

    Image ops see only the image, so they are never geometric and read no annotations;
    augmentations read none either (the pipeline hands them the mask only to move it)."""
    if on not in ("image", "sample"):
        raise ValueError(f"op {name!r}: on={on!r}; expected 'image' or 'sample'")
    if on == "sample" and geometric is None:
        raise ValueError(f"sample op {name!r} must declare geometric=True (it moves pixels) or False")
    if on == "image" and (geometric or reads):
        raise ValueError(f"image op {name!r} sees only the image: it cannot be geometric or read {list(reads)}")
    if not set(reads) <= ANNOTATIONS:
        raise ValueError(f"op {name!r}: reads={list(reads)}; expected a subset of {sorted(ANNOTATIONS)}")
    if random and reads:
        raise ValueError(f"augmentation {name!r} cannot read {list(reads)}: augmentations get no annotations")
    if without_mask is not None and "mask" not in reads:
        raise ValueError(f"op {name!r}: without_mask is given but the op does not read the mask")
    if (pointwise or levels is not None) and (on != "image" or random):
        raise ValueError(f"op {name!r}: only image preprocessing ops can be pointwise or have grey-level tables")
    if matrix is not None and not (random and geometric):
        raise ValueError(f"op {name!r}: only geometric augmentations draw a warp matrix")
    fixed = channels

    def wrap(fn: Callable) -> Callable:
        if name in OPS:
            raise ValueError(f"op {name!r} registered twice")
        arguments = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                     if p.kind == p.KEYWORD_ONLY}
        missing = set(config_defaults or {}) - set(arguments)
        if missing:
            raise ValueError(f"op {name!r}: config_defaults name argument(s) {sorted(missing)} it does not take")
        OPS[name] = Op(
            name=name, fn=fn, on=on, random=random, geometric=bool(geometric), reads=frozenset(reads),
            config_defaults=dict(config_defaults or {}),
            channels=fixed if callable(fixed) else (lambda arguments: fixed),
            requires=requires or _no_requirements, without_mask=without_mask, arguments=arguments,
            pointwise=pointwise, levels=levels, matrix=matrix)
        return fn

    return wrap


def register_preprocess(name: str, on: str = "image", **facts) -> Callable:
    """Registers ``fn(image, **kw) -> image`` (or ``fn(sample, **kw) -> sample`` with on="sample")."""
    return register(name, random=False, on=on, **facts)


def register_augment(name: str, on: str = "image", **facts) -> Callable:
    """Registers ``fn(image, rng, **kw) -> image`` (or ``fn(sample, rng, **kw)`` with on="sample")."""
    return register(name, random=True, on=on, **facts)


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

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name


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


def format_spec(calls) -> str:
    """Op calls -> a spec string that ``parse_spec`` reads back."""
    return "|".join(str(call) for call in calls)


def config_value(config: Mapping, field: str) -> Any:
    """A data-config field's value, None where it is missing or empty (it then provides no default)."""
    value = config.get(field)
    return None if value is None or value == "" else value


def spec_defaults(data_config: Mapping) -> dict:
    """Op arguments that data-config fields provide (``size``, and ``region`` / ``cache_dir``
    where ``data.roi`` / ``data.mask_cache`` are set), as the registered ops declare them."""
    defaults = {}
    for op in OPS.values():
        for argument, field in op.config_defaults.items():
            value = config_value(data_config, field)
            if value is not None:
                defaults[argument] = value
    return defaults


class BoundOp:
    """An op with its arguments: the spec's, over those its data-config fields provide."""

    def __init__(self, op: Op, call: OpCall, config: Mapping):
        self.op, self.call = op, call
        provided = {arg: config_value(config, field) for arg, field in op.config_defaults.items()}
        self.kwargs = {**{k: v for k, v in provided.items() if v is not None}, **call.kwargs}
        fn = functools.partial(op.fn, **self.kwargs)
        if op.on == "sample":
            self._apply = fn if op.random else (lambda sample, rng: fn(sample))
        elif op.random:
            self._apply = lambda sample, rng: {**sample, "image": fn(sample["image"], rng)}
        else:
            self._apply = lambda sample, rng: {**sample, "image": fn(sample["image"])}

    @property
    def arguments(self) -> dict:
        """Every keyword argument the op runs with (its own defaults included)."""
        return {**self.op.arguments, **self.kwargs}

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        return self._apply(sample, rng)

    def __str__(self) -> str:
        """The call with the arguments that the spec and the data config give."""
        return str(OpCall(self.op.name, self.kwargs))


def _bind(call: OpCall, random: bool, config: Mapping) -> BoundOp:
    kind = "augment" if random else "preprocess"
    op = OPS.get(call.name)
    if op is None:
        known = sorted(name for name, o in OPS.items() if o.random == random)
        raise ValueError(f"unknown {kind} op {call.name!r}; known: {', '.join(known)}")
    if op.random != random:
        if op.random:
            raise ValueError(f"{call.name!r} is an augmentation (it draws random numbers): put it in data.augment, "
                             f"not in a preprocess or normalize spec")
        raise ValueError(f"{call.name!r} is not an augmentation: put it in data.preprocess or data.normalize, "
                         f"not in an augment spec")
    unknown = set(call.kwargs) - set(op.arguments)
    if unknown:
        raise ValueError(f"{kind} op {call.name!r} has no argument(s) {sorted(unknown)}; "
                         f"it takes {sorted(op.arguments)}")
    return BoundOp(op, call, config)


class Chain:
    """One spec, parsed and bound once: its ops applied left to right.

    Call it with a sample dict (returns one) or a bare image (returns an image), and for an
    augment chain (``random=True``, presets expanded) a ``numpy.random.Generator``.
    ``config`` (a data config, or any mapping of its fields) provides the ops' declared
    defaults; ``name`` (e.g. ``data.preprocess``) starts its error messages."""

    def __init__(self, spec: str, *, random: bool = False, config: Mapping | None = None, name: str = ""):
        self.spec, self.random, self.name = spec, random, name
        self._config = config if config is not None else {}
        self._fixed_table: np.ndarray | None = None  # level_table of a chain of pointwise ops
        try:
            calls = parse_spec(spec, AUGMENT_PRESETS if random else None)
            self.ops: tuple[BoundOp, ...] = tuple(_bind(call, random, self._config) for call in calls)
        except ValueError as e:
            raise ValueError(f"{name}: {e}" if name else str(e)) from e

    def __call__(self, x: Sample | np.ndarray, rng: np.random.Generator | None = None):
        if self.random and self.ops and rng is None:
            raise ValueError(f"{self.name or 'augment'} {self.spec!r} draws random numbers: pass a numpy Generator")
        sample = x if isinstance(x, dict) else {"image": x}
        for op in self.ops:
            sample = op(sample, rng)
        return sample if isinstance(x, dict) else sample["image"]

    @property
    def reads(self) -> frozenset[str]:
        """The annotations its ops use where the sample has them."""
        return frozenset().union(*(op.op.reads for op in self.ops))

    @property
    def geometric(self) -> tuple[str, ...]:
        """Names of its ops that move pixels, in order."""
        return tuple(op.op.name for op in self.ops if op.op.geometric)

    def channels(self, channels_in: int) -> int:
        """The image channels out of the chain for ``channels_in`` in, from the ops' declarations."""
        channels = channels_in
        for op in self.ops:
            out = op.op.channels(op.arguments)
            channels = channels if out is None else out
        return channels

    @property
    def maps_grey_levels(self) -> bool:
        """Whether the chain on a uint8 grey image is one grey-level table per image: its first op
        is pointwise or has ``levels``, the others are pointwise (the empty chain: the levels as
        float32)."""
        return all(op.op.pointwise or (i == 0 and op.op.levels is not None) for i, op in enumerate(self.ops))

    def level_table(self, image: np.ndarray) -> np.ndarray:
        """The (256, C) float32 table ``T`` with ``as_network_array(self(image))[y, x, c] ==
        T[image[y, x], c]`` for a uint8 grey ``image`` (needs :attr:`maps_grey_levels`).

        A pointwise op runs on the table so far as if it were a 256 x 1 image (the first on the
        256 grey levels), so the values are those of the ops' own arithmetic on the image."""
        if not self.maps_grey_levels:
            raise ValueError(f"{self.name or 'spec'} {self.spec!r} is not a grey-level table: an op after the "
                             f"first is not pointwise, or the first has no table form")
        grey = as_2d(image)
        if grey.dtype != np.uint8 or grey.ndim != 2:
            raise ValueError(f"{self.name or 'spec'} {self.spec!r}: a grey-level table needs a uint8 grey image, "
                             f"got {image.dtype} {image.shape}")
        if all(op.op.pointwise for op in self.ops):  # the same table for every image: made once
            if self._fixed_table is None:
                table = self._table(grey)
                table.setflags(write=False)  # shared by every example
                self._fixed_table = table
            return self._fixed_table
        return self._table(grey)

    def _table(self, grey: np.ndarray) -> np.ndarray:
        table = GREY_LEVELS
        for i, op in enumerate(self.ops):
            if op.op.pointwise:
                table = op({"image": table if i == 0 else table[:, None, :]})["image"]
            else:
                table = op.op.levels(grey, **op.kwargs)
            table = np.asarray(table).reshape(256, -1)
        return table.astype(np.float32, copy=False)

    @property
    def warp_fill(self) -> tuple[str, float] | None:
        """(fill_mode, fill_value) of the chain as one warp per image, or None when it is not one:
        every op draws a ``matrix`` and at most one of them fills (the others, flips, move every
        pixel onto the canvas); without a filling op, ('constant', 0)."""
        if not all(op.op.matrix is not None for op in self.ops):
            return None
        fills = [(op.arguments["fill_mode"], float(op.arguments["fill_value"]))
                 for op in self.ops if "fill_mode" in op.arguments]
        return fills[0] if len(fills) == 1 else (("constant", 0.0) if not fills else None)

    def draw_warp(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """The chain's ops as one 2x3 warp of an image of ``shape`` (h, w), drawing from ``rng``
        exactly as running the chain does (needs :attr:`warp_fill`): the matrix of
        ``cv2.warpAffine`` (source to destination pixel centres)."""
        if self.warp_fill is None:
            raise ValueError(f"{self.name or 'spec'} {self.spec!r} is not one warp per image: every op must be a "
                             f"geometric augmentation with a warp matrix (flip, affine), at most one of them filling")
        total = np.eye(3)
        for op in self.ops:
            matrix = op.op.matrix(shape, rng, **op.kwargs)
            if matrix is not None:
                total = np.vstack([matrix, [0.0, 0.0, 1.0]]) @ total
        return total[:2].astype(np.float32)

    def for_single_images(self) -> tuple[Chain, list[str]]:
        """This chain for images outside the dataset (no stored mask, no keypoints), with notes.

        An op that cannot run without a stored hand mask makes its own where it declares how
        (``without_mask``: ``hand_mask`` turns to ``source='classical'``), and a note says so.
        ValueError for an op that needs keypoints, or a stored mask it cannot replace."""
        where = f"{self.name or 'spec'} {self.spec!r}"
        calls, notes = [], []
        for op in self.ops:
            required = op.op.requires(op.arguments)
            if "keypoints" in required:
                raise ValueError(f"{where}: {op} needs hand keypoints, which single images do not have; "
                                 f"this run cannot predict images outside its dataset")
            if "mask" in required:
                if op.op.without_mask is None:
                    raise ValueError(f"{where}: {op} needs a stored hand mask, which single images do not have; "
                                     f"this run cannot predict images outside its dataset")
                call = OpCall(op.call.name, op.op.without_mask(dict(op.call.kwargs)))
                notes.append(f"{op} -> {call}: single images have no stored (dataset or cached) hand mask; "
                             f"the mask is made from the image")
                calls.append(call)
            else:
                calls.append(op.call)
        return Chain(format_spec(calls), random=self.random, config=self._config, name=self.name), notes

    def __repr__(self) -> str:
        return f"Chain({self.spec!r}, random={self.random})"


def build_preprocess(spec: str, **config_fields) -> Chain:
    """Composes a preprocessing spec; ``config_fields`` (data-config field names, e.g.
    ``image_size=64``) provide the ops' declared defaults."""
    return Chain(spec, random=False, config=_checked_fields(config_fields))


def build_augment(spec: str, **config_fields) -> Chain:
    """Composes an augmentation spec (presets expanded) into a function of ``(sample, rng)``."""
    return Chain(spec, random=True, config=_checked_fields(config_fields))


def _checked_fields(config_fields: dict) -> dict:
    declared = {field for op in OPS.values() for field in op.config_defaults.values()}
    unknown = set(config_fields) - declared
    if unknown:
        raise ValueError(f"no op takes a default from data-config field(s) {sorted(unknown)}; "
                         f"declared fields: {sorted(declared)}")
    return config_fields


# ----------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A data config's ``preprocess``, ``augment`` and ``normalize`` specs, parsed once.

    Stored images are grey; ``num_channels`` is the channel count of the network input, as
    the ops declare it. The normalize ops see the image alone."""

    preprocess: Chain
    augment: Chain
    normalize: Chain

    @classmethod
    def from_config(cls, data_config: Mapping) -> Pipeline:
        """The pipeline of ``data_config``; built once per distinct specs and op-default fields."""
        fields = sorted({field for op in OPS.values() for field in op.config_defaults.values()})
        values = tuple((field, config_value(data_config, field)) for field in fields)
        return _pipeline(data_config["preprocess"], data_config["augment"], data_config["normalize"], values)

    @property
    def reads_mask(self) -> bool:
        """Whether a preprocessing op uses the record's hand mask (so it must be decoded)."""
        return "mask" in self.preprocess.reads

    @property
    def reads_keypoints(self) -> bool:
        return "keypoints" in self.preprocess.reads

    @property
    def num_channels(self) -> int:
        """Channels of the network input that the three chains make from a grey image."""
        return self.normalize.channels(self.augment.channels(self.preprocess.channels(1)))

    def network_input(self, image: np.ndarray) -> np.ndarray:
        """A preprocessed (and augmented) uint8 image -> float32 (S, S, C) through the normalize ops."""
        return as_network_array(self.normalize(image))


def as_network_array(image: np.ndarray) -> np.ndarray:
    """The normalize chain's output as the network's float32 (S, S, C), copied only if needed."""
    out = np.asarray(image).astype(np.float32, copy=False)
    return out[:, :, None] if out.ndim == 2 else out


@functools.lru_cache(maxsize=32)
def _pipeline(preprocess: str, augment: str, normalize: str, values: tuple) -> Pipeline:
    config = dict(values)
    return Pipeline(preprocess=Chain(preprocess, config=config, name="data.preprocess"),
                    augment=Chain(augment, random=True, config=config, name="data.augment"),
                    normalize=Chain(normalize, config=config, name="data.normalize"))


# The op families register themselves on import; their functions are reachable as ops.<name>.
from boneage_jax.ops.geometry import *  # noqa: E402,F401,F403
from boneage_jax.ops.contrast import *  # noqa: E402,F401,F403
from boneage_jax.ops.normalize import *  # noqa: E402,F401,F403
from boneage_jax.ops.augment import *  # noqa: E402,F401,F403
from boneage_jax.ops.hand import *  # noqa: E402,F401,F403
