r"""Score a trained run (or an ensemble of runs) on a split of its dataset, or on another one.

    python -m boneage_jax.evaluate --workdir=runs/demo [--split=test|validation|train|all] \
        [--which=best|latest] [--tta] [--ensemble=runs/b,runs/c] [--bias_correction] [--report] \
        [--config.data.manual_dir=OTHER_FOLDER] [--config.key=value ...]

The run's ``config.json`` is loaded and ``--config.*`` overrides are applied on top of it (data
settings: another dataset folder, sex and age filters, batch size); the model settings
(``model.*``, ``task``, ``loss``, ``data.image_size``, ``data.normalize``) cannot change.

- ``--split``: one of the run's splits (``validation`` is the held-out part of ``train`` in
  the Kaggle layout) or ``all``, every labelled image of every split of the dataset. Default:
  ``test`` when the dataset has one, else ``validation``.
- ``--tta``: test-time augmentation, the mean prediction over the image, its horizontal flip
  (``--tta_flip``) and small rotations (``--tta_angles``, default -5 and +5 degrees) of the
  normalised input (edges replicated).
- ``--ensemble``: more workdirs; the prediction is the members' mean (each member reads the
  images with its own preprocessing). Gaussian heads combine as a mixture (std of the
  mixture); class heads vote (ties go to the class whose mean age is nearest the mean age).
- ``--bias_correction``: fits ``true ~ slope * pred + intercept`` on the validation
  predictions (same models, same TTA) and applies it to the scored split.

Writes into the (first) workdir ``evaluation_<split>[_latest][_tta][_ensemble][_bc][_on-<folder>].json``
(``results.json``'s keys mae, rmse, r2, num_examples, baseline_mae, checkpoint_step, and mse,
mad_difference, mad_deviation, ccc, mean_error, sd_error, ``breakdown`` per sex and per age
band, ``accuracy`` and ``confusion_matrix`` for class heads, ``bias_correction``, ``inference``
timing and memory) and ``predictions_<same suffix>.csv`` (id, male, boneage, pred_boneage,
[pred_std], [pred_class]; ``_on-<folder>`` is added when ``data.manual_dir`` is not the run's).
``--report`` also draws the figures and ``report/report.md`` (``boneage_jax.report``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from boneage_jax import data, evaluation, inference, io, metrics, objectives

SPLITS = ("test", "validation", "train", "all")
# Settings the weights depend on: an evaluation may not change them.
FROZEN = ("model", "task", "loss", "data.image_size", "data.normalize")

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a run written by boneage_jax.main.")
_SPLIT = flags.DEFINE_enum("split", None, list(SPLITS), "Split to score (default: test if present, else validation).")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to load.")
_TTA = flags.DEFINE_bool("tta", False, "Test-time augmentation: mean over flip and small rotations.")
_TTA_FLIP = flags.DEFINE_bool("tta_flip", True, "With --tta: include the horizontal flip.")
_TTA_ANGLES = flags.DEFINE_list("tta_angles", ["-5", "5"], "With --tta: rotations in degrees.")
_ENSEMBLE = flags.DEFINE_list("ensemble", [], "More workdirs whose predictions are averaged with --workdir's.")
_BIAS = flags.DEFINE_bool("bias_correction", False, "Linear bias correction fitted on validation predictions.")
_REPORT = flags.DEFINE_bool("report", False, "Also draw the figures and report/report.md.")
_REPORT_IMAGES = flags.DEFINE_integer("report_images", 8, "Validation images in the Grad-CAM / attention figures.")

_OVERRIDES: list[str] = []  # the --config.* arguments, taken out of argv before absl parses it


# ----------------------------------------------------------------------------- configuration


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
        if not re.match(r"^--?(no)?config\.", arg):
            raise ValueError(f"{arg!r} is not a --config.key=value override")
    before = _flatten(config.to_dict())
    argv = ["evaluate", *overrides]
    values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv, lock_config=True)
        values(argv)
    except (AttributeError, KeyError) as e:
        raise ValueError(f"unknown config key {e} in {' '.join(overrides)} (the keys are those of {source})") from e
    except flags.Error as e:
        raise ValueError(f"bad config override: {e}") from e
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
    return apply_overrides(inference.read_config(workdir), overrides, os.path.join(workdir, "config.json"))


def _require_workdir(workdir: str) -> None:
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"{os.path.join(workdir, 'config.json')} is missing: is {workdir} a workdir "
                                "written by boneage_jax.main?")


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


def evaluate(workdir: str, *, split: str | None = None, which: str = "best", tta: bool = False,
             tta_flip: bool = True, tta_angles: Sequence[float] = (-5.0, 5.0), ensemble: Sequence[str] = (),
             bias_correction: bool = False, overrides: Sequence[str] = (), report: bool = False,
             report_images: int = 8, verbose: bool = True) -> Evaluation:
    """Scores ``workdir``'s run (and ``ensemble`` members) and writes the JSON and CSV; see the
    module docstring. Returns an :class:`Evaluation`."""
    workdir = os.path.abspath(workdir)
    config = load_config(workdir, overrides)
    saved_dir = inference.read_config(workdir).data.manual_dir
    members = [workdir] + [os.path.abspath(m) for m in ensemble if m]
    configs = [config]
    for member in members[1:]:
        member_config = load_config(member, overrides)
        for key in ("manual_dir", "data_dir", "builder_config"):  # the first run's dataset
            if key in config.data and key in member_config.data:
                member_config.data[key] = config.data[key]
        configs.append(member_config)
    runs = [_load_member(m, which, c) for m, c in zip(members, configs)]
    split, chosen = selections(config, split)
    tta_options = {"tta": tta, "tta_flip": tta_flip, "tta_angles": tuple(float(a) for a in tta_angles)}

    timing = evaluation.Timing()
    predictions = evaluation.ensemble_predictions(runs, chosen, timing=timing, **tta_options)
    objective = runs[0].objective

    correction = None
    if bias_correction:
        if split == "validation":
            validation = predictions
        else:
            validation = evaluation.ensemble_predictions(runs, selections(config, "validation")[1], **tta_options)
        labelled = ~np.isnan(validation["boneage"])
        if labelled.sum() < 2:
            raise ValueError("bias correction needs at least 2 labelled validation images")
        correction = metrics.fit_linear_correction(validation["pred_boneage"][labelled], validation["boneage"][labelled])
        uncorrected = objective.score(predictions)
        predictions = {**predictions, "pred_boneage_uncorrected": predictions["pred_boneage"],
                       "pred_boneage": metrics.apply_linear_correction(predictions["pred_boneage"],
                                                                       correction).astype(np.float32)}
        correction = {**correction, "fitted_on": "validation", "num_fitted": int(labelled.sum()),
                      "in_sample": split in ("validation", "all"), "uncorrected": uncorrected}

    result = evaluation.score_predictions(predictions, objective)
    result["checkpoint_step"] = runs[0].step
    result["split"] = split
    result["which"] = which
    result["tfds_splits"] = [s.tfds_split for s in chosen]
    result["dataset"] = os.path.abspath(os.path.expanduser(config.data.manual_dir))
    result["members"] = [{"workdir": r.workdir, "checkpoint_step": r.step, "model": r.config.model.name}
                         for r in runs]
    result["tta"] = ({"views": 1 + tta_flip + len(tta_options["tta_angles"]), "flip": tta_flip,
                      "angles": list(tta_options["tta_angles"])} if tta else None)
    if correction is not None:
        result["bias_correction"] = correction
    result["inference"] = {**timing.summary(), **evaluation.memory_summary()}
    result["overrides"] = list(overrides)

    other = None
    if os.path.abspath(os.path.expanduser(config.data.manual_dir)) != os.path.abspath(os.path.expanduser(saved_dir)):
        other = os.path.basename(os.path.normpath(config.data.manual_dir))
    suffix = output_suffix(split, which=which, tta=tta, ensemble=len(runs) > 1, bias_correction=bias_correction,
                           other_data=other)
    json_path = os.path.join(workdir, f"evaluation_{suffix}.json")
    csv_path = os.path.join(workdir, f"predictions_{suffix}.csv")
    io.write_json(json_path, result)
    write_predictions_csv(csv_path, predictions)
    outcome = Evaluation(result, predictions, runs, split, json_path, csv_path)
    if verbose:
        print(summary_table(outcome), flush=True)
    if report:
        from boneage_jax import report as report_lib  # pylint: disable=import-outside-toplevel

        outcome.report_path = report_lib.write_report(outcome, num_images=report_images)
        if verbose:
            print(f"wrote {outcome.report_path}", flush=True)
    return outcome


def write_predictions_csv(path: str, predictions: dict[str, np.ndarray]) -> None:
    columns = ["id", "male", "boneage", "pred_boneage"] + [
        k for k in ("pred_boneage_uncorrected", "pred_std", "pred_class") if k in predictions]

    def cell(key, value):
        if key in ("id", "pred_class"):
            return int(value)
        if key == "male":
            return int(bool(value))
        return "" if np.isnan(value) else f"{float(value):.4f}"

    rows = ([cell(k, predictions[k][i]) for k in columns] for i in range(len(predictions["id"])))
    io.write_csv(path, columns, rows)


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
        if "accuracy" in r:
            lines.append(f"class accuracy {r['accuracy']:.3f} over {len(r['confusion_matrix'])} classes")
        if "bias_correction" in r:
            bc = r["bias_correction"]
            lines.append(f"bias correction: true = {bc['slope']:.4f} * pred {bc['intercept']:+.2f} (fitted on "
                         f"{bc['num_fitted']} validation images{', in-sample' if bc['in_sample'] else ''}); "
                         f"uncorrected MAE {bc['uncorrected']['mae']:.2f}")
    inf = r["inference"]
    lines.append(f"inference: {inf['model_ms_per_image']:.3f} ms/image in the model, {inf['total_ms_per_image']:.2f} "
                 f"ms/image with the input pipeline ({inf['device']}); peak host memory {inf['peak_host_mib']:.0f} MiB"
                 + (f", peak device memory {inf['peak_device_mib']:.0f} MiB" if "peak_device_mib" in inf else ""))
    lines.append(f"wrote {outcome.json_path} and {outcome.csv_path}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.key=value`` (or ``--config.key value``) arguments from the rest."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if re.match(r"^--?(no)?config\.", arg):
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                overrides.append(f"{arg}={argv[i + 1]}")
                i += 2
                continue
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser for ``app.run``: ``--config.*`` arguments are kept for
    ``apply_overrides`` (they can only be checked once the run's config is read)."""
    rest, overrides = split_config_args(argv[1:])
    _OVERRIDES[:] = overrides
    try:
        return flags.FLAGS([argv[0], *rest])
    except flags.Error as e:
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        print("Pass --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        angles = [float(a) for a in _TTA_ANGLES.value]
    except ValueError as e:
        raise app.UsageError(f"--tta_angles must be numbers: {e}") from e
    try:
        evaluate(_WORKDIR.value, split=_SPLIT.value, which=_WHICH.value, tta=_TTA.value, tta_flip=_TTA_FLIP.value,
                 tta_angles=angles, ensemble=_ENSEMBLE.value, bias_correction=_BIAS.value, overrides=_OVERRIDES,
                 report=_REPORT.value, report_images=_REPORT_IMAGES.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run_cli(extra: Sequence[str] = ()) -> None:
    sys.argv = [*sys.argv, *extra]
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run_cli()
