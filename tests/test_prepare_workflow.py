"""The prepare workflow end to end on small phantoms made with a known affine (real antspyx, MONAI, NIfTI I/O).

One cohort run (two worker processes) serves several tests: two good subjects (one with a user lung mask), a
corrupt file, an image that is not in HU, and a scan without lungs. A second run is killed mid-way and
started again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from custom.prepare import cache
from custom.prepare.phantom import make_phantom
from custom.prepare.workflow import prepare_cohort

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(spacing_mm=2.5, scale_range=(1.15, 1.25))  # ~80 % of the atlas size: quick at 1 mm


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    scans = root / "scans"
    scans.mkdir()
    good = {
        "subj0": make_phantom(scans / "subj0.nii.gz", seed=10, axcodes="RAS", **SMALL),
        # LPS on disk, and a user lung mask (slightly eroded, so it differs from the built-in segmentation)
        "subj1": make_phantom(
            scans / "subj1.nii.gz", seed=11, axcodes="LPS", lung_mask_path=root / "truth1.nii.gz", **SMALL
        ),
    }
    truth = nib.load(str(root / "truth1.nii.gz"))
    from scipy import ndimage

    eroded = ndimage.binary_erosion(np.asarray(truth.dataobj) > 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(eroded, truth.affine), str(scans / "subj1_lung_mask.nii.gz"))

    (scans / "corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file" * 20)
    image = nib.load(str(scans / "subj0.nii.gz"))
    normalised = (np.asarray(image.dataobj, dtype=np.float32) + 1024.0) / 2000.0
    nib.save(nib.Nifti1Image(normalised, image.affine), str(scans / "not_hu.nii.gz"))
    make_phantom(scans / "no_lungs.nii.gz", seed=12, lungs=False, spacing_mm=4.0, scale_range=(1.15, 1.25))

    cache_dir = root / "cache"
    start = time.perf_counter()
    manifest = prepare_cohort(scans, cache_dir, num_workers=2, progress=True)  # worker processes + progress bar
    return dict(
        root=root,
        scans=scans,
        cache=cache_dir,
        manifest=manifest,
        phantoms=good,
        seconds=time.perf_counter() - start,
        eroded_ml=float(eroded.sum()) * 2.5**3 / 1000.0,
    )


def test_end_to_end_two_subjects(cohort):
    manifest = cohort["manifest"].set_index("subject_id")
    assert manifest.loc[["subj0", "subj1"], "status"].tolist() == ["ok", "ok"]
    on_disk = cache.read_manifest(cohort["cache"]).set_index("subject_id")
    assert set(on_disk.index) == {"subj0", "subj1", "corrupt", "not_hu", "no_lungs"}
    for subject_id in ("subj0", "subj1"):
        entry = cohort["cache"] / subject_id
        assert cache.is_complete(cohort["cache"], subject_id)
        patches = np.load(entry / "patches.npy", mmap_mode="r")
        landmarks = np.load(entry / "landmarks_vox.npy")
        qc = json.loads((entry / "qc.json").read_text())
        transform = json.loads((entry / "transform.json").read_text())
        assert patches.shape == (581, 32, 32, 32) and patches.dtype == np.int16
        assert landmarks.shape == (581, 3)
        assert qc["status"] == "ok" and qc["spacing"] == [1.0, 1.0, 1.0] and qc["axcodes"] == "LAS"
        assert qc["dice"] > 0.9
        # a good registration puts as many landmarks in the lung as the atlas itself has (0.64)
        assert qc["share_inside_lung"] > 0.9 * qc["atlas_share_inside_lung"]
        # the two stored maps are inverse to each other
        product = np.asarray(transform["atlas_to_subject_vox"]) @ np.asarray(transform["subject_to_atlas_vox"])
        np.testing.assert_allclose(product, np.eye(4), atol=1e-6)
        # patches hold the subject's HU: landmarks inside the lung see lung (-850 HU) at their centre
        centre_hu = np.asarray(patches[:, 16, 16, 16], dtype=np.float64)
        assert np.mean(centre_hu < -600) >= qc["share_inside_lung"] - 0.05
        assert on_disk.loc[subject_id, "path"] == subject_id
    assert np.load(cohort["cache"] / "subj0" / "patches.npy").min() >= -1024


def test_registered_landmarks_within_2mm_of_the_known_transform(cohort):
    for subject_id, phantom in cohort["phantoms"].items():
        entry = cohort["cache"] / subject_id
        transform = json.loads((entry / "transform.json").read_text())
        true_world = phantom.true_landmarks_world()
        grid = np.linalg.inv(np.asarray(transform["subject_affine_ras"]))
        true_vox = (np.c_[true_world, np.ones(len(true_world))] @ grid.T)[:, :3]
        error_mm = np.linalg.norm(np.load(entry / "landmarks_vox.npy") - true_vox, axis=1)  # 1 mm grid
        assert error_mm.mean() < 2.0, f"{subject_id}: mean landmark error {error_mm.mean():.2f} mm"
        assert np.percentile(error_mm, 95) < 4.0


def test_user_lung_mask_wins(cohort):
    qc = json.loads((cohort["cache"] / "subj1" / "qc.json").read_text())
    assert qc["lung_mask"].endswith("subj1_lung_mask.nii.gz")
    assert qc["lung_volume_ml"] == pytest.approx(cohort["eroded_ml"], rel=0.05)
    assert json.loads((cohort["cache"] / "subj0" / "qc.json").read_text())["lung_mask"] == "auto"


@pytest.mark.parametrize(
    "subject_id, error_type, words",
    [
        ("corrupt", "InputError", "could not read the image"),
        ("not_hu", "NotHounsfieldError", "not Hounsfield units"),
        ("no_lungs", "NoLungError", "no lungs found"),
    ],
)
def test_bad_inputs_are_recorded_while_others_finish(cohort, subject_id, error_type, words):
    manifest = cache.read_manifest(cohort["cache"]).set_index("subject_id")
    row = manifest.loc[subject_id]
    assert row.status == "failed" and row.error_type == error_type
    assert words in row.error and f"{subject_id}." in row.error  # names the file and the reason
    assert "Traceback" not in row.error and len(row.error) < 600
    assert not (cohort["cache"] / subject_id).exists()
    failures = pd.read_csv(cohort["cache"] / "failures.csv").set_index("subject_id")
    assert set(failures.index) == {"corrupt", "not_hu", "no_lungs"}
    assert failures.loc[subject_id, "error"] == row.error


def _wait_for(predicate, timeout, process):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return predicate()
        time.sleep(0.1)
    return False


def test_killed_run_resumes_without_redoing_finished_subjects(cohort, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("subj0.nii.gz", "subj1.nii.gz"):
        shutil.copy(cohort["scans"] / name, scans / name)
    cache_dir = tmp_path / "cache"
    command = [
        sys.executable,
        str(REPO / "bundle" / "scripts" / "prepare.py"),
        "run",
        "--source",
        str(scans),
        "--cache_dir",
        str(cache_dir),
        "--progress",
        "False",
        "--log_level",
        "WARNING",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait_for(lambda: (cache_dir / "subj0" / "qc.json").exists(), 600, first), (
            first.stderr.read().decode()[-2000:] if first.poll() is not None else "subj0 never finished"
        )
        assert first.poll() is None, "the run finished before it could be killed"
        first.send_signal(signal.SIGKILL)  # no clean-up handlers run
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    # what a kill leaves: complete entries only (an unfinished subject is at most a hidden .tmp-* folder)
    visible = [p.name for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert visible == ["subj0"] and cache.is_complete(cache_dir, "subj0")
    finished = (cache_dir / "subj0" / "patches.npy").stat()

    manifest = prepare_cohort(scans, cache_dir, progress=False)
    assert manifest.set_index("subject_id").status.tolist() == ["ok", "ok"]
    assert manifest.set_index("subject_id").reused.tolist() == [True, False]
    again = (cache_dir / "subj0" / "patches.npy").stat()
    assert (again.st_ino, again.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)  # not redone
    assert cache.is_complete(cache_dir, "subj1")
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]
