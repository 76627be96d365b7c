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
