"""Regression metrics in months."""

from __future__ import annotations

import numpy as np


def regression_metrics(pred: np.ndarray, true: np.ndarray, baseline: float) -> dict[str, float]:
    """MAE, RMSE and R2 of predictions, beside the MAE of always predicting ``baseline``.

    ``baseline`` is the training mean, so ``baseline_mae`` is what a model that ignores the
    image scores.
    """
    pred = np.asarray(pred, np.float64)
    true = np.asarray(true, np.float64)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"predictions {pred.shape} and labels {true.shape} must be equal 1-d shapes")
    if len(true) == 0:
        raise ValueError("no labelled examples to score")
    error = pred - true
    total = np.sum((true - true.mean()) ** 2)
    return {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "r2": float(1.0 - np.sum(error**2) / total) if total > 0 else float("nan"),
        "num_examples": int(len(true)),
        "baseline_mae": float(np.mean(np.abs(true - baseline))),
    }
