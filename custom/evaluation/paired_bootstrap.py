"""Paired differences between two methods scored on the same subjects, with bootstrap confidence intervals.

Why paired: when DrasCLR and a baseline are read out with the same folds on the same subjects, most of the
spread of each score is the subjects, which both share. Resampling subjects jointly (a subject keeps its truth
and both methods' out-of-fold predictions) cancels that shared part, so the interval is the uncertainty of the
*difference*, far narrower than two separate intervals would suggest. Resampling is ``scipy.stats.bootstrap``
with ``paired=True``; the interval is the percentile interval (BCa on request).

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

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


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
    resampled rows of it. Resamples in which the metric is undefined (NaN, e.g. one class only) are dropped
    from the interval and counted out of ``n_resamples``."""
    truth = np.asarray(truth)
    a, b = np.asarray(prediction_a), np.asarray(prediction_b)
    n = len(truth)
    if not (len(a) == len(b) == n):
        raise ValueError(f"truth and both predictions must hold the same subjects: {n}, {len(a)} and {len(b)} rows")
    if n < 3:
        raise ValueError(f"a paired bootstrap needs at least 3 subjects, got {n}")
    rows = np.arange(n)

    def difference(sample):
        return metric(truth[sample], a[sample]) - metric(truth[sample], b[sample])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN draws (a resample the metric cannot score)
        result = stats.bootstrap(
            (rows,),
            difference,
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
    return PairedDifference(
        estimate=float(difference(rows)),
        low=float(low),
        high=float(high),
        confidence=confidence,
        n_subjects=n,
        n_resamples=int(finite.size),
        share_above_zero=float(np.mean(finite > 0)) if finite.size else float("nan"),
        method=method,
    )
