"""Figures of a run and its evaluation (matplotlib, Agg backend, PNG files).

Each function draws one figure into ``path`` and returns the path:

- ``learning_curves(events, path)``: training loss, and training / validation MAE against the
  step, from ``metrics.jsonl``'s events; the best validation step is marked;
- ``predicted_vs_true``: predicted against true bone age by sex, with the identity line;
- ``bland_altman``: difference (predicted - true) against the mean of the two, with the mean
  difference and the 95% limits of agreement (mean +- 1.96 SD);
- ``error_by_age``: absolute error against true age, with the mean of each age band;
- ``confusion``: the confusion matrix of a classification head;
- ``reliability``: observed against nominal coverage of the per-image prediction intervals,
  with the diagonal of a calibrated model and the band that chance alone leaves around it;
- ``overlays``: radiographs with a map (Grad-CAM or attention) laid over them.

``python -m boneage_jax.evaluate --workdir DIR --report`` draws them all into ``DIR/report``.
Each figure is written atomically (``io.write_bytes``), in the format of its path's suffix.
"""

from __future__ import annotations

import io as _io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from boneage_jax import io, metrics  # noqa: E402

DPI = 110
SEX_COLOURS = {"male": "tab:blue", "female": "tab:red"}


def _save(fig, path: str) -> str:
    buffer = _io.BytesIO()
    fig.savefig(buffer, format=os.path.splitext(path)[1][1:].lower() or "png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    io.write_bytes(path, buffer.getvalue())
    return path


def _series(events: list[dict], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(e["step"], e[key]) for e in events if e.get("split") == split and e.get(key) is not None]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*rows)
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def learning_curves(events: list[dict], path: str, title: str = "") -> str:
    """Loss (left) and MAE in months (right) against the training step."""
    fig, (ax_loss, ax_mae) = plt.subplots(1, 2, figsize=(11, 4))
    steps, loss = _series(events, "train", "loss")
    if len(steps):
        ax_loss.plot(steps, loss, marker="." if len(steps) < 30 else None)
        if np.all(loss > 0) and loss.max() / loss.min() > 20:
            ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.grid(alpha=0.3)
    train_key = "mae_months" if any("mae_months" in e for e in events if e.get("split") == "train") else "jaccard"
    val_key = "mae" if train_key == "mae_months" else "jaccard"
    for split, key, label in (("train", train_key, "train (running batches)"), ("validation", val_key, "validation")):
        s, v = _series(events, split, key)
        if len(s):
            ax_mae.plot(s, v, marker="o" if split == "validation" or len(s) < 30 else None, ms=4, label=label)
    s, v = _series(events, "validation", val_key)
    if len(s):
        best = int(np.argmax(v) if val_key == "jaccard" else np.argmin(v))
        ax_mae.axvline(s[best], color="grey", ls=":", lw=1)
        ax_mae.annotate(f"best {v[best]:.2f} @ {int(s[best])}", (s[best], v[best]), textcoords="offset points",
                        xytext=(5, 8), fontsize=8)
    baseline = [e["baseline_mae"] for e in events if e.get("split") == "validation" and "baseline_mae" in e]
    if baseline:
        ax_mae.axhline(baseline[-1], color="k", ls="--", lw=1, label="validation baseline (training mean)")
    for ax in (ax_loss, ax_mae):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_mae.set(xlabel="step", ylabel="MAE (months)" if val_key == "mae" else "Jaccard", title=val_key.upper())
    ax_mae.grid(alpha=0.3)
    if ax_mae.lines:  # below the axes: curves fill the whole panel
        ax_mae.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _age_limits(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * (hi - lo) if hi > lo else 5.0
    return lo - pad, hi + pad


def predicted_vs_true(pred: np.ndarray, true: np.ndarray, male: np.ndarray, path: str, title: str = "") -> str:
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    male = np.asarray(male).astype(bool)
    for name, keep in (("male", male), ("female", ~male)):
        if keep.any():
            ax.scatter(true[keep], pred[keep], s=14, alpha=0.7, color=SEX_COLOURS[name], label=f"{name} ({keep.sum()})")
    lo, hi = _age_limits(pred, true)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="true bone age (months)", ylabel="predicted bone age (months)",
           aspect="equal")
    m = metrics.regression_metrics(pred, true, float(np.mean(true)))
    ax.set_title((title + "\n" if title else "") + f"MAE {m['mae']:.2f}  R² {m['r2']:.3f}  CCC {m['ccc']:.3f}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def bland_altman(pred: np.ndarray, true: np.ndarray, path: str, title: str = "") -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    mean = (pred + true) / 2.0
    diff = pred - true
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    ax.scatter(mean, diff, s=14, alpha=0.7, color="tab:purple")
    for value, style, label in ((bias, "-", f"mean {bias:+.2f}"), (bias + 1.96 * sd, "--", f"+1.96 SD {bias + 1.96 * sd:+.2f}"),
                                (bias - 1.96 * sd, "--", f"-1.96 SD {bias - 1.96 * sd:+.2f}")):
        ax.axhline(value, color="k", ls=style, lw=1)
        ax.annotate(label, (1.0, value), xycoords=("axes fraction", "data"), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set(xlabel="mean of predicted and true (months)", ylabel="predicted - true (months)",
           title=(title + ": " if title else "") + "Bland-Altman")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def error_by_age(pred: np.ndarray, true: np.ndarray, path: str, title: str = "") -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    error = np.abs(pred - true)
    ax.scatter(true, error, s=14, alpha=0.5, color="tab:grey", label="images")
    index = metrics.age_band_index(true)
    label = "band mean"
    for i, (_, low, high) in enumerate(metrics.AGE_BANDS):
        keep = index == i
        if keep.any():
            value = float(error[keep].mean())
            ax.hlines(value, low, high, color="tab:orange", lw=2.5, label=label)
            label = None
            ax.annotate(f"{value:.1f}\n(n={int(keep.sum())})", ((low + high) / 2, value), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
        ax.axvline(low, color="grey", ls=":", lw=0.6)
    ax.set_xticks([b[1] for b in metrics.AGE_BANDS] + [metrics.AGE_BANDS[-1][2]])
    ax.set(xlim=(0, 240), xlabel="true bone age (months)", ylabel="absolute error (months)",
           title=(title + ": " if title else "") + "error by age (bands 0-2, 2-6, 6-10, 10-14, 14-19 years)")
    ax.set_ylim(0, max(float(error.max()), 1.0) * 1.25)  # room for the band labels
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    return _save(fig, path)


def reliability(levels, coverage, num_examples: int, path: str, mean_width=None, title: str = "") -> str:
    """Observed coverage of the per-image intervals against their nominal level (a reliability
    diagram): on the diagonal when calibrated, below it when over-confident. The grey band is
    where a calibrated model's coverage falls for ``num_examples`` images (95%, normal
    approximation); ``mean_width`` (months) labels the points."""
    levels, coverage = np.asarray(levels, np.float64), np.asarray(coverage, np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    grid = np.linspace(0.0, 1.0, 101)
    low, high = metrics.coverage_sampling_band(grid, num_examples)
    ax.fill_between(grid, low, high, color="0.85",
                    label=f"chance range of a calibrated model ({num_examples} images, 95%)")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    ax.plot(levels, coverage, marker="o", color="tab:blue", label="observed")
    if mean_width is not None:
        for x, y, w in zip(levels, coverage, mean_width):
            ax.annotate(f"{w:.1f}", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7,
                        color="tab:blue")
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="nominal coverage of the interval",
           ylabel="observed coverage (fraction of true ages inside)",
           title=(title + "\n" if title else "") + "interval calibration"
                 + (" (labels: mean width, months)" if mean_width is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def confusion(matrix: np.ndarray, path: str, labels: list[str] | None = None, title: str = "") -> str:
    matrix = np.asarray(matrix)
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ticks = labels or [str(i) for i in range(n)]
    ax.set_xticks(range(n), ticks, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), ticks, fontsize=7)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix")
    return _save(fig, path)


def overlays(images: np.ndarray, maps: np.ndarray, path: str, captions: list[str] | None = None, title: str = "",
             vmax: float | None = 1.0, columns: int = 4) -> str:
    """Greyscale images (B, H, W[, C]) with ``maps`` (B, H, W) in jet at 45% opacity.
    ``vmax=None`` scales each map to its own maximum."""
    n = len(images)
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows + (0.4 if title else 0)), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        image = np.asarray(images[k], np.float32)
        image = image[..., 0] if image.ndim == 3 else image
        ax.imshow(image, cmap="gray")
        ax.imshow(maps[k], cmap="jet", alpha=0.45, vmin=0.0, vmax=vmax if vmax is not None else float(maps[k].max()) or 1.0)
        if captions:
            ax.set_title(captions[k], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
