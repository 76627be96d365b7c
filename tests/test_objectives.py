"""Heads' losses and readouts: regression, Gaussian, age classes."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from boneage_jax import objectives


def _model_config(head: str, num_classes: int = 3, class_edges=()):
    return ml_collections.ConfigDict({"head": head, "num_classes": num_classes, "class_edges": class_edges})


def test_equal_width_edges_match_pandas_cut():
    ages = np.array([1.0, 50.0, 100.0, 228.0])
    edges = objectives.equal_width_edges(ages, 3)
    # pandas.cut(ages, 3).categories: (0.773, 76.667], (76.667, 152.333], (152.333, 228.0]
    np.testing.assert_allclose(edges, [0.773, 76.6667, 152.3333, 228.0], atol=1e-3)
    np.testing.assert_array_equal(objectives.assign_classes(ages, edges), [0, 0, 1, 2])
    np.testing.assert_array_equal(objectives.assign_classes(np.array([edges[1], edges[1] + 0.01]), edges), [0, 1])


def test_regression_readout_undoes_the_zscore():
    stats = objectives.label_stats(_model_config("regression"), np.array([100.0, 140.0]))
    objective = objectives.Objective("regression", stats)
    assert objective.num_outputs == 1
    out = objective.predict(jnp.array([[1.0], [-1.0]]))
    np.testing.assert_allclose(out["boneage"], [140.0, 100.0])
    np.testing.assert_allclose(objective.loss(jnp.array([[1.0]]), jnp.array([140.0])), [0.0])


def test_gaussian_nll_and_uncertainty():
    stats = objectives.LabelStats(mean=120.0, std=40.0)
    objective = objectives.Objective("gaussian", stats)
    outputs = jnp.array([[0.5, np.log(0.25)]])
    out = objective.predict(outputs)
    np.testing.assert_allclose(out["boneage"], [140.0])
    np.testing.assert_allclose(out["std"], [20.0], rtol=1e-6)
    # NLL is lowest at the true value and grows with the error.
    near, far = objective.loss(outputs, jnp.array([140.0])), objective.loss(outputs, jnp.array([180.0]))
    assert float(far[0]) > float(near[0])
    expected = 0.5 * (np.log(0.25) + 0 + np.log(2 * np.pi))
    np.testing.assert_allclose(near, [expected], rtol=1e-5)


def test_classification_expected_age_and_cross_entropy():
    ages = np.array([10.0, 20.0, 100.0, 110.0, 200.0, 210.0])
    stats = objectives.label_stats(_model_config("classification", 3), ages)
    objective = objectives.Objective("classification", stats)
    assert objective.num_outputs == 3
    np.testing.assert_allclose(stats.class_means, [15.0, 105.0, 205.0])
    confident = jnp.array([[0.0, 20.0, 0.0]])
    out = objective.predict(confident)
    assert int(out["class"][0]) == 1 and abs(float(out["boneage"][0]) - 105.0) < 1e-3
    right, wrong = objective.loss(confident, jnp.array([100.0])), objective.loss(confident, jnp.array([200.0]))
    assert float(right[0]) < 1e-6 < float(wrong[0])
    np.testing.assert_array_equal(objective.true_classes(ages), [0, 0, 1, 1, 2, 2])


def test_given_class_edges_and_errors():
    stats = objectives.label_stats(_model_config("classification", class_edges=(0, 72, 144, 240)),
                                   np.array([10.0, 100.0, 200.0]))
    assert stats.class_edges == (0.0, 72.0, 144.0, 240.0)
    with pytest.raises(ValueError, match="class_edges"):
        objectives.label_stats(_model_config("classification", class_edges=(0, 50, 20)), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="config.model.head"):
        objectives.Objective("ordinal", stats)
    with pytest.raises(ValueError, match="config.loss"):
        objectives.Objective("regression", stats, loss="l3")
