"""Every evaluation metric against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from boneage_jax import metrics

# errors e = pred - true = [1, 3, -2, 6]: mean 2, |e| sum 12, e^2 sum 50.
PRED = np.array([10.0, 20.0, 30.0, 50.0])
TRUE = np.array([9.0, 17.0, 32.0, 44.0])  # mean 25.5, deviations -16.5 -8.5 6.5 18.5, SST 729


def test_regression_metrics_by_hand():
    m = metrics.regression_metrics(PRED, TRUE, baseline=25.0)
    assert m["num_examples"] == 4
    assert m["mae"] == pytest.approx(3.0)
    assert m["mse"] == pytest.approx(12.5)
    assert m["rmse"] == pytest.approx(math.sqrt(12.5))
    assert m["r2"] == pytest.approx(1 - 50 / 729)
    assert m["baseline_mae"] == pytest.approx((16 + 8 + 7 + 19) / 4)
    assert m["mean_error"] == pytest.approx(2.0)
    assert m["sd_error"] == pytest.approx(math.sqrt(12.5 - 4.0))


def test_mad_in_both_senses():
    # Mean absolute difference = MAE (Lee et al., Deeplasia).
    assert metrics.mad_difference(PRED, TRUE) == pytest.approx(3.0)
    assert metrics.mad_difference(PRED, TRUE) == metrics.mae(PRED, TRUE)
    # Mean absolute deviation of the errors about their mean 2: |[-1, 1, -4, 4]| -> 10 / 4.
    assert metrics.mad_deviation(PRED, TRUE) == pytest.approx(2.5)
    # A constant bias has no deviation.
    assert metrics.mad_deviation(TRUE + 7.0, TRUE) == pytest.approx(0.0)
    assert metrics.mad_difference(TRUE + 7.0, TRUE) == pytest.approx(7.0)


def test_lins_ccc_by_hand():
    # pred mean 27.5, deviations -17.5 -7.5 2.5 22.5: var 875/4; true var 729/4;
    # cov (288.75 + 63.75 + 16.25 + 416.25) / 4 = 785/4; (27.5 - 25.5)^2 = 4.
    expected = 2 * (785 / 4) / (875 / 4 + 729 / 4 + 4)
    assert metrics.ccc(PRED, TRUE) == pytest.approx(expected)
    assert expected == pytest.approx(157 / 162)
    assert metrics.ccc(TRUE, TRUE) == pytest.approx(1.0)
    # Perfect correlation but a shift: CCC < 1 where Pearson would be 1.
    assert metrics.ccc(TRUE + 10.0, TRUE) == pytest.approx(2 * 182.25 / (2 * 182.25 + 100))
    assert math.isnan(metrics.ccc([1.0, 1.0], [1.0, 1.0]))


def test_r2_and_shape_errors():
    assert math.isnan(metrics.r2([1.0, 2.0], [3.0, 3.0]))
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        metrics.mae([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no labelled"):
        metrics.mae([], [])


def test_accuracy_and_confusion_matrix():
    true = [0, 0, 1, 2, 2, 2]
    pred = [0, 1, 1, 2, 0, 2]
    assert metrics.accuracy(pred, true) == pytest.approx(4 / 6)
    np.testing.assert_array_equal(metrics.confusion_matrix(true, pred, 3), [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metrics.confusion_matrix([0, 3], [0, 1], 3)


def test_age_bands():
    ages = [0, 23.9, 24, 71, 72, 119.99, 120, 167, 168, 228, 229, -1]
    np.testing.assert_array_equal(metrics.age_band_index(ages), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, -1, -1])
    assert [b[0] for b in metrics.AGE_BANDS] == ["0-2y", "2-6y", "6-10y", "10-14y", "14-19y"]


def test_breakdown_by_sex_and_band():
    true = np.array([12.0, 30.0, 100.0, 150.0])
    pred = np.array([14.0, 27.0, 100.0, 160.0])  # errors 2, -3, 0, 10
    male = np.array([1, 0, 1, 0])
    result = metrics.breakdown(pred, true, male, baseline=100.0)
    assert result["sex"]["male"]["num_examples"] == 2
    assert result["sex"]["male"]["mae"] == pytest.approx(1.0)
    assert result["sex"]["female"]["mae"] == pytest.approx(6.5)
    assert result["sex"]["female"]["mean_error"] == pytest.approx(3.5)
    assert result["sex"]["female"]["baseline_mae"] == pytest.approx((70 + 50) / 2)
    bands = result["age_band"]
    assert list(bands) == ["0-2y", "2-6y", "6-10y", "10-14y", "14-19y"]
    assert [bands[b]["num_examples"] for b in bands] == [1, 1, 1, 1, 0]
    assert bands["0-2y"]["mae"] == pytest.approx(2.0)
    assert bands["2-6y"]["mae"] == pytest.approx(3.0)
    assert bands["6-10y"]["mae"] == pytest.approx(0.0)
    assert bands["10-14y"]["rmse"] == pytest.approx(10.0)
    assert bands["14-19y"] == {"num_examples": 0}
    assert "baseline_mae" not in metrics.breakdown(pred, true, male)["sex"]["male"]


def test_linear_bias_correction():
    # Exact line true = 2 pred + 3.
    fit = metrics.fit_linear_correction([1.0, 2.0, 3.0], [5.0, 7.0, 9.0])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(3.0)
    np.testing.assert_allclose(metrics.apply_linear_correction([10.0, 0.0], fit), [23.0, 3.0])
    # Least squares: pred [0, 1, 2], true [0, 2, 1]: slope cov/var = (1/3)/(2/3) = 0.5, intercept 1 - 0.5.
    fit = metrics.fit_linear_correction([0.0, 1.0, 2.0], [0.0, 2.0, 1.0])
    assert fit["slope"] == pytest.approx(0.5) and fit["intercept"] == pytest.approx(0.5)
    # Constant predictions: only the offset.
    fit = metrics.fit_linear_correction([5.0, 5.0], [6.0, 8.0])
    assert fit == {"slope": 1.0, "intercept": 2.0}
    # Fitted on validation, applied to test: it removes a linear distortion of the test predictions.
    rng = np.random.default_rng(0)
    val_true, test_true = rng.uniform(0, 228, 200), rng.uniform(0, 228, 100)
    distort = lambda t: 0.7 * t + 30.0  # regression towards the mean  # noqa: E731
    fit = metrics.fit_linear_correction(distort(val_true), val_true)
    corrected = metrics.apply_linear_correction(distort(test_true), fit)
    np.testing.assert_allclose(corrected, test_true, atol=1e-9)


# ----------------------------------------------------------------------------- bootstrap confidence intervals


def test_bootstrap_of_a_constant_error_is_degenerate():
    true = np.linspace(0.0, 228.0, 50)
    ci = metrics.bootstrap_intervals(true + 3.0, true)
    assert ci["level"] == 0.95 and ci["num_resamples"] == 2000 and ci["seed"] == 0 and ci["num_examples"] == 50
    for name in ("mae", "rmse"):
        assert ci[name]["estimate"] == pytest.approx(3.0)
        assert ci[name]["low"] == pytest.approx(3.0) and ci[name]["high"] == pytest.approx(3.0)
    # CCC still varies with the resampled ages, around its estimate.
    assert ci["ccc"]["low"] < ci["ccc"]["estimate"] < ci["ccc"]["high"]
    assert ci["ccc"]["estimate"] == pytest.approx(metrics.ccc(true + 3.0, true))


def test_bootstrap_is_reproducible_and_matches_the_standard_error():
    rng = np.random.default_rng(1)
    true = rng.uniform(0.0, 228.0, 1425)
    pred = true + rng.normal(0.0, 10.0, 1425)
    ci = metrics.bootstrap_intervals(pred, true)
    assert ci == metrics.bootstrap_intervals(pred, true)
    assert ci != metrics.bootstrap_intervals(pred, true, seed=1)
    # The percentile interval of a mean is close to mean -+ 1.96 standard errors.
    error = np.abs(pred - true)
    half = 1.96 * error.std() / np.sqrt(len(error))
    assert ci["mae"]["estimate"] == pytest.approx(error.mean())
    assert ci["mae"]["low"] == pytest.approx(error.mean() - half, abs=0.1 * half)
    assert ci["mae"]["high"] == pytest.approx(error.mean() + half, abs=0.1 * half)
    narrow = metrics.bootstrap_intervals(pred, true, level=0.5)
    assert ci["rmse"]["low"] < narrow["rmse"]["low"] < narrow["rmse"]["high"] < ci["rmse"]["high"]


def test_bootstrap_interval_covers_the_population_mae_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    population_mae = np.sqrt(2.0 / np.pi)  # E|Z| for standard normal errors
    hits = 0
    trials = 200
    for trial in range(trials):
        error = rng.normal(size=100)
        ci = metrics.bootstrap_intervals(error, np.zeros(100), num_resamples=500, seed=trial)
        hits += ci["mae"]["low"] <= population_mae <= ci["mae"]["high"]
    assert 0.89 <= hits / trials <= 0.99  # binomial noise of 200 trials: +-0.03 at 2 SD


def test_bootstrap_chunks_and_nan_resamples():
    chunks = list(metrics.bootstrap_indices(3_000_000, num_resamples=5, seed=0))
    assert [c.shape for c in chunks] == [(1, 3_000_000)] * 5  # one resample of a huge split at a time
    assert sum(len(c) for c in metrics.bootstrap_indices(10, num_resamples=7)) == 7
    with pytest.raises(ValueError):
        next(metrics.bootstrap_indices(0))
    # Two equal images: every resample has no variance, so CCC is NaN and so is its interval.
    ci = metrics.bootstrap_intervals([5.0, 5.0], [5.0, 5.0])
    assert math.isnan(ci["ccc"]["low"]) and ci["mae"]["high"] == 0.0
    assert metrics.percentile_interval(np.array([np.nan, 1.0, 3.0]), level=0.5) == (1.5, 2.5)


def test_paired_bootstrap_mae_difference():
    rng = np.random.default_rng(3)
    true = rng.uniform(0.0, 228.0, 300)
    worse = true + 2.0 + rng.uniform(0.0, 5.0, 300)  # errors 2..7
    better = worse - 1.0  # every error 1 month smaller
    d = metrics.paired_bootstrap_mae(better, worse, true)
    assert d["difference"] == pytest.approx(-1.0)
    assert d["low"] == pytest.approx(-1.0) and d["high"] == pytest.approx(-1.0)  # the images cancel
    assert d["mae_a"] == pytest.approx(d["mae_b"] - 1.0)
    same = metrics.paired_bootstrap_mae(worse, worse, true)
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    # Two models equally good on average: the interval holds 0.
    a, b = true + rng.normal(0, 8, 300), true + rng.normal(0, 8, 300)
    d = metrics.paired_bootstrap_mae(a, b, true)
    assert d["low"] < d["difference"] < d["high"] and d["high"] - d["low"] < 3.0


# ----------------------------------------------------------------------------- prediction intervals and calibration


def test_normal_interval_and_coverage():
    low, high = metrics.normal_interval([10.0, 20.0], [1.0, 2.0], 0.95)
    np.testing.assert_allclose(low, [10.0 - 1.959964, 20.0 - 2 * 1.959964], rtol=1e-6)
    np.testing.assert_allclose(high, [10.0 + 1.959964, 20.0 + 2 * 1.959964], rtol=1e-6)
    low, high = metrics.normal_interval([0.0], [1.0], 0.68)
    assert high[0] == pytest.approx(0.994458, rel=1e-5)
    assert metrics.interval_coverage([1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 3.5, 0.0], [2.0, 1.0, 4.0, 4.0]) == 0.5
    assert [metrics.level_name(v) for v in (0.68, 0.95, 0.1)] == ["68", "95", "10"]
    with pytest.raises(ValueError, match="negative"):
        metrics.normal_interval([0.0], [-1.0], 0.5)
    with pytest.raises(ValueError, match="level"):
        metrics.normal_interval([0.0], [1.0], 1.0)


def test_intervals_from_the_true_gaussian_are_calibrated():
    rng = np.random.default_rng(4)
    n = 20000
    mean = rng.uniform(0.0, 228.0, n)
    std = rng.uniform(3.0, 15.0, n)  # each image its own uncertainty
    true = mean + std * rng.normal(size=n)
    c = metrics.calibration(mean, std, true)
    assert c["num_examples"] == n and c["levels"] == list(metrics.RELIABILITY_LEVELS)
    np.testing.assert_allclose(c["coverage"], c["levels"], atol=0.015)  # 3.4 binomial SD at 50%
    assert c["coverage_68"] == pytest.approx(0.68, abs=0.015) and c["coverage_95"] == pytest.approx(0.95, abs=0.01)
    assert c["mean_width_95"] == pytest.approx(2 * 1.959964 * std.mean(), rel=1e-6)
    assert np.all(np.diff(c["mean_width"]) > 0)


def test_overconfident_intervals_cover_too_little():
    rng = np.random.default_rng(5)
    n = 5000
    mean, std = rng.uniform(0.0, 228.0, n), np.full(n, 10.0)
    true = mean + std * rng.normal(size=n)
    c = metrics.calibration(mean, std / 3.0, true)  # claims a third of the real spread
    # The 68% interval -+0.994 * 10/3 holds P(|Z| < 0.331) = 0.260 of a N(0, 10^2) error; the 95%
    # interval -+1.960 * 10/3 holds P(|Z| < 0.653) = 0.486 (binomial SD with 5000 images: 0.007).
    assert c["coverage_68"] == pytest.approx(0.260, abs=0.02)
    assert c["coverage_95"] == pytest.approx(0.486, abs=0.02)
    assert all(observed < nominal - 0.05 for observed, nominal in zip(c["coverage"], c["levels"]))
    zero = metrics.calibration(mean, np.zeros(n), true)  # a point "interval" holds nothing
    assert zero["coverage_95"] == 0.0 and zero["mean_width_95"] == 0.0


def test_coverage_sampling_band():
    low, high = metrics.coverage_sampling_band([0.5, 0.95], 100)
    np.testing.assert_allclose(low, [0.5 - 0.098, 0.95 - 1.96 * np.sqrt(0.95 * 0.05 / 100)], rtol=1e-6)
    np.testing.assert_allclose(high, [0.598, min(1.0, 0.95 + 1.96 * np.sqrt(0.95 * 0.05 / 100))], rtol=1e-6)
    low, high = metrics.coverage_sampling_band([0.0, 1.0], 10)
    np.testing.assert_array_equal(low, [0.0, 1.0]) and np.testing.assert_array_equal(high, [0.0, 1.0])
