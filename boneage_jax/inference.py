"""A trained run, loaded for inference: its config, objective, weights and compiled readout.

``predict_step`` is the readout of one batch in inference mode (the training loop, evaluation,
Grad-CAM and export compile it); ``outputs`` runs a batch of images through the model, or a
batch of cached backbone features through its head. ``load_config(workdir, overrides)`` reads a run's
``config.json`` with ``--config.key=value`` overrides (``ml_collections.config_flags``; the
``FROZEN`` model settings cannot change).

``load_run(workdir)`` reads what ``boneage_jax.main`` wrote (``config.json``,
``label_stats.json`` and ``checkpoints/best`` or ``checkpoints/latest``) and returns a
:class:`LoadedRun` whose ``predict(batch)`` maps a batch (``image`` float32 (B, S, S, C),
``male`` float32 (B,)) to the objective's readout (``boneage`` in months, and ``std`` or
``class`` where the head gives them; ``mask`` for segmentation). Only the parameters and batch
statistics are restored (``boneage_jax.state.restore_weights``): no optimiser is built, and runs
saved in the older one-item checkpoint layout load too. ``input_pipeline.prepare_image`` runs a
run's preprocessing on images from outside its dataset.

:class:`Predictor` is a loaded bone-age run for single images from outside the dataset, what
``boneage_jax.predict`` and ``boneage_jax.serve`` share: a file or bytes in memory -> the stored
resolution (colour kept for the quality check) -> the quality check (``boneage_jax.quality``: a hand
radiograph it can read?) -> the run's preprocessing made fit for
single images (:func:`single_image_spec`) -> batched readout (padded to a power of two) and
saliency maps. :func:`enable_compilation_cache` turns on JAX's persistent compilation cache.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from boneage_jax import input_pipeline, io, objectives, quality, state
from configs.common import base_config


def outputs(model, batch: dict):
    """``model(image, male)`` (the image normalised on the device where the batch has ``levels``,
    ``input_pipeline.network_images``); a batch of cached backbone features (``features`` in place of
    ``image``, ``boneage_jax.feature_cache``) goes through the head alone."""
    if "features" in batch:
        return model.head(batch["features"], batch["male"])
    return model(input_pipeline.network_images(batch), batch["male"])


def predict_step(params, rest, rng_state, batch: dict, *, graphdef, objective: objectives.Task):
    """The objective's readout for a batch in inference mode: ``boneage`` in months and more."""
    model = state.merge(graphdef, params, rng_state, rest)
    return objective.predict(outputs(model, batch))


@dataclasses.dataclass
class LoadedRun:
    workdir: str
    config: ml_collections.ConfigDict
    objective: objectives.Task
    stats: objectives.LabelStats
    step: int
    in_channels: int
    graphdef: nnx.GraphDef
    params: dict
    rest: dict
    rng_state: dict
    predict: Callable[[dict], dict]  # batch -> readout (jax arrays)

    def model(self) -> nnx.Module:
        """The model in inference mode (for attention maps, Grad-CAM and other inspection)."""
        return state.merge(self.graphdef, self.params, self.rng_state, self.rest)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """A run's ``config.json`` over today's defaults (``configs.common.base_config``): a key that
    a run from an older version did not save has the value that version used."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: is {workdir} a workdir written by boneage_jax.main?")
    with open(path) as f:
        try:
            raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a JSON config ({e})") from e
    return ml_collections.ConfigDict(with_defaults(base_config().to_dict(), raw))


def with_defaults(defaults: dict, saved: dict) -> dict:
    """``saved`` with the keys it lacks taken from ``defaults``, recursively."""
    merged = dict(defaults)
    for key, value in saved.items():
        default = defaults.get(key)
        merged[key] = with_defaults(default, value) if isinstance(default, dict) and isinstance(value, dict) else value
    return merged


# Settings the weights depend on: an evaluation may not change them.
FROZEN = ("model", "task", "loss", "data.image_size", "data.normalize")


def _tuples(value):
    """JSON lists back to tuples (what the configs use, and what config flags can override)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    source: str = "config.json") -> ml_collections.ConfigDict:
    """``config`` with ``--config.key=value`` arguments applied (ml_collections' own parsing,
    so values are typed as in training). Raises ValueError for unknown keys and for changes of
    the ``FROZEN`` model settings."""
    config = ml_collections.ConfigDict(_tuples(config.to_dict()))
    overrides = list(overrides)
    if not overrides:
        return config
    for arg in overrides:
        if arg.startswith("-") and not re.match(r"^--?(no)?config\.", arg):
            raise ValueError(f"{arg!r} is not a --config.key=value override")
    before = _flatten(config.to_dict())
    argv = ["evaluate", *overrides]
    values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv, lock_config=True)
        left = values(argv)[1:]
    except (AttributeError, KeyError) as e:
        raise ValueError(f"unknown config key {e} in {' '.join(overrides)} (the keys are those of {source})") from e
    except flags.Error as e:
        raise ValueError(f"bad config override: {e}") from e
    if left:
        raise ValueError(f"bad config override: unexpected {' '.join(left)} in {' '.join(overrides)}")
    new = values.config
    after = _flatten(new.to_dict())
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and any(k == f or k.startswith(f + ".") for f in FROZEN))
    if changed:
        raise ValueError(f"the model settings cannot change at evaluation: {', '.join(changed)} "
                         f"(the weights were trained with {source}'s values)")
    return new


def load_config(workdir: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    _require_workdir(workdir)
    return apply_overrides(read_config(workdir), overrides, os.path.join(workdir, "config.json"))


def _require_workdir(workdir: str) -> None:
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"{os.path.join(workdir, 'config.json')} is missing: is {workdir} a workdir "
                                "written by boneage_jax.main?")


def load_run(workdir: str, which: str = "best", config: ml_collections.ConfigDict | None = None) -> LoadedRun:
    """Loads a run's weights from ``checkpoints/<which>`` (best or latest).

    ``config`` replaces the saved config (to change data settings such as ``manual_dir``);
    the model settings must stay those the run was trained with."""
    workdir = os.path.abspath(workdir)
    config = config if config is not None else read_config(workdir)
    stats_path = os.path.join(workdir, "label_stats.json")
    if not os.path.isfile(stats_path):
        raise FileNotFoundError(f"{stats_path} is missing: the run in {workdir} did not start training")
    with open(stats_path) as f:
        raw = json.load(f)
    stats = objectives.LabelStats(mean=raw["mean"], std=raw["std"], class_edges=tuple(raw.get("class_edges", ())),
                                  class_means=tuple(raw.get("class_means", ())))
    objective = objectives.make_objective(config, stats)
    in_channels = input_pipeline.input_channels(config.data)
    create = state.model_factory(config, in_channels=in_channels, num_outputs=objective.num_outputs,
                                 task=objective.task)
    graphs, params_shape, rest_shape = state.abstract(create)
    # The dropout RNG state is not checkpointed; only its (unused in eval mode) keys are needed.
    rng_state = state.rng_state(create)
    params, rest, step = state.restore_weights(os.path.join(workdir, "checkpoints", which), params_shape, rest_shape)
    predict_jit = jax.jit(functools.partial(predict_step, graphdef=graphs.eval, objective=objective))

    def predict(batch: dict) -> dict:
        return predict_jit(params, rest, rng_state, batch)

    return LoadedRun(workdir=workdir, config=config, objective=objective, stats=stats,
                     step=step, in_channels=in_channels, graphdef=graphs.eval,
                     params=params, rest=rest, rng_state=rng_state, predict=predict)


def stored_max_side(data_config) -> int | None:
    """The longest side that the run's TFDS builder config stores images at (None: original)."""
    from tfds_rsna import rsna_bone_age  # pylint: disable=import-outside-toplevel

    name = data_config.builder_config
    for builder_config in rsna_bone_age.RsnaBoneAge.BUILDER_CONFIGS:
        if builder_config.name == name:
            return builder_config.max_side
    raise ValueError(f"data.builder_config {name!r}: unknown; expected one of "
                     f"{[c.name for c in rsna_bone_age.RsnaBoneAge.BUILDER_CONFIGS]}")


# ----------------------------------------------------------------------------- single images (predict, serve)

_SEXES = {"m": True, "male": True, "f": False, "female": False}


def parse_sex(value: str) -> bool:
    """'M'/'male' -> True, 'F'/'female' -> False (any case); ValueError otherwise."""
    key = str(value).strip().lower()
    if key not in _SEXES:
        raise ValueError(f"sex {value!r}: expected M, F, male or female")
    return _SEXES[key]


def single_image_spec(spec: str, data_config=None) -> tuple[str, list[str]]:
    """The preprocessing spec for images outside the dataset, and notes on what changed.

    Ops that read a stored hand mask make their own (``hand_mask`` with ``source='dataset'``, the
    default, or ``'cache'`` becomes ``source='classical'``); ops that need keypoints raise
    ValueError (``roi_crop`` of region roi1/roi2/roi3, given in the spec or by ``data.roi`` in
    ``data_config``, and ``align(source='keypoints')``): ``ops.Chain.for_single_images``."""
    from boneage_jax import ops  # pylint: disable=import-outside-toplevel

    chain, notes = ops.Chain(spec, config=data_config, name="data.preprocess").for_single_images()
    return chain.spec, notes


def padded_size(n: int, batch_size: int) -> int:
    """The batch size that ``n`` images are padded to: the next power of two, at most ``batch_size``."""
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


class Predictor:
    """A loaded bone-age run with the single-image preprocessing and jitted readout / saliency:
    what ``boneage_jax.predict`` and ``boneage_jax.serve`` share.

    An image goes through what validation images went through in training: the dataset's stored
    resolution (:meth:`stored`), then the run's ``data.preprocess`` made fit for single images
    (:func:`single_image_spec`; ``notes`` says what changed) and ``data.normalize``
    (:meth:`prepare`). Batches are padded to a power of two, at most ``batch_size``."""

    def __init__(self, workdir: str, which: str = "best", batch_size: int = 16):
        self.run = load_run(workdir, which=which)
        objectives.require_bone_age(self.run.objective, workdir, "predict")
        self.data_config = self.run.config.data.copy_and_resolve_references()
        self.data_config.preprocess, self.notes = single_image_spec(self.run.config.data.preprocess, self.data_config)
        self.max_side = stored_max_side(self.data_config)
        self.batch_size = max(1, batch_size)
        self.image_size = int(self.data_config.image_size)

    # -- images

    def stored(self, image: np.ndarray) -> np.ndarray:
        """A uint8 image as the TFDS builder would have stored it (longest side capped); a colour
        image keeps its channels (the quality check reads them; :meth:`prepare` reads it grey)."""
        from tfds_rsna import rsna_bone_age  # pylint: disable=import-outside-toplevel

        return rsna_bone_age.resize_longest_side(image, self.max_side)

    def load(self, path: str) -> np.ndarray:
        """A PNG, JPEG or DICOM file -> the stored image (:meth:`stored`): uint8 grey (H, W), or
        BGR (H, W, 3) for a PNG or JPEG whose colour channels differ (``io.read_image``)."""
        return self.stored(io.read_image(path, colour=True))

    def decode(self, data: bytes, name: str) -> np.ndarray:
        """PNG, JPEG or DICOM bytes (``name`` for messages) -> the stored image, decoded in memory
        (grey or BGR as :meth:`load`)."""
        return self.stored(io.decode_image(data, name, colour=True))

    def unusable_reason(self, image: np.ndarray) -> str | None:
        """Why a stored image is not a hand radiograph this network can read
        (``quality.unusable_reason``: "REASON: details"); None if it is."""
        return quality.unusable_reason(image, self.image_size)

    def prepare(self, image: np.ndarray, path: str = "image", check_quality: bool = True) -> np.ndarray:
        """The network input of a stored image; ImageReadError for an image that is not usable
        (:meth:`unusable_reason`, unless ``check_quality`` is False) or that the preprocessing
        cannot handle."""
        reason = self.unusable_reason(image) if check_quality else None
        if reason:
            raise io.ImageReadError(f"{path}: rejected: {reason}")
        try:
            return input_pipeline.prepare_image(self.data_config, quality.grey(image))
        except Exception as e:  # an op failing on this image (e.g. an empty hand mask)
            raise io.ImageReadError(f"{path}: preprocessing failed: {e}") from e

    def preprocessed_uint8(self, image: np.ndarray) -> np.ndarray:
        """The image after ``data.preprocess`` only (what the heatmap is drawn on)."""
        from boneage_jax import ops  # pylint: disable=import-outside-toplevel

        preprocess = ops.Pipeline.from_config(self.data_config).preprocess
        return np.asarray(ops.as_2d(preprocess({"image": quality.grey(image), "id": 0})["image"]))

    # -- the network

    def _padded(self, images: np.ndarray, male: np.ndarray) -> tuple[dict, int]:
        n = len(images)
        size = padded_size(n, self.batch_size)
        pad = size - n
        images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)]) if pad else images
        male = np.concatenate([male, np.repeat(male[:1], pad)]) if pad else male
        return {"image": images.astype(np.float32), "male": male.astype(np.float32)}, n

    def predict_arrays(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray]:
        """(N, S, S, C) network inputs and (N,) male flags -> readout numpy arrays, in batches."""
        outputs: dict[str, list] = {}
        for start in range(0, len(images), self.batch_size):
            batch, n = self._padded(images[start:start + self.batch_size], male[start:start + self.batch_size])
            readout = jax.device_get(self.run.predict(batch))
            for key, value in readout.items():
                outputs.setdefault(key, []).append(np.asarray(value)[:n])
        return {k: np.concatenate(v) for k, v in outputs.items()}

    @functools.cached_property
    def _saliency_fn(self) -> tuple[str, Callable]:
        import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

        run = self.run
        if hasattr(run.model().backbone, "attention_map"):

            def attention(params, rest, rng_state, images, male):
                del male
                model = state.merge(run.graphdef, params, rng_state, rest)
                return model.backbone.attention_map(images)

            return "attention", jax.jit(attention)

        def gradient(params, rest, rng_state, images, male):
            def total_age(x):
                model = state.merge(run.graphdef, params, rng_state, rest)
                return jnp.sum(run.objective.predict(model(x, male))["boneage"])

            return jnp.max(jnp.abs(jax.grad(total_age)(images)), axis=-1)

        return "gradient", jax.jit(gradient)

    @property
    def saliency_kind(self) -> str:
        """``attention`` (the backbone's attention map) or ``gradient`` (gradient saliency)."""
        return self._saliency_fn[0]

    def saliency(self, images: np.ndarray, male: np.ndarray) -> tuple[str, np.ndarray]:
        """Per-image maps (N, S, S) in [0, 1]: smoothed |d boneage / d input| or the attention map."""
        import cv2  # pylint: disable=import-outside-toplevel

        kind, fn = self._saliency_fn
        maps = []
        for start in range(0, len(images), self.batch_size):
            batch, n = self._padded(images[start:start + self.batch_size], male[start:start + self.batch_size])
            out = np.asarray(jax.device_get(fn(self.run.params, self.run.rest, self.run.rng_state, batch["image"],
                                               batch["male"])), np.float32)[:n]
            maps.extend(out)
        result = []
        size = self.image_size
        for m in maps:
            if m.shape != (size, size):
                m = cv2.resize(m, (size, size), interpolation=cv2.INTER_CUBIC)
            if kind == "gradient":
                m = cv2.GaussianBlur(m, (0, 0), sigmaX=max(1.0, size / 64))
                top = float(np.percentile(m, 99.5))
                m = m / top if top > 0 else np.zeros_like(m)
            result.append(np.clip(m, 0.0, 1.0))
        return kind, np.stack(result) if result else np.zeros((0, size, size), np.float32)
