"""Evaluation metrics against independent computations, leakage checks, small-cohort handling and the workflow."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from threadpoolctl import threadpool_limits

from custom.evaluation.ordinal_metrics import accuracy, one_off_accuracy
from custom.evaluation.readouts import cross_validated_readout, readout_pipeline
from custom.evaluation.survival import (
    _fold_design,
    bode_index,
    censor_at,
    cross_validated_cox,
    encode_covariates,
    time_dependent_concordance,
)
from custom.synthetic import draw_clinical_table


@pytest.fixture(scope="module")
def cohort():
    """A table-only SYNTHETIC cohort and features that carry its disease signal plus noise."""
    table = draw_clinical_table(90, seed=3).set_index("subject_id")
    rng = np.random.default_rng(0)
    signal = np.c_[table["emphysema_fraction"], table["airway_disease"], table["air_trapping_fraction"]]
    signal = (signal - signal.mean(0)) / signal.std(0)
    features = np.c_[signal + 0.1 * rng.normal(size=signal.shape), rng.normal(size=(len(table), 9))]
    return table, features


# ---------------------------------------------------------------- ordinal metrics


def test_one_off_accuracy_by_hand():
    truth = [0, 1, 2, 3, 4, 2]
    pred = [0, 3, 1, 3, 2, 2]  # distances 0, 2, 1, 0, 2, 0 -> exact 3/6, within one grade 4/6
    assert accuracy(truth, pred) == pytest.approx(3 / 6)
    assert one_off_accuracy(truth, pred) == pytest.approx(4 / 6)
    names = ["CT-0", "CT-1", "CT-2", "CT-3", "CT-4"]
    assert one_off_accuracy([names[t] for t in truth], [names[p] for p in pred], order=names) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="not on the ordinal scale"):
        one_off_accuracy(["CT-0"], ["CT-9"], order=names)


# ---------------------------------------------------------------- readouts


def test_readout_scores_equal_hand_computation(cohort):
    table, x = cohort
    y = np.log(table["fev1pp"].to_numpy())
    result = cross_validated_readout(x, y, "continuous", folds=5, seed=1)
    assert result.status == "ok" and result.n_folds == 5
    for fold in result.folds:
        t, p = y[fold.test], fold.prediction
        assert fold.scores["r2"] == pytest.approx(1 - np.sum((t - p) ** 2) / np.sum((t - t.mean()) ** 2))
    covered = np.sort(np.concatenate([f.test for f in result.folds]))
    np.testing.assert_array_equal(covered, np.arange(len(y)))  # every subject predicted exactly once
    assert result.mean("r2") > 0.3  # the features carry the spirometry signal

    grades = table["cle_score"].to_numpy()
    result = cross_validated_readout(x, grades, "ordinal", folds=5, seed=1)
    for fold in result.folds:
        t, p = grades[fold.test], fold.prediction
        assert fold.scores["accuracy"] == pytest.approx(sum(a == b for a, b in zip(t, p)) / len(t))
        assert fold.scores["one_off"] == pytest.approx(sum(abs(a - b) <= 1 for a, b in zip(t, p)) / len(t))
    values = result.fold_values("accuracy")
    assert result.mean("accuracy") == pytest.approx(values.mean())
    assert result.sd("accuracy") == pytest.approx(np.std(values, ddof=1))


def test_readout_on_noise_has_no_skill(cohort):
    table, x = cohort
    noise = np.random.default_rng(5).normal(size=x.shape)
    result = cross_validated_readout(noise, np.log(table["fev1pp"].to_numpy()), "continuous", folds=5, seed=1)
    assert result.pooled("r2") < 0.15


@pytest.mark.filterwarnings("ignore:The least populated class")
@pytest.mark.parametrize("kind,column", [("continuous", "fev1pp"), ("ordinal", "cle_score")])
def test_fold_scaler_and_model_see_only_training_rows(cohort, kind, column):
    table, x = cohort
    y = table[column].to_numpy()
    result = cross_validated_readout(x, y, kind, folds=4, seed=2, keep_models=True)
    for fold in result.folds:
        scaler = fold.model.named_steps["scale"]
        assert scaler.n_samples_seen_ == len(fold.train)
        np.testing.assert_allclose(scaler.mean_, x[fold.train].mean(axis=0))
        # a fresh pipeline fitted on the training rows alone predicts the test rows identically
        fresh, _ = readout_pipeline(kind, y[fold.train], x.shape[1], seed=2)
        with threadpool_limits(limits=1, user_api="blas"):
            fresh.fit(x[fold.train], y[fold.train])
        np.testing.assert_allclose(fresh.predict(x[fold.test]), fold.prediction)
    # wrecking one fold's test rows leaves that fold's scaler, regularisation and coefficients untouched
    fold = result.folds[0]
    moved = x.copy()
    moved[fold.test] += 3.0
    moved_result = cross_validated_readout(moved, y, kind, folds=4, seed=2, keep_models=True)
    rerun, other = moved_result.folds[0], moved_result.folds[1]
    np.testing.assert_array_equal(rerun.test, fold.test)
    np.testing.assert_allclose(rerun.model.named_steps["scale"].mean_, fold.model.named_steps["scale"].mean_)
    np.testing.assert_allclose(rerun.model.named_steps["model"].coef_, fold.model.named_steps["model"].coef_)
    assert not np.allclose(other.model.named_steps["scale"].mean_, result.folds[1].model.named_steps["scale"].mean_)


def test_small_cohort_is_reported_not_crashed():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 4))
    grades = np.array([0, 0, 0, 1, 1, 2, 3])
    result = cross_validated_readout(x, grades, "ordinal", folds=5)
    assert result.status == "ok" and result.n_folds == 3
    assert any("3 folds, not 5" in n for n in result.notes)
    assert any("2 (n=1)" in n and "3 (n=1)" in n for n in result.notes)
    one_class = cross_validated_readout(x, np.zeros(7, int), "binary", folds=5)
    assert one_class.status == "n/a" and "one class" in one_class.reason
    tiny = cross_validated_readout(x[:3], np.arange(3.0), "continuous", folds=5)
    assert tiny.status == "n/a" and "too few" in tiny.reason
    singletons = cross_validated_readout(x[:4], np.array([0, 1, 2, 3]), "ordinal")
    assert singletons.status == "n/a" and "one subject each" in singletons.reason


# ---------------------------------------------------------------- survival


def harrell_by_hand(time, event, risk) -> float:
    """Pairs (i, j) with an observed event for i before t_j; concordant when i has the higher risk."""
    concordant, comparable = 0.0, 0
    for i, j in itertools.permutations(range(len(time)), 2):
        if event[i] and time[i] < time[j]:
            comparable += 1
            concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


def test_time_dependent_concordance_against_hand_count_and_lifelines():
    rng = np.random.default_rng(4)
    time = rng.exponential(5.0, 40)
    event = rng.random(40) < 0.6
    risk = -time + rng.normal(0, 3, 40)
    risk[:4] = risk[4]  # some tied scores count one half
    by_hand = harrell_by_hand(time, event, risk)
    assert time_dependent_concordance(time, event, risk) == pytest.approx(by_hand)
    assert concordance_index(time, -risk, event) == pytest.approx(by_hand)
    horizon = float(np.percentile(time, 50))
    t_h, e_h = censor_at(time, event, horizon)
    assert t_h.max() == pytest.approx(horizon) and not e_h[time > horizon].any()
    at_horizon = time_dependent_concordance(time, event, risk, horizon)
    assert at_horizon == pytest.approx(harrell_by_hand(t_h, e_h, risk))
    assert at_horizon != pytest.approx(by_hand)  # censoring at the horizon changes which pairs count


def test_cox_fold_design_uses_training_rows_and_finds_signal(cohort):
    table, x = cohort
    cov = encode_covariates(table, ["age", "pack_years"], ["sex", "race", "smoking_status"])
    assert {"sex=M", "smoking_status=former", "smoking_status=never"} <= set(cov.columns)
    train = np.arange(60)
    design = _fold_design(x, cov.to_numpy(), train, pca_components=3, seed=0)
    np.testing.assert_allclose(design[train].mean(axis=0), 0.0, atol=1e-9)
    assert np.abs(design[60:].mean(axis=0)).max() > 1e-3
    result = cross_validated_cox(
        x, cov, table["survival_years"], table["death_event"], folds=5, seed=0, pca_components=3, n_bootstrap=50
    )
    assert result.status == "ok" and result.n_folds == 5
    assert np.all(result.concordance > 0.6), result.concordance
    assert np.all((result.standard_error > 0) & (result.standard_error < 0.2))
    # the reported C(t) is Harrell's C of the cross-validated risk on the data censored at each horizon
    for horizon, c in zip(result.horizons, result.concordance):
        t_h, e_h = censor_at(table["survival_years"], table["death_event"], horizon)
        assert c == pytest.approx(harrell_by_hand(t_h, e_h, result.risk))


def test_bode_index_points():
    table = pd.DataFrame(
        {
            "fev1pp": [70, 55, 40, 30],
            "six_minute_walk_m": [400, 300, 200, 100],
            "mmrc": [1, 2, 3, 4],
            "bmi": [25, 21, 19, 30],
        }
    )
    np.testing.assert_array_equal(
        bode_index(table).to_numpy(), [0, 4, 7, 9]
    )  # 55 -> 1, 300 m -> 1, mMRC 2 -> 1, BMI 21 -> 1
    with pytest.raises(KeyError, match="mmrc"):
        bode_index(table.drop(columns="mmrc"))
