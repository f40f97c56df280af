"""sftmix.stage1.splits: confidence, the median split, variability and agreement, against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from sftmix.stage1.splits import confidence_scores, median_split, split_agreement, variability_scores


def _split_by_definition(confidences: list[float]) -> list[bool]:
    """The split spelled out: rank by (confidence desc, index asc), top floor(N/2) are confident."""
    ranked = sorted(range(len(confidences)), key=lambda i: (-confidences[i], i))
    confident = set(ranked[: len(confidences) // 2])
    return [i in confident for i in range(len(confidences))]


@pytest.mark.parametrize("n", [1, 2, 7, 10, 31])
def test_confidence_and_split_match_definition(n):
    rng = np.random.default_rng(n)
    # Perplexities on a coarse grid so that ties (and ties across the median) really occur.
    perps = rng.integers(1, 6, size=(n, 3)).astype(float)
    conf = confidence_scores(perps)
    expected_conf = [-sum(row) / 3 for row in perps.tolist()]
    np.testing.assert_allclose(conf, expected_conf)
    split = median_split(conf)
    assert split.dtype == bool and split.sum() == n // 2
    assert split.tolist() == _split_by_definition(conf.tolist())
    if split.any() and (~split).any():
        assert conf[split].min() >= conf[~split].max()


def test_split_ties_and_odd_n():
    # All equal: the earlier examples are confident; odd N: the extra one is unconfident.
    assert median_split([0.0] * 5).tolist() == [True, True, False, False, False]
    # A tie straddling the median: of the two -2.0 examples the earlier (index 1) wins.
    assert median_split([-5.0, -2.0, -1.0, -2.0]).tolist() == [False, True, True, False]
    assert median_split([]).tolist() == []


def test_split_agreement_uses_the_files_own_split_on_ties_and_odd_n():
    # Five examples, a tie across the median in a: median_split in a's order puts e1 (not e3) in the top half.
    a = {"e0": 5.0, "e1": 2.0, "e2": 1.0, "e3": 2.0, "e4": 0.0}
    b = {"e4": 0.0, "e3": 4.0, "e2": 1.0, "e1": 3.0, "e0": 5.0}  # another order, e3 above e1
    agree = split_agreement(a, b)
    assert agree["n"] == 5
    assert agree["same_half"] == pytest.approx(3 / 5)  # e1 and e3 swap halves, the rest agree
    assert split_agreement(a, a) == {"same_half": 1.0, "spearman": 1.0, "n": 5}
    # reversed: -1 but for the tie (e1, e3), which keeps its order in both
    assert split_agreement(a, {k: -v for k, v in a.items()})["spearman"] == pytest.approx(-0.9)
    assert split_agreement(a, {"e0": 1.0, "e1": 2.0, "x": 3.0})["n"] == 2  # only the common ids
    with pytest.raises(ValueError, match="at least 2 common ids"):
        split_agreement(a, {"x": 1.0})


def test_math_rejects_bad_input():
    with pytest.raises(ValueError):
        confidence_scores([1.0, 2.0])  # not [N, C]
    with pytest.raises(ValueError):
        confidence_scores([[1.0, float("nan")]])
    with pytest.raises(ValueError):
        median_split([[1.0]])
    with pytest.raises(ValueError):
        median_split([1.0, float("nan")])


def test_variability_is_population_std():
    perps = np.array([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]])
    np.testing.assert_allclose(variability_scores(perps), [np.sqrt(8 / 3), 0.0])
