"""prepare, embed and inference under torchrun (2 gloo processes) give what one process gives.

A cohort of 6 scans (5 SYNTHETIC subjects and one corrupt file) goes through each workflow twice, through the
real `python -m monai.bundle run` entry point: once in one process, once as `torchrun --nproc_per_node=2`.
Each subject is done exactly once, by the rank the deterministic split names; the merged manifest, the
failure report, the patch files (byte for byte), the embeddings and the emphysema maps and report rows are the
same. The runs also show that no workflow warns about a missing logging.conf or prints per-scan library notices.
"""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "bundle" / "configs"
TIMING = ["seconds", "registration_seconds", "reused", "rank", "map_seconds"]
pytestmark = pytest.mark.slow


def _bundle_run(tmp_path, run_id, config, processes, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    command = launcher + ["-m", "monai.bundle", "run", run_id, "--config_file", str(CONFIGS / config), *map(str, args)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Default logging file" not in output, output[-3000:]  # configs/logging.conf is found and used
    assert "nvImageCodec" not in output and "unable to load" not in output, output[-3000:]  # no per-scan notices
    return output


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from custom.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root / "synthetic", num_subjects=5, seed=3, dicom_every=0, progress=False)
    bad = root / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 not a whole gzip stream")
    table = pd.read_csv(root / "synthetic" / "cohort.csv", dtype=str)
    rows = [{"subject_id": r.subject_id, "image": str(root / "synthetic" / r.image)} for r in table.itertuples()]
    rows.insert(2, {"subject_id": "BROKEN", "image": str(bad)})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return root


def _prepare(tmp_path, cohort, name, processes):
    cache = tmp_path / name
    _bundle_run(
        tmp_path,
        "prepare",
        "prepare.yaml",
        processes,
        "--source",
        cohort / "cohort.csv",
        "--cache_dir",
        cache,
        "--progress",
        "false",
    )
    return cache


def test_prepare_embed_and_maps_under_torchrun_equal_one_process(cohort, tmp_path):
    single, sharded = (_prepare(tmp_path, cohort, n, p) for n, p in (("single", 1), ("sharded", 2)))
    one = pd.read_csv(single / "manifest.csv", dtype={"subject_id": str})
    two = pd.read_csv(sharded / "manifest.csv", dtype={"subject_id": str})
    assert len(one) == 6 and (one.status == "failed").sum() == 1 and one.loc[2, "subject_id"] == "BROKEN"
    # Each subject exactly once, by the rank of the deterministic split (input position modulo 2).
    assert two.subject_id.tolist() == one.subject_id.tolist()
    assert two["rank"].tolist() == [i % 2 for i in range(6)] and set(one["rank"]) == {0}
    pd.testing.assert_frame_equal(one.drop(columns=TIMING, errors="ignore"), two.drop(columns=TIMING, errors="ignore"))
    assert (
        pd.read_csv(single / "failures.csv")
        .drop(columns=["seconds"], errors="ignore")
        .equals(pd.read_csv(sharded / "failures.csv").drop(columns=["seconds"], errors="ignore"))
    )
    for subject in one[one.status == "ok"].path:
        assert (single / subject / "patches.npy").read_bytes() == (sharded / subject / "patches.npy").read_bytes()

    from custom.emphysema.network import EmphysemaDetectors
    from custom.model.network import DrasCLRNetwork

    torch.manual_seed(0)
    weights = tmp_path / "pretrained.pt"
    torch.save(DrasCLRNetwork().state_dict(), weights)
    embeddings = {}
    for name, processes in (("single", 1), ("sharded", 2)):
        out = tmp_path / f"embed_{name}"
        _bundle_run(
            tmp_path,
            "embed",
            "embed.yaml",
            processes,
            "--source",
            single,
            "--out_dir",
            out,
            "--weights",
            weights,
            "--progress",
            "false",
        )
        embeddings[name] = out
    a, b = (pd.read_csv(embeddings[n] / "subject_embeddings.csv", dtype={"subject_id": str}) for n in embeddings)
    assert len(a) == 5
    pd.testing.assert_frame_equal(a, b)
    for subject in a.subject_id:
        assert np.array_equal(
            np.load(embeddings["single"] / "patch_embeddings" / f"{subject}.npy"),
            np.load(embeddings["sharded"] / "patch_embeddings" / f"{subject}.npy"),
        )

    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    torch.save(EmphysemaDetectors().state_dict(), model)
    maps = {}
    for name, processes in (("single", 1), ("sharded", 2)):
        out = tmp_path / f"maps_{name}"
        _bundle_run(
            tmp_path,
            "inference",
            "inference.yaml",
            processes,
            "--input",
            cohort / "cohort.csv",
            "--output_dir",
            out,
            "--model_path",
            model,
            "--min_stride",
            32,
            "--pictures",
            "false",
            "--progress",
            "false",
        )
        maps[name] = out
    a, b = (pd.read_csv(maps[n] / "emphysema_report.csv", dtype={"subject_id": str}) for n in maps)
    assert len(a) == 5
    keep = [c for c in a.columns if c not in TIMING and not c.startswith("outputs")]
    pd.testing.assert_frame_equal(a[keep], b[keep])
    failures = [pd.read_csv(maps[n] / "failures.csv") for n in maps]
    assert failures[0].subject_id.tolist() == failures[1].subject_id.tolist() == ["BROKEN"]
    import nibabel as nib

    for subject in a.subject_id:
        mask_a, mask_b = (np.asarray(nib.load(str(maps[n] / subject / "emphysema_mask.nii.gz")).dataobj) for n in maps)
        assert np.array_equal(mask_a, mask_b)
