"""Cross-validated linear readouts of frozen subject features (paper §4.2.1, Tables 2, 4, 6, 8).

Continuous targets: ridge regression, scored by R². Ordinal, binary and categorical targets: multinomial
logistic regression, scored by accuracy (and 1-off accuracy for ordinal grades). Every outer fold fits a fresh
scikit-learn ``Pipeline(StandardScaler[, PCA], RidgeCV | LogisticRegressionCV)`` on its training rows only, so
the scaling, the optional PCA and the regularisation strength (chosen by the inner CV of RidgeCV /
LogisticRegressionCV, on those same rows) never see the fold's test rows. The scores are mean ± s.d. over folds.

Small cohorts: the outer split asks for ``folds`` folds but uses fewer when the data cannot fill them
(regression: every test fold keeps at least two subjects, R² needs them; classification: stratified folds, at
most as many as the largest class has subjects). Every such reduction, and classes too small to appear in every
fold, is reported in ``notes``; a target that cannot be evaluated at all (one class, too few subjects, a
training fold with one class) gives ``status == "n/a"`` with the reason instead of an error.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from custom.evaluation.ordinal_metrics import accuracy, one_off_accuracy

KINDS = ("continuous", "ordinal", "binary", "categorical")
METRICS = {
    "continuous": ("r2",),
    "ordinal": ("accuracy", "one_off"),
    "binary": ("accuracy",),
    "categorical": ("accuracy",),
}
DEFAULT_ALPHAS = tuple(np.logspace(-2, 6, 17).tolist())
DEFAULT_CS = tuple(np.logspace(-4, 4, 9).tolist())
FIXED_C = 1.0  # when a training fold is too small for an inner split
# scikit-learn >= 1.8 spells "plain L2" as l1_ratios=(0,) and is moving LogisticRegressionCV's attributes;
# older releases (the project allows >= 1.5) have neither argument and default to L2.
_L2_ONLY = {
    k: v
    for k, v in {"l1_ratios": (0.0,), "use_legacy_attributes": False}.items()
    if k in inspect.signature(LogisticRegressionCV).parameters
}


class NotEvaluable(ValueError):
    """The data cannot support the requested cross-validation; the message is the reason shown in tables."""


@dataclass
class Fold:
    train: np.ndarray
    test: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    scores: dict
    model: Pipeline | None = None


@dataclass
class ReadoutResult:
    kind: str
    n_subjects: int
    requested_folds: int
    folds: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    status: str = "ok"
    reason: str = ""

    @property
    def metrics(self) -> tuple:
        return METRICS[self.kind]

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def fold_values(self, metric: str) -> np.ndarray:
        return np.array([f.scores[metric] for f in self.folds], dtype=np.float64)

    def mean(self, metric: str) -> float:
        return float(np.nanmean(self.fold_values(metric))) if self.folds else float("nan")

    def pooled(self, metric: str, order=None) -> float:
        """The metric on all out-of-fold predictions together (each subject predicted by the fold model that
        did not see it); steadier than per-fold R² when test folds hold a handful of subjects."""
        if not self.folds:
            return float("nan")
        y_true = np.concatenate([f.truth for f in self.folds])
        y_pred = np.concatenate([f.prediction for f in self.folds])
        return fold_scores(self.kind, y_true, y_pred, order)[metric]

    @property
    def smallest_test_fold(self) -> int:
        return min((len(f.test) for f in self.folds), default=0)

    def sd(self, metric: str) -> float:
        """Sample standard deviation over folds (ddof = 1)."""
        values = self.fold_values(metric)
        values = values[np.isfinite(values)]
        return float(np.std(values, ddof=1)) if values.size > 1 else float("nan")


def plan_folds(y: np.ndarray, kind: str, folds: int, seed: int) -> tuple[list, list]:
    """Outer (train, test) index pairs and notes on how the request was adapted to the data."""
    n = len(y)
    notes = []
    if kind == "continuous":
        k = min(folds, n // 2)
        if k < 2:
            raise NotEvaluable(f"{n} subjects: too few for 2 folds of at least 2")
        if k < folds:
            notes.append(f"{k} folds, not {folds}: {n} subjects (R² needs >= 2 per test fold)")
        return list(KFold(k, shuffle=True, random_state=seed).split(np.zeros(n))), notes
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise NotEvaluable(f"one class only ({classes.tolist()}) among {n} subjects")
    k = min(folds, int(counts.max()))
    if k < 2:
        raise NotEvaluable(f"{n} subjects in {len(classes)} classes of one subject each")
    if k < folds:
        notes.append(f"{k} folds, not {folds}: the largest class has {int(counts.max())} subjects")
    small = [f"{c} (n={m})" for c, m in zip(classes.tolist(), counts.tolist()) if m < k]
    if small:
        notes.append(f"classes with fewer subjects than folds, not in every training/test fold: {', '.join(small)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), y))
    for train, _ in splits:
        if len(np.unique(y[train])) < 2:
            raise NotEvaluable("a training fold holds one class only")
    return splits, notes


def readout_pipeline(
    kind: str,
    y_train: np.ndarray,
    n_features: int,
    pca_components=None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    Cs: Sequence[float] = DEFAULT_CS,  # noqa: N803 - scikit-learn's name (LogisticRegressionCV)
    inner_folds: int = 3,
    seed: int = 0,
) -> tuple[Pipeline, str]:
    """An unfitted scaler[-PCA]-linear pipeline for one training fold, and a note when its regularisation is
    fixed rather than chosen (a training fold too small for an inner split)."""
    n_train = len(y_train)
    steps = [("scale", StandardScaler())]
    if pca_components is not None:
        if isinstance(pca_components, float) and 0 < pca_components < 1:
            steps.append(("pca", PCA(pca_components, svd_solver="full", random_state=seed)))
        else:
            steps.append(("pca", PCA(max(1, min(int(pca_components), n_train - 1, n_features)), random_state=seed)))
    note = ""
    if kind == "continuous":
        steps.append(("model", RidgeCV(alphas=list(alphas))))  # efficient leave-one-out over the training rows
        return Pipeline(steps), note
    counts = np.unique(y_train, return_counts=True)[1]
    inner = min(inner_folds, int(counts.max()))
    if inner >= 2 and n_train >= 2 * inner:
        model = LogisticRegressionCV(
            Cs=list(Cs),
            cv=StratifiedKFold(inner, shuffle=True, random_state=seed),
            scoring="neg_log_loss",
            max_iter=1000,
            **_L2_ONLY,
        )
    else:
        model = LogisticRegression(C=FIXED_C, max_iter=1000)
        note = f"regularisation fixed (C={FIXED_C}): a training fold too small for an inner split"
    steps.append(("model", model))
    return Pipeline(steps), note


def fold_scores(kind: str, y_true: np.ndarray, y_pred: np.ndarray, order=None) -> dict:
    if kind == "continuous":
        return {"r2": float(r2_score(y_true, y_pred))}
    scores = {"accuracy": accuracy(y_true, y_pred)}
    if kind == "ordinal":
        scores["one_off"] = one_off_accuracy(y_true, y_pred, order)
    return scores


def cross_validated_readout(
    features,
    target,
    kind: str,
    folds: int = 5,
    seed: int = 0,
    pca_components=None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    Cs: Sequence[float] = DEFAULT_CS,  # noqa: N803 - scikit-learn's name (LogisticRegressionCV)
    inner_folds: int = 3,
    order: Sequence | None = None,
    keep_models: bool = False,
) -> ReadoutResult:
    """Linear readout of ``target`` (n,) from ``features`` (n, d) with ``folds``-fold CV (see module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"target kind must be one of {KINDS}, got {kind!r}")
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(target)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (n, d) with one row per target value, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    if kind == "continuous":
        y = y.astype(np.float64)
    result = ReadoutResult(kind=kind, n_subjects=len(y), requested_folds=folds)
    try:
        splits, result.notes = plan_folds(y, kind, folds, seed)
    except NotEvaluable as err:
        result.status, result.reason = "n/a", str(err)
        return result
    fixed, unconverged = set(), 0
    for train, test in splits:
        pipeline, note = readout_pipeline(kind, y[train], x.shape[1], pca_components, alphas, Cs, inner_folds, seed)
        if note:
            fixed.add(note)
        # small linear fits: one BLAS thread is several times faster than many competing for shared cores
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
            warnings.simplefilter("always", ConvergenceWarning)
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            pipeline.fit(x[train], y[train])
        unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        prediction = pipeline.predict(x[test])
        result.folds.append(
            Fold(
                train,
                test,
                y[test],
                prediction,
                fold_scores(kind, y[test], prediction, order),
                pipeline if keep_models else None,
            )
        )
    result.notes.extend(sorted(fixed))
    if unconverged:
        result.notes.append(f"optimiser did not converge in {unconverged} fold(s)")
    return result
