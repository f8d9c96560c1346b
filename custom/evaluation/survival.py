"""Survival analysis with Cox proportional hazards (paper §4.2.2, Table 3), with lifelines.

Model: a Cox model (``lifelines.CoxPHFitter``, fixed ridge ``penalizer``) on the image features plus the
confounders (age, sex, race, smoking status, pack-years; categorical ones one-hot encoded with the first level
dropped), optionally plus clinical columns (spirometry, a BODE-like index). Inside every cross-validation
fold, the image features are standardised and optionally reduced by PCA, and the other columns standardised,
with statistics of the fold's training rows only; the fitted model scores the fold's held-out subjects. The
held-out scores of all folds form one cross-validated risk score per subject.

Time-dependent concordance C(t): Harrell's concordance index of the risk score against survival after
administrative censoring at horizon t: follow-up is cut at t, so an event after t counts as censored at t.
C(t) then asks how well the score ranks the subjects who die before t against everyone known to live longer,
which is what a clinician needs for a t-year prognosis. Horizons are the 25th/50th/75th percentiles of the
observed follow-up times. Harrell's C itself is ``lifelines.utils.concordance_index`` (ties in the score count
one half). Standard error: the standard deviation of C(t) over bootstrap resamples of the subjects with their
cross-validated scores (``scipy.stats.bootstrap``). With ``repeats`` > 1 the whole cross-validation is repeated
with new fold seeds and C(t) and its standard error are averaged over repeats (the paper averages five runs).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError, ConvergenceWarning
from lifelines.utils import concordance_index
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from custom.evaluation.readouts import NotEvaluable

DEFAULT_PERCENTILES = (25, 50, 75)
# scipy >= 1.15 takes the generator as ``rng``; the older releases the project allows call it ``random_state``.
_BOOTSTRAP_RNG = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


def censor_at(time, event, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """Administrative censoring at ``horizon``: follow-up cut at the horizon, later events become censored."""
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    return np.minimum(time, horizon), event & (time <= horizon)


def time_dependent_concordance(time, event, risk, horizon: float = np.inf) -> float:
    """Harrell's C of ``risk`` (higher = earlier death) on survival administratively censored at ``horizon``.

    NaN when no pair is comparable (no event before the horizon)."""
    time_h, event_h = censor_at(time, event, horizon)
    if not event_h.any():
        return float("nan")
    try:
        return float(concordance_index(time_h, -np.asarray(risk, dtype=np.float64), event_h))
    except ZeroDivisionError:  # lifelines: no admissible pairs
        return float("nan")


def follow_up_horizons(time, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Horizons t at the given percentiles of the observed follow-up times."""
    return np.percentile(np.asarray(time, dtype=np.float64), list(percentiles))


def bootstrap_standard_errors(time, event, risk, horizons, n_bootstrap: int = 200, seed: int = 0) -> np.ndarray:
    """Standard deviation of C(t) at each horizon over ``n_bootstrap`` resamples of the subjects
    (``scipy.stats.bootstrap``, paired: a subject keeps its time, event and score). A resample without a
    comparable pair gives no C(t) and is left out of that horizon's standard deviation."""
    time, event, risk = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(risk, float)

    def statistic(t, e, r):
        return np.array([time_dependent_concordance(t, e, r, horizon) for horizon in horizons])

    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # percentile interval of a horizon with NaN draws
        result = stats.bootstrap(
            (time, event, risk),
            statistic,
            n_resamples=n_bootstrap,
            paired=True,
            vectorized=False,
            method="percentile",
            **{_BOOTSTRAP_RNG: rng},
        )
    draws = np.asarray(result.bootstrap_distribution).reshape(len(horizons), -1)
    finite = np.isfinite(draws)
    return np.array([np.std(col[ok], ddof=1) if ok.sum() > 1 else np.nan for col, ok in zip(draws, finite)])


def encode_covariates(table: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str]) -> pd.DataFrame:
    """Numeric columns as floats and categorical ones one-hot (``pandas.get_dummies``: sorted levels, the first
    dropped, columns ``<column>=<level>``). The levels come from the whole table: a fixed coding, not a fitted
    statistic."""
    numeric_part = table[list(numeric)].astype(np.float64)
    if not categorical:
        return numeric_part
    dummies = pd.get_dummies(
        table[list(categorical)].astype(str),
        prefix=list(categorical),
        prefix_sep="=",
        drop_first=True,
        dtype=np.float64,
    )
    return pd.concat([numeric_part, dummies], axis=1)


@dataclass
class SurvivalResult:
    percentiles: tuple
    horizons: np.ndarray
    concordance: np.ndarray = None
    standard_error: np.ndarray = None
    n_subjects: int = 0
    n_events: int = 0
    n_folds: int = 0
    repeats: int = 0
    risk: np.ndarray = None  # cross-validated risk scores of the first repeat
    notes: list = field(default_factory=list)
    status: str = "ok"
    reason: str = ""


def survival_folds(event: np.ndarray, folds: int, seed: int) -> tuple[list, list]:
    n, n_events = len(event), int(event.sum())
    if n_events < 2 or n - n_events < 1:
        raise NotEvaluable(f"{n_events} events among {n} subjects: need >= 2 events and >= 1 censored subject")
    k = min(folds, n // 2, n_events)
    if k < 2:
        raise NotEvaluable(f"{n} subjects: too few for 2 folds")
    notes = [f"{k} folds, not {folds}: {n} subjects, {n_events} events"] if k < folds else []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), event))
    return splits, notes


def _fold_design(image: np.ndarray | None, covariates: np.ndarray, train, pca_components, seed):
    """Training-row statistics only: scale (and reduce) image features, scale covariates; drop constant columns."""
    blocks_all = []
    if image is not None and image.shape[1]:
        scaler = StandardScaler().fit(image[train])
        z = scaler.transform(image)
        if pca_components is not None:
            k = max(1, min(int(pca_components), len(train) - 1, image.shape[1]))
            pca = PCA(k, random_state=seed).fit(z[train])
            z = pca.transform(z)
        blocks_all.append(z)
    if covariates.shape[1]:
        blocks_all.append(StandardScaler().fit(covariates[train]).transform(covariates))
    design = np.concatenate(blocks_all, axis=1)
    keep = design[train].std(axis=0) > 1e-12
    return design[:, keep]


def cross_validated_cox(
    image_features,
    covariates: pd.DataFrame,
    time,
    event,
    folds: int = 5,
    seed: int = 0,
    repeats: int = 1,
    penalizer: float = 0.5,
    pca_components=None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    n_bootstrap: int = 200,
) -> SurvivalResult:
    """C(t) ± bootstrap s.e. of a cross-validated Cox model (see module docstring). ``image_features`` may be
    None (clinical covariates only)."""
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    image = None if image_features is None else np.asarray(image_features, dtype=np.float64)
    cov = np.asarray(covariates, dtype=np.float64).reshape(len(time), -1)
    if (image is not None and not np.isfinite(image).all()) or not np.isfinite(cov).all():
        raise ValueError("survival covariates contain NaN or infinite values")
    horizons = follow_up_horizons(time, percentiles)
    result = SurvivalResult(tuple(percentiles), horizons, n_subjects=len(time), n_events=int(event.sum()))
    concordances, errors, unconverged = [], [], 0
    for r in range(repeats):
        try:
            splits, notes = survival_folds(event, folds, seed + r)
        except NotEvaluable as err:
            result.status, result.reason = "n/a", str(err)
            return result
        if r == 0:
            result.notes.extend(notes)
        risk = np.zeros(len(time))
        for train, test in splits:
            design = _fold_design(image, cov, train, pca_components, seed)
            columns = [f"x{i}" for i in range(design.shape[1])]
            frame = pd.DataFrame(design[train], columns=columns).assign(_time=time[train], _event=event[train])
            fitter = CoxPHFitter(penalizer=penalizer)
            with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
                warnings.simplefilter("always", ConvergenceWarning)
                try:
                    fitter.fit(frame, duration_col="_time", event_col="_event")
                except ConvergenceError as err:
                    result.status, result.reason = "n/a", f"Cox fit did not converge: {str(err).splitlines()[0]}"
                    return result
            unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
            risk[test] = fitter.predict_log_partial_hazard(pd.DataFrame(design[test], columns=columns)).to_numpy()
        if r == 0:
            result.risk = risk
        concordances.append([time_dependent_concordance(time, event, risk, h) for h in horizons])
        errors.append(bootstrap_standard_errors(time, event, risk, horizons, n_bootstrap, seed + r))
        result.n_folds = len(splits)
    result.repeats = repeats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result.concordance = np.nanmean(np.array(concordances), axis=0)
        result.standard_error = np.nanmean(np.array(errors), axis=0)
    if unconverged:
        result.notes.append(f"lifelines warned about convergence in {unconverged} fold fit(s)")
    return result


BODE_PARTS = ("fev1pp", "six_minute_walk_m", "mmrc", "bmi")


def bode_index(table: pd.DataFrame, columns: dict | None = None) -> pd.Series:
    """BODE index (0-10): BMI, airflow Obstruction (FEV1 % predicted), Dyspnoea (mMRC) and Exercise capacity
    (6-minute walk distance), each scored in points by the published cut-offs and summed. ``columns`` maps the
    parts (``BODE_PARTS``) to the table's column names; a KeyError lists the parts the table lacks."""
    columns = {part: part for part in BODE_PARTS} | dict(columns or {})
    missing = [f"{part} (column {columns[part]!r})" for part in BODE_PARTS if columns[part] not in table.columns]
    if missing:
        raise KeyError(f"the table lacks the BODE part(s) {', '.join(missing)}")
    fev1 = table[columns["fev1pp"]].astype(float)
    walk = table[columns["six_minute_walk_m"]].astype(float)
    mmrc = table[columns["mmrc"]].astype(float)
    bmi = table[columns["bmi"]].astype(float)
    points = (
        np.select([fev1 >= 65, fev1 >= 50, fev1 >= 36], [0, 1, 2], 3)
        + np.select([walk >= 350, walk >= 250, walk >= 150], [0, 1, 2], 3)
        + np.select([mmrc <= 1, mmrc == 2, mmrc == 3], [0, 1, 2], 3)
        + np.where(bmi > 21, 0, 1)
    )
    index = pd.Series(points.astype(np.float64), index=table.index, name="bode_index")
    return index.where(fev1.notna() & walk.notna() & mmrc.notna() & bmi.notna())
