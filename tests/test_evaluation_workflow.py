"""The evaluate workflow through its bundle config (real scikit-learn, lifelines, MLflow sqlite store) on a
table-only SYNTHETIC cohort, the LAA-950 and random-init baselines from a small prepared cache, and input errors."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, write_patch_cache
from monai.bundle import ConfigParser
from monai.utils import path_to_sqlite_uri

from custom.data.atlas import atlas_mask_path, landmark_corners, landmark_locations
from custom.embed.cohort import embed_patches
from custom.evaluation.baselines import (
    laa_features,
    landmark_major_means,
    random_init_embeddings,
    random_init_network,
)
from custom.subject_table import read_embedding_table as load_embedding_table
from custom.synthetic import draw_clinical_table
from custom.synthetic.covid import draw_covid_row

CONFIG = REPO_ROOT / "bundle" / "configs" / "evaluate.yaml"


def _embeddings(signal: np.ndarray, ids, noise: float, seed: int, dim: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    signal = (signal - signal.mean(0)) / signal.std(0)
    values = np.c_[signal + noise * rng.normal(size=signal.shape), rng.normal(size=(len(ids), dim - signal.shape[1]))]
    return pd.DataFrame(values, index=pd.Index(ids, name="subject_id"), columns=[f"e{i}" for i in range(dim)])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    clinical = draw_clinical_table(40, seed=1)
    clinical.to_csv(root / "clinical.csv", index=False)
    disease = clinical[["emphysema_fraction", "airway_disease", "air_trapping_fraction"]].to_numpy()
    (root / "drasclr").mkdir()
    _embeddings(disease, clinical["subject_id"], 0.1, 0).to_csv(root / "drasclr" / "subject_embeddings.csv")
    _embeddings(disease, clinical["subject_id"], 5.0, 1).to_csv(root / "neighbours_1.csv")
    rng = np.random.default_rng(2)
    covid = pd.DataFrame([draw_covid_row(rng, f"COV{i:04d}", i) for i in range(25)])
    covid.to_csv(root / "covid_clinical.csv", index=False)
    _embeddings(covid[["involvement_fraction"]].to_numpy(), covid["subject_id"], 0.2, 3).to_csv(root / "covid.csv")
    (root / "detection").mkdir()
    pd.DataFrame(
        {"scheme": ["linear readout"], "initialisation": ["pretrained"], "centrilobular f1": ["0.8 ± 0.1"]}
    ).to_csv(root / "detection" / "detection_table.csv", index=False)
    pd.DataFrame(
        {
            "init": ["pretrained"] * 2 + ["scratch"] * 2,
            "fraction": [0.5, 1.0] * 2,
            "subtype": "paraseptal",
            "f1_mean": [0.6, 0.8, 0.5, 0.7],
            "f1_sd": 0.05,
        }
    ).to_csv(root / "detection" / "efficiency.csv")
    report = clinical[["subject_id"]].assign(
        lung_centrilobular_pct=100 * clinical["cle_fraction"], lung_paraseptal_pct=100 * clinical["paraseptal_fraction"]
    )
    report.to_csv(root / "detection" / "emphysema_report.csv", index=False)
    return root


def test_evaluate_config_end_to_end(inputs, tmp_path):
    root = inputs
    tracking_uri_before = os.environ.get("MLFLOW_TRACKING_URI")
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update(
        {
            "output_dir": str(tmp_path / "out"),
            "clinical": str(root / "clinical.csv"),
            "prepared_cache": None,
            "embeddings": {
                "DrasCLR": str(root / "drasclr"),
                "Plain MoCo": str(root / "absent"),
                "Neighbours = 1": str(root / "neighbours_1.csv"),
            },
            "survival#repeats": 1,
            "survival#bootstrap": 30,
            "covid#clinical": str(root / "covid_clinical.csv"),
            "covid#embeddings": {"DrasCLR": str(root / "covid.csv")},
            "covid#prepared_cache": None,
            "detection#tables#table5_emphysema_detection#path": str(root / "detection" / "detection_table.csv"),
            "detection#label_efficiency#path": str(root / "detection" / "efficiency.csv"),
            "detection#detected_fractions#path": str(root / "detection" / "emphysema_report.csv"),
            "mlflow#tracking_uri": path_to_sqlite_uri(str(tmp_path / "mlruns.db")),
        }
    )
    parser.get_parsed_content("evaluate")  # runs the workflow
    out = tmp_path / "out"
    notes = (out / "notes.txt").read_text()
    assert "'Plain MoCo' skipped" in notes and "baselines skipped: no prepared cache" in notes

    readouts = pd.read_csv(out / "readouts.csv")
    r2 = readouts[(readouts["target"] == "log_fev1pp") & (readouts["metric"] == "r2")].set_index("feature_set")
    assert r2.loc["DrasCLR", "mean"] > 0.3 > r2.loc["Neighbours = 1", "mean"]
    assert (readouts.loc[readouts["target"] == "gold", "note"].str.contains("with gold in \\[-1\\] left out")).all()

    table2 = (out / "tables" / "table2_phenotypes.md").read_text()
    assert "| DrasCLR |" in table2 and "Plain MoCo" not in table2 and "SYNTHETIC" in table2
    table8 = pd.read_csv(out / "tables" / "table8_neighbour_ablation.csv")
    assert table8["Method"].tolist() == ["Neighbours = 1"]
    assert not (out / "tables" / "table6_location_ablation.csv").exists()
    table3 = pd.read_csv(out / "tables" / "table3_survival.csv")
    assert {"DrasCLR", "Confounders only", "Spirometry", "DrasCLR + Spirometry"} <= set(table3["Method"])
    bode = table3[table3["Method"] == "BODE"].iloc[0]
    assert bode.iloc[2].startswith("n/a") and "six_minute_walk_m" in (out / "tables" / "table3_survival.md").read_text()
    table4 = pd.read_csv(out / "tables" / "table4_covid_severity.csv")
    assert table4["Method"].tolist() == ["DrasCLR"]
    assert (out / "tables" / "table5_emphysema_detection.md").is_file()
    assert (out / "plots" / "label_efficiency.png").stat().st_size > 0
    assert (out / "plots" / "fraction_by_gold.png").stat().st_size > 0

    import mlflow

    client = mlflow.tracking.MlflowClient(path_to_sqlite_uri(str(tmp_path / "mlruns.db")))
    experiment = client.get_experiment_by_name("drasclr_evaluation")
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.data.metrics["phenotype/DrasCLR/log_fev1pp/r2/mean"] == pytest.approx(r2.loc["DrasCLR", "mean"])
    assert any(k.startswith("survival/DrasCLR/c_td_p50") for k in run.data.metrics)
    assert any(k.startswith("covid/DrasCLR/severity/accuracy") for k in run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"tables", "plots", "readouts.csv"}
    assert run.info.status == "FINISHED"
    # the run leaves no process-wide MLflow state behind (it would redirect later training handlers)
    assert os.environ.get("MLFLOW_TRACKING_URI") == tracking_uri_before


def test_missing_column_names_the_file_and_the_column(inputs, tmp_path):
    clinical = pd.read_csv(inputs / "clinical.csv").drop(columns=["fev1pp"])
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update(
        {
            "output_dir": str(tmp_path / "out"),
            "clinical": str(tmp_path / "clinical.csv"),
            "prepared_cache": None,
            "embeddings": {"DrasCLR": str(inputs / "drasclr")},
            "targets": {"fev1": {"column": "fev1pp", "kind": "continuous"}},
            "mlflow#enabled": False,
        }
    )
    with pytest.raises(KeyError, match=r"clinical\.csv: missing column\(s\) \['fev1pp'\]"):
        parser.get_parsed_content("evaluation").run()
    bad = pd.read_csv(inputs / "neighbours_1.csv").assign(e3="x")
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad\.csv: expected subject_id plus numeric feature columns.*e3"):
        load_embedding_table(tmp_path / "bad.csv")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_patch_cache(tmp_path_factory.mktemp("evaluate_cache"), num_subjects=2, seed=1)


def test_laa950_from_the_prepared_cache(cache):
    subject, patch = laa_features(cache)
    assert list(subject.index) == ["sub000", "sub001"] and patch.shape == (2, 581)
    mask = np.asarray(nib.load(str(atlas_mask_path())).dataobj) > 0
    hu = np.load(cache / "sub001" / "patches.npy")
    low = lung = 0
    for j, (x, y, z) in enumerate(landmark_corners()):
        region = mask[x : x + 32, y : y + 32, z : z + 32] & (hu[j] < -500)
        low_j = int((region & (hu[j] < -950)).sum())
        if j == 100:
            assert patch.loc["sub001", "laa950_100"] == pytest.approx(100 * low_j / region.sum())
        low, lung = low + low_j, lung + int(region.sum())
    assert subject.loc["sub001", "laa950"] == pytest.approx(100 * low / lung)
    assert subject.loc["sub001", "laa950"] > subject.loc["sub000", "laa950"]  # the cache gives it more -990 HU spots


def test_landmark_major_means_equal_per_subject_embedding(cache):
    network = random_init_network(5)
    arrays = [np.load(cache / sid / "patches.npy", mmap_mode="r")[:12] for sid in ("sub000", "sub001")]
    locations = landmark_locations()[:12]
    means = landmark_major_means(network, arrays, locations, batch_size=64)
    for array, mean in zip(arrays, means):
        np.testing.assert_allclose(mean, embed_patches(network, array, locations).mean(axis=0), rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    other = random_init_network(5)  # the seed alone fixes the weights, whatever the global RNG state
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), other.state_dict().values()))


@pytest.mark.slow
def test_random_init_embeddings_are_cached_until_the_patches_change(tmp_path):
    cache = write_patch_cache(tmp_path / "cache", num_subjects=1)
    first = random_init_embeddings(cache, tmp_path / "random", seed=3)
    assert first.shape == (1, 128) and np.isfinite(first.to_numpy()).all()
    cached = pd.read_csv(tmp_path / "random" / "subject_embeddings.csv", index_col=0)
    cached.iloc[0, 0] = 123.0  # a marker: a reused row keeps it, a recomputed row does not
    cached.to_csv(tmp_path / "random" / "subject_embeddings.csv")
    assert random_init_embeddings(cache, tmp_path / "random", seed=3).iloc[0, 0] == 123.0
    patches = cache / "sub000" / "patches.npy"
    os.utime(patches, ns=(patches.stat().st_atime_ns, patches.stat().st_mtime_ns + 10**9))
    again = random_init_embeddings(cache, tmp_path / "random", seed=3)
    np.testing.assert_allclose(again.to_numpy(), first.to_numpy(), rtol=1e-5, atol=1e-6)  # same seed, same network
