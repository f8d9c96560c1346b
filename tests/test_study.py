"""The evidence study (bundle/configs/study.yaml, custom.study): every stage wired on a tiny budget, like-for-like
budgets read back from MLflow, the same folds for every feature set, and a resumed study that redoes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from monai.bundle import ConfigWorkflow
from monai.utils import path_to_sqlite_uri

import custom
from custom.study.pretraining import StudyPretraining
from custom.study.readouts import StudyReadouts

CONFIG = str(Path(custom.bundle_root()) / "configs" / "study.yaml")
# the settings a method may hold differently from DrasCLR: its own switches, and where its outputs go
METHOD_PARAMS = {
    "variant",
    "conditioning",
    "global_queue",
    "num_neighbours",
    "num_queues",
    "output_dir",
    "model_path",
    "run_name",
    "resume",
}


def run_study(out_dir: Path) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=CONFIG, workflow_type=None, preset="tiny", seed=11, output_dir=str(out_dir), progress=False
    )
    workflow.initialize()
    workflow.run()
    return workflow


@pytest.mark.slow
def test_the_study_runs_every_stage_with_one_budget_and_resumes(tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "study"
    run_study(out)
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["generate", "prepare", "pretrain", "embed", "readouts", "compare", "report"]
    assert all(s["status"] == "ok" and s["calls"] == 1 for s in stages.values()), stages

    # every method at every share, and the baselines, were read out on both cohorts
    predictions = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    methods = ["DrasCLR", "Plain MoCo", "No conditioning", "ℓ = 0"]
    learned = predictions.dropna(subset=["share"])
    for cohort in ("copd", "covid"):
        got = learned[learned.cohort == cohort].groupby("method")["share"].unique()
        assert sorted(got.index) == sorted(methods)
        assert all(sorted(v) == [0.0, 0.25, 0.5, 1.0] for v in got), got
        assert {"LAA-950", "LAA-950 (patch)"} <= set(predictions[predictions.cohort == cohort].method)
    assert "survival" in set(predictions.target) and "severity" in set(predictions.target)
    # same subjects in the same test folds for every feature set: each (target, repeat) has one subject set
    per_set = predictions.groupby(["cohort", "target", "repeat", "method", "share"], dropna=False)["subject_id"]
    subject_sets = per_set.apply(lambda s: tuple(sorted(s))).groupby(["cohort", "target", "repeat"]).nunique()
    assert (subject_sets == 1).all(), subject_sets

    # the budget each method got, as its own MLflow run logged it: the same iterations x batch, schedule, seed
    client = MlflowClient(tracking_uri=path_to_sqlite_uri(str(out / "mlruns.db")))
    experiment = client.get_experiment_by_name("drasclr_study")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.info.run_name == "study-tiny"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.params["variant"] for r in children) == sorted(
        ["neighbours_2", "plain_moco", "conditioning_none", "neighbours_0"]
    )
    shared = [{k: v for k, v in r.data.params.items() if k not in METHOD_PARAMS} for r in children]
    assert all(p == shared[0] for p in shared), [set(p.items()) ^ set(shared[0].items()) for p in shared]
    assert (shared[0]["iterations"], shared[0]["batch_size"], shared[0]["max_epochs"]) == ("4", "4", "4")
    budgets = pd.read_csv(out / "budgets.csv")
    assert (budgets["patches_seen"] == 16).all() and (budgets["trained_iterations"] == 4).all()

    # the report, its tables and picture
    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "tiny" in report and "compute_curve.png" in report
    assert (out / "compute_curve.png").stat().st_size > 10_000
    paired = pd.read_csv(out / "paired_differences.csv")
    assert set(paired.baseline) >= {"Plain MoCo", "No conditioning", "ℓ = 0", "LAA-950"}
    assert (paired.low <= paired.estimate + 1e-12).all() and (paired.estimate <= paired.high + 1e-12).all()

    # a second call redoes nothing: no generation, no training, the same numbers
    method_record = out / "pretrain" / "neighbours_2" / "method.json"
    trained_at = method_record.stat().st_mtime_ns
    run_study(out)
    again = json.loads((out / "stages.json").read_text())
    assert again["generate"]["calls"] == 1 and again["pretrain"]["calls"] == 2
    assert method_record.stat().st_mtime_ns == trained_at
    pd.testing.assert_frame_equal(pd.read_csv(out / "paired_differences.csv"), paired)

    # the same folder with another budget is refused before any work, naming what changed
    workflow = ConfigWorkflow(
        config_file=CONFIG, workflow_type=None, preset="tiny", seed=11, output_dir=str(out), iterations=8
    )
    workflow.initialize()
    with pytest.raises(ValueError, match=r"study with other settings \(settings.iterations\)"):
        workflow.parser.get_parsed_content("study").run()  # the run expression's own error, not MONAI's wrapper


def test_shares_must_fall_on_the_kept_encoders(tmp_path):
    with pytest.raises(ValueError, match="multiple of snapshots"):
        StudyPretraining({"DrasCLR": "drasclr"}, tmp_path, iterations=10, batch_size=4, snapshots=4)
    with pytest.raises(ValueError, match="share 0.3 is not one of k / 4"):
        StudyPretraining({"DrasCLR": "drasclr"}, tmp_path, iterations=8, batch_size=4, shares=(0.0, 0.3, 1.0))
    with pytest.raises(ValueError, match="unknown ablation variant"):
        StudyPretraining({"DrasCLR": "drasclr", "X": "not_a_variant"}, tmp_path, iterations=8, batch_size=4)


def test_every_feature_set_gets_the_same_folds_and_a_prediction_per_subject():
    rng = np.random.default_rng(0)
    n = 40
    index = pd.Index([f"S{i:03d}" for i in range(n)], name="subject_id")
    signal = rng.normal(size=n)
    clinical = pd.DataFrame(
        {
            "fev1pp": np.exp(4.3 + 0.2 * signal + 0.05 * rng.normal(size=n)),
            "grade": (signal > 0).astype(int) + (signal > 1).astype(int),
            "years": rng.uniform(1, 10, n),
            "death": (rng.random(n) < 0.5).astype(int),
        },
        index=index,
    )
    readouts = StudyReadouts(
        {
            "log_fev1pp": {"column": "fev1pp", "kind": "continuous", "transform": "log"},
            "grade": {"kind": "ordinal"},
        },
        survival={"time": "years", "event": "death", "pca_components": 2},
        folds=4,
        repeats=2,
        seed=3,
    )
    good = pd.DataFrame(np.c_[signal, rng.normal(size=(n, 3))], index=index)
    noise = pd.DataFrame(rng.normal(size=(n, 4)), index=index)
    a, notes_a = readouts.predictions("copd", clinical, good, "A", 1.0, "a")
    b, notes_b = readouts.predictions("copd", clinical, noise, "B", 1.0, "b")
    assert notes_a == notes_b == []
    for table in (a, b):
        assert set(table.target) == {"log_fev1pp", "grade", "survival"}
        counts = table.groupby(["target", "repeat"]).subject_id.agg(["count", "nunique"])
        assert (counts["count"] == n).all() and (counts["nunique"] == n).all()  # each subject once per repeat
    # the same test folds: a subject's fold partners are the same in A and B (the folds, not only their union)
    key = ["target", "repeat", "subject_id"]
    merged = a.merge(b, on=key, suffixes=("_a", "_b"))
    assert len(merged) == len(a) == len(b)
    np.testing.assert_array_equal(merged.truth_a.fillna(-1), merged.truth_b.fillna(-1))
    np.testing.assert_array_equal(merged.fold_a, merged.fold_b)
    assert merged[merged.target == "grade"].fold_a.nunique() == 4
    fev = merged[merged.target == "log_fev1pp"]
    r2 = {
        m: 1 - ((fev.truth_a - fev[f"prediction_{m}"]) ** 2).sum() / ((fev.truth_a - fev.truth_a.mean()) ** 2).sum()
        for m in ("a", "b")
    }
    assert r2["a"] > 0.6 > r2["b"], r2  # the features that carry the signal predict it out of fold
    with pytest.raises(ValueError, match="not the same subjects"):
        readouts.predictions("copd", clinical, good.iloc[::-1], "A", 1.0, "a.csv")


def test_a_study_folder_is_resumed_only_with_its_own_settings(tmp_path):
    from custom.study.workflow import Study

    record = {"preset": "cpu", "seed": 7, "settings": {"iterations": 400, "shares": [0.0, 1.0]}, "started": "t0"}
    study = Study(tmp_path, {**record, "started": None}, {}, None, None, None, {}, {})
    study.check_same_study({})  # a new folder
    study.check_same_study({**record, "finished": "t1", "notes": ["x"], "bundle_version": "0.0.1"})  # run-only keys
    changed = {**record, "settings": {"iterations": 800, "shares": [0.0, 1.0]}}
    with pytest.raises(ValueError, match=r"other settings \(settings.iterations\); give another --output_dir"):
        study.check_same_study(changed)
    with pytest.raises(ValueError, match=r"other settings \(seed\)"):
        study.check_same_study({**record, "seed": 8})


def test_budgets_without_mlflow_come_from_the_trainer_record_and_say_so():
    from custom.study.pretraining import mlflow_budgets
    from custom.study.report import _budget_table

    budget = {"iterations": 400, "batch_size": 16, "max_epochs": 4, "epoch_length": 100, "order": "mixed"}
    records = {
        "DrasCLR": {"variant": "neighbours_2", "status": "ok", "budget": budget, "mlflow_run_id": None},
        "Plain MoCo": {"variant": "plain_moco", "status": "failed", "reason": "boom"},
    }
    rows = pd.DataFrame(mlflow_budgets(records, None))
    assert rows.loc[0, "iterations"] == 400 and rows.loc[0, "patches_seen"] == 6400
    assert rows.loc[0, "source"] == "trainer record (no MLflow run)"
    assert pd.isna(rows.loc[1, "iterations"])  # a failed method has no budget: shown as n/a, not invented
    table = _budget_table(rows)
    assert list(table["Read from"]) == ["trainer record (no MLflow run)"] * 2
