"""Every workflow's MLflow run, read back with ``mlflow.MlflowClient`` from real sqlite stores: the tags, the input
tables as MLflow datasets, the config files, the pictures, the exported model (loaded with ``torch.load``), metrics
with steps, and an ablation family as a parent run with its variants as children. The fine-tuning and detection
runs use the SYNTHETIC ``demo_cohort`` boxes of tests/test_emphysema_finetune.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, write_patch_cache
from monai.bundle import ConfigParser
from monai.utils import path_to_sqlite_uri
from test_emphysema_finetune import cohort_boxes, detection_boxes  # noqa: F401 - module fixtures reused here
from test_evaluation_workflow import inputs  # noqa: F401 - module fixture reused here

from custom.emphysema.network import EmphysemaDetectors
from custom.engine.tracking import PARENT_TAG, WorkflowRun, invoked_config_files, table_metrics

CONFIGS = REPO_ROOT / "bundle" / "configs"
PROVENANCE = ("bundle_version", "git_commit", "host", "world_size", "command")


def _runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} in {uri}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def _artifacts(client, run_id: str, folder: str | None = None) -> set:
    return {f.path for f in client.list_artifacts(run_id, folder)}


def _steps(client, run_id: str, name: str) -> list:
    return sorted(m.step for m in client.get_metric_history(run_id, name))


# ---------------------------------------------------------------- the shared helpers, fast
def test_a_workflow_run_records_inputs_outputs_and_a_failure(tmp_path):
    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    table = tmp_path / "scores.csv"
    pd.DataFrame({"arm": ["a", "a", "b"], "fold": [0, 1, 0], "f1": [0.5, 0.7, float("nan")]}).to_csv(table, index=0)
    prepared = write_patch_cache(tmp_path / "prepared", num_subjects=1)
    config = tmp_path / "workflow.yaml"
    config.write_text("x: 1\n")

    def work():
        (tmp_path / "curve.png").write_bytes(b"\x89PNG not really")
        return "done"

    run = WorkflowRun(
        uri,
        "family",
        run_name="parent",
        dataset_dir=prepared,
        datasets={"scores": table, "absent": tmp_path / "absent.csv"},
        params={"folds": 2},
        config_files=[config],
        metric_tables=[{"path": table, "names": ["arm"], "values": ["f1"], "step": "fold", "prefix": "cv"}],
        figures=[str(tmp_path / "*.png")],
    )
    assert run.run(work) == "done"
    client = mlflow.MlflowClient(uri)
    (parent,) = _runs(uri, "family")
    assert parent.info.status == "FINISHED" and parent.data.params == {"folds": "2"}
    assert all(parent.data.tags.get(k) for k in PROVENANCE) and parent.data.tags["dataset_dir"] == str(prepared)
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"prepared_cohort", "scores"}
    assert _steps(client, parent.info.run_id, "cv/a/f1") == [0, 1] and "cv/b/f1" not in parent.data.metrics
    assert _artifacts(client, parent.info.run_id) >= {"config", "figures", "dataset"}
    assert _artifacts(client, parent.info.run_id, "dataset") == {"dataset/manifest.csv", "dataset/scores.csv"}

    # children: a run started inside nested() on the same store; none for a run on another store
    with run.nested():
        with WorkflowRun(uri, "family", run_name="child"):
            pass
        with WorkflowRun(path_to_sqlite_uri(str(tmp_path / "other.db")), "family", run_name="elsewhere"):
            pass
    with WorkflowRun(uri, "family", run_name="after"):
        pass
    tags = {r.info.run_name: r.data.tags for r in _runs(uri, "family")}
    assert tags["child"][PARENT_TAG] == parent.info.run_id
    assert PARENT_TAG not in tags["after"] and PARENT_TAG not in tags["parent"]
    assert PARENT_TAG not in _runs(path_to_sqlite_uri(str(tmp_path / "other.db")), "family")[0].data.tags

    def crash():
        raise RuntimeError("simulated failure")

    with pytest.raises(RuntimeError):
        WorkflowRun(uri, "family", run_name="crashed", config_files=[config]).run(crash)
    crashed = [r for r in _runs(uri, "family") if r.info.run_name == "crashed"][0]
    assert crashed.info.status == "FAILED" and _artifacts(client, crashed.info.run_id, "config") == {
        "config/workflow.yaml"
    }
    # disabled: the work runs, nothing is logged
    assert WorkflowRun(uri, "disabled", enabled="false").run(lambda: 3) == 3
    assert client.get_experiment_by_name("disabled") is None


def test_a_monai_bundle_run_command_logs_its_resolved_config(tmp_path, monkeypatch):
    import monai.bundle
    import yaml

    config = tmp_path / "workflow.yaml"
    config.write_text("x: 1\ny: '@x'\nz: [1]\n")
    main = str(Path(monai.bundle.__file__).parent / "__main__.py")
    argv = [main, "run", "work", "--config_file", str(config), "--x", "2", "--z=[3,4]", "--tracking", "mlflow"]
    monkeypatch.setattr(sys, "argv", argv)
    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    WorkflowRun(uri, "resolved", config_files=invoked_config_files()).run(lambda: None)
    client = mlflow.MlflowClient(uri)
    (run,) = _runs(uri, "resolved")
    assert _artifacts(client, run.info.run_id, "config") == {"config/workflow.yaml", "config/resolved.yaml"}
    resolved = client.download_artifacts(run.info.run_id, "config/resolved.yaml", str(tmp_path / "download"))
    assert yaml.safe_load(Path(resolved).read_text()) == {"x": 2, "y": "@x", "z": [3, 4]}
    assert run.data.tags["command"].endswith("--x 2 '--z=[3,4]' --tracking mlflow")  # shlex-quoted


def test_table_metrics_take_their_steps_from_the_table():
    frame = pd.DataFrame({"init": ["pretrained", "pretrained"], "fraction": [0.5, 1.0], "f1_mean": [0.6, "n/a"]})
    (metric,) = table_metrics(frame, ["init"], ["f1_mean", "absent"], step="fraction", step_scale=100)
    assert (metric.key, metric.value, metric.step) == ("pretrained/f1_mean", 0.6, 50)


# ---------------------------------------------------------------- the workflows
@pytest.mark.slow
def test_finetune_run_holds_tags_datasets_config_curve_and_a_loadable_model(cohort_boxes, tmp_path):  # noqa: F811
    from monai.bundle import run

    model_path = tmp_path / "models" / "model.pt"
    run(
        "finetune",
        config_file=str(CONFIGS / "emphysema_finetune.yaml"),
        annotations=str(cohort_boxes["annotations"]),
        prepared_dir=str(cohort_boxes["prepared"]),
        patch_cache=str(cohort_boxes["cache"]),
        pretrained_path=str(cohort_boxes["pretrained"]),
        progress=False,
        freeze_encoder=True,
        epochs=2,
        batch_size=3,
        model_path=str(model_path),
        output_dir=str(tmp_path / "ft"),
    )
    uri = path_to_sqlite_uri(str(tmp_path / "ft" / "mlruns.db"))
    client = mlflow.MlflowClient(uri)
    (found,) = _runs(uri, "drasclr_emphysema_finetune")
    run_id = found.info.run_id
    assert found.info.status == "FINISHED"
    tags = found.data.tags
    assert all(tags.get(k) for k in PROVENANCE) and tags["world_size"] == "1"
    assert tags["dataset_dir"] == str(Path(cohort_boxes["prepared"]).resolve())
    datasets = {d.dataset.name: d for d in found.inputs.dataset_inputs}
    assert set(datasets) == {"annotations", "prepared_cohort"} and all(d.dataset.digest for d in datasets.values())
    assert {t.key: t.value for t in datasets["annotations"].tags}["mlflow.data.context"] == "training"
    assert found.data.params["epochs"] == "2" and found.data.params["num_boxes"] == "6"
    # 6 boxes, batch 3: 2 iterations per epoch; the loss per iteration and per epoch
    assert _steps(client, run_id, "Loss") == [1, 2, 3, 4] and _steps(client, run_id, "epoch_loss") == [1, 2]
    assert _artifacts(client, run_id, "config") == {"config/emphysema_finetune.yaml"}
    assert _artifacts(client, run_id, "figures") == {"figures/finetune_loss.png"}
    assert (tmp_path / "ft" / "finetune_loss.png").stat().st_size > 5000
    assert _artifacts(client, run_id, "model") == {"model/model.pt", "model/model.json"}
    assert _artifacts(client, run_id, "dataset") == {"dataset/annotations.csv", "dataset/manifest.csv"}
    weights = client.download_artifacts(run_id, "model/model.pt", str(tmp_path / "download"))
    state = torch.load(weights, weights_only=True)
    EmphysemaDetectors().load_state_dict(state)  # the deployable detectors, not some other file
    written = torch.load(model_path, weights_only=True)
    assert all(torch.equal(state[k], written[k]) for k in written)


@pytest.mark.slow
def test_detection_run_holds_fold_scores_curve_tables_and_inputs(cohort_boxes, detection_boxes, tmp_path):  # noqa: F811
    from monai.bundle import run

    out = tmp_path / "detection"
    run(
        "detection",
        config_file=str(CONFIGS / "emphysema_finetune.yaml"),
        annotations=str(detection_boxes["annotations"]),
        patch_cache=str(detection_boxes["cache"]),
        prepared_dir=str(cohort_boxes["prepared"]),
        pretrained_path=str(cohort_boxes["pretrained"]),
        progress=False,
        detection_dir=str(out),
        output_dir=str(tmp_path / "ft"),
        folds=2,
        fractions=[1.0],
        stride=32,
        cv_epochs_linear=1,
        cv_epochs_full=1,
        batch_size=2,
        random_location=False,
    )
    uri = path_to_sqlite_uri(str(tmp_path / "ft" / "mlruns.db"))  # the store of emphysema_finetune.yaml
    client = mlflow.MlflowClient(uri)
    (found,) = _runs(uri, "drasclr_emphysema_detection")
    run_id = found.info.run_id
    assert found.info.status == "FINISHED" and found.info.run_name == "detection"
    assert all(found.data.tags.get(k) for k in PROVENANCE)
    assert {d.dataset.name for d in found.inputs.dataset_inputs} == {"annotations", "prepared_cohort"}
    assert found.data.params["folds"] == "2"
    folds = pd.read_csv(out / "fold_metrics.csv")
    laa = folds[(folds["experiment"] == "patch_laa/none/1") & (folds["subtype"] == "centrilobular")]
    # names: each table column's value made MLflow-safe ("/" inside a value becomes "_")
    history = client.get_metric_history(run_id, "fold/patch_laa_none_1/centrilobular/accuracy")
    assert sorted((m.step, m.value) for m in history) == sorted(zip(laa["fold"], laa["accuracy"]))
    assert "patch_laa_none_1/centrilobular/f1_mean" in found.data.metrics
    assert _steps(client, run_id, "label_efficiency/pretrained/centrilobular/f1_mean") == [100]
    assert _artifacts(client, run_id, "figures") == {"figures/label_efficiency.png"}
    assert {"tables/detection_table.md", "tables/fold_metrics.csv"} <= _artifacts(client, run_id, "tables")
    assert _artifacts(client, run_id, "config") == {"config/emphysema_finetune.yaml"}


@pytest.mark.slow
def test_evaluation_run_holds_inputs_config_and_per_fold_scores(inputs, tmp_path):  # noqa: F811
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "evaluate.yaml"))
    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    parser.update(
        {
            "output_dir": str(tmp_path / "out"),
            "clinical": str(inputs / "clinical.csv"),
            "prepared_cache": None,
            "embeddings": {"DrasCLR": str(inputs / "drasclr"), "Plain MoCo": str(inputs / "absent")},
            "survival#enabled": False,
            "covid#clinical": str(inputs / "covid_clinical.csv"),
            "covid#embeddings": {"DrasCLR": str(inputs / "covid.csv")},
            "covid#prepared_cache": None,
            # the figures' inputs from the fixture, not whatever an earlier demo left under bundle/runs
            "detection#tables#table5_emphysema_detection#path": str(inputs / "detection" / "detection_table.csv"),
            "detection#label_efficiency#path": str(inputs / "detection" / "efficiency.csv"),
            "detection#detected_fractions#path": str(inputs / "detection" / "emphysema_report.csv"),
            "mlflow#tracking_uri": uri,
        }
    )
    parser.get_parsed_content("evaluate")
    assert list((tmp_path / "out" / "plots").glob("*.png")), "the evaluation drew no picture"
    client = mlflow.MlflowClient(uri)
    (found,) = _runs(uri, "drasclr_evaluation")
    assert all(found.data.tags.get(k) for k in PROVENANCE)
    datasets = {d.dataset.name for d in found.inputs.dataset_inputs}
    assert datasets == {"clinical", "covid_clinical", "embeddings: DrasCLR"}
    assert _artifacts(client, found.info.run_id, "config") == {"config/evaluate.yaml"}
    readouts = pd.read_csv(tmp_path / "out" / "readouts.csv")
    row = readouts[(readouts["feature_set"] == "DrasCLR") & (readouts["target"] == "gold")]
    row = row[row["metric"] == "accuracy"].iloc[0]
    history = client.get_metric_history(found.info.run_id, "phenotype/DrasCLR/gold/accuracy/fold")
    assert [round(m.value, 4) for m in sorted(history, key=lambda m: m.step)] == [
        float(v) for v in row["fold_values"].split()
    ]
    assert {"plots", "tables", "readouts.csv"} <= _artifacts(client, found.info.run_id)


@pytest.mark.slow
def test_ablation_family_is_one_parent_run_with_a_child_per_variant(tmp_path):
    spec = importlib.util.spec_from_file_location("run_ablations", REPO_ROOT / "bundle/scripts/run_ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cache = write_patch_cache(tmp_path / "cache", num_subjects=1)
    out = tmp_path / "ablations"
    module.main(
        dataset_dir=str(cache),
        out_dir=str(out),
        variants="plain_moco,neighbours_0",
        max_epochs=1,
        epoch_length=1,
        batch_size=4,
        num_workers=0,
    )
    uri = path_to_sqlite_uri(str(out / "mlruns.db"))
    client = mlflow.MlflowClient(uri)
    runs = {r.info.run_name: r for r in _runs(uri, "drasclr_ablation")}
    assert set(runs) == {"ablations", "plain_moco", "neighbours_0"}
    parent = runs["ablations"]
    assert parent.info.status == "FINISHED" and PARENT_TAG not in parent.data.tags
    assert parent.data.params["variants"] == "plain_moco,neighbours_0" and parent.data.metrics["variants_ok"] == 2
    assert all(parent.data.tags.get(k) for k in PROVENANCE)
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"prepared_cohort"}
    assert "ablations.csv" in _artifacts(client, parent.info.run_id)
    assert _artifacts(client, parent.info.run_id, "config") == {
        "config/train.yaml",
        "config/ablation.yaml",
    }
    for name in ("plain_moco", "neighbours_0"):
        child = runs[name]
        assert child.data.tags[PARENT_TAG] == parent.info.run_id, name
        assert child.info.status == "FINISHED" and child.data.params["variant"] == name
        assert all(child.data.tags.get(k) for k in PROVENANCE)
        assert _steps(client, child.info.run_id, "loss") == [1]
        assert _artifacts(client, child.info.run_id, "model") == {"model/pretrained.pt"}
