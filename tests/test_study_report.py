"""The evidence study's comparison and report (custom/study/comparison.py, custom/study/report.py) on a predictions
table built here with a KNOWN effect: DrasCLR predicts the truth with little noise, plain MoCo and the fixed
LAA-950 baseline with much more, and "Copy" is an identical copy of DrasCLR. Two cohorts, a continuous, an
ordinal and a survival target, shares 0 / 0.5 / 1 of the budget, two cross-validation repeats."""

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from matplotlib.image import imread
from sklearn.metrics import r2_score

from custom.study.comparison import PAIRED_COLUMNS, SCORE_COLUMNS, paired_table, score_table
from custom.study.report import compute_curve, summary_counts, write_report

SHARES = (0.0, 0.5, 1.0)
REPEATS = 2
RESAMPLES = 200
# target -> (cohort, label, kind, metric)
TARGETS = {
    "log_fev1pp": ("copd", "logFEV1pp", "continuous", "r2"),
    "gold": ("copd", "GOLD", "ordinal", "accuracy"),
    "survival": ("copd", "Survival", "survival", "c_index"),
    "severity": ("covid", "Severity", "ordinal", "accuracy"),
}
SUBJECTS = {"copd": 60, "covid": 40}


def _truth(rng, kind, n):
    if kind == "continuous":
        return rng.normal(size=n), None
    if kind == "ordinal":
        return rng.integers(0, 4, n).astype(float), None
    latent = rng.normal(size=n)
    death = rng.exponential(np.exp(-latent))
    censor = rng.exponential(2.0, n)
    return latent, (np.minimum(death, censor), (death <= censor).astype(float))


def _predict(rng, kind, latent, noise):
    """A prediction of ``latent`` whose error grows with ``noise`` (class codes for ordinal targets)."""
    if kind == "ordinal":
        right = rng.random(len(latent)) < 1 / (1 + noise)
        return np.where(right, latent, rng.integers(0, 4, len(latent))).astype(float)
    return latent + noise * rng.normal(size=len(latent))


def _predictions(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for target, (cohort, label, kind, metric) in TARGETS.items():
        n = SUBJECTS[cohort]
        ids = [f"{cohort}-{i:03d}" for i in range(n)]
        latent, survival = _truth(rng, kind, n)
        truth = np.full(n, np.nan) if survival else latent
        time, event = survival if survival else (np.full(n, np.nan), np.full(n, np.nan))
        base = {"cohort": cohort, "target": target, "label": label, "kind": kind, "metric": metric}
        for repeat in range(REPEATS):
            sets = [("LAA-950", np.nan, 2.0)]
            for share in SHARES:
                sets += [("DrasCLR", share, 0.25 + 0.2 * (1 - share)), ("Plain MoCo", share, 2.0)]
            for method, share, noise in sets:
                prediction = _predict(rng, kind, latent, noise)
                for copy in ["Copy"] if method == "DrasCLR" else []:
                    rows += _rows(base, copy, share, repeat, ids, truth, prediction, time, event)
                rows += _rows(base, method, share, repeat, ids, truth, prediction, time, event)
    return pd.DataFrame(rows)


def _rows(base, method, share, repeat, ids, truth, prediction, time, event):
    return [
        {
            **base,
            "method": method,
            "share": share,
            "repeat": repeat,
            "subject_id": ids[i],
            "truth": truth[i],
            "prediction": prediction[i],
            "time": time[i],
            "event": event[i],
        }
        for i in range(len(ids))
    ]


@pytest.fixture(scope="module")
def predictions():
    return _predictions()


@pytest.fixture(scope="module")
def scores(predictions):
    return score_table(predictions, n_resamples=RESAMPLES, seed=3)


@pytest.fixture(scope="module")
def paired(predictions):
    return paired_table(predictions, n_resamples=RESAMPLES, seed=3)


def _by_hand(block: pd.DataFrame, metric: str) -> float:
    values = []
    for _, r in block.sort_values("subject_id").groupby("repeat"):
        if metric == "r2":
            values.append(r2_score(r["truth"], r["prediction"]))
        elif metric == "accuracy":
            values.append(np.mean(r["truth"].to_numpy() == r["prediction"].to_numpy()))
        else:
            values.append(concordance_index(r["time"], -r["prediction"], r["event"]))
    return float(np.mean(values))


def test_scores_are_the_repeat_averaged_metrics(predictions, scores):
    assert list(scores.columns) == SCORE_COLUMNS
    # 4 targets x (3 learned methods x 3 shares + 1 fixed baseline)
    assert len(scores) == 4 * (3 * 3 + 1)
    for _, row in scores.iterrows():
        share = predictions["share"].isna() if pd.isna(row["share"]) else predictions["share"] == row["share"]
        block = predictions[(predictions["target"] == row["target"]) & (predictions["method"] == row["method"]) & share]
        assert row["estimate"] == pytest.approx(_by_hand(block, row["metric"])), (row["target"], row["method"])
        assert row["low"] <= row["estimate"] <= row["high"]
        assert row["n_subjects"] == SUBJECTS[row["cohort"]] and row["repeats"] == REPEATS


def test_paired_differences_find_the_known_effect(paired):
    assert list(paired.columns) == PAIRED_COLUMNS
    # per target: 3 shares x (Copy, Plain MoCo, LAA-950)
    assert len(paired) == 4 * 3 * 3
    assert set(paired["reference"]) == {"DrasCLR"}
    worse = paired[paired["baseline"].isin(["Plain MoCo", "LAA-950"])]
    assert (worse["low"] > 0).all(), worse[["target", "share", "baseline", "low"]]
    assert worse["excludes_zero"].all() and (worse["share_above_zero"] > 0.95).all()
    copy = paired[paired["baseline"] == "Copy"]
    assert (copy["estimate"] == 0.0).all() and (copy["low"] == 0.0).all() and (copy["high"] == 0.0).all()
    assert not copy["excludes_zero"].any()
    fixed = paired[paired["baseline"] == "LAA-950"]
    assert sorted(fixed["share"].unique()) == list(SHARES)  # a fixed baseline is compared at every share
    counts = summary_counts(paired)
    assert (counts.loc[counts["baseline"] == "LAA-950", "above"] == 4).all()
    assert (counts.loc[counts["baseline"] == "Copy", "includes"] == 4).all()


def test_subjects_are_aligned_by_id_and_the_result_is_deterministic(predictions, paired):
    """Rows in another order, and a baseline that lacks one subject in every repeat: pairs use only the subjects
    both sides hold, matched by id, and the same seed gives the same numbers."""
    one = predictions[predictions["target"] == "log_fev1pp"]
    shuffled = one.sample(frac=1.0, random_state=1)
    again = paired_table(shuffled, n_resamples=RESAMPLES, seed=3)
    pd.testing.assert_frame_equal(
        again.reset_index(drop=True), paired[paired["target"] == "log_fev1pp"].reset_index(drop=True)
    )
    dropped = one[~((one["method"] == "LAA-950") & (one["subject_id"] == "copd-007"))]
    fewer = paired_table(dropped, n_resamples=RESAMPLES, seed=3)
    assert set(fewer.loc[fewer["baseline"] == "LAA-950", "n_subjects"]) == {SUBJECTS["copd"] - 1}
    assert set(fewer.loc[fewer["baseline"] != "LAA-950", "n_subjects"]) == {SUBJECTS["copd"]}


def test_repeats_with_different_subjects_are_refused(predictions):
    one = predictions[predictions["target"] == "gold"]
    gap = (one["method"] == "Plain MoCo") & (one["repeat"] == 1) & (one["subject_id"] == "copd-011")
    with pytest.raises(ValueError, match=r"copd/gold, method 'Plain MoCo' .*different subject sets"):
        paired_table(one[~gap], n_resamples=RESAMPLES)
    with pytest.raises(ValueError, match="no rows of the reference method 'SimCLR'"):
        paired_table(one, reference="SimCLR")
    with pytest.raises(ValueError, match=r"predictions table: missing column\(s\) \['prediction'\]"):
        score_table(one.drop(columns="prediction"))


def test_the_report_holds_the_tables_and_the_picture(tmp_path, scores, paired):
    record = {
        "preset": "test",
        "seed": 123,
        "generator": "regional",
        "copd_subjects": SUBJECTS["copd"],
        "covid_subjects": SUBJECTS["covid"],
        "settings": {"shares": list(SHARES), "repeats": REPEATS},
        "started": "2026-12-02T05:00:00Z",
        "finished": "2026-12-02T05:10:00Z",
        "bundle_version": "9.9.9",
    }
    budgets = pd.DataFrame(
        {
            "method": ["DrasCLR", "Plain MoCo", "Copy"],
            "iterations": [120, 120, 120],
            "batch_size": [16, 16, 16],
            "patches_seen": [1920, 1920, 1920],
            "order": ["landmark"] * 3,
            "queue_size": [64] * 3,
            "num_queues": [581, 1, 581],
            "train_seconds": [412.0, 98.5, 412.0],
            "mlflow_run_id": ["a1", "b2", "c3"],
        }
    )
    stage_times = pd.DataFrame(
        {
            "stage": ["generate", "prepare", "pretrain"],
            "seconds": [40.0, 3725.0, 812.0],
            "cpu_seconds": [70.0, 7000.0, 1600.0],
            "detail": ["100 subjects", "", "3 methods"],
        }
    )
    path = write_report(tmp_path, record, scores, paired, stage_times, budgets)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert "SYNTHETIC DATA" in text and "| preset | test |" in text and "| generator model | regional |" in text
    assert "| COPD-like subjects (SYNTHETIC) | 60 |" in text and "| bundle version | 9.9.9 |" in text
    assert "MLflow params" in text and "| Plain MoCo | 120 | 16 | 1920 | landmark | 64 | 1 | 1 min 38 s | b2 |" in text
    assert "| prepare | 1 h 02 min 05 s | 1 h 56 min 40 s |  |" in text
    assert "| Cohort | Target | Metric | DrasCLR | Copy | Plain MoCo | LAA-950 |" in text  # reference first
    full = scores[(scores["share"] == 1.0) & (scores["target"] == "log_fev1pp") & (scores["method"] == "DrasCLR")]
    est, low, high = full[["estimate", "low", "high"]].iloc[0]
    assert f"{est:.2f} [{low:.2f}, {high:.2f}]" in text
    row = paired[(paired["share"] == 1.0) & (paired["target"] == "gold") & (paired["baseline"] == "LAA-950")].iloc[0]
    cell = f"{row['estimate'] * 100:.1f} [{row['low'] * 100:.1f}, {row['high'] * 100:.1f}]"
    assert f"| copd | GOLD | % acc. | LAA-950 | {cell} |" in text
    assert "| LAA-950 | 4 | 4 | 0 | 0 |" in text and "| Copy | 4 | 0 | 4 | 0 |" in text
    assert "![Score against the share of the pre-training budget (SYNTHETIC)](compute_curve.png)" in text
    picture = imread(tmp_path / "compute_curve.png")
    assert picture.ndim == 3 and picture.shape[0] > 300 and picture.shape[1] > 600
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "scores.csv"), scores, check_dtype=False)
    assert len(pd.read_csv(tmp_path / "paired_differences.csv")) == len(paired)
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_compute_curve_refuses_a_table_without_scores(tmp_path, scores):
    with pytest.raises(ValueError, match=r"scores table: missing column\(s\) \['low', 'high'\]"):
        compute_curve(scores.drop(columns=["low", "high"]), tmp_path / "curve.png")
