r"""A Markdown report of a run and one evaluation of it, with figures.

    python -m boneage_jax.report --workdir=runs/demo [any boneage_jax.evaluate flag]
    python -m boneage_jax.evaluate --workdir=runs/demo --report      # the same

Evaluates (``boneage_jax.evaluation.evaluate``, with every option of ``boneage_jax.evaluate``;
default split: test if the dataset has one, else validation), then writes into
``<workdir>/report/``:

- ``learning_curves.png``: training loss; training and validation MAE against the step;
- ``predicted_vs_true.png``, ``bland_altman.png``, ``error_by_age.png`` of the evaluated split;
- ``reliability.png``: calibration of the per-image prediction intervals (Gaussian heads, TTA,
  ensembles), observed against nominal coverage;
- ``confusion.png`` for classification heads;
- ``gradcam.png``: Grad-CAM of the predicted age on the first ``--report_images`` validation
  images (any convolutional model, see ``boneage_jax.explain``);
- ``attention.png``: ``vgg19_attention``'s attention maps on the same images;
- ``report.md``: the model, the results with bootstrap confidence intervals, the per-image
  intervals and their coverage (or that the run has none), the ensemble members compared, the
  breakdown per sex and age band, and a resources
  table (parameters, training time and throughput from ``metrics.jsonl``, inference time per
  image, peak host and device memory), linking the figures.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics

import jax
import numpy as np

from boneage_jax import data, explain, input_pipeline, io, metrics, plots
from boneage_jax import evaluation as evaluation_lib

FIGURES = {
    "learning_curves": "Learning curves",
    "predicted_vs_true": "Predicted against true bone age",
    "bland_altman": "Bland-Altman",
    "error_by_age": "Absolute error by age",
    "reliability": "Calibration of the per-image intervals",
    "confusion": "Confusion matrix",
    "gradcam": "Grad-CAM",
    "attention": "Attention maps",
}


def read_events(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_summary(events: list[dict], batch_size: int) -> dict:
    """Training time and throughput from ``metrics.jsonl``.

    ``step_time_s``: the sum over the logged intervals of steps x batch / images_per_s (training
    steps only; the first interval includes compilation). ``wall_time_s``: first to last event
    (evaluation and checkpoints included; a resumed run's pause too), when events carry a
    ``time``. ``images_per_s``: the median throughput after the first interval."""
    rows = sorted((e for e in events if e.get("split") == "train" and e.get("images_per_s")), key=lambda e: e["step"])
    out: dict = {}
    info = [e for e in events if e.get("split") == "info"]
    if info:
        out.update({k: info[0][k] for k in ("num_params", "total_steps") if k in info[0]})
    steps = [e["step"] for e in events if e.get("split") == "train"]
    if steps:
        out["steps"] = max(steps)
    if rows:
        total, previous = 0.0, 0
        for e in rows:
            total += (e["step"] - previous) * batch_size / e["images_per_s"]
            previous = e["step"]
        out["step_time_s"] = total
        later = [e["images_per_s"] for e in rows[1:]] or [rows[0]["images_per_s"]]
        out["images_per_s"] = statistics.median(later)
    times = [e["time"] for e in events if isinstance(e.get("time"), (int, float))]
    if len(times) >= 2:
        out["wall_time_s"] = max(times) - min(times)
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _metrics_table(rows: list[tuple[str, dict]], with_baseline: bool = True) -> list[str]:
    header = "| | images | MAE | RMSE | R² | CCC | MAD (deviation) | mean error | SD error |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if with_baseline:
        header += " baseline MAE |"
        rule += "---:|"
    lines = [header, rule]
    for name, m in rows:
        if not m.get("num_examples") or "mae" not in m:
            lines.append(f"| {name} | {m.get('num_examples', 0)} |" + " |" * (8 if with_baseline else 7))
            continue
        line = (f"| {name} | {m['num_examples']} | {_fmt(m['mae'])} | {_fmt(m['rmse'])} | {_fmt(m['r2'], 3)} | "
                f"{_fmt(m.get('ccc'), 3)} | {_fmt(m.get('mad_deviation'))} | {_fmt(m.get('mean_error'))} | "
                f"{_fmt(m.get('sd_error'))} |")
        if with_baseline:
            line += f" {_fmt(m.get('baseline_mae'))} |"
        lines.append(line)
    return lines


def _uncertainty_section(r: dict, with_figure: bool) -> list[str]:
    """The per-image intervals (sources, coverage and width at 68% and 95%), in Markdown."""
    interval = r["prediction_interval"]
    lines = ["### Uncertainty per image", ""]
    if not interval["sources"]:
        return lines + [interval["note"][0].upper() + interval["note"][1:] + ".", ""]
    mixture = any(source.startswith("spread") for source in interval["sources"])
    lines.append("Each prediction carries a normal interval (`pred_std` and the 68% and 95% interval ends in the "
                 f"CSV) whose variance comes from: {', '.join(interval['sources'])}"
                 + ("; combined as the mean of the variances plus the variance of the means" if mixture else "")
                 + (f"; scaled by the bias correction's slope (x{interval['scaled_by_bias_correction']:.3f})"
                    if "scaled_by_bias_correction" in interval else "") + ".")
    lines.append("")
    if "calibration" in r:
        c = r["calibration"]
        lines += ["| nominal coverage | observed coverage | mean width (months) |", "|---:|---:|---:|"]
        for level in metrics.INTERVAL_LEVELS:
            name = metrics.level_name(level)
            lines.append(f"| {name}% | {100 * c[f'coverage_{name}']:.1f}% | {c[f'mean_width_{name}']:.2f} |")
        lines += ["", f"Observed coverage is the fraction of the {c['num_examples']} images whose true bone age "
                  "lies inside its interval; below the nominal level the intervals are over-confident"
                  + (" (figure: [reliability.png](reliability.png))." if with_figure else "."), ""]
    return lines


def _quality_section(q: dict) -> list[str]:
    """The quality check over the split (``--quality``), in Markdown: how many images it would
    reject, why, and the error with and without them."""
    text = evaluation_lib.quality_text(q)
    lines = ["### Quality control", "", text[0].upper() + text[1:] + ". The check is `boneage_jax.quality` (what "
             "`predict` and the service refuse without `--force`).", ""]
    if "metrics" in q:
        lines += _metrics_table(list(q["metrics"].items()), with_baseline=False)
        lines.append("")
    if q["rejected_images"]:
        lines += ["| id | rejection |", "|---:|---|"]
        lines += [f"| {item['id']} | {item['rejection']} |" for item in q["rejected_images"][:50]]
        if len(q["rejected_images"]) > 50:
            lines.append(f"| ... | {len(q['rejected_images']) - 50} more in the evaluation JSON |")
        lines.append("")
    return lines


def example_batch(run, num_images: int) -> dict | None:
    """The first ``num_images`` validation images of the run's dataset, as one batch."""
    builder = data.prepare(run.config.data)
    validation = data.select_splits(run.config.data, builder, run.config.seed)["validation"]
    num = min(num_images, len(validation.indices))
    if num == 0:
        return None
    chosen = data.SplitSelection(validation.tfds_split, validation.indices[:num], validation.labels)
    size = -(-num // jax.device_count()) * jax.device_count()
    batch = next(iter(input_pipeline.eval_batches(run.config.data, chosen, size)))
    return {k: v[:num] for k, v in batch.items()}


def draw_figures(evaluation, out_dir: str, num_images: int = 8) -> dict[str, str]:
    """Every figure that applies; returns {name: file name in out_dir}."""
    run = evaluation.runs[0]
    workdir = run.workdir
    drawn = {}
    tag = f"{evaluation.split}" + (" (ensemble)" if len(evaluation.runs) > 1 else "") + \
        (" (TTA)" if evaluation.result.get("tta") else "")
    events = read_events(workdir)
    if events:
        plots.learning_curves(events, os.path.join(out_dir, "learning_curves.png"),
                              title=f"{os.path.basename(workdir)}: {run.config.model.name}")
        drawn["learning_curves"] = "learning_curves.png"
    p = evaluation.predictions
    labelled = ~np.isnan(p["boneage"])
    if labelled.sum() >= 2:
        pred, true, male = p["pred_boneage"][labelled], p["boneage"][labelled], p["male"][labelled]
        plots.predicted_vs_true(pred, true, male, os.path.join(out_dir, "predicted_vs_true.png"), title=tag)
        plots.bland_altman(pred, true, os.path.join(out_dir, "bland_altman.png"), title=tag)
        plots.error_by_age(pred, true, os.path.join(out_dir, "error_by_age.png"), title=tag)
        drawn.update(predicted_vs_true="predicted_vs_true.png", bland_altman="bland_altman.png",
                     error_by_age="error_by_age.png")
    if "calibration" in evaluation.result:
        c = evaluation.result["calibration"]
        plots.reliability(c["levels"], c["coverage"], c["num_examples"], os.path.join(out_dir, "reliability.png"),
                          mean_width=c["mean_width"],
                          title=f"{tag}: {', '.join(evaluation.result['prediction_interval']['sources'])}")
        drawn["reliability"] = "reliability.png"
    if "confusion_matrix" in evaluation.result:
        edges = evaluation.result["class_edges"]
        labels = [f"{edges[i]:.0f}-{edges[i + 1]:.0f}" for i in range(len(edges) - 1)]
        labels[0], labels[-1] = f"≤{edges[1]:.0f}", f">{edges[-2]:.0f}"  # the end classes take every age beyond
        plots.confusion(np.asarray(evaluation.result["confusion_matrix"]), os.path.join(out_dir, "confusion.png"),
                        labels=labels, title=f"{tag}: accuracy {evaluation.result['accuracy']:.3f} (classes in months)")
        drawn["confusion"] = "confusion.png"
    if num_images > 0:
        batch = example_batch(run, num_images)
        if batch is not None:
            ages = np.asarray(jax.device_get(run.predict({"image": batch["image"], "male": batch["male"]})["boneage"]))
            captions = [f"id {int(i)} {'M' if m else 'F'}: {t:.0f} -> {a:.0f} mo"
                        for i, m, t, a in zip(batch["id"], batch["male"], batch["boneage"], ages)]
            try:
                cams, info = explain.gradcam(run, batch["image"], batch["male"])
            except explain.NoFeatureMapError as e:
                evaluation.result.setdefault("report_notes", []).append(str(e))
            else:
                evaluation.result["gradcam_feature_map"] = info
                plots.overlays(batch["image"], cams, os.path.join(out_dir, "gradcam.png"), captions=captions,
                               title=f"Grad-CAM of the predicted age on the last {info['shape'][0]}x{info['shape'][1]}"
                                     f"x{info['shape'][2]} feature map ({info['layer']}), validation images")
                drawn["gradcam"] = "gradcam.png"
            attention = explain.attention_maps(run, batch["image"])
            if attention is not None:
                ranges = [f"{c}\nattention {m.min():.2f}-{m.max():.2f}" for c, m in zip(captions, attention)]
                plots.overlays(batch["image"], attention, os.path.join(out_dir, "attention.png"), captions=ranges,
                               title="attention map (sigmoid, colour scale 0 to 1), validation images")
                drawn["attention"] = "attention.png"
    return drawn


def write_report(evaluation, num_images: int = 8) -> str:
    """Draws the figures and writes ``<workdir>/report/report.md``; returns its path."""
    run = evaluation.runs[0]
    workdir = run.workdir
    out_dir = os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    drawn = draw_figures(evaluation, out_dir, num_images)
    r = evaluation.result
    config = run.config
    training = training_summary(read_events(workdir), config.batch_size)
    lines = [f"# {os.path.basename(workdir)}: bone age report", ""]
    model = config.model
    lines.append(f"Model `{model.name}` ({_fmt(training.get('num_params'))} parameters), {model.head} head, "
                 f"sex fusion `{model.sex_fusion}`, {config.data.image_size} px input. Trained "
                 f"{_fmt(training.get('steps'))} of {_fmt(training.get('total_steps'))} steps at batch "
                 f"{config.batch_size}; the {r['which']} checkpoint is step {r['checkpoint_step']}. Written "
                 f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} from `{workdir}`.")
    lines.append("")

    results_path = os.path.join(workdir, "results.json")
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
        lines += ["## Results at the end of training (`results.json`)", ""]
        lines += _metrics_table([(name, m) for name, m in results.items()])
        lines.append("")

    desc = f"{r['num_examples']} images of `{evaluation.split}` ({', '.join(r['tfds_splits'])} of `{r['dataset']}`)"
    if len(r["members"]) > 1:
        desc += ", ensemble of " + ", ".join(f"`{m['workdir']}` (step {m['checkpoint_step']})" for m in r["members"])
    if r.get("tta"):
        desc += (f", test-time augmentation over {r['tta']['views']} views (flip: {r['tta']['flip']}, rotations "
                 f"{r['tta']['angles']} degrees)")
    lines += ["## This evaluation", "", desc + f". Files: [{os.path.basename(evaluation.json_path)}]"
              f"(../{os.path.basename(evaluation.json_path)}), [{os.path.basename(evaluation.csv_path)}]"
              f"(../{os.path.basename(evaluation.csv_path)}).", ""]
    if "mae" in r:
        lines += _metrics_table([("all", r)])
        lines += ["", "MAE is the mean absolute difference (what Lee et al. and Deeplasia call MAD); "
                  "MAD (deviation) is the mean absolute deviation of the errors about their mean; mean error is "
                  "the bias (predicted - true); baseline MAE predicts the training mean for everyone. All in months.",
                  "", "Confidence intervals: " + evaluation_lib.confidence_text(r["confidence_intervals"]) + ".", ""]
        if "member_comparison" in r:
            lines += ["Ensemble members, their MAE and paired differences on the same images (before any bias "
                      "correction):", ""]
            lines += ["    " + line for line in evaluation_lib.comparison_lines(r["member_comparison"])]
            lines.append("")
        lines += _uncertainty_section(r, "reliability" in drawn)
        lines += ["### By sex", ""]
        lines += _metrics_table(list(r["breakdown"]["sex"].items()))
        lines += ["", "### By age band (true age)", ""]
        lines += _metrics_table([(name.replace("y", " years"), m) for name, m in r["breakdown"]["age_band"].items()])
        lines.append("")
        if "bias_correction" in r:
            bc = r["bias_correction"]
            lines += [f"Linear bias correction: predictions mapped by true = {bc['slope']:.4f} x predicted "
                      f"{bc['intercept']:+.2f}, fitted on {bc['num_fitted']} validation predictions"
                      + (" (in-sample for this split)" if bc["in_sample"] else "")
                      + f"; MAE before correction {bc['uncorrected']['mae']:.2f}.", ""]
        if "accuracy" in r:
            lines += [f"Class accuracy: {r['accuracy']:.3f}.", ""]
    else:
        lines += ["The images are unlabelled: predictions only.", ""]
        lines += _uncertainty_section(r, False)
    if "quality" in r:
        lines += _quality_section(r["quality"])

    inference = r["inference"]
    lines += ["## Resources", "", "| | |", "|---|---|",
              f"| parameters | {_fmt(training.get('num_params'))} |",
              f"| training time (steps only, from throughput; includes compilation) | "
              f"{_duration(training.get('step_time_s'))} |",
              f"| training wall-clock (first to last logged event) | {_duration(training.get('wall_time_s'))} |",
              f"| training throughput (median) | {_fmt(training.get('images_per_s'), 1)} images/s |",
              f"| inference time per image (model, after compilation{', all TTA views' if r.get('tta') else ''}"
              f"{', all members' if len(r['members']) > 1 else ''}) | {inference['model_ms_per_image']:.3f} ms |",
              f"| inference time per image (with decoding and preprocessing) | "
              f"{inference['total_ms_per_image']:.2f} ms |",
              f"| peak host memory (evaluation process, maxrss) | {inference['peak_host_mib']:.0f} MiB |",
              "| peak device memory (evaluation) | "
              + (f"{inference['peak_device_mib']:.0f} MiB |" if "peak_device_mib" in inference else "n/a on this device |"),
              f"| device | {inference['device']} |", ""]

    lines += ["## Figures", ""]
    for name, title in FIGURES.items():
        if name in drawn:
            lines += [f"### {title}", "", f"![{title}]({drawn[name]})", ""]
            if name == "gradcam" and "gradcam_feature_map" in r:
                info = r["gradcam_feature_map"]
                lines += [f"Gradient of the predicted age with respect to the last spatial feature map of the "
                          f"forward pass ({info['shape'][0]}x{info['shape'][1]}, {info['shape'][2]} channels, output "
                          f"of a {info['layer']}: `{info['primitive']}`), averaged per channel, weighting the channels; positive part, "
                          "scaled to each image's maximum. Red raises the predicted age.", ""]
    for note in r.get("report_notes", []):
        lines += [f"Note: {note}", ""]
    path = os.path.join(out_dir, "report.md")
    io.write_text(path, "\n".join(lines))
    return path


if __name__ == "__main__":
    from boneage_jax import cli

    cli.run(cli.EvaluateCommand(report=True).main)
