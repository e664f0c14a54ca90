"""The attribution metrics on hand-made attributions whose curves and AUCs are known."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import float64_keras, predict


@pytest.fixture(scope="module")
def ranked():
    """``f(x) = 4 x0 + 3 x1 + 2 x2 + x3`` at ``x = 1``: removing features in the order of their
    weight is the ideal deletion order."""
    import keras

    with float64_keras():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(np.array([[4.0], [3.0], [2.0], [1.0]]))
    x = np.ones((1, 4))
    good = np.array([[[4.0, 3.0, 2.0, 1.0]]])
    return model, x, good, good[..., ::-1].copy()


def test_deletion_and_insertion_curves_by_hand(ranked):
    import augnet

    model, x, good, bad = ranked
    d = augnet.deletion(model, x, good, steps=4)
    np.testing.assert_allclose(d.fractions, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(d.scores[0, 0], [10, 6, 3, 1, 0])
    # trapezoid: (10/2 + 6 + 3 + 1 + 0/2) / 4
    np.testing.assert_allclose(d.auc, [[3.75]])
    np.testing.assert_allclose(augnet.deletion(model, x, bad, steps=4).auc, [[6.25]])
    i = augnet.insertion(model, x, good, steps=4, baseline=0.0)
    np.testing.assert_allclose(i.scores[0, 0], [0, 4, 7, 9, 10])
    np.testing.assert_allclose(i.auc, [[6.25]])
    np.testing.assert_allclose(augnet.insertion(model, x, bad, steps=4, baseline=0.0).auc, [[3.75]])
    # Steps that do not divide the features: round(j * 4 / 3) = 0, 1, 3, 4 features removed.
    d3 = augnet.deletion(model, x, good, steps=3)
    np.testing.assert_allclose(d3.fractions, [0, 0.25, 0.75, 1])
    np.testing.assert_allclose(d3.scores[0, 0], [10, 6, 1, 0])
    np.testing.assert_allclose(d3.auc, [[0.25 * 8 + 0.5 * 3.5 + 0.25 * 0.5]])
    # A baseline other than zero: removed features become 0.5.
    half = augnet.deletion(model, x, good, steps=4, baseline=0.5)
    np.testing.assert_allclose(half.scores[0, 0], [10, 8, 6.5, 5.5, 5])


def test_pixels_are_removed_with_all_their_channels():
    import keras

    import augnet

    with float64_keras():
        model = keras.Sequential(
            [keras.Input((2, 2, 2)), keras.layers.Flatten(), keras.layers.Dense(1, use_bias=False)]
        )
    w = np.arange(1.0, 9.0)  # 8 weights; pixel (r, c) has channels 2(2r + c), 2(2r + c) + 1
    model.layers[-1].kernel.assign(w[:, None])
    x = np.ones((1, 2, 2, 2))
    attr = (x * w.reshape(2, 2, 2))[:, None]  # gradient x input, (1, 1, 2, 2, 2)
    d = augnet.deletion(model, x, attr, steps=4)
    # Pixels by summed attribution: (1,1): 7+8, (1,0): 5+6, (0,1): 3+4, (0,0): 1+2.
    np.testing.assert_allclose(d.scores[0, 0], [36, 21, 10, 3, 0])


def test_attribution_results_carry_their_outputs():
    import keras

    import augnet

    keras.utils.set_random_seed(1)
    with float64_keras():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    x = np.random.default_rng(0).normal(size=(3, 6))
    top = augnet.gradient_x_input(model, x, top_k=2)
    by_result = augnet.deletion(model, x, top, steps=6)
    by_array = augnet.deletion(model, x, top.attributions, outputs=top.indices, steps=6)
    np.testing.assert_array_equal(by_result.indices, top.indices)
    np.testing.assert_allclose(by_result.scores, by_array.scores)
    # Each curve follows its own output: step 0 is y_k(x), the last step y_k(baseline = 0).
    preds = predict(model, x)  # float64 computed in float64, as augnet does
    np.testing.assert_allclose(by_result.scores[..., 0], np.take_along_axis(preds, top.indices, 1))
    bias = model.layers[0].bias.numpy()
    np.testing.assert_allclose(by_result.scores[..., -1], bias[top.indices])
    with pytest.raises(ValueError, match=r"call for \(3, 4, 6\)"):
        augnet.deletion(model, x, top.attributions)  # 2 maps, but all 4 outputs by default
    with pytest.raises(ValueError, match="do not pass `outputs` too"):
        augnet.deletion(model, x, top, outputs=[0, 1])


def test_mufidelity_is_one_for_a_linear_models_gradient_x_input(ranked):
    import augnet

    model, x, good, bad = ranked
    assert augnet.mufidelity(model, x, good, grid=None, n_subsets=40)[0, 0] == pytest.approx(1.0)
    worse = augnet.mufidelity(model, x, bad, grid=None, n_subsets=40)[0, 0]
    assert worse < 0.9
    # By hand: Pearson correlation over the same subsets (seed 0, p = 0.2).
    rng = np.random.default_rng(0)
    subsets = rng.random((1, 40, 4)) < 0.2
    drops = subsets[0] @ np.array([4.0, 3, 2, 1])
    sums = subsets[0] @ bad[0, 0]
    assert worse == pytest.approx(np.corrcoef(drops, sums)[0, 1], abs=1e-12)


def test_mufidelity_grid_cells():
    from augnet._attribution.metrics import _cells

    cells = _cells((6, 4), 3).reshape(6, 4)
    # 3 cells along each axis: rows 0-1 / 2-3 / 4-5; columns 0-1 / 2 / 3 (4 * c // 4 * 3).
    assert cells.max() == 8
    np.testing.assert_array_equal(cells[:, 0], [0, 0, 3, 3, 6, 6])
    np.testing.assert_array_equal(cells[0], [0, 0, 1, 2])
    np.testing.assert_array_equal(_cells((5,), None), np.arange(5))


def test_rank_correlation():
    from augnet._attribution.metrics import rankdata, spearman

    a = np.array([[3.0, 1.0, 2.0, 2.0]])
    np.testing.assert_allclose(rankdata(a), [[4, 1, 2.5, 2.5]])
    np.testing.assert_allclose(spearman(a, a), [1.0])
    np.testing.assert_allclose(spearman(a, -a), [-1.0])
    assert np.isnan(spearman(a, np.zeros_like(a))[0])  # a constant map has no ranking
    stats = pytest.importorskip("scipy.stats")
    b = np.random.default_rng(0).integers(0, 5, size=(3, 30)).astype(float)
    c = np.random.default_rng(1).normal(size=(3, 30))
    np.testing.assert_allclose(rankdata(b), np.stack([stats.rankdata(r) for r in b]))
    np.testing.assert_allclose(
        spearman(b, c), [stats.spearmanr(r, s).statistic for r, s in zip(b, c)], rtol=1e-12
    )


def test_evaluate_attributions_table(ranked):
    import augnet

    model, x, good, bad = ranked
    table = augnet.evaluate_attributions(
        model, x, {"good": good, "bad": bad}, steps=4, metrics=["deletion", "insertion"]
    )
    assert [row["method"] for row in table] == ["good", "bad"]
    assert table["good"]["deletion"] == pytest.approx(3.75)
    assert table["bad"]["deletion"] == pytest.approx(6.25)
    text = str(table)
    assert "deletion AUC ↓" in text and "insertion AUC ↑" in text and "good" in text
    assert table.details["good"]["deletion"].shape == (1, 1)


def test_evaluate_attributions_runs_methods(ranked):
    import augnet

    model, x, _, _ = ranked
    table = augnet.evaluate_attributions(
        model, x, methods={"gradient_x_input": {}, "smoothgrad": {"n_samples": 4}}, steps=4
    )
    row = table["gradient_x_input"]
    assert row["deletion"] == pytest.approx(3.75) and row["mufidelity"] == pytest.approx(1.0)
    assert row["randomization"] is not None and row["seconds"] >= 0
    assert set(table.details["smoothgrad"]) == {
        "deletion",
        "insertion",
        "mufidelity",
        "randomization",
    }
    with pytest.raises(ValueError, match="Pass `attributions`"):
        augnet.evaluate_attributions(model, x)
    with pytest.raises(ValueError, match="`metrics`"):
        augnet.evaluate_attributions(model, x, methods=["gradient"], metrics=["auc"])


def test_metrics_need_one_input():
    import keras

    import augnet

    a, b = keras.Input((2,)), keras.Input((2,))
    model = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    x = [np.ones((1, 2), "float32"), np.ones((1, 2), "float32")]
    with pytest.raises(ValueError, match="one input"):
        augnet.deletion(model, x, np.ones((1, 1, 2)))
