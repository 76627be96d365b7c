"""What a model's outputs mean: the loss they are trained with and how they read out as months.

``config.model.head`` chooses one:

- ``regression``: one output, bone age in z-score units of the training labels; loss
  ``config.loss`` (mse, mae or huber).
- ``gaussian``: two outputs, mean (z units) and log-variance; Gaussian negative log-likelihood.
  Each prediction comes with a standard deviation in months (its uncertainty).
- ``classification``: ``model.num_classes`` logits over age ranges; cross-entropy. The ranges
  are ``model.class_edges`` (months) when given, else equal-width bins over the training labels
  as ``pandas.cut(ages, num_classes)`` makes them (Hamrouni & Hassen's 3, 5 and 10 classes).
  The age readout is the expected age: class probabilities times each class's mean training
  age, so MAE is reported for classifiers too.

``config.task = "segmentation"`` trains a U-Net on hand masks instead (:class:`Segmentation`,
scored by the Jaccard index). Both implement :class:`Task`, the protocol through which the
training loop and the commands talk to an objective: loss, readout and scores, the summary
line and results table printed, the files written beside ``results.json``, and whether the
bone-age commands (evaluate, predict, export) apply. :func:`make_objective` is the one place
that reads ``config.task``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

HEADS = ("regression", "gaussian", "classification")
TASKS = ("boneage", "segmentation")


@dataclasses.dataclass(frozen=True)
class LabelStats:
    """What the objective needs from the training labels (saved with every run)."""

    mean: float
    std: float
    class_edges: tuple[float, ...] = ()  # num_classes + 1 edges in months (classification)
    class_means: tuple[float, ...] = ()  # mean training age of each class (months)


def equal_width_edges(ages: np.ndarray, num_classes: int) -> np.ndarray:
    """``pandas.cut(ages, num_classes)``'s bins: equal width over [min, max], the lowest edge
    lowered by 0.1% of the range so that the minimum falls inside the first (left-open) bin."""
    lo, hi = float(ages.min()), float(ages.max())
    edges = np.linspace(lo, hi, num_classes + 1)
    edges[0] -= (hi - lo) * 0.001
    return edges


def assign_classes(ages: np.ndarray, edges) -> np.ndarray:
    """Class index of each age for right-closed bins (e_i, e_i+1]; ages beyond the ends are
    put in the first or last class."""
    edges = np.asarray(edges, np.float64)
    return np.clip(np.searchsorted(edges, ages, side="left") - 1, 0, len(edges) - 2)


def label_stats(model_config: ml_collections.ConfigDict, ages: np.ndarray) -> LabelStats:
    ages = ages[~np.isnan(ages)]
    if len(ages) < 2:
        raise ValueError(f"the training split has {len(ages)} labelled images; need at least 2")
    stats = LabelStats(float(ages.mean()), float(max(ages.std(), 1e-3)))
    if model_config.head != "classification":
        return stats
    if model_config.class_edges:
        edges = np.asarray(model_config.class_edges, np.float64)
        if len(edges) < 3 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"config.model.class_edges {tuple(edges)} must be at least 3 increasing values")
    else:
        edges = equal_width_edges(ages, model_config.num_classes)
    classes = assign_classes(ages, edges)
    means = [float(ages[classes == k].mean()) if np.any(classes == k) else float((edges[k] + edges[k + 1]) / 2)
             for k in range(len(edges) - 1)]
    return dataclasses.replace(stats, class_edges=tuple(map(float, edges)), class_means=tuple(means))


class Task(Protocol):
    """What the training loop, ``inference`` and the commands need from an objective."""

    task: str  # what ``models.create_model(task=...)`` builds: a bone-age model or a segmentation network
    monitor: str  # the validation metric that picks the best checkpoint
    higher_is_better: bool
    predicts_bone_age: bool  # whether evaluate, predict and export apply
    stats: LabelStats

    @property
    def num_outputs(self) -> int: ...

    def batch_loss(self, outputs: jax.Array, batch: dict) -> jax.Array:
        """Mean loss of a batch (inside the compiled train step)."""

    def step_metrics(self, outputs: jax.Array, batch: dict) -> dict[str, jax.Array]:
        """Training metrics of a batch, logged beside the loss."""

    def predict(self, outputs: jax.Array) -> dict[str, jax.Array]:
        """The readout of the model's outputs (inside the compiled predict step)."""

    def host_readout(self, readout: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-example host arrays kept for scoring a split."""

    def score(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """A split's metrics (a ``results.json`` entry)."""

    def summary(self, result: dict) -> str:
        """One line for a split's metrics."""

    def results_table(self, results: dict[str, dict]) -> str:
        """A short text table of every split's metrics."""

    def write_artefacts(self, workdir: str, split: str, predictions: dict[str, np.ndarray]) -> None:
        """Files beside ``results.json`` for a split's final predictions (process 0 only)."""


def require_bone_age(objective: Task, workdir: str, command: str) -> None:
    """Raises ValueError when ``command`` (evaluate, predict, export) cannot use the run in ``workdir``."""
    if not objective.predicts_bone_age:
        raise ValueError(f"{workdir} is a {objective.task} run: {command} needs a bone age run "
                         f"({objective.task} runs report {objective.monitor} in results.json)")


class Objective:
    """Loss and readout of one head type, given the training label statistics (a :class:`Task`)."""

    task = "boneage"
    monitor = "mae"
    higher_is_better = False
    predicts_bone_age = True

    def __init__(self, head: str, stats: LabelStats, loss: str = "mse"):
        if head not in HEADS:
            raise ValueError(f"config.model.head {head!r}; expected one of {HEADS}")
        if head == "classification" and not stats.class_edges:
            raise ValueError("a classification head needs class edges in the label statistics")
        self.head, self.stats, self.loss_name = head, stats, loss
        losses = {
            "mse": lambda p, t: (p - t) ** 2,
            "mae": lambda p, t: jnp.abs(p - t),
            "huber": lambda p, t: optax.huber_loss(p, t, delta=1.0),
        }
        if head == "regression" and loss not in losses:
            raise ValueError(f"config.loss {loss!r}; expected one of {sorted(losses)}")
        self._regression_loss = losses.get(loss)

    @property
    def num_outputs(self) -> int:
        return {"regression": 1, "gaussian": 2, "classification": len(self.stats.class_edges) - 1}[self.head]

    def loss(self, outputs: jax.Array, boneage: jax.Array) -> jax.Array:
        """Per-example loss of outputs (B, num_outputs) against bone age in months (B,)."""
        z = (boneage - self.stats.mean) / self.stats.std
        if self.head == "regression":
            return self._regression_loss(outputs[:, 0], z)
        if self.head == "gaussian":
            mean, log_var = outputs[:, 0], outputs[:, 1]
            return 0.5 * (log_var + (z - mean) ** 2 * jnp.exp(-log_var) + jnp.log(2 * jnp.pi))
        edges = jnp.asarray(self.stats.class_edges[1:-1], jnp.float32)
        labels = jnp.searchsorted(edges, boneage, side="left")
        return optax.softmax_cross_entropy_with_integer_labels(outputs, labels)

    def predict(self, outputs: jax.Array) -> dict[str, jax.Array]:
        """Readout in months: ``boneage`` always, ``std`` (gaussian), ``class`` (classification)."""
        if self.head == "regression":
            return {"boneage": outputs[:, 0] * self.stats.std + self.stats.mean}
        if self.head == "gaussian":
            return {
                "boneage": outputs[:, 0] * self.stats.std + self.stats.mean,
                "std": jnp.exp(0.5 * outputs[:, 1]) * self.stats.std,
            }
        probabilities = jax.nn.softmax(outputs, axis=-1)
        means = jnp.asarray(self.stats.class_means, jnp.float32)
        return {"boneage": probabilities @ means, "class": jnp.argmax(outputs, axis=-1)}

    def true_classes(self, boneage: np.ndarray) -> np.ndarray:
        return assign_classes(boneage, self.stats.class_edges)

    def batch_loss(self, outputs: jax.Array, batch: dict) -> jax.Array:
        return jnp.mean(self.loss(outputs, batch["boneage"]))

    def step_metrics(self, outputs: jax.Array, batch: dict) -> dict[str, jax.Array]:
        return {"mae_months": jnp.mean(jnp.abs(self.predict(outputs)["boneage"] - batch["boneage"]))}

    def host_readout(self, readout: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-example host arrays kept for scoring (here: the readout as it is)."""
        del batch
        return readout

    def score(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics in months (and accuracy for age classes) of a split's predictions."""
        from boneage_jax import metrics  # pylint: disable=import-outside-toplevel

        labelled = ~np.isnan(predictions["boneage"])
        if not labelled.any():
            return {"num_examples": int(len(labelled)), "labelled": False}
        true = predictions["boneage"][labelled]
        result = metrics.regression_metrics(predictions["pred_boneage"][labelled], true, self.stats.mean)
        if "pred_std" in predictions:
            result["mean_predicted_std"] = float(np.mean(predictions["pred_std"][labelled]))
        if "pred_class" in predictions:
            result["accuracy"] = float(np.mean(predictions["pred_class"][labelled] == self.true_classes(true)))
        return result

    def summary(self, result: dict) -> str:
        if "mae" not in result:
            return f"{result['num_examples']} images (unlabelled)"
        return (f"mae {result['mae']:.2f}  rmse {result['rmse']:.2f}  r2 {result['r2']:.3f}  "
                f"(baseline mae {result['baseline_mae']:.2f})")

    def results_table(self, results: dict[str, dict]) -> str:
        """Each split's MAE beside the predict-the-training-mean baseline."""
        lines = [f"{'split':<12}{'images':>8}{'MAE (months)':>15}{'baseline MAE':>15}{'RMSE':>9}{'R2':>8}"]
        for name, r in results.items():
            if "mae" not in r:
                lines.append(f"{name:<12}{r['num_examples']:>8}   (unlabelled)")
                continue
            lines.append(f"{name:<12}{r['num_examples']:>8}{r['mae']:>15.2f}{r['baseline_mae']:>15.2f}"
                         f"{r['rmse']:>9.2f}{r['r2']:>8.3f}")
        return "\n".join(lines)

    def write_artefacts(self, workdir: str, split: str, predictions: dict[str, np.ndarray]) -> None:
        """Nothing beyond ``results.json`` (``boneage_jax.evaluate`` writes per-image predictions)."""
        del workdir, split, predictions


def jaccard(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image Jaccard index (IoU) of boolean masks (B, H, W); 1 where both are empty."""
    axes = tuple(range(1, predicted.ndim))
    intersection = np.logical_and(predicted, true).sum(axes)
    union = np.logical_or(predicted, true).sum(axes)
    return np.where(union > 0, intersection / np.maximum(union, 1), 1.0).astype(np.float32)


class Segmentation:
    """Hand segmentation (U-Net): one logit per pixel against the mask in ``batch["mask"]``.

    Loss: binary cross-entropy plus soft Dice loss (1 - Dice), averaged over the batch. Scored by
    the Jaccard index (IoU) per image: of the raw thresholded output (``jaccard``) and after the
    post-processing that keeps the hand-sized component and drops spots (``jaccard_post``,
    ``boneage_jax.ops.hand.keep_hand``).
    """

    task = "segmentation"
    monitor = "jaccard"
    higher_is_better = True
    predicts_bone_age = False
    num_outputs = 1

    def __init__(self, stats: LabelStats):
        self.stats = stats

    def batch_loss(self, logits: jax.Array, batch: dict) -> jax.Array:
        target = batch["mask"]
        logits = logits.astype(jnp.float32)
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target), axis=(1, 2, 3))
        p = jax.nn.sigmoid(logits)
        dice = (2 * jnp.sum(p * target, axis=(1, 2, 3)) + 1.0) / (jnp.sum(p + target, axis=(1, 2, 3)) + 1.0)
        return jnp.mean(bce + 1.0 - dice)

    def step_metrics(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        predicted, true = logits[..., 0] > 0, batch["mask"][..., 0] > 0.5
        intersection = jnp.sum(predicted & true, axis=(1, 2))
        union = jnp.sum(predicted | true, axis=(1, 2))
        return {"jaccard": jnp.mean(jnp.where(union > 0, intersection / jnp.maximum(union, 1), 1.0))}

    def predict(self, logits: jax.Array) -> dict[str, jax.Array]:
        return {"mask": logits[..., 0] > 0}

    def host_readout(self, readout: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Turns each batch's predicted masks into per-image Jaccard (raw and post-processed),
        so that a split's masks never pile up in memory."""
        from boneage_jax.ops import hand  # pylint: disable=import-outside-toplevel

        predicted = np.asarray(readout.pop("pred_mask"), bool)
        true = np.asarray(batch["mask"])[..., 0] > 0.5
        post = np.stack([hand.keep_hand(m.astype(np.uint8) * 255) > 0 for m in predicted])
        return {**readout, "pred_jaccard": jaccard(predicted, true), "pred_jaccard_post": jaccard(post, true)}

    def score(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        raw, post = predictions["pred_jaccard"], predictions["pred_jaccard_post"]
        return {"num_examples": int(len(raw)), "jaccard": float(raw.mean()), "jaccard_median": float(np.median(raw)),
                "jaccard_min": float(raw.min()), "jaccard_post": float(post.mean()),
                "jaccard_post_min": float(post.min())}

    def summary(self, result: dict) -> str:
        return (f"jaccard {result['jaccard']:.4f}  (post-processed {result['jaccard_post']:.4f}, "
                f"min {result['jaccard_min']:.3f})")

    def results_table(self, results: dict[str, dict]) -> str:
        lines = [f"{'split':<12}{'images':>8}{'Jaccard':>10}{'post-processed':>16}{'min':>8}"]
        lines += [f"{name:<12}{r['num_examples']:>8}{r['jaccard']:>10.4f}{r['jaccard_post']:>16.4f}"
                  f"{r['jaccard_min']:>8.3f}" for name, r in results.items()]
        return "\n".join(lines)

    def write_artefacts(self, workdir: str, split: str, predictions: dict[str, np.ndarray]) -> None:
        """``jaccard_<split>.csv``: id, jaccard, jaccard_post per image."""
        from boneage_jax import io  # pylint: disable=import-outside-toplevel

        io.write_csv(os.path.join(workdir, f"jaccard_{split}.csv"), ["id", "jaccard", "jaccard_post"],
                     zip(predictions["id"].tolist(), predictions["pred_jaccard"].tolist(),
                         predictions["pred_jaccard_post"].tolist()))


def make_objective(config: ml_collections.ConfigDict, stats: LabelStats) -> Task:
    """The objective of ``config.task``: bone age (``config.model.head``) or segmentation."""
    task = config.task
    if task == "boneage":
        return Objective(config.model.head, stats, config.loss)
    if task == "segmentation":
        if not config.data.mask_in_batch:
            raise ValueError("config.task='segmentation' needs config.data.mask_in_batch=True (masks in the batches)")
        return Segmentation(stats)
    raise ValueError(f"config.task {task!r}; expected one of {TASKS}")
