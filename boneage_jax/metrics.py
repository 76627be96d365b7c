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

Uncertainty of the scores: ``bootstrap_intervals`` (percentile bootstrap confidence intervals of
MAE, RMSE and CCC over the images; 2,000 resamples, seed 0) and ``paired_bootstrap_mae`` (the
MAE difference of two predictions of the same images, with its interval).

Uncertainty per image: ``normal_interval`` (the central interval of a normal prediction with a
standard deviation), ``interval_coverage`` and ``calibration`` (observed coverage and mean width
of such intervals at nominal levels: the reliability curve), ``coverage_sampling_band`` (the
coverage a calibrated model shows by chance with n images).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

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


# ----------------------------------------------------------------------------- bootstrap confidence intervals

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
_RESAMPLED_VALUES_AT_ONCE = 1 << 21  # per array: a chunk of resamples stays under ~16 MiB of float64


def bootstrap_indices(num_examples: int, num_resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> Iterator[np.ndarray]:
    """Indices of ``num_resamples`` resamples with replacement of ``num_examples`` examples, in
    chunks of rows (one row per resample) small enough to hold a few float copies of."""
    if num_examples < 1 or num_resamples < 1:
        raise ValueError(f"bootstrap of {num_examples} examples with {num_resamples} resamples")
    rng = np.random.default_rng(seed)
    rows = max(1, _RESAMPLED_VALUES_AT_ONCE // num_examples)
    for start in range(0, num_resamples, rows):
        yield rng.integers(0, num_examples, size=(min(rows, num_resamples - start), num_examples))


def resampled_regression(pred: np.ndarray, true: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
    """MAE, RMSE and CCC (as :func:`mae`, :func:`rmse`, :func:`ccc`) of each resample, a row of
    ``index`` (R, N); each value has shape (R,)."""
    p, t = pred[index], true[index]
    error = p - t
    mp, mt = p.mean(axis=1), t.mean(axis=1)
    covariance = np.mean((p - mp[:, None]) * (t - mt[:, None]), axis=1)
    denominator = p.var(axis=1) + t.var(axis=1) + (mp - mt) ** 2
    safe = np.where(denominator > 0, denominator, 1.0)
    return {
        "mae": np.abs(error).mean(axis=1),
        "rmse": np.sqrt(np.mean(error**2, axis=1)),
        "ccc": np.where(denominator > 0, 2.0 * covariance / safe, np.nan),
    }


def percentile_interval(values: np.ndarray, level: float = BOOTSTRAP_LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap values (NaN values, such as the CCC of a
    resample whose predictions and labels are all equal, are left out; all NaN -> NaN)."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def bootstrap_settings(num_examples: int, *, level: float = BOOTSTRAP_LEVEL, num_resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> dict:
    """How a bootstrap interval was made (the keys every bootstrap result starts with)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level {level} must be in (0, 1)")
    return {"method": "percentile bootstrap over images", "level": level, "num_resamples": num_resamples,
            "seed": seed, "num_examples": num_examples}


def bootstrap_intervals(pred, true, *, level: float = BOOTSTRAP_LEVEL, num_resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> dict:
    """Percentile bootstrap confidence intervals of MAE, RMSE and CCC over the examples.

    Resamples the (prediction, label) pairs with replacement ``num_resamples`` times (fixed
    ``seed``: the same inputs give the same interval) and takes the central ``level`` quantiles
    of each metric. Returns the settings and ``{"mae"|"rmse"|"ccc": {"estimate", "low", "high"}}``,
    the estimate being the metric of all examples."""
    pred, true = _pair(pred, true)
    result = bootstrap_settings(len(true), level=level, num_resamples=num_resamples, seed=seed)
    draws: dict[str, list[np.ndarray]] = {"mae": [], "rmse": [], "ccc": []}
    for index in bootstrap_indices(len(true), num_resamples, seed):
        for name, values in resampled_regression(pred, true, index).items():
            draws[name].append(values)
    estimates = {"mae": mae(pred, true), "rmse": rmse(pred, true), "ccc": ccc(pred, true)}
    for name, values in draws.items():
        low, high = percentile_interval(np.concatenate(values), level)
        result[name] = {"estimate": estimates[name], "low": low, "high": high}
    return result


def paired_bootstrap_mae(pred_a, pred_b, true, *, level: float = BOOTSTRAP_LEVEL,
                         num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """MAE(a) - MAE(b) of two sets of predictions of the same images, with its percentile
    bootstrap interval: each resample draws images, and both predictions of a drawn image go
    together, so what the two share (hard images) cancels. Negative: ``a`` is better.

    Returns the settings and ``mae_a``, ``mae_b``, ``difference``, ``low``, ``high``."""
    pred_a, true = _pair(pred_a, true)
    pred_b, _ = _pair(pred_b, true)
    gap = np.abs(pred_a - true) - np.abs(pred_b - true)  # MAE(a) - MAE(b) is its mean
    result = bootstrap_settings(len(true), level=level, num_resamples=num_resamples, seed=seed)
    differences = np.concatenate([gap[index].mean(axis=1)
                                  for index in bootstrap_indices(len(true), num_resamples, seed)])
    low, high = percentile_interval(differences, level)
    return {**result, "mae_a": mae(pred_a, true), "mae_b": mae(pred_b, true), "difference": float(gap.mean()),
            "low": low, "high": high}


# ----------------------------------------------------------------------------- prediction intervals and calibration

INTERVAL_LEVELS = (0.68, 0.95)  # the per-image intervals written beside each prediction
RELIABILITY_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the reliability curve


def level_name(level: float) -> str:
    """0.68 -> "68" (the suffix of the interval columns and calibration keys)."""
    return f"{100.0 * level:g}"


def normal_interval(mean, std, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The central ``level`` interval of N(mean, std^2): mean -+ z std, z the (1 + level) / 2
    quantile of the standard normal (1.96 for 0.95, 0.994 for 0.68)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level {level} must be in (0, 1)")
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if np.any(std < 0):
        raise ValueError("standard deviations must not be negative")
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2.0)
    return mean - z * std, mean + z * std


def interval_coverage(true, low, high) -> float:
    """Fraction of the labels inside their closed interval [low, high]."""
    true, low, high = (np.asarray(a, np.float64) for a in (true, low, high))
    if not true.shape == low.shape == high.shape or len(true) == 0:
        raise ValueError(f"labels {true.shape} and interval ends {low.shape}, {high.shape} must be equal, "
                         "non-empty shapes")
    return float(np.mean((true >= low) & (true <= high)))


def calibration(pred, std, true, levels=RELIABILITY_LEVELS, headline=INTERVAL_LEVELS) -> dict:
    """How often per-image normal intervals (``normal_interval`` of ``pred``, ``std``) hold the truth.

    For each nominal level in ``levels`` (the reliability curve) and ``headline``: the observed
    coverage and the mean interval width in months. A calibrated model covers about the nominal
    fraction; lower coverage means over-confident intervals. Returns ``num_examples``,
    ``levels``, ``coverage``, ``mean_width`` (lists, one per level) and
    ``coverage_<L>`` / ``mean_width_<L>`` for each headline level (``coverage_68``, ...)."""
    pred, true = _pair(pred, true)
    std = np.asarray(std, np.float64)
    if std.shape != true.shape:
        raise ValueError(f"standard deviations {std.shape} and labels {true.shape} must have equal shapes")

    def at(level: float) -> tuple[float, float]:
        low, high = normal_interval(pred, std, level)
        return interval_coverage(true, low, high), float(np.mean(high - low))

    curve = [at(level) for level in levels]
    result = {"num_examples": int(len(true)), "levels": [float(level) for level in levels],
              "coverage": [c for c, _ in curve], "mean_width": [w for _, w in curve]}
    for level in headline:
        coverage, width = at(level)
        result[f"coverage_{level_name(level)}"] = coverage
        result[f"mean_width_{level_name(level)}"] = width
    return result


def coverage_sampling_band(levels, num_examples: int, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Where the observed coverage of a *calibrated* model falls for ``num_examples`` images
    (normal approximation of the binomial, +-``z`` standard errors, clipped to [0, 1]): how far
    from the diagonal a reliability curve may wander by chance alone."""
    levels = np.asarray(levels, np.float64)
    half = z * np.sqrt(levels * (1.0 - levels) / max(num_examples, 1))
    return np.clip(levels - half, 0.0, 1.0), np.clip(levels + half, 0.0, 1.0)
