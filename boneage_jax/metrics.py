"""Evaluation metrics in months, in plain numpy.

Regression (bone age in months): ``mae``, ``mse``, ``rmse``, ``r2`` (coefficient of
determination, 1 - SSE / SST), ``ccc`` (Lin's concordance correlation coefficient), and the two
quantities the literature calls "MAD":

- ``mad_difference``: the mean absolute *difference* between prediction and truth, i.e. the
  MAE (Lee et al. 2017 and Deeplasia report it under this name);
- ``mad_deviation``: the mean absolute *deviation* of the errors about their mean,
  ``mean(|e - mean(e)|)`` with ``e = pred - true``: the spread of the errors once a constant
  bias is removed.

``mean_error`` is the bias (mean of pred - true; Bland-Altman's centre line) and
``sd_error`` its population standard deviation.

Classification heads: ``accuracy`` and ``confusion_matrix`` (rows true class, columns predicted).

``breakdown`` repeats the regression metrics per sex and per age band (``AGE_BANDS``: 0-2, 2-6,
6-10, 10-14 and 14-19 years); ``fit_linear_correction`` / ``apply_linear_correction`` fit
``true ~ slope * pred + intercept`` by least squares (on validation) and apply it (to test).
"""

from __future__ import annotations

import numpy as np

# Age bands in months: [low, high), the last one closed at 228 months (19 years, RSNA's maximum).
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("0-2y", 0.0, 24.0),
    ("2-6y", 24.0, 72.0),
    ("6-10y", 72.0, 120.0),
    ("10-14y", 120.0, 168.0),
    ("14-19y", 168.0, 228.0),
)


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, np.float64)
    true = np.asarray(true, np.float64)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"predictions {pred.shape} and labels {true.shape} must be equal 1-d shapes")
    if len(true) == 0:
        raise ValueError("no labelled examples to score")
    return pred, true


def mae(pred, true) -> float:
    pred, true = _pair(pred, true)
    return float(np.mean(np.abs(pred - true)))


def mse(pred, true) -> float:
    pred, true = _pair(pred, true)
    return float(np.mean((pred - true) ** 2))


def rmse(pred, true) -> float:
    return float(np.sqrt(mse(pred, true)))


def r2(pred, true) -> float:
    """1 - SSE / SST; NaN when the labels are all equal (SST = 0)."""
    pred, true = _pair(pred, true)
    total = np.sum((true - true.mean()) ** 2)
    return float(1.0 - np.sum((pred - true) ** 2) / total) if total > 0 else float("nan")


def mad_difference(pred, true) -> float:
    """Mean absolute difference between prediction and truth (= MAE; Lee et al., Deeplasia)."""
    return mae(pred, true)


def mad_deviation(pred, true) -> float:
    """Mean absolute deviation of the errors about their mean: ``mean(|e - mean(e)|)``."""
    pred, true = _pair(pred, true)
    error = pred - true
    return float(np.mean(np.abs(error - error.mean())))


def ccc(pred, true) -> float:
    """Lin's concordance correlation coefficient with population (1/n) moments:
    ``2 cov(p, t) / (var(p) + var(t) + (mean(p) - mean(t))^2)``; NaN when the denominator is 0."""
    pred, true = _pair(pred, true)
    mp, mt = pred.mean(), true.mean()
    covariance = np.mean((pred - mp) * (true - mt))
    denominator = pred.var() + true.var() + (mp - mt) ** 2
    return float(2.0 * covariance / denominator) if denominator > 0 else float("nan")


def mean_error(pred, true) -> float:
    """Bias: mean of pred - true (positive when the model over-estimates)."""
    pred, true = _pair(pred, true)
    return float(np.mean(pred - true))


def regression_metrics(pred: np.ndarray, true: np.ndarray, baseline: float) -> dict[str, float]:
    """Every regression metric of predictions, beside the MAE of always predicting ``baseline``.

    ``baseline`` is the training mean, so ``baseline_mae`` is what a model that ignores the
    image scores. Keys: mae, rmse, r2, num_examples, baseline_mae (``results.json``'s schema)
    and mse, mad_difference, mad_deviation, ccc, mean_error, sd_error.
    """
    pred, true = _pair(pred, true)
    error = pred - true
    return {
        "mae": mae(pred, true),
        "rmse": rmse(pred, true),
        "r2": r2(pred, true),
        "num_examples": int(len(true)),
        "baseline_mae": float(np.mean(np.abs(true - baseline))),
        "mse": mse(pred, true),
        "mad_difference": mad_difference(pred, true),
        "mad_deviation": mad_deviation(pred, true),
        "ccc": ccc(pred, true),
        "mean_error": float(error.mean()),
        "sd_error": float(error.std()),
    }


# ----------------------------------------------------------------------------- classes


def accuracy(pred_class, true_class) -> float:
    pred_class, true_class = np.asarray(pred_class), np.asarray(true_class)
    if pred_class.shape != true_class.shape or len(true_class) == 0:
        raise ValueError(f"predicted classes {pred_class.shape} and true classes {true_class.shape} "
                         "must be equal, non-empty shapes")
    return float(np.mean(pred_class == true_class))


def confusion_matrix(true_class, pred_class, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int counts: row = true class, column = predicted class."""
    true_class = np.asarray(true_class, np.int64)
    pred_class = np.asarray(pred_class, np.int64)
    if true_class.shape != pred_class.shape:
        raise ValueError(f"true classes {true_class.shape} and predicted classes {pred_class.shape} differ")
    for name, values in (("true", true_class), ("predicted", pred_class)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} classes must be in [0, {num_classes})")
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (true_class, pred_class), 1)
    return matrix


# ----------------------------------------------------------------------------- groups


def age_band_index(ages, bands=AGE_BANDS) -> np.ndarray:
    """Index of each age's band (``[low, high)``, the last band closed); -1 outside every band."""
    ages = np.asarray(ages, np.float64)
    index = np.full(ages.shape, -1, np.int64)
    for i, (_, low, high) in enumerate(bands):
        inside = (ages >= low) & ((ages < high) | ((ages == high) & (i == len(bands) - 1)))
        index[inside & (index < 0)] = i
    return index


def group_metrics(pred, true, baseline: float | None = None) -> dict[str, float]:
    """``regression_metrics`` of a group, or ``{"num_examples": 0}`` when it is empty."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if len(true) == 0:
        return {"num_examples": 0}
    result = regression_metrics(pred, true, true.mean() if baseline is None else baseline)
    if baseline is None:
        result.pop("baseline_mae")
    return result


def breakdown(pred, true, male, baseline: float | None = None, bands=AGE_BANDS) -> dict[str, dict]:
    """The metrics per sex and per age band of the *true* age.

    Returns ``{"sex": {"male": {...}, "female": {...}}, "age_band": {"0-2y": {...}, ...}}``;
    each entry has ``regression_metrics``'s keys (``baseline_mae`` only when ``baseline`` is
    given) or just ``num_examples: 0``. Ages outside every band are left out of the bands.
    """
    pred, true = _pair(pred, true)
    male = np.asarray(male).astype(bool)
    if male.shape != true.shape:
        raise ValueError(f"sex {male.shape} and labels {true.shape} must have equal shapes")
    result = {"sex": {}, "age_band": {}}
    for name, keep in (("male", male), ("female", ~male)):
        result["sex"][name] = group_metrics(pred[keep], true[keep], baseline)
    index = age_band_index(true, bands)
    for i, (name, _, _) in enumerate(bands):
        keep = index == i
        result["age_band"][name] = group_metrics(pred[keep], true[keep], baseline)
    return result


# ----------------------------------------------------------------------------- bias correction


def fit_linear_correction(pred, true) -> dict[str, float]:
    """Least-squares ``true ~ slope * pred + intercept``; returns {"slope", "intercept"}.

    Regression to the mean makes a model over-estimate young and under-estimate old children;
    fitted on validation predictions, this line undoes the linear part of it. With constant
    predictions only the offset is fitted (slope 1)."""
    pred, true = _pair(pred, true)
    if len(true) < 2 or np.ptp(pred) == 0:
        return {"slope": 1.0, "intercept": float(np.mean(true - pred))}
    slope, intercept = np.polyfit(pred, true, 1)
    return {"slope": float(slope), "intercept": float(intercept)}


def apply_linear_correction(pred, correction: dict[str, float]) -> np.ndarray:
    return np.asarray(pred, np.float64) * correction["slope"] + correction["intercept"]
