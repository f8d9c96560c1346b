"""Emphysema maps against the SYNTHETIC truth: voxel counts and scores on hand-built maps with known answers, grid
checks naming the files, and bundle/scripts/evaluate_maps.py end to end on a tiny held-out cohort."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT

from custom.emphysema.map_truth import cohort_summary, compare_files, compare_map, subject_counts

SCRIPT = REPO_ROOT / "bundle" / "scripts" / "evaluate_maps.py"

# One row of 10 voxels. Voxel 0 is outside the truth's lung (its lesion and the map's call there do not count);
# inside: CL hit, CL hit, CL missed, CL false call, PS hit, PS missed, panlobular called CL, airway wall called
# PS, and a lung voxel the map's lung left out (background there).
LUNG = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
LESIONS = [1, 1, 1, 1, 0, 2, 2, 3, 4, 0]
MAP = [2, 2, 2, 1, 2, 3, 1, 2, 3, 0]


def _arrays(*rows):
    return [np.asarray(r, dtype=np.uint8).reshape(-1, 1, 1) for r in rows]


def _row(map_labels=MAP, lesions=LESIONS, lung=LUNG):
    m, les, lu = _arrays(map_labels, lesions, lung)
    return compare_map(m, les, lu.astype(bool))


def test_scores_of_a_hand_built_map():
    row = _row()
    # centrilobular: tp 2 (voxels 1, 2), fp 2 (4, and 7: panlobular is not centrilobular), fn 1 (3)
    assert (row["centrilobular_tp"], row["centrilobular_fp"], row["centrilobular_fn"]) == (2, 2, 1)
    assert row["centrilobular_precision"] == pytest.approx(0.5)
    assert row["centrilobular_recall"] == pytest.approx(2 / 3)
    assert row["centrilobular_f1"] == pytest.approx(4 / 7)
    # paraseptal: tp 1 (5), fp 1 (8, airway wall), fn 1 (6)
    assert (row["paraseptal_tp"], row["paraseptal_fp"], row["paraseptal_fn"]) == (1, 1, 1)
    assert row["paraseptal_precision"] == row["paraseptal_recall"] == row["paraseptal_f1"] == pytest.approx(0.5)
    # any emphysema: panlobular counts, so voxel 7 is a hit; fp 4 and 8, fn 3 and 6
    assert (row["emphysema_tp"], row["emphysema_fp"], row["emphysema_fn"]) == (4, 2, 2)
    assert row["emphysema_precision"] == row["emphysema_recall"] == row["emphysema_f1"] == pytest.approx(2 / 3)
    assert row["lung_voxels"] == 9 and row["map_lung_voxels"] == 9 and row["lung_overlap"] == 8
    assert row["lung_dice"] == pytest.approx(16 / 18)
    assert row["mapped_centrilobular_share"] == pytest.approx(4 / 9)
    assert row["mapped_paraseptal_share"] == pytest.approx(2 / 9)
    assert row["mapped_emphysema_share"] == pytest.approx(6 / 9)
    assert row["true_centrilobular_share"] == pytest.approx(3 / 9)
    assert row["true_paraseptal_share"] == pytest.approx(2 / 9)
    assert row["true_panlobular_share"] == pytest.approx(1 / 9)
    assert row["true_emphysema_share"] == pytest.approx(6 / 9)
    assert row["panlobular_called_emphysema"] == pytest.approx(1.0)
    assert row["has_emphysema"] is True and math.isnan(row["false_positive_share"])


def test_a_subject_without_emphysema_gives_its_false_positive_share():
    # air trapping and airway wall are not emphysema: half of this lung is called emphysema wrongly
    row = _row(map_labels=[1, 2, 3, 1], lesions=[0, 0, 5, 4], lung=[1, 1, 1, 1])
    assert row["has_emphysema"] is False
    assert row["false_positive_share"] == pytest.approx(0.5)
    assert row["centrilobular_precision"] == 0.0 and row["centrilobular_f1"] == 0.0
    assert math.isnan(row["centrilobular_recall"])  # nothing true to find
    # nothing mapped and nothing true: every ratio undefined, the false-positive share 0
    empty = _row(map_labels=[1, 1, 1, 1], lesions=[0, 0, 5, 4], lung=[1, 1, 1, 1])
    assert all(math.isnan(empty[f"centrilobular_{k}"]) for k in ("precision", "recall", "f1"))
    assert empty["false_positive_share"] == 0.0


def test_cohort_summary_means_and_pooled_counts():
    rows = pd.DataFrame([_row(), _row(map_labels=[1, 2, 3, 1], lesions=[0, 0, 5, 4], lung=[1, 1, 1, 1])])
    summary = cohort_summary(rows).set_index("metric")
    precision = summary.loc["centrilobular_precision"]
    assert precision.n == 2 and precision["mean"] == pytest.approx(0.25)
    assert precision.sd == pytest.approx(np.std([0.5, 0.0], ddof=1))
    assert precision.pooled == pytest.approx(2 / 5)  # tp 2, fp 2 + 1
    recall = summary.loc["centrilobular_recall"]
    assert recall.n == 1 and recall["mean"] == pytest.approx(2 / 3) and math.isnan(recall.sd)
    assert summary.loc["centrilobular_f1"].pooled == pytest.approx(4 / 8)
    fp = summary.loc["false_positive_share"]
    assert fp.n == 1 and fp["mean"] == pytest.approx(0.5) and fp.pooled == pytest.approx(0.5)
    assert summary.loc["mapped_emphysema_share"].pooled == pytest.approx((6 + 2) / (9 + 4))


def test_shape_and_grid_mismatches_are_errors_naming_the_files(tmp_path):
    with pytest.raises(ValueError, match="shapes differ"):
        subject_counts(*_arrays([1, 2], [0, 1], [1, 1, 1]))

    def write(name, array, affine=None):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(np.asarray(array, np.uint8), np.eye(4) if affine is None else affine), str(path))
        return path

    m, les, lu = _arrays(MAP, LESIONS, LUNG)
    lesions, lung = write("lesions.nii.gz", les), write("lung.nii.gz", lu)
    assert compare_files(write("map.nii.gz", m), lesions, lung)["centrilobular_tp"] == 2
    with pytest.raises(ValueError, match=r"short_map\.nii\.gz: shape \(9, 1, 1\) differs from .*lesions\.nii\.gz"):
        compare_files(lesions, write("short_map.nii.gz", m[:9]), lung)
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    with pytest.raises(ValueError, match=r"moved_map\.nii\.gz: affine differs from .*lesions\.nii\.gz"):
        compare_files(lesions, write("moved_map.nii.gz", m, shifted), lung)
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        compare_files(tmp_path / "absent.nii.gz", lesions, lung)


def _load_script():
    spec = importlib.util.spec_from_file_location("_script_evaluate_maps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_seed_is_refused(tmp_path):
    script = _load_script()
    assert script.demo_seed() == 0
    with pytest.raises(SystemExit, match="seed 0 is the demo cohort's"):
        script.main(out_dir=str(tmp_path), seed=0, model_path=str(tmp_path / "absent.pt"))
    assert not (tmp_path / "cohort").exists()


def _write_map_model(path):
    """Weights of the inference config's own network (random, seeded): the test needs no trained bundle/models."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundle" / "configs" / "inference.yaml"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.mark.slow
def test_evaluate_maps_end_to_end_on_a_tiny_held_out_cohort(tmp_path):
    model = _write_map_model(tmp_path / "model.pt")
    out = tmp_path / "judged"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}

    def run(seed=1000):
        command = [sys.executable, str(SCRIPT), "--out_dir", str(out), "--num_subjects", "2", "--seed", str(seed)]
        command += ["--voxel_size", "4", "--model_path", str(model), "--stride", "48", "--min_stride", "48"]
        return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)

    done = run()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = pd.read_csv(out / "map_truth_subjects.csv", dtype={"subject_id": str})
    cohort = pd.read_csv(out / "cohort" / "cohort.csv", dtype={"subject_id": str})
    assert list(rows.subject_id) == list(cohort.subject_id) and len(rows) == 2
    assert cohort.spacing_mm.eq("4x4x4").all()
    for _, subject in cohort.iterrows():  # the table holds what the files say
        mask = out / "maps" / subject.subject_id / "emphysema_mask.nii.gz"
        expected = compare_files(mask, out / "cohort" / subject.label, out / "cohort" / subject.lung_mask)
        row = rows.set_index("subject_id").loc[subject.subject_id]
        for key in ("lung_voxels", "centrilobular_tp", "paraseptal_fp", "emphysema_fn", "lung_overlap"):
            assert row[key] == expected[key], key
        assert row["lung_dice"] > 0.8  # the workflow's own lung segmentation finds the generator's lung
        assert f"{subject.subject_id}: true CL" in done.stdout
    summary = pd.read_csv(out / "map_truth_summary.csv").set_index("metric")
    assert summary.loc["lung_dice", "n"] == 2
    report = (out / "map_truth.md").read_text()
    assert "SYNTHETIC" in report and "| centrilobular_f1 |" in report
    assert (out / "map_truth.png").stat().st_size > 10_000

    # resumable: the cohort and the maps are reused, not made again
    written = (out / "maps" / cohort.subject_id[0] / "emphysema_mask.nii.gz").stat().st_mtime_ns
    again = run()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing the held-out cohort" in again.stdout
    assert (out / "maps" / cohort.subject_id[0] / "emphysema_mask.nii.gz").stat().st_mtime_ns == written
    pd.testing.assert_frame_equal(pd.read_csv(out / "map_truth_subjects.csv", dtype={"subject_id": str}), rows)
    # another seed into the same folder is refused instead of mixing cohorts
    other = run(seed=1001)
    assert other.returncode != 0 and "choose another --out_dir" in other.stdout + other.stderr
