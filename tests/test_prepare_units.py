"""Unit tests of the prepare steps that need no registration run (fast)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from custom.data.atlas import atlas_mask_path, landmark_corners
from custom.prepare import cache
from custom.prepare.io import NotHounsfieldError, load_ct, load_mask_like, resample_isotropic, validate_hu
from custom.prepare.landmark_generator import generate_atlas_landmarks
from custom.prepare.landmarks import map_landmarks, share_inside
from custom.prepare.lung_mask import NoLungError, segment_lungs
from custom.prepare.patches import extract_patches, patch_corners
from custom.prepare.phantom import make_phantom
from custom.prepare.registration import RAS_TO_LPS, ants_affine_to_matrix
from custom.prepare.workflow import discover_inputs


def test_resample_matches_monai_spacing():
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    rng = np.random.default_rng(0)
    array = rng.normal(size=(40, 30, 12)).astype(np.float32)
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [3.0, -4.0, 5.0]
    expected = Spacing(pixdim=1.0, mode="bilinear", padding_mode="border")(
        MetaTensor(torch.from_numpy(array)[None], affine=torch.from_numpy(affine))
    )
    ours, ours_affine = resample_isotropic(array, affine)
    assert ours.shape == tuple(expected.shape[1:])
    np.testing.assert_allclose(ours, expected[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(ours_affine, expected.affine.numpy())


@pytest.mark.parametrize(
    "values, words",
    [
        (lambda a: (a + 1024) / 2000.0, "normalised"),  # scaled to [0, 1]
        (lambda a: a + 1024, "RescaleIntercept"),  # raw stored values, intercept not applied
        (lambda a: a * 0 + 7, "constant"),
    ],
)
def test_validate_hu_names_file_and_reason(values, words):
    hu = np.full((40, 40, 40), 40.0, dtype=np.float32)
    hu[:8] = -1000.0
    validate_hu(hu, "scan.nii.gz")  # genuine HU passes
    with pytest.raises(NotHounsfieldError) as info:
        validate_hu(values(hu), "scan.nii.gz")
    assert "scan.nii.gz" in str(info.value) and words in str(info.value)


def test_extract_patches_centre_convention_and_padding():
    volume = np.arange(60 * 50 * 40, dtype=np.int32).reshape(60, 50, 40) % 3000 - 1000
    landmarks = np.array([[30.2, 25.0, 20.4], [1.0, 2.0, 3.0], [500.0, 0.0, 0.0]])
    patches = extract_patches(volume.astype(np.float32), landmarks)
    assert patches.shape == (3, 32, 32, 32) and patches.dtype == np.int16
    # patch voxel (16, 16, 16) is the voxel nearest the landmark; corner = round(centre) - 16
    assert patches[0, 16, 16, 16] == volume[30, 25, 20]
    np.testing.assert_array_equal(patch_corners(landmarks)[0], [14, 9, 4])
    np.testing.assert_array_equal(patches[0], volume[14:46, 9:41, 4:36])
    # a landmark near the corner of the scan: outside is air (-1024), inside is the scan
    assert patches[1, 0, 0, 0] == -1024 and patches[1, 16, 16, 16] == volume[1, 2, 3]
    assert (patches[2] == -1024).all()


def test_landmark_generator_gives_575_of_the_released_581():
    corners = generate_atlas_landmarks(atlas_mask_path())
    released = {tuple(c) for c in landmark_corners().tolist()}
    generated = {tuple(c) for c in corners.tolist()}
    assert len(corners) == 575 == len(generated)
    assert generated <= released
    assert corners.dtype == np.int64 and corners.shape == (575, 3)


def test_landmark_generator_threshold_is_strictly_more_than_ten_percent(tmp_path):
    """Corners at x = 0, 26, 52; 3277 lung voxels (> 10 % of 32^3) keep a patch, 3276 do not."""

    def block(count):
        out = np.zeros((26, 32, 32), dtype=np.uint8)
        out.reshape(-1)[:count] = 1
        return out

    mask = np.zeros((84, 32, 32), dtype=np.uint8)
    mask[0:26] = block(3277)  # only in the patch at x = 0
    mask[58:84] = block(3276)  # only in the patch at x = 52
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(path))
    corners = generate_atlas_landmarks(path, tmp_path / "loc.npy")
    assert corners.tolist() == [[0, 0, 0]]
    assert np.load(tmp_path / "loc.npy").tolist() == [[0, 0, 0]]


def test_ants_matrix_matches_ants_point_mapping(tmp_path):
    """Our 4x4 reading of the ANTs file must map points exactly as ANTs does (centre and translation included)."""
    import ants

    rng = np.random.default_rng(1)
    matrix = np.eye(3) + rng.normal(0, 0.05, (3, 3))
    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=matrix,
        translation=[4.0, -7.0, 2.5],
        center=[10.0, 20.0, -30.0],
    )
    path = str(tmp_path / "t.mat")
    ants.write_transform(tx, path)
    points = rng.uniform(-100, 100, (6, 3))
    expected = ants.apply_transforms_to_points(3, pd.DataFrame(points, columns=["x", "y", "z"]), [path]).values
    ours = (np.c_[points, np.ones(6)] @ ants_affine_to_matrix(path).T)[:, :3]
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert RAS_TO_LPS[0, 0] == -1 and RAS_TO_LPS[2, 2] == 1


def test_landmark_helpers():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[:5] = True
    shift = np.eye(4)
    shift[:3, 3] = [1.0, 0.0, 0.0]
    mapped = map_landmarks(shift, np.array([[2, 3, 4], [7, 3, 4]]))
    np.testing.assert_allclose(mapped, [[3, 3, 4], [8, 3, 4]])
    assert share_inside(np.array([[1.0, 1, 1], [8, 1, 1], [-3, 1, 1]]), mask) == pytest.approx(1 / 3)


def _entry(tmp_path, subject_id="s1"):
    transform_mat = tmp_path / "t.mat"
    transform_mat.write_bytes(b"x" * 10)
    patches = np.zeros((581, 32, 32, 32), dtype=np.int16)
    transform = {"atlas_to_subject_vox": np.eye(4), "subject_to_atlas_vox": np.eye(4)}
    return cache.write_subject_entry(
        tmp_path / "cache",
        subject_id,
        patches,
        np.zeros((581, 3)),
        transform_mat,
        transform,
        {"num_landmarks": 581, "dice": 0.9},
    )


def test_cache_entry_is_atomic_and_validated(tmp_path):
    entry = _entry(tmp_path)
    cache_dir = entry.parent
    assert cache.is_complete(cache_dir, "s1")
    assert np.load(entry / cache.PATCHES, mmap_mode="r").shape == (581, 32, 32, 32)
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert json.loads((entry / cache.QC).read_text())["status"] == "ok"

    # a truncated patches file (e.g. a disk filled up) is not a finished entry
    data = (entry / cache.PATCHES).read_bytes()
    (entry / cache.PATCHES).write_bytes(data[: len(data) // 2])
    assert not cache.is_complete(cache_dir, "s1")
    # rewriting the subject replaces the bad entry in one rename
    _entry(tmp_path)
    assert cache.is_complete(cache_dir, "s1")
    (entry / cache.QC).unlink()
    assert not cache.is_complete(cache_dir, "s1")

    # what a killed writer leaves is hidden, never counted, and cleaned up
    (cache_dir / ".tmp-s2-deadbeef").mkdir()
    (cache_dir / ".tmp-s2-deadbeef" / cache.PATCHES).write_bytes(b"partial")
    assert not cache.is_complete(cache_dir, "s2")
    removed = cache.remove_stale_temporaries(cache_dir)
    assert [p.name for p in removed] == [".tmp-s2-deadbeef"] and not (cache_dir / ".tmp-s2-deadbeef").exists()


def test_manifest_and_failures_are_written(tmp_path):
    rows = [
        {"subject_id": "a", "status": "ok", "dice": 0.9, "path": "a"},
        {
            "subject_id": "b",
            "status": "failed",
            "error": "b.nii.gz: bad",
            "error_type": "InputError",
            "source": "b.nii.gz",
        },
    ]
    cache.write_manifest(tmp_path, rows)
    manifest = cache.read_manifest(tmp_path)
    assert list(manifest.columns[: len(cache.MANIFEST_COLUMNS)]) == cache.MANIFEST_COLUMNS
    failures = pd.read_csv(tmp_path / cache.FAILURES)
    assert failures.subject_id.tolist() == ["b"] and failures.error.tolist() == ["b.nii.gz: bad"]


def test_discover_inputs_folder_and_csv(tmp_path):
    (tmp_path / "scans" / "site1").mkdir(parents=True)
    for name in ("a.nii.gz", "a_lung_mask.nii.gz", "site1/b.nii", "notes.txt"):
        (tmp_path / "scans" / name).write_bytes(b"")
    series = tmp_path / "scans" / "patient 7" / "series"
    series.mkdir(parents=True)
    (series / "0001.dcm").write_bytes(b"")
    items = {i.subject_id: i for i in discover_inputs(tmp_path / "scans")}
    assert set(items) == {"a", "site1_b", "patient_7_series"}
    assert items["a"].lung_mask.endswith("a_lung_mask.nii.gz") and items["site1_b"].lung_mask is None
    assert items["patient_7_series"].image == str(series)

    csv = tmp_path / "cohort.csv"
    csv.write_text("subject_id,image,lung_mask\nx1,scans/a.nii.gz,scans/a_lung_mask.nii.gz\nx2,/abs/b.nii,\n")
    items = discover_inputs(csv)
    assert items[0].image == str(tmp_path / "scans" / "a.nii.gz") and items[1].lung_mask is None
    assert items[1].image == "/abs/b.nii"
    csv.write_text("subject_id,image\nx1,a.nii.gz\nx1,b.nii.gz\n")
    with pytest.raises(ValueError, match="duplicate subject ids"):
        discover_inputs(csv)
    csv.write_text("id,path\nx1,a.nii.gz\n")
    with pytest.raises(ValueError, match="subject_id"):
        discover_inputs(csv)


def test_segmentation_finds_phantom_lungs_and_refuses_a_scan_without_lungs(tmp_path):
    phantom = make_phantom(
        tmp_path / "p.nii.gz",
        seed=3,
        spacing_mm=4.0,
        scale_range=(1.15, 1.25),
        lung_mask_path=tmp_path / "truth.nii.gz",
    )
    ct = load_ct(phantom.path, spacing=2.0)  # 2 mm keeps this unit test quick
    lung = segment_lungs(ct.hu, spacing_mm=2.0)
    truth = load_mask_like(tmp_path / "truth.nii.gz", ct)  # the user-mask path: reoriented and resampled
    dice = 2 * (lung & truth).sum() / (lung.sum() + truth.sum())
    assert dice > 0.9

    no_lung = make_phantom(tmp_path / "n.nii.gz", seed=3, spacing_mm=4.0, lungs=False, scale_range=(1.15, 1.25))
    ct = load_ct(no_lung.path, spacing=2.0)
    with pytest.raises(NoLungError, match="no lungs found"):
        segment_lungs(ct.hu, spacing_mm=2.0, source=str(no_lung.path))


def test_stale_file_names_do_not_look_like_subjects(tmp_path):
    assert cache.safe_subject_id("patient 7/series") == "patient_7_series"
    assert cache.safe_subject_id(".hidden") == "hidden"
    with pytest.raises(ValueError):
        cache.safe_subject_id("///")
    assert os.sep not in cache.safe_subject_id("a/b")
