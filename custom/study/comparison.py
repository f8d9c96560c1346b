"""The study's comparison: every method's score and DrasCLR's paired difference to every other method, each with
a bootstrap interval over subjects (``custom.evaluation.paired_bootstrap``).

Input is the long ``predictions`` table the study writes: one row per (cohort, target, method, share, repeat,
subject) with the subject's truth and its out-of-fold prediction (``truth``; survival rows carry ``time`` and
``event`` instead and a risk as prediction). A learned method has a ``share`` of the pre-training budget; a fixed
baseline (LAA-950, ...) has none (NaN) and is compared with the reference at every share.

Why alignment by ``subject_id``: two methods are paired subject by subject, so both must hold the same subjects
in every repeat. A method whose repeats hold different subject sets cannot be averaged over repeats subject by
subject and is refused; between two methods only the subjects both hold are compared.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from custom.evaluation.ordinal_metrics import accuracy
from custom.evaluation.paired_bootstrap import bootstrap_score, paired_difference
from custom.evaluation.survival import time_dependent_concordance

KEYS = ["cohort", "target", "method", "share"]
COLUMNS = [*KEYS, "label", "kind", "metric", "repeat", "subject_id", "truth", "prediction"]
SURVIVAL_COLUMNS = ["time", "event"]
SCORE_COLUMNS = [*KEYS, "label", "metric", "estimate", "low", "high", "confidence", "n_subjects", "repeats"]
PAIRED_COLUMNS = [
    "cohort",
    "target",
    "label",
    "metric",
    "share",
    "reference",
    "baseline",
    "estimate",
    "low",
    "high",
    "share_above_zero",
    "excludes_zero",
    "confidence",
    "n_subjects",
]


def r2(truth, prediction) -> float:
    """R² as ``sklearn.metrics.r2_score`` defines it for one output (NaN when the truth is constant), in numpy:
    the bootstrap calls it hundreds of thousands of times and sklearn's input checks cost 50x the arithmetic."""
    truth, prediction = np.asarray(truth, dtype=np.float64), np.asarray(prediction, dtype=np.float64)
    total = float(((truth - truth.mean()) ** 2).sum())
    return 1.0 - float(((truth - prediction) ** 2).sum()) / total if total > 0 else float("nan")


def c_index(truth, risk) -> float:
    """Harrell's C of ``risk`` (higher = earlier death); ``truth`` rows are (time, event)."""
    truth = np.asarray(truth, dtype=np.float64)
    return time_dependent_concordance(truth[:, 0], truth[:, 1], risk, horizon=np.inf)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"r2": r2, "accuracy": accuracy, "c_index": c_index}


def metric_function(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    if name not in METRICS:
        raise ValueError(f"predictions: unknown metric {name!r}; known: {sorted(METRICS)}")
    return METRICS[name]


def _truth_columns(metric: str) -> list[str]:
    return SURVIVAL_COLUMNS if metric == "c_index" else ["truth"]


def check_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """The table with its columns checked; one line naming what is missing or unknown."""
    missing = [c for c in COLUMNS if c not in predictions.columns]
    if "c_index" in set(predictions.get("metric", ())):
        missing += [c for c in SURVIVAL_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions table: missing column(s) {missing}; it has {list(predictions.columns)}")
    if predictions.empty:
        raise ValueError("predictions table: no rows")
    for name in dict.fromkeys(predictions["metric"]):
        metric_function(name)
    for (cohort, target), block in predictions.groupby(["cohort", "target"], sort=False):
        for column in ("label", "metric", "kind"):
            if block[column].nunique() != 1:
                raise ValueError(
                    f"predictions table: {cohort}/{target} has more than one {column}: {sorted(set(block[column]))}"
                )
    return predictions


class _Side:
    """One method's predictions of one target at one share: (repeats, subjects) plus the subjects' truth."""

    def __init__(self, block: pd.DataFrame, metric: str, what: str):
        self.what = what
        repeated = block.duplicated(["repeat", "subject_id"])
        if repeated.any():
            row = block[repeated].iloc[0]
            raise ValueError(f"{what}: subject {row['subject_id']!r} appears twice in repeat {row['repeat']}")
        sets = {r: frozenset(g["subject_id"]) for r, g in block.groupby("repeat", sort=True)}
        first_repeat, first = next(iter(sets.items()))
        for r, subjects in sets.items():
            if subjects != first:
                example = sorted(subjects ^ first, key=str)[0]
                raise ValueError(
                    f"{what}: its repeats hold different subject sets (repeat {first_repeat}: {len(first)} subjects, "
                    f"repeat {r}: {len(subjects)}; {example!r} is in only one of them)"
                )
        self.repeats = tuple(sets)
        self.prediction = block.pivot(index="repeat", columns="subject_id", values="prediction").sort_index()
        columns = _truth_columns(metric)
        varying = block.groupby("subject_id")[columns].nunique(dropna=False).max(axis=1) > 1
        if varying.any():
            raise ValueError(f"{what}: the truth of subject {varying[varying].index[0]!r} differs between repeats")
        self.truth = block.groupby("subject_id")[columns].first()

    def predictions(self, subjects) -> np.ndarray:
        return self.prediction.loc[:, subjects].to_numpy(dtype=np.float64)


def _truth_array(truth: pd.DataFrame, subjects, metric: str) -> np.ndarray:
    values = truth.loc[subjects, _truth_columns(metric)].to_numpy(dtype=np.float64)
    return values if metric == "c_index" else values[:, 0]


def _align(reference: _Side, other: _Side, metric: str) -> tuple[list, np.ndarray]:
    """The subjects both sides hold (sorted) and their truth; refuses different repeats or truths."""
    if reference.repeats != other.repeats:
        raise ValueError(
            f"{reference.what} and {other.what}: different repeats {list(reference.repeats)} and "
            f"{list(other.repeats)}; a paired comparison needs the same cross-validation rounds"
        )
    subjects = sorted(set(reference.prediction.columns) & set(other.prediction.columns), key=str)
    if len(subjects) < 3:
        raise ValueError(f"{reference.what} and {other.what}: {len(subjects)} subjects in common, need at least 3")
    truth = _truth_array(reference.truth, subjects, metric)
    other_truth = _truth_array(other.truth, subjects, metric)
    if not np.array_equal(truth, other_truth, equal_nan=True):
        raise ValueError(f"{reference.what} and {other.what}: the same subjects have different truths")
    return subjects, truth


def _what(cohort, target, method, share) -> str:
    at = "fixed baseline" if pd.isna(share) else f"at share {share:g}"
    return f"{cohort}/{target}, method {method!r} ({at})"


def _groups(block: pd.DataFrame):
    return block.groupby(["method", "share"], sort=False, dropna=False)


def score_table(
    predictions: pd.DataFrame, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """One row per (cohort, target, method, share): the repeat-averaged metric on all subjects with a percentile
    bootstrap interval over subjects (``bootstrap_score``)."""
    predictions = check_predictions(predictions)
    rows = []
    for (cohort, target), block in predictions.groupby(["cohort", "target"], sort=False):
        label, metric = block["label"].iloc[0], block["metric"].iloc[0]
        for (method, share), part in _groups(block):
            side = _Side(part, metric, _what(cohort, target, method, share))
            subjects = sorted(side.prediction.columns, key=str)
            score = bootstrap_score(
                _truth_array(side.truth, subjects, metric),
                side.predictions(subjects),
                metric_function(metric),
                n_resamples=n_resamples,
                confidence=confidence,
                seed=seed,
            )
            rows.append(
                {
                    "cohort": cohort,
                    "target": target,
                    "method": method,
                    "share": share,
                    "label": label,
                    "metric": metric,
                    "estimate": score.estimate,
                    "low": score.low,
                    "high": score.high,
                    "confidence": confidence,
                    "n_subjects": score.n_subjects,
                    "repeats": score.repeats,
                }
            )
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def paired_table(
    predictions: pd.DataFrame,
    reference: str = "DrasCLR",
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """For each (cohort, target, share s): ``reference``@s minus every other learned method @s, and minus every
    fixed baseline, with a paired bootstrap interval over the subjects both hold (``paired_difference``)."""
    predictions = check_predictions(predictions)
    if reference not in set(predictions["method"]):
        raise ValueError(
            f"predictions table: no rows of the reference method {reference!r}; "
            f"methods: {list(dict.fromkeys(predictions['method']))}"
        )
    rows = []
    for (cohort, target), block in predictions.groupby(["cohort", "target"], sort=False):
        label, metric = block["label"].iloc[0], block["metric"].iloc[0]
        parts = dict(list(_groups(block)))
        learned = {key: part for key, part in parts.items() if not pd.isna(key[1])}
        fixed = {key: part for key, part in parts.items() if pd.isna(key[1])}
        shares = sorted(share for method, share in learned if method == reference)
        if not shares:  # the reference could not be read out on this target (a note of the readouts says why)
            continue
        sides: dict = {}

        def side(key, part):
            if key not in sides:
                sides[key] = _Side(part, metric, _what(cohort, target, *key))
            return sides[key]

        for share in shares:
            ours = side((reference, share), learned[(reference, share)])
            others = [(k, p) for k, p in learned.items() if k[1] == share and k[0] != reference]
            for key, part in others + list(fixed.items()):
                method, theirs = key[0], side(key, part)
                subjects, truth = _align(ours, theirs, metric)
                result = paired_difference(
                    truth,
                    ours.predictions(subjects),
                    theirs.predictions(subjects),
                    metric_function(metric),
                    n_resamples=n_resamples,
                    confidence=confidence,
                    seed=seed,
                )
                rows.append(
                    {
                        "cohort": cohort,
                        "target": target,
                        "label": label,
                        "metric": metric,
                        "share": share,
                        "reference": reference,
                        "baseline": method,
                        "estimate": result.estimate,
                        "low": result.low,
                        "high": result.high,
                        "share_above_zero": result.share_above_zero,
                        "excludes_zero": result.excludes_zero,
                        "confidence": confidence,
                        "n_subjects": result.n_subjects,
                    }
                )
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)
