"""Paired differences between two methods scored on the same subjects, with bootstrap confidence intervals.

Why paired: when DrasCLR and a baseline are read out with the same folds on the same subjects, most of the
spread of each score is the subjects, which both share. Resampling subjects jointly (a subject keeps its truth
and both methods' out-of-fold predictions) cancels that shared part, so the interval is the uncertainty of the
*difference*, far narrower than two separate intervals would suggest. Resampling is ``scipy.stats.bootstrap``
with ``paired=True``; the interval is the percentile interval (BCa on request).

With repeated cross-validation a method has one prediction per subject in every repeat: predictions are then
(repeats, n) arrays, a method's score is the mean of its per-repeat scores, and a resample draws subjects, each
keeping its truth and its predictions of every repeat and both methods, so the interval covers the fold noise
and the subject noise at once. ``bootstrap_score`` gives one method's score with the same resampling.

``out_of_fold`` turns a cross-validated readout (``custom.evaluation.readouts.ReadoutResult``) into one
prediction per subject, indexed by the subject's row, so two methods' results line up subject by subject.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

_RNG_ARGUMENT = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


@dataclass(frozen=True)
class PairedDifference:
    """``estimate`` = metric(A) - metric(B) on all subjects; [``low``, ``high``] its bootstrap interval;
    ``share_above_zero`` the share of resamples in which A beat B (a reading aid, not a p-value)."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_subjects: int
    n_resamples: int
    share_above_zero: float
    method: str
    repeats: int = 1

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


@dataclass(frozen=True)
class BootstrapScore:
    """One method's repeat-averaged ``estimate`` on all subjects and [``low``, ``high``] its bootstrap interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_subjects: int
    n_resamples: int
    repeats: int
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def out_of_fold(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row index, truth, prediction) of every subject a readout predicted, sorted by row index.

    Each subject is predicted by the one fold model that did not see it; a subject predicted twice means the
    folds overlap, which would double-count it in a bootstrap."""
    if not result.folds:
        raise ValueError(f"the readout has no folds to pair ({result.status}: {result.reason or 'no folds'})")
    index = np.concatenate([np.asarray(f.test) for f in result.folds])
    truth = np.concatenate([np.asarray(f.truth) for f in result.folds])
    prediction = np.concatenate([np.asarray(f.prediction) for f in result.folds])
    if len(np.unique(index)) != len(index):
        raise ValueError("a subject appears in more than one test fold; out-of-fold predictions need disjoint folds")
    order = np.argsort(index, kind="stable")
    return index[order], truth[order], prediction[order]


def _repeats(prediction, what: str) -> np.ndarray:
    """A (n,) or (repeats, n) prediction as (repeats, n)."""
    prediction = np.asarray(prediction)
    if prediction.ndim == 1:
        return prediction[None, :]
    if prediction.ndim != 2 or prediction.shape[0] < 1:
        raise ValueError(f"{what} must be a (n,) or (repeats, n) array, got shape {prediction.shape}")
    return prediction


def _mean_score(metric, truth: np.ndarray, prediction: np.ndarray, rows: np.ndarray) -> float:
    """mean over repeats r of metric(truth, prediction[r]) on the subjects ``rows``."""
    return float(np.mean([metric(truth[rows], p[rows]) for p in prediction]))


def _resample_subjects(statistic, n: int, n_resamples: int, confidence: float, seed: int, method: str):
    """(statistic on all subjects, low, high, finite draws): ``scipy.stats.bootstrap`` over subject rows, so every
    caller draws the same subjects for the same ``n`` and ``seed``. Resamples in which the statistic is undefined
    (NaN, e.g. one class only) are dropped from a percentile interval."""
    if n < 3:
        raise ValueError(f"a bootstrap over subjects needs at least 3 subjects, got {n}")
    rows = np.arange(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN draws (a resample the metric cannot score)
        result = stats.bootstrap(
            (rows,),
            statistic,
            n_resamples=n_resamples,
            confidence_level=confidence,
            vectorized=False,
            method=method,
            **{_RNG_ARGUMENT: np.random.default_rng(seed)},
        )
    draws = np.asarray(result.bootstrap_distribution, dtype=np.float64)
    finite = draws[np.isfinite(draws)]
    if method == "percentile" and finite.size < draws.size:  # scipy's interval is NaN with any NaN draw
        tail = (1 - confidence) / 2 * 100
        low, high = np.percentile(finite, [tail, 100 - tail]) if finite.size else (np.nan, np.nan)
    else:
        low, high = result.confidence_interval.low, result.confidence_interval.high
    return float(statistic(rows)), float(low), float(high), finite


def paired_difference(
    truth,
    prediction_a,
    prediction_b,
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> PairedDifference:
    """metric(truth, A) - metric(truth, B) with a paired bootstrap interval over subjects.

    ``truth`` may be a (n,) array or, for survival, a (n, 2) array of (time, event); ``metric`` receives the
    resampled rows of it. Predictions are (n,) or, with repeated cross-validation, (repeats, n) arrays with the
    same repeats: the statistic is then mean_r metric(truth, A[r]) - mean_r metric(truth, B[r]). Resamples in
    which the metric is undefined are dropped from the interval and counted out of ``n_resamples``."""
    truth = np.asarray(truth)
    a, b = _repeats(prediction_a, "prediction_a"), _repeats(prediction_b, "prediction_b")
    n = len(truth)
    if not (a.shape[1] == b.shape[1] == n):
        raise ValueError(
            f"truth and both predictions must hold the same subjects: {n}, {a.shape[1]} and {b.shape[1]} rows"
        )
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"both predictions must hold the same repeats: {a.shape[0]} and {b.shape[0]}")
    if n < 3:
        raise ValueError(f"a paired bootstrap needs at least 3 subjects, got {n}")

    def difference(sample):
        return _mean_score(metric, truth, a, sample) - _mean_score(metric, truth, b, sample)

    estimate, low, high, finite = _resample_subjects(difference, n, n_resamples, confidence, seed, method)
    return PairedDifference(
        estimate=estimate,
        low=low,
        high=high,
        confidence=confidence,
        n_subjects=n,
        n_resamples=int(finite.size),
        share_above_zero=float(np.mean(finite > 0)) if finite.size else float("nan"),
        method=method,
        repeats=int(a.shape[0]),
    )


def bootstrap_score(
    truth,
    prediction,
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> BootstrapScore:
    """One method's mean_r metric(truth, prediction[r]) with a bootstrap interval over subjects; the same
    resampling as ``paired_difference`` (same ``seed`` and subjects: the same draws)."""
    truth = np.asarray(truth)
    p = _repeats(prediction, "prediction")
    n = len(truth)
    if p.shape[1] != n:
        raise ValueError(f"truth and prediction must hold the same subjects: {n} and {p.shape[1]} rows")

    def score(sample):
        return _mean_score(metric, truth, p, sample)

    estimate, low, high, finite = _resample_subjects(score, n, n_resamples, confidence, seed, method)
    return BootstrapScore(
        estimate=estimate,
        low=low,
        high=high,
        confidence=confidence,
        n_subjects=n,
        n_resamples=int(finite.size),
        repeats=int(p.shape[0]),
        method=method,
    )
