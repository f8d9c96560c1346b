"""The paired bootstrap of a difference between two methods (custom/evaluation/paired_bootstrap.py)."""

import numpy as np
import pytest

from custom.evaluation.ordinal_metrics import accuracy
from custom.evaluation.paired_bootstrap import bootstrap_score, out_of_fold, paired_difference
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


def test_repeated_predictions_average_the_per_repeat_scores():
    """With (repeats, n) predictions the estimate is the mean over repeats of the per-repeat difference (and
    score), and every repeat of a subject travels with it: the interval is as wide as the subjects allow."""
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 2, 90)
    a = np.stack([_predictions(rng.random(90) < p, truth) for p in (0.9, 0.8, 0.7)])
    b = np.stack([_predictions(rng.random(90) < p, truth) for p in (0.6, 0.7, 0.5)])
    joint = paired_difference(truth, a, b, accuracy, n_resamples=300, seed=1)
    single = [paired_difference(truth, a[r], b[r], accuracy, n_resamples=300, seed=1).estimate for r in range(3)]
    assert joint.estimate == pytest.approx(np.mean(single))
    assert joint.repeats == 3 and joint.n_subjects == 90
    assert joint.low < joint.estimate < joint.high
    score = bootstrap_score(truth, a, accuracy, n_resamples=300, seed=1)
    assert score.estimate == pytest.approx(np.mean([accuracy(truth, a[r]) for r in range(3)]))
    assert score.low < score.estimate < score.high and score.repeats == 3
    # the same seed draws the same subjects: the difference of the two scores' draws is the paired draw
    score_b = bootstrap_score(truth, b, accuracy, n_resamples=300, seed=1)
    assert score.estimate - score_b.estimate == pytest.approx(joint.estimate)
    with pytest.raises(ValueError, match="same repeats: 3 and 2"):
        paired_difference(truth, a, b[:2], accuracy)


def test_the_interval_with_repeats_covers_a_known_difference_at_its_nominal_rate():
    """Three repeats of a cross-validation whose correctness is shared by a subject across repeats half of the
    time (a hard or easy subject stays so): A is right with probability 0.80 and B with 0.65 in every repeat, so
    the true difference of the repeat-averaged accuracies is 0.15. Resampling subjects with all their repeats
    must cover it about 95 % of the time; a score's own interval must cover 0.80 likewise."""
    rng = np.random.default_rng(11)
    n, repeats, studies = 120, 3, 150

    def correct(p):
        fixed = rng.random(n) < 0.5  # subjects whose correctness is the same in every repeat
        once = rng.random(n) < p
        each = rng.random((repeats, n)) < p
        return np.where(fixed, once, each)

    covered = covered_score = 0
    for _ in range(studies):
        truth = rng.integers(0, 2, n)
        a = _predictions(correct(0.80), truth)
        b = _predictions(correct(0.65), truth)
        seed = int(rng.integers(1 << 30))
        result = paired_difference(truth, a, b, accuracy, n_resamples=300, seed=seed)
        covered += result.low <= 0.15 <= result.high
        score = bootstrap_score(truth, a, accuracy, n_resamples=300, seed=seed)
        covered_score += score.low <= 0.80 <= score.high
    assert 0.88 <= covered / studies <= 0.99, f"coverage {covered / studies:.3f}"
    assert 0.88 <= covered_score / studies <= 0.99, f"score coverage {covered_score / studies:.3f}"
