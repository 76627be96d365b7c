"""Predictions and scores of a trained model: what the training loop and the evaluation commands share.

- :func:`global_batch` and :func:`to_host` move batches onto the ``data`` mesh and back
  (gathering across processes); the readout of one batch is ``inference.predict_step``.
- :func:`predict_split`: predictions for every example of a split, padding removed
  (:func:`predict_batches`: of any evaluation batches, e.g. cached backbone features).
- :func:`score_predictions`: the objective's metrics plus, for bone age, bootstrap confidence
  intervals of MAE, RMSE and CCC, the calibration of per-image intervals, the breakdown per sex
  and age band and the confusion matrix of class heads.
- Test-time augmentation (:func:`tta_views`: flip and small rotations of the normalised input,
  edges replicated) and ensembles (:func:`combine`, :func:`ensemble_predictions`: the members'
  mean; the spread as a mixture of the views or members, Gaussian heads with their variance;
  class heads by vote) over loaded runs (``boneage_jax.inference.LoadedRun``), with timing
  (:class:`Timing`) and peak memory; :func:`compare_members`: the members' MAE against each
  other and the ensemble (paired bootstrap).
- Per-image prediction intervals (:func:`with_intervals`: 68% and 95% normal intervals from
  ``pred_std``, where a Gaussian head, TTA or an ensemble gives one; :func:`interval_sources`).
- Quality control over a split (:func:`quality_verdicts`: ``boneage_jax.quality``'s check of
  every stored image; :func:`quality_summary`: how many it would reject, why, and the error with
  and without them).
- :func:`evaluate`: what ``python -m boneage_jax.evaluate`` (and ``boneage_jax.report``) does:
  loads a run (and ensemble members), scores a split, optionally bias-corrected, writes
  ``evaluation_<suffix>.json`` and ``predictions_<suffix>.csv`` into the workdir, and with
  ``report`` the figures and ``report/report.md`` (``boneage_jax.report``). The options and
  files are described in ``boneage_jax/evaluate.py``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import time
from collections.abc import Callable, Sequence

import cv2
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from boneage_jax import data, inference, input_pipeline, io, metrics, objectives, quality, state
from boneage_jax.ops import augment



# ----------------------------------------------------------------------------- batches


def to_host(tree):
    """Global arrays to host numpy, gathering across processes when there are several."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows of a batch -> global arrays sharded over the ``data`` mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- a split


def predict_split(
    predict: Callable, config: ml_collections.ConfigDict, selection: data.SplitSelection, sharding: NamedSharding,
    objective: objectives.Task, progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Predictions for every example of a split (padding removed), with labels and ids; with
    ``progress`` (its description), a progress bar over the batches on a terminal."""
    batches = input_pipeline.eval_batches(config.data, selection, config.eval_batch_size)
    if progress is not None:
        batches = io.progress(batches, -(-len(selection.indices) // config.eval_batch_size), progress, "batch")
    return predict_batches(predict, batches, sharding, objective)


def predict_batches(predict: Callable, batches, sharding: NamedSharding, objective: objectives.Task
                    ) -> dict[str, np.ndarray]:
    """Predictions for evaluation ``batches`` (this process's rows, padding of weight 0 removed),
    with labels and ids: of a split's images, or of cached backbone features."""
    keep = ("boneage", "male", "id", "weight")
    outputs = []
    for batch in batches:
        device_batch = global_batch(batch, sharding)
        readout = to_host({f"pred_{k}": v for k, v in predict(device_batch).items()})
        host_batch = to_host(device_batch)
        readout = objective.host_readout(readout, host_batch)
        outputs.append({**readout, **{k: host_batch[k] for k in keep}})
    merged = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    real = merged.pop("weight") > 0
    return {k: v[real] for k, v in merged.items()}



# ----------------------------------------------------------------------------- scoring


def score_predictions(predictions: dict[str, np.ndarray], objective) -> dict:
    """``objective.score`` plus, over the labelled predictions, bootstrap confidence intervals of
    MAE, RMSE and CCC (``confidence_intervals``), the calibration of the per-image intervals
    where there is a ``pred_std`` (``calibration``), the breakdown per sex and age band, and the
    confusion matrix for class heads."""
    result = dict(objective.score(predictions))
    labelled = ~np.isnan(predictions["boneage"])
    if not labelled.any():
        return result
    pred, true, male = (predictions[k][labelled] for k in ("pred_boneage", "boneage", "male"))
    result["confidence_intervals"] = metrics.bootstrap_intervals(pred, true)
    if "pred_std" in predictions:
        result["calibration"] = metrics.calibration(pred, predictions["pred_std"][labelled], true)
    result["breakdown"] = metrics.breakdown(pred, true, male, baseline=objective.stats.mean)
    if "pred_class" in predictions:
        true_class = objective.true_classes(true)
        matrix = metrics.confusion_matrix(true_class, predictions["pred_class"][labelled],
                                          len(objective.stats.class_edges) - 1)
        result["accuracy"] = metrics.accuracy(predictions["pred_class"][labelled], true_class)
        result["confusion_matrix"] = matrix.tolist()
        result["class_edges"] = list(objective.stats.class_edges)
    return result


def memory_summary() -> dict:
    """Peak resident memory of this process and, where the device reports it, peak device memory."""
    out = {"peak_host_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # KiB on Linux
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # pylint: disable=broad-except
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        out["peak_device_mib"] = stats["peak_bytes_in_use"] / 2**20
    out["device"] = str(jax.local_devices()[0].device_kind)
    return out



# ----------------------------------------------------------------------------- test-time augmentation and ensembles


def rotate(images: np.ndarray, angle: float) -> np.ndarray:
    """Rotates (B, H, W, C) float images about their centre by ``angle`` degrees
    (counter-clockwise, as the ``affine`` augmentation), replicating the edges."""
    _, height, width, channels = images.shape
    matrix = augment.affine_matrix((width / 2.0, height / 2.0), angle)
    return np.stack([
        cv2.warpAffine(np.ascontiguousarray(image), matrix, (width, height), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE).reshape(height, width, channels)
        for image in images
    ]).astype(images.dtype)


def tta_views(images: np.ndarray, flip: bool = True, angles: Sequence[float] = (-5.0, 5.0)) -> list[np.ndarray]:
    """The original batch, its horizontal flip and its rotations."""
    views = [images]
    if flip:
        views.append(np.ascontiguousarray(images[:, :, ::-1]))
    views.extend(rotate(images, float(a)) for a in angles)
    return views


def combine(readouts: Sequence[dict], prefix: str = "", class_means: Sequence[float] | None = None) -> dict:
    """Mean of several readouts of the same images (TTA views or ensemble members).

    ``{prefix}boneage``: the mean. ``{prefix}std``: the standard deviation of the equal-weight
    mixture of the readouts, whose variance is the mean of their variances plus the variance of
    their means: Gaussian readouts (all with a ``std``) as normals; readouts without one, when
    there are several, as point masses (the spread of the means alone); none for a single
    readout without one. ``{prefix}class`` (when all have one): the majority vote, ties going to
    the class whose ``class_means`` is nearest the mean age (else the lowest class)."""
    ages = np.stack([np.asarray(r[f"{prefix}boneage"], np.float64) for r in readouts])
    out = {f"{prefix}boneage": ages.mean(0).astype(np.float32)}
    gaussian = all(f"{prefix}std" in r for r in readouts)
    if gaussian or len(readouts) > 1:
        variances = (np.stack([np.asarray(r[f"{prefix}std"], np.float64) ** 2 for r in readouts]) if gaussian
                     else np.zeros_like(ages))
        var = variances.mean(0) + ages.var(0)
        out[f"{prefix}std"] = np.sqrt(var).astype(np.float32)
    if all(f"{prefix}class" in r for r in readouts):
        classes = np.stack([np.asarray(r[f"{prefix}class"], np.int64) for r in readouts])  # (N, B)
        num = int(classes.max()) + 1 if class_means is None else len(class_means)
        counts = np.stack([(classes == k).sum(0) for k in range(num)], axis=1)  # (B, K)
        tied = counts == counts.max(axis=1, keepdims=True)
        if class_means is not None:
            distance = np.abs(np.asarray(class_means)[None, :] - out[f"{prefix}boneage"][:, None])
            out[f"{prefix}class"] = np.where(tied, distance, np.inf).argmin(axis=1)
        else:
            out[f"{prefix}class"] = tied.argmax(axis=1)
    return out


@dataclasses.dataclass
class Timing:
    """Time in the model (after compilation) and in the whole pass, over the real images."""

    model_s: float = 0.0
    total_s: float = 0.0
    images: int = 0

    def summary(self) -> dict:
        n = max(self.images, 1)
        return {"model_ms_per_image": 1e3 * self.model_s / n, "total_ms_per_image": 1e3 * self.total_s / n,
                "images": self.images}


def member_predictions(run: inference.LoadedRun, chosen: Sequence[data.SplitSelection], *, tta: bool = False,
                       tta_flip: bool = True, tta_angles: Sequence[float] = (-5.0, 5.0),
                       timing: Timing | None = None) -> dict[str, np.ndarray]:
    """One run's predictions (``predict_split``'s arrays) over the selections, in order."""
    config, objective = run.config, run.objective
    sharding = NamedSharding(state.make_mesh(), P("data"))
    class_means = objective.stats.class_means or None

    def predict(batch: dict) -> dict:
        if not tta:
            return run.predict(batch)
        views = tta_views(np.asarray(batch["image"]), tta_flip, tta_angles)
        readouts = [jax.device_get(run.predict({**batch, "image": jax.device_put(v, batch["image"].sharding)}))
                    for v in views]
        return combine(readouts, class_means=class_means)

    def timed(batch: dict) -> dict:
        start = time.perf_counter()
        out = jax.block_until_ready(predict(batch))
        if timing is not None:
            timing.model_s += time.perf_counter() - start
        return out

    if timing is not None:
        # Compile (and warm up) on the first batch before anything is timed.
        first = next(iter(input_pipeline.eval_batches(config.data, chosen[0], config.eval_batch_size)))
        jax.block_until_ready(predict(global_batch(first, sharding)))

    parts = []
    start = time.perf_counter()
    for selection in chosen:
        parts.append(predict_split(timed, config, selection, sharding, objective,
                                   progress=f"evaluate {os.path.basename(run.workdir)} {selection.tfds_split}"))
    if timing is not None:
        timing.total_s += time.perf_counter() - start
        timing.images += sum(len(p["id"]) for p in parts)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def each_member_predictions(runs: Sequence[inference.LoadedRun], chosen: Sequence[data.SplitSelection],
                            timing: Timing | None = None, **tta) -> list[dict[str, np.ndarray]]:
    """Every member's own predictions of the same images (``timing`` counts each image once)."""
    each = [member_predictions(run, chosen, timing=timing, **tta) for run in runs]
    if timing is not None and len(runs) > 1:
        timing.images //= len(runs)
    for run, other in zip(runs[1:], each[1:]):
        if not np.array_equal(each[0]["id"], other["id"]):
            raise ValueError(f"ensemble member {run.workdir} predicted other images than {runs[0].workdir}")
    return each


def combine_members(runs: Sequence[inference.LoadedRun],
                    each: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The members' predictions combined (``combine``; one member: its own)."""
    first = each[0]
    if len(each) == 1:
        return first
    heads = {run.objective.head for run in runs}
    edges = {run.objective.stats.class_edges for run in runs}
    readouts = [{k: v for k, v in p.items() if k.startswith("pred_")} for p in each]
    if not (heads == {"classification"} and len(edges) == 1):
        for r in readouts:
            r.pop("pred_class", None)
    combined = combine(readouts, prefix="pred_", class_means=runs[0].objective.stats.class_means or None)
    return {**{k: v for k, v in first.items() if not k.startswith("pred_")}, **combined}


def ensemble_predictions(runs: Sequence[inference.LoadedRun], chosen: Sequence[data.SplitSelection],
                         timing: Timing | None = None, **tta) -> dict[str, np.ndarray]:
    """The members' predictions combined (one member: its own)."""
    return combine_members(runs, each_member_predictions(runs, chosen, timing, **tta))


def compare_members(runs: Sequence[inference.LoadedRun], each: Sequence[dict[str, np.ndarray]],
                    combined: dict[str, np.ndarray]) -> dict:
    """Paired bootstrap comparisons of an ensemble's members on their labelled images: each
    member's MAE with its interval, each later member minus the first (``--workdir``'s run: two
    configs compared on the same images), and the ensemble minus each member. The predictions
    are compared as the models made them (before any bias correction)."""
    labelled = ~np.isnan(combined["boneage"])
    true = combined["boneage"][labelled]
    preds = [p["pred_boneage"][labelled] for p in each]
    ensemble = combined["pred_boneage"][labelled]
    members = []
    for run, pred in zip(runs, preds):
        mae = metrics.bootstrap_intervals(pred, true)["mae"]
        members.append({"workdir": run.workdir, "mae": mae["estimate"], "low": mae["low"], "high": mae["high"]})

    def difference(pred_a, pred_b, workdir):
        d = metrics.paired_bootstrap_mae(pred_a, pred_b, true)
        return {"workdir": workdir, "difference": d["difference"], "low": d["low"], "high": d["high"]}

    return {**metrics.bootstrap_settings(len(true)), "members": members,
            "minus_first": [difference(pred, preds[0], run.workdir) for run, pred in zip(runs[1:], preds[1:])],
            "ensemble_minus_member": [difference(ensemble, pred, run.workdir) for run, pred in zip(runs, preds)]}


# ----------------------------------------------------------------------------- per-image intervals


def interval_sources(runs: Sequence[inference.LoadedRun], tta_views: int) -> list[str]:
    """Where a per-image spread comes from (``combine``): the Gaussian heads' standard deviation
    (when every member has one), the spread over the TTA views, the spread over the members.
    Empty: the predictions have no interval."""
    sources = []
    gaussian = sum(run.objective.head == "gaussian" for run in runs)
    if gaussian == len(runs):
        sources.append("gaussian head")
    elif gaussian and tta_views > 1:  # every member has a std then, so the Gaussian ones count
        sources.append(f"gaussian head of {gaussian} of {len(runs)} members")
    if tta_views > 1:
        sources.append(f"spread over {tta_views} TTA views")
    if len(runs) > 1:
        sources.append(f"spread over {len(runs)} ensemble members")
    return sources


# The per-image interval columns: pred_low_68, pred_high_68, pred_low_95, pred_high_95.
INTERVAL_COLUMNS = tuple(f"pred_{end}_{metrics.level_name(level)}" for level in metrics.INTERVAL_LEVELS
                         for end in ("low", "high"))


def with_intervals(predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``predictions`` with ``INTERVAL_COLUMNS`` (the central normal intervals of
    ``pred_boneage`` and ``pred_std`` at ``metrics.INTERVAL_LEVELS``) when they have a ``pred_std``."""
    if "pred_std" not in predictions:
        return predictions
    out = dict(predictions)
    for level in metrics.INTERVAL_LEVELS:
        low, high = metrics.normal_interval(predictions["pred_boneage"], predictions["pred_std"], level)
        out[f"pred_low_{metrics.level_name(level)}"] = low.astype(np.float32)
        out[f"pred_high_{metrics.level_name(level)}"] = high.astype(np.float32)
    return out


# ----------------------------------------------------------------------------- quality control


def quality_verdicts(data_config: ml_collections.ConfigDict, chosen: Sequence[data.SplitSelection]
                     ) -> tuple[dict[int, quality.Rejection | None], float]:
    """The quality check (``quality.rejection`` for a network of ``data.image_size``) of every
    stored image of the selections, by record id, and the seconds the checks took (decoding not
    counted)."""
    verdicts, seconds = {}, 0.0
    for selection in chosen:
        source = data.data_source(data_config, selection.tfds_split, decode_masks=False)
        for index in selection.indices:
            record = source[int(index)]
            start = time.perf_counter()
            verdicts[int(record["id"])] = quality.rejection(record["image"], int(data_config.image_size))
            seconds += time.perf_counter() - start
    return verdicts, seconds


def quality_summary(predictions: dict[str, np.ndarray], verdicts: dict[int, quality.Rejection | None],
                    seconds: float) -> dict:
    """``quality`` of the evaluation JSON: images checked and rejected (``rejected_fraction``),
    the count per reason, the rejected ids with their reasons, ms per image, and ``metrics``:
    over the labelled images, ``metrics.group_metrics`` of ``all``, the ``accepted`` and the
    ``rejected`` ones."""
    found = [verdicts[int(i)] for i in predictions["id"]]
    rejected = np.array([v is not None for v in found], bool)
    reasons: dict[str, int] = {}
    for v in found:
        if v is not None:
            reasons[v.reason] = reasons.get(v.reason, 0) + 1
    out = {"checked": len(found), "rejected": int(rejected.sum()),
           "rejected_fraction": float(rejected.mean()) if len(found) else 0.0,
           "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
           "rejected_images": [{"id": int(i), "rejection": str(v)} for i, v in zip(predictions["id"], found)
                               if v is not None],
           "ms_per_image": 1e3 * seconds / max(len(found), 1)}
    labelled = ~np.isnan(predictions["boneage"])
    if labelled.any():
        pred, true = predictions["pred_boneage"], predictions["boneage"]
        groups = (("all", labelled), ("accepted", labelled & ~rejected), ("rejected", labelled & rejected))
        out["metrics"] = {name: metrics.group_metrics(pred[keep], true[keep]) for name, keep in groups}
    return out


def quality_text(q: dict) -> str:
    """One line on the quality check: how many images it would reject, why, and the MAE with
    and without them."""
    why = ", ".join(f"{reason} {count}" for reason, count in q["reasons"].items())
    text = (f"quality check: {q['rejected']} of {q['checked']} images ({q['rejected_fraction']:.1%}) would be "
            f"rejected{f' ({why})' if why else ''}, {q['ms_per_image']:.1f} ms/image")
    if "metrics" in q:
        groups = q["metrics"]
        parts = [f"MAE {groups['all']['mae']:.2f} on all {groups['all']['num_examples']}"]
        for name in ("accepted", "rejected"):
            if groups[name].get("num_examples"):
                parts.append(f"{groups[name]['mae']:.2f} on the {groups[name]['num_examples']} {name}")
        text += "; " + ", ".join(parts)
    return text


# ----------------------------------------------------------------------------- evaluating runs


SPLITS = ("test", "validation", "train", "all")


def _load_member(workdir: str, which: str, config: ml_collections.ConfigDict) -> inference.LoadedRun:
    directory = os.path.join(workdir, "checkpoints", which)
    if not os.path.isdir(directory) or not any(name.isdigit() for name in os.listdir(directory)):
        raise FileNotFoundError(f"no checkpoint in {directory}: has the run in {workdir} saved one "
                                f"(try --which={'latest' if which == 'best' else 'best'})?")
    run = inference.load_run(workdir, which=which, config=config)
    objectives.require_bone_age(run.objective, workdir, "evaluate")
    return run


# ----------------------------------------------------------------------------- splits


def selections(config: ml_collections.ConfigDict, split: str | None) -> tuple[str, list[data.SplitSelection]]:
    """(split name, the selections to score): one, or for ``all`` every TFDS split's labelled
    records (after the config's sex and age filters)."""
    builder = data.prepare(config.data)
    splits = data.select_splits(config.data, builder, config.seed)
    if split is None:
        split = "test" if "test" in splits else "validation"
    if split == "all":
        chosen = []
        for name in sorted(builder.info.splits.keys()):
            labels = data.label_index(config.data, name)
            labelled = np.flatnonzero(~np.isnan(labels.boneage))
            indices = data.filter_indices(labels, labelled, config.data)
            if len(indices):
                chosen.append(data.SplitSelection(name, indices, labels))
        if not chosen:
            raise ValueError(f"no labelled images in {config.data.manual_dir}")
        return split, chosen
    if split not in splits:
        raise ValueError(f"the dataset in {config.data.manual_dir} has no {split} split "
                         f"(it has {', '.join(sorted(splits))}; try --split=validation or --split=all)")
    return split, [splits[split]]


# ----------------------------------------------------------------------------- the evaluation


def output_suffix(split: str, *, which: str = "best", tta: bool = False, ensemble: bool = False,
                  bias_correction: bool = False, other_data: str | None = None) -> str:
    parts = [split]
    if which != "best":
        parts.append(which)
    if tta:
        parts.append("tta")
    if ensemble:
        parts.append("ensemble")
    if bias_correction:
        parts.append("bc")
    if other_data:
        parts.append("on-" + re.sub(r"[^A-Za-z0-9._-]+", "_", other_data))
    return "_".join(parts)


@dataclasses.dataclass
class Evaluation:
    """What ``evaluate`` computed: the JSON written, the predictions, the runs."""

    result: dict
    predictions: dict[str, np.ndarray]
    runs: list[inference.LoadedRun]
    split: str
    json_path: str
    csv_path: str
    report_path: str | None = None
    quality: dict[int, quality.Rejection | None] | None = None  # by id, with ``quality_check``


def evaluate(workdir: str, *, split: str | None = None, which: str = "best", tta: bool = False,
             tta_flip: bool = True, tta_angles: Sequence[float] = (-5.0, 5.0), ensemble: Sequence[str] = (),
             bias_correction: bool = False, overrides: Sequence[str] = (), report: bool = False,
             report_images: int = 8, quality_check: bool = False, verbose: bool = True) -> Evaluation:
    """Scores ``workdir``'s run (and ``ensemble`` members) and writes the JSON and CSV; see the
    module docstring. ``quality_check``: also run the quality check over the split's images
    (:func:`quality_summary`). Returns an :class:`Evaluation`."""
    workdir = os.path.abspath(workdir)
    config = inference.load_config(workdir, overrides)
    saved_dir = inference.read_config(workdir).data.manual_dir
    members = [workdir] + [os.path.abspath(m) for m in ensemble if m]
    configs = [config]
    for member in members[1:]:
        member_config = inference.load_config(member, overrides)
        for key in ("manual_dir", "data_dir", "builder_config"):  # the first run's dataset
            if key in config.data and key in member_config.data:
                member_config.data[key] = config.data[key]
        configs.append(member_config)
    runs = [_load_member(m, which, c) for m, c in zip(members, configs)]
    split, chosen = selections(config, split)
    tta_options = {"tta": tta, "tta_flip": tta_flip, "tta_angles": tuple(float(a) for a in tta_angles)}

    tta_views = 1 + tta_flip + len(tta_options["tta_angles"]) if tta else 1

    timing = Timing()
    each = each_member_predictions(runs, chosen, timing=timing, **tta_options)
    predictions = combine_members(runs, each)
    objective = runs[0].objective
    comparison = compare_members(runs, each, predictions) if len(runs) > 1 and has_labels(predictions) else None

    correction = None
    if bias_correction:
        if split == "validation":
            validation = predictions
        else:
            validation = ensemble_predictions(runs, selections(config, "validation")[1], **tta_options)
        labelled = ~np.isnan(validation["boneage"])
        if labelled.sum() < 2:
            raise ValueError("bias correction needs at least 2 labelled validation images")
        correction = metrics.fit_linear_correction(validation["pred_boneage"][labelled], validation["boneage"][labelled])
        uncorrected = objective.score(predictions)
        predictions = {**predictions, "pred_boneage_uncorrected": predictions["pred_boneage"],
                       "pred_boneage": metrics.apply_linear_correction(predictions["pred_boneage"],
                                                                       correction).astype(np.float32)}
        if "pred_std" in predictions:  # the predictive distribution through the same line
            predictions["pred_std"] = (predictions["pred_std"] * abs(correction["slope"])).astype(np.float32)
        correction = {**correction, "fitted_on": "validation", "num_fitted": int(labelled.sum()),
                      "in_sample": split in ("validation", "all"), "uncorrected": uncorrected}

    predictions = with_intervals(predictions)
    result = score_predictions(predictions, objective)
    result["checkpoint_step"] = runs[0].step
    result["split"] = split
    result["which"] = which
    result["tfds_splits"] = [s.tfds_split for s in chosen]
    result["dataset"] = os.path.abspath(os.path.expanduser(config.data.manual_dir))
    result["members"] = [{"workdir": r.workdir, "checkpoint_step": r.step, "model": r.config.model.name}
                         for r in runs]
    result["tta"] = ({"views": tta_views, "flip": tta_flip, "angles": list(tta_options["tta_angles"])}
                     if tta else None)
    if correction is not None:
        result["bias_correction"] = correction
    result["prediction_interval"] = interval_description(predictions, interval_sources(runs, tta_views), objective,
                                                         correction)
    if comparison is not None:
        result["member_comparison"] = comparison
    result["inference"] = {**timing.summary(), **memory_summary()}
    result["overrides"] = list(overrides)
    verdicts = None
    if quality_check:
        verdicts, seconds = quality_verdicts(config.data, chosen)
        result["quality"] = quality_summary(predictions, verdicts, seconds)

    other = None
    if os.path.abspath(os.path.expanduser(config.data.manual_dir)) != os.path.abspath(os.path.expanduser(saved_dir)):
        other = os.path.basename(os.path.normpath(config.data.manual_dir))
    suffix = output_suffix(split, which=which, tta=tta, ensemble=len(runs) > 1, bias_correction=bias_correction,
                           other_data=other)
    json_path = os.path.join(workdir, f"evaluation_{suffix}.json")
    csv_path = os.path.join(workdir, f"predictions_{suffix}.csv")
    io.write_json(json_path, result)
    write_predictions_csv(csv_path, predictions, verdicts)
    outcome = Evaluation(result, predictions, runs, split, json_path, csv_path, quality=verdicts)
    if verbose:
        print(summary_table(outcome), flush=True)
    if report:
        from boneage_jax import report as report_lib  # pylint: disable=import-outside-toplevel

        outcome.report_path = report_lib.write_report(outcome, num_images=report_images)
        if verbose:
            print(f"wrote {outcome.report_path}", flush=True)
    return outcome


def has_labels(predictions: dict[str, np.ndarray]) -> bool:
    return bool((~np.isnan(predictions["boneage"])).any())


def interval_description(predictions: dict[str, np.ndarray], sources: Sequence[str], objective,
                         correction: dict | None) -> dict:
    """``prediction_interval`` of the evaluation JSON: where the per-image intervals come from
    and which CSV columns hold them, or why there are none."""
    if "pred_std" not in predictions:
        return {"sources": [], "note": f"no per-image interval: a {objective.head} head gives no spread of its own "
                                       "(a gaussian head, --tta or --ensemble would)"}
    out = {"sources": list(sources), "levels": list(metrics.INTERVAL_LEVELS),
           "csv_columns": ["pred_std", *INTERVAL_COLUMNS],
           "distribution": "normal around pred_boneage with variance pred_std^2 = mean of the variances + variance "
                           "of the means over the TTA views and ensemble members (a readout without a std counts "
                           "as variance 0)"}
    if correction is not None:
        out["scaled_by_bias_correction"] = abs(correction["slope"])
    return out


def write_predictions_csv(path: str, predictions: dict[str, np.ndarray],
                          verdicts: dict[int, quality.Rejection | None] | None = None) -> None:
    """The predictions CSV; with ``verdicts`` (the quality check's, by id) a last column
    ``quality``: the reason an image would be rejected, empty where it is accepted."""
    columns = ["id", "male", "boneage", "pred_boneage"] + [
        k for k in ("pred_boneage_uncorrected", "pred_std", "pred_class", *INTERVAL_COLUMNS) if k in predictions]

    def cell(key, value):
        if key in ("id", "pred_class"):
            return int(value)
        if key == "male":
            return int(bool(value))
        return "" if np.isnan(value) else f"{float(value):.4f}"

    def row(i: int) -> list:
        cells = [cell(k, predictions[k][i]) for k in columns]
        if verdicts is not None:
            verdict = verdicts[int(predictions["id"][i])]
            cells.append("" if verdict is None else verdict.reason)
        return cells

    header = columns + ["quality"] * (verdicts is not None)
    io.write_csv(path, header, (row(i) for i in range(len(predictions["id"]))))


def _ci(low: float | None, high: float | None, level: float, digits: int) -> str:
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{level_percent(level)} CI n/a"
    return f"{level_percent(level)} CI {low:.{digits}f} to {high:.{digits}f}"


def level_percent(level: float) -> str:
    return f"{metrics.level_name(level)}%"


def confidence_text(intervals: dict) -> str:
    """"MAE 8.79 (95% CI 7.90 to 9.70), RMSE ..., CCC ..." and how the intervals were made."""
    parts = []
    for name, label, digits in (("mae", "MAE", 2), ("rmse", "RMSE", 2), ("ccc", "CCC", 3)):
        entry = intervals[name]
        parts.append(f"{label} {entry['estimate']:.{digits}f} "
                     f"({_ci(entry['low'], entry['high'], intervals['level'], digits)})")
    return (", ".join(parts) + f" [percentile bootstrap over the {intervals['num_examples']:,} images, "
            f"{intervals['num_resamples']:,} resamples, seed {intervals['seed']}]")


def interval_text(result: dict) -> str:
    """One line on the per-image intervals: their sources and calibration, or that there are none."""
    interval = result["prediction_interval"]
    if not interval["sources"]:
        return interval["note"]
    text = f"per-image intervals ({', '.join(interval['sources'])})"
    if "calibration" not in result:
        return text + ": no labels to check them against"
    c = result["calibration"]
    covered = [f"{level_percent(level)} interval covers {c[f'coverage_{metrics.level_name(level)}']:.1%} of the "
               f"images (mean width {c[f'mean_width_{metrics.level_name(level)}']:.2f} months)"
               for level in metrics.INTERVAL_LEVELS]
    return text + ": " + "; ".join(covered)


def comparison_lines(comparison: dict) -> list[str]:
    """The ensemble members' MAE and the paired differences (``compare_members``), one a line."""
    level, names = comparison["level"], {}
    for m in comparison["members"]:
        names[m["workdir"]] = os.path.basename(os.path.normpath(m["workdir"])) or m["workdir"]
    if len(set(names.values())) < len(names):  # the same folder name twice: full paths
        names = {w: w for w in names}
    lines = ["members (paired bootstrap over the same images): " + ", ".join(
        f"{names[m['workdir']]} MAE {m['mae']:.2f} ({_ci(m['low'], m['high'], level, 2)})"
        for m in comparison["members"])]
    first = names[comparison["members"][0]["workdir"]]
    for d in comparison["minus_first"]:
        lines.append(f"  MAE {names[d['workdir']]} - {first}: {d['difference']:+.2f} "
                     f"({_ci(d['low'], d['high'], level, 2)})")
    for d in comparison["ensemble_minus_member"]:
        lines.append(f"  MAE ensemble - {names[d['workdir']]}: {d['difference']:+.2f} "
                     f"({_ci(d['low'], d['high'], level, 2)})")
    return lines


def summary_table(outcome: Evaluation) -> str:
    """A readable table: all images, per sex, per age band; then timing and the files written."""
    r = outcome.result
    head = (f"{r['members'][0]['workdir']} ({r['which']} checkpoint, step {r['checkpoint_step']}) on {outcome.split}"
            f" [{', '.join(r['tfds_splits'])} of {r['dataset']}]")
    if len(r["members"]) > 1:
        head += f", ensemble of {len(r['members'])}"
    if r.get("tta"):
        head += f", TTA over {r['tta']['views']} views"
    lines = [head]
    if "mae" not in r:
        lines.append(f"{r['num_examples']} images, unlabelled: predictions only")
        lines.append(interval_text(r))
    else:
        lines.append(f"{'':<10}{'images':>7}{'MAE':>8}{'RMSE':>8}{'R2':>8}{'CCC':>8}{'MADdev':>8}{'bias':>8}"
                     f"{'baseline':>10}")

        def row(name, m):
            if not m.get("num_examples"):
                return f"{name:<10}{0:>7}"
            return (f"{name:<10}{m['num_examples']:>7}{m['mae']:>8.2f}{m['rmse']:>8.2f}{m['r2']:>8.3f}"
                    f"{m['ccc']:>8.3f}{m['mad_deviation']:>8.2f}{m['mean_error']:>+8.2f}"
                    f"{m.get('baseline_mae', float('nan')):>10.2f}")

        lines.append(row("all", r))
        for group in ("sex", "age_band"):
            for name, m in r["breakdown"][group].items():
                lines.append(row(name, m))
        lines.append(confidence_text(r["confidence_intervals"]))
        lines.append(interval_text(r))
        if "member_comparison" in r:
            lines += comparison_lines(r["member_comparison"])
        if "accuracy" in r:
            lines.append(f"class accuracy {r['accuracy']:.3f} over {len(r['confusion_matrix'])} classes")
        if "bias_correction" in r:
            bc = r["bias_correction"]
            lines.append(f"bias correction: true = {bc['slope']:.4f} * pred {bc['intercept']:+.2f} (fitted on "
                         f"{bc['num_fitted']} validation images{', in-sample' if bc['in_sample'] else ''}); "
                         f"uncorrected MAE {bc['uncorrected']['mae']:.2f}")
    if "quality" in r:
        lines.append(quality_text(r["quality"]))
    inf = r["inference"]
    lines.append(f"inference: {inf['model_ms_per_image']:.3f} ms/image in the model, {inf['total_ms_per_image']:.2f} "
                 f"ms/image with the input pipeline ({inf['device']}); peak host memory {inf['peak_host_mib']:.0f} MiB"
                 + (f", peak device memory {inf['peak_device_mib']:.0f} MiB" if "peak_device_mib" in inf else ""))
    lines.append(f"wrote {outcome.json_path} and {outcome.csv_path}")
    return "\n".join(lines)
