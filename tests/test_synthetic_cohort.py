"""The SYNTHETIC demo cohort: deterministic, labels consistent with the images and the stated model, lesions
where their subtype's prior puts them, and files (NIfTI, DICOM, tables) that read back as written.

Images are made at 4-6 mm so the whole file runs in well under a minute on one core."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage

from custom.synthetic import (
    CopdLikeGenerator,
    CovidLikeGenerator,
    draw_clinical_table,
    generate_cohort,
    generate_covid_cohort,
    labels,
)
from custom.synthetic.anatomy import load_atlas_reference
from custom.synthetic.clinical import gold_stage
from custom.synthetic.copd_like import DEFAULT_MAX_BOXES
from custom.synthetic.covid import grade_from_involvement

VOXEL_MM = 4.0
GENERATORS = {"copd": CopdLikeGenerator, "covid": CovidLikeGenerator}


def _subject(index: int, cohort: str = "copd", seed: int = 0, deformation_mm: float = 4.0, **overrides):
    generator = GENERATORS[cohort](index + 1, seed, VOXEL_MM, deformation_mm)
    plan = generator.plan(index)
    plan.row.update(overrides)
    return plan.row, generator.grid, generator.synthesize(plan)


def _index_with(table: pd.DataFrame, column: str, minimum: float) -> int:
    hits = table.index[table[column] >= minimum]
    assert len(hits), f"no subject with {column} >= {minimum} in the first {len(table)}"
    return int(hits[0])


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return draw_clinical_table(200, seed=0)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_cohort(
        out, num_subjects=6, seed=0, voxel_size=VOXEL_MM, dicom_every=4, annotation_fraction=1.0, progress=False
    )
    generate_covid_cohort(out, num_subjects=5, seed=0, voxel_size=VOXEL_MM, progress=False)
    return out


# --- clinical model --------------------------------------------------------------------------------------


def test_clinical_table_is_deterministic_by_seed(table):
    again = draw_clinical_table(200, seed=0)
    pd.testing.assert_frame_equal(table, again)
    other = draw_clinical_table(200, seed=1)
    assert not np.allclose(table["fev1pp"], other["fev1pp"])
    # a subject does not depend on the size of the cohort it was drawn in
    pd.testing.assert_frame_equal(draw_clinical_table(5, seed=0), table.head(5))


def test_gold_and_prism_follow_the_spirometric_rules(table):
    ratio, fev1pp = table["fev1_fvc"].to_numpy(), table["fev1pp"].to_numpy()
    expected = np.select(
        [ratio >= 0.70, fev1pp >= 80, fev1pp >= 50, fev1pp >= 30], [np.where(fev1pp < 80, -1, 0), 1, 2, 3], 4
    )
    np.testing.assert_array_equal(table["gold"].to_numpy(), expected)
    np.testing.assert_array_equal(table["prism"].to_numpy(), (expected == -1).astype(int))
    assert set(table["gold"]) >= {-1, 0, 1, 2, 3, 4}, "200 draws should reach every stage and PRISm"
    assert (table.loc[table["gold"] == -1, "gold_label"] == "PRISm").all()
    gold, prism = gold_stage([85.0, 85.0, 60.0, 40.0, 20.0, 60.0], [0.75, 0.65, 0.65, 0.65, 0.65, 0.75])
    assert gold.tolist() == [0, 1, 2, 3, 4, -1] and prism.tolist() == [0, 0, 0, 0, 0, 1]


def test_more_emphysema_means_lower_fev1pp(table):
    none = table[table["emphysema_fraction"] == 0]
    heavy = table[table["emphysema_fraction"] >= table["emphysema_fraction"].quantile(0.8)]
    assert len(none) > 30 and len(heavy) > 30
    assert heavy["fev1pp"].mean() < none["fev1pp"].mean() - 20
    assert heavy["fev1_fvc"].mean() < none["fev1_fvc"].mean() - 0.1
    assert table["emphysema_fraction"].corr(table["fev1pp"], method="spearman") < -0.4
    # the CLE visual score orders the burden it reads
    means = table.groupby("cle_score")["cle_fraction"].mean()
    assert means.is_monotonic_increasing and means.loc[0] == 0


def test_survival_is_censored_and_driven_by_disease(table):
    big = draw_clinical_table(600, seed=5)
    assert set(big["death_event"]) == {0, 1}
    assert (big["survival_years"] > 0).all() and (big["survival_years"] <= 12.0).all()
    severe = big[big["gold"] >= 3]["death_event"].mean()
    healthy = big[big["gold"] == 0]["death_event"].mean()
    assert severe > healthy + 0.15
    by_exacerbation = big.groupby("exacerbation_history")["fev1pp"].mean()
    assert by_exacerbation.loc[1] < by_exacerbation.loc[0]


# --- images ----------------------------------------------------------------------------------------------


def test_subject_is_deterministic():
    _, _, first = _subject(1)
    _, _, second = _subject(1)
    for key in ("image", "lesion", "lung"):
        np.testing.assert_array_equal(first[key], second[key])
    assert first["transform"] == second["transform"]


def test_lesion_priors_and_hu_classes(table):
    index = _index_with(table, "cle_fraction", 0.12)
    row, grid, sub = _subject(index, paraseptal_fraction=0.03, panlobular_fraction=0.08)
    image, lesion, lung = sub["image"].astype(np.float32), sub["lesion"], sub["lung"] > 0
    assert not np.any((lesion > 0) & ~lung), "lesions must lie inside the lung"
    # lung fully in view, air around the body
    for axis in range(3):
        assert not np.take(lung, [0, -1], axis=axis).any()
    assert image[:4, :4, :].mean() < -950
    # the image carries the burden the clinical model was driven by
    measured = sub["measured"]
    assert abs(measured["measured_centrilobular_fraction"] - row["cle_fraction"]) < 0.01
    assert abs(measured["measured_panlobular_fraction"] - 0.08) < 0.005

    depth = ndimage.distance_transform_edt(lung, sampling=grid.spacing)
    z = np.broadcast_to(np.arange(lung.shape[2]), lung.shape)  # z grows superiorly (RAS affine, +z)
    z_lung = z[lung]
    upper = z_lung.mean()
    cle, pse, ple = (lesion == labels.CENTRILOBULAR), (lesion == labels.PARASEPTAL), (lesion == labels.PANLOBULAR)
    # centrilobular: upper and central; paraseptal: subpleural; panlobular: lower
    assert z[cle].mean() > upper + 2
    assert np.mean(z[cle] > np.median(z_lung)) > 0.6
    assert np.median(depth[cle]) > np.median(depth[lung])
    assert np.median(depth[pse]) < 0.5 * np.median(depth[lung])
    assert np.mean(depth[pse] <= 12.0) > 0.9
    assert z[ple].mean() < upper - 2

    # HU of the classes
    vessels_free = lung & (lesion == labels.NONE) & (image < -500)
    assert -900 < np.median(image[vessels_free]) < -760
    for mask in (cle, pse):
        assert np.median(image[mask]) < -950
    assert -990 < np.median(image[ple]) < -930
    trapped = lesion == labels.AIR_TRAPPING
    if trapped.any():
        assert np.median(image[vessels_free]) - 80 < np.median(image[trapped]) < np.median(image[vessels_free])
    wall = lesion == labels.AIRWAY_WALL
    assert wall.any() and np.median(image[wall]) > -400, "thickened airway walls are dense, not emphysema"


def test_affine_only_subject_matches_its_saved_transform():
    _, grid, sub = _subject(2, deformation_mm=0.0)
    transform = sub["transform"]
    reference = load_atlas_reference(step=int(VOXEL_MM))
    subject_to_atlas = np.asarray(transform["subject_to_atlas"])
    assert np.allclose(subject_to_atlas @ np.asarray(transform["atlas_to_subject"]), np.eye(4))
    lung_vox = np.argwhere(sub["lung"] > 0)[::7]
    atlas_mm = subject_to_atlas @ grid.affine @ np.c_[lung_vox, np.ones(len(lung_vox))].T
    atlas_vox = np.rint(np.linalg.inv(reference.affine_1mm) @ atlas_mm)[:3] / reference.step
    inside = ndimage.map_coordinates(reference.lung, atlas_vox, order=0)
    assert np.mean(inside > 0) > 0.97


# --- files -----------------------------------------------------------------------------------------------


def test_files_tables_and_manifest(cohort_dir):
    manifest = pd.read_csv(cohort_dir / "cohort.csv", keep_default_na=False)
    clinical = pd.read_csv(cohort_dir / "clinical.csv")
    assert list(manifest["subject_id"]) == list(clinical["subject_id"]) == [f"SYN{i:04d}" for i in range(6)]
    assert {
        "age",
        "sex",
        "race",
        "smoking_status",
        "pack_years",
        "fev1pp",
        "fev1_fvc",
        "gold",
        "prism",
        "cle_score",
        "paraseptal_score",
        "exacerbation_history",
        "survival_years",
        "death_event",
        "laa950_percent",
        "kernel",
    } <= set(clinical.columns)
    pd.testing.assert_frame_equal(
        clinical[["subject_id", "fev1pp", "gold"]], draw_clinical_table(6, seed=0)[["subject_id", "fev1pp", "gold"]]
    )
    for _, row in manifest.iterrows():
        image = nib.load(cohort_dir / row["image"])
        assert image.get_data_dtype() == np.int16
        assert np.allclose(np.abs(np.diag(image.affine)[:3]), VOXEL_MM)
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        label = nib.load(cohort_dir / row["label"])
        assert np.allclose(label.affine, image.affine) and label.shape == image.shape
        transform = json.loads((cohort_dir / row["transform"]).read_text())
        assert np.asarray(transform["atlas_to_subject"]).shape == (4, 4)
    assert (cohort_dir / "SYNTHETIC_README.txt").read_text().startswith("SYNTHETIC")
    assert not list(cohort_dir.rglob(".tmp-*")), "atomic writes leave no temporary files"


def test_annotations_are_consistent(cohort_dir):
    boxes = pd.read_csv(cohort_dir / "annotations.csv")
    clinical = pd.read_csv(cohort_dir / "clinical.csv").set_index("subject_id")
    assert set(boxes["label"]) >= {"centrilobular", "healthy"}
    healthy = boxes[boxes["label"] == "healthy"].groupby("subject_id").size()
    controls = [s for s in healthy.index if clinical.loc[s, "gold"] == 0 and clinical.loc[s, "emphysema_fraction"] == 0]
    assert (healthy.drop(controls) <= DEFAULT_MAX_BOXES["healthy_other"]).all()
    assert (boxes["size_mm"] == 32.0).all()
    for _, box in boxes.iterrows():
        subject = box["subject_id"]
        image = nib.load(cohort_dir / "images" / f"{subject}.nii.gz")
        lesion = np.asarray(nib.load(cohort_dir / "labels" / f"{subject}_lesions.nii.gz").dataobj)
        centre = box[["centre_x", "centre_y", "centre_z"]].to_numpy(dtype=int)
        mm = (image.affine @ np.r_[centre, 1])[:3]
        assert np.allclose(mm, box[["centre_x_mm", "centre_y_mm", "centre_z_mm"]].to_numpy(float), atol=0.01)
        half = int(16 // VOXEL_MM)
        window = lesion[tuple(slice(max(c - half, 0), c + half + 1) for c in centre)]
        if box["label"] == "healthy":  # from every subject (healthy_subjects "all"), never holding emphysema
            assert not np.isin(window, labels.EMPHYSEMA_CODES).any()
        else:
            code = labels.CENTRILOBULAR if box["label"] == "centrilobular" else labels.PARASEPTAL
            assert lesion[tuple(centre)] == code


def test_dicom_round_trip_through_monai(cohort_dir):
    from monai.transforms import LoadImage

    manifest = pd.read_csv(cohort_dir / "cohort.csv", keep_default_na=False)
    with_dicom = manifest[manifest["dicom"] != ""]
    assert list(with_dicom["subject_id"]) == ["SYN0000", "SYN0004"]
    row = with_dicom.iloc[0]
    files = sorted((cohort_dir / row["dicom"]).glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert all(float(h.RescaleSlope) == 1 and float(h.RescaleIntercept) == -1024 for h in headers)
    from_dicom = LoadImage(reader="PydicomReader", image_only=True)(str(cohort_dir / row["dicom"]))
    from_nifti = LoadImage(image_only=True)(str(cohort_dir / row["image"]))
    assert from_dicom.shape == from_nifti.shape
    np.testing.assert_array_equal(np.asarray(from_dicom), np.asarray(from_nifti))
    np.testing.assert_allclose(np.asarray(from_dicom.affine), np.asarray(from_nifti.affine), atol=1e-3)


def test_covid_grades_match_the_lung_involved(cohort_dir):
    clinical = pd.read_csv(cohort_dir / "covid_clinical.csv")
    assert list(clinical["grade"]) == [0, 1, 2, 3, 4]
    assert (clinical["measured_grade"] == clinical["grade"]).all()
    for _, row in clinical.iterrows():
        lesion = np.asarray(nib.load(cohort_dir / "labels" / f"{row['subject_id']}_lesions.nii.gz").dataobj)
        lung = np.asarray(nib.load(cohort_dir / "lungs" / f"{row['subject_id']}_lung.nii.gz").dataobj) > 0
        share = float(np.isin(lesion, (labels.GROUND_GLASS, labels.CONSOLIDATION)).sum()) / lung.sum()
        assert grade_from_involvement(share) == row["grade"]
    severe = clinical.iloc[-1]["subject_id"]
    image = np.asarray(nib.load(cohort_dir / "images" / f"{severe}.nii.gz").dataobj).astype(np.float32)
    lesion = np.asarray(nib.load(cohort_dir / "labels" / f"{severe}_lesions.nii.gz").dataobj)
    assert -650 < np.median(image[lesion == labels.GROUND_GLASS]) < -250
    assert -150 < np.median(image[lesion == labels.CONSOLIDATION]) < 80


def test_cli_writes_a_cohort(tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "bundle" / "scripts" / "generate_demo_cohort.py"
    spec = importlib.util.spec_from_file_location("generate_demo_cohort", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(out_dir=str(tmp_path), num_subjects=1, seed=7, voxel_size=6.0, dicom_every=0, progress=False)
    manifest = pd.read_csv(tmp_path / "cohort.csv", keep_default_na=False)
    assert manifest["subject_id"].tolist() == ["SYN0000"]
    assert (tmp_path / manifest["image"][0]).is_file()


def test_written_subject_is_identical_whatever_the_cohort_size(cohort_dir, tmp_path):
    generate_cohort(tmp_path, num_subjects=1, seed=0, voxel_size=VOXEL_MM, dicom_every=0, progress=False)
    for folder, suffix in (("images", ""), ("labels", "_lesions"), ("lungs", "_lung")):
        ours = nib.load(tmp_path / folder / f"SYN0000{suffix}.nii.gz")
        theirs = nib.load(cohort_dir / folder / f"SYN0000{suffix}.nii.gz")
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
        np.testing.assert_array_equal(ours.affine, theirs.affine)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "clinical.csv"), pd.read_csv(cohort_dir / "clinical.csv").head(1)
    )


def test_landmarks_map_into_the_subject_and_back(cohort_dir):
    from custom.data.atlas import landmark_centres
    from custom.synthetic.geometry import atlas_to_subject_points, subject_to_atlas_points

    transform = json.loads((cohort_dir / "transforms" / "SYN0001.json").read_text())
    assert transform["deformation"]["amplitude_mm"] > 0
    centres = landmark_centres().astype(np.float64)
    in_subject = atlas_to_subject_points(transform, centres)
    np.testing.assert_allclose(subject_to_atlas_points(transform, in_subject), centres, atol=1e-3)
    # a landmark is in the subject's lung exactly when it is in the atlas lung (up to the pleura's voxels)
    lung = np.asarray(nib.load(cohort_dir / "lungs" / "SYN0001_lung.nii.gz").dataobj) > 0
    idx = np.clip(np.rint(in_subject).astype(int), 0, np.array(lung.shape) - 1)
    reference = load_atlas_reference(step=int(VOXEL_MM))
    in_atlas_lung = reference.signed_depth_mm[tuple((centres / reference.step).round().astype(int).T)] > 0
    assert np.mean(lung[tuple(idx.T)] == in_atlas_lung) > 0.95
