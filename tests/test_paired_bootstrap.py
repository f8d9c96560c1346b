"""The paired bootstrap of a difference between two methods (custom/evaluation/paired_bootstrap.py)."""

import numpy as np
import pytest

from custom.evaluation.ordinal_metrics import accuracy
from custom.evaluation.paired_bootstrap import out_of_fold, paired_difference
from custom.evaluation.readouts import cross_validated_readout


def _predictions(correct: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Binary predictions that are right exactly where ``correct`` is True."""
    return np.where(correct, truth, 1 - truth)


def test_the_estimate_is_the_difference_of_the_two_scores():
    truth = np.tile([0, 1], 50)
    a = _predictions(np.arange(100) < 80, truth)  # right on 80 subjects
    b = _predictions(np.arange(100) < 60, truth)  # right on 60, all of them among A's 80
    result = paired_difference(truth, a, b, accuracy, n_resamples=500)
    assert result.estimate == pytest.approx(0.20)
    assert result.low > 0 and result.excludes_zero and result.share_above_zero == 1.0
    assert result.low < 0.20 < result.high


def test_the_interval_covers_a_known_difference_at_its_nominal_rate():
    """A is right with probability 0.80 and B with 0.65, independently per subject: the true difference in
    accuracy is 0.15. Over 200 simulated studies the 95 % interval must cover it about 95 % of the time."""
    rng = np.random.default_rng(7)
    covered, widths = 0, []
    for _ in range(200):
        truth = rng.integers(0, 2, 150)
        a = _predictions(rng.random(150) < 0.80, truth)
        b = _predictions(rng.random(150) < 0.65, truth)
        result = paired_difference(truth, a, b, accuracy, n_resamples=400, seed=int(rng.integers(1 << 30)))
        covered += result.low <= 0.15 <= result.high
        widths.append(result.high - result.low)
    assert 0.89 <= covered / 200 <= 0.99, f"coverage {covered / 200:.3f}"
    # sd of the difference of two independent accuracies at n = 150: sqrt(.8*.2/150 + .65*.35/150) = 0.0508
    assert np.median(widths) == pytest.approx(2 * 1.96 * 0.0508, rel=0.15)


def test_pairing_removes_the_spread_both_methods_share():
    """Two methods that agree on 190 of 200 subjects and differ on 10 (A right, B wrong): each accuracy alone
    has a wide interval, but the paired difference is certain to be positive and narrow."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 200)
    shared = rng.random(200) < 0.6
    differ = np.zeros(200, dtype=bool)
    differ[np.flatnonzero(~shared)[:10]] = True
    a = _predictions(shared | differ, truth)
    b = _predictions(shared, truth)
    paired = paired_difference(truth, a, b, accuracy, n_resamples=1000)
    assert paired.estimate == pytest.approx(0.05)
    assert paired.low > 0
    separate_sd = np.sqrt(2 * 0.6 * 0.4 / 200)  # what two unpaired intervals would imply
    assert (paired.high - paired.low) < 2 * 1.96 * separate_sd / 2


def test_out_of_fold_lines_up_two_readouts_with_the_same_folds():
    """Two feature sets read out with the same target and seed get the same folds, so their out-of-fold
    predictions pair subject by subject; the better features win with an interval above zero."""
    rng = np.random.default_rng(3)
    n = 120
    y = rng.normal(size=n)
    informative = np.c_[y + 0.3 * rng.normal(size=n), rng.normal(size=(n, 3))]
    noise = rng.normal(size=(n, 4))
    good = cross_validated_readout(informative, y, "continuous", folds=5, seed=11)
    bad = cross_validated_readout(noise, y, "continuous", folds=5, seed=11)
    index_good, truth_good, pred_good = out_of_fold(good)
    index_bad, truth_bad, pred_bad = out_of_fold(bad)
    np.testing.assert_array_equal(index_good, np.arange(n))
    np.testing.assert_array_equal(index_good, index_bad)
    np.testing.assert_array_equal(truth_good, y)

    def r2(truth, prediction):
        return 1 - np.sum((truth - prediction) ** 2) / np.sum((truth - truth.mean()) ** 2)

    result = paired_difference(truth_good, pred_good, pred_bad, r2, n_resamples=500)
    assert result.estimate == pytest.approx(good.pooled("r2") - bad.pooled("r2"))
    assert result.low > 0.5


def test_mismatched_subjects_are_refused():
    with pytest.raises(ValueError, match="same subjects: 5, 5 and 4 rows"):
        paired_difference(np.zeros(5), np.zeros(5), np.zeros(4), accuracy)
