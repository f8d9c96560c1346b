"""Subject ids are text everywhere: ``00``, ``0001`` and ``12345`` keep their leading zeros from the cohort CSV
through prepare (manifest, cache folders), the training file list, embed (the embedding table) and the
evaluation's paired subjects (issue: ``00`` became ``0`` and subjects were silently dropped)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from custom.data.patch_dataset import prepared_patch_files
from custom.embed.cohort import embed_cohort
from custom.evaluation.baselines import Baselines
from custom.evaluation.cohort import Cohort
from custom.evaluation.feature_sets import EmbeddingSets
from custom.evaluation.notes import Notes
from custom.model.network import DrasCLRNetwork
from custom.prepare.workflow import prepare_cohort

IDS = ["00", "0001", "12345"]


@pytest.mark.slow
def test_ids_with_leading_zeros_survive_prepare_train_embed_evaluate(demo_cohort, tmp_path):
    images = sorted((demo_cohort / "synthetic" / "images").glob("*.nii.gz"))[: len(IDS)]
    cohort_csv = tmp_path / "cohort.csv"
    pd.DataFrame({"subject_id": IDS, "image": [str(p) for p in images]}).to_csv(cohort_csv, index=False)

    cache = tmp_path / "prepared"
    manifest = prepare_cohort(cohort_csv, cache, num_workers=1, progress=False)
    assert sorted(manifest["subject_id"]) == sorted(IDS) and (manifest["status"] == "ok").all(), manifest
    on_disk = pd.read_csv(cache / "manifest.csv", dtype=str, keep_default_na=False)
    assert sorted(on_disk["subject_id"]) == sorted(IDS)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) >= sorted(IDS)

    train_files = prepared_patch_files(cache)  # what training reads
    assert sorted(f.parent.name for f in train_files) == sorted(IDS)

    weights = tmp_path / "pretrained.pt"
    torch.save(DrasCLRNetwork().state_dict(), weights)
    embedded = embed_cohort(cache, weights, tmp_path / "embeddings", progress=False)
    assert sorted(embedded["subject_id"]) == sorted(IDS)

    clinical = tmp_path / "clinical.csv"
    pd.DataFrame({"subject_id": IDS, "fev1pp": [80.0, 60.0, 40.0]}).to_csv(clinical, index=False)
    cohort = Cohort(
        "ids",
        clinical,
        EmbeddingSets({"DrasCLR": tmp_path / "embeddings"}),
        Baselines(prepared_cache=cache, laa950=True, laa950_patch=False, random_init=False),
    )
    data = cohort.load(Notes())
    assert sorted(data.clinical.index) == sorted(IDS)
    for name, table in data.sets.items():
        assert sorted(table.index) == sorted(IDS), name
    np.testing.assert_allclose(
        data.sets["DrasCLR"].loc["0001"].to_numpy(), embedded.set_index("subject_id").loc["0001"].to_numpy(), atol=1e-6
    )
