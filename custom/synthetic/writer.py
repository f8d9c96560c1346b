"""Atomic writers for the SYNTHETIC cohort: NIfTI, DICOM series, JSON and CSV, and ``CohortWriter``, the config
component (``generate.yaml``: ``writer``) that writes a generated cohort's files and tables.

Every file is written under a temporary name in its final folder and moved into place with ``os.replace``,
so an interrupted run never leaves a half-written file that a later step would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from tqdm.auto import tqdm

from custom.atomic_io import atomic_path

SYNTHETIC_NOTE = "SYNTHETIC DrasCLR demo data - not a real patient"
NIFTI_MARK = b"SYNTHETIC DrasCLR demo"  # NIfTI header ``descrip`` of every synthetic scan
DICOM_MANUFACTURER = "SYNTHETIC"  # DICOM Manufacturer of every synthetic slice


def is_synthetic_scan(path: str | Path) -> bool:
    """Whether ``path`` (a NIfTI file or a DICOM series folder) was written by this generator: the marks above.
    Anything unreadable or unmarked counts as not synthetic."""
    path = Path(path)
    try:
        if path.is_dir():
            import pydicom

            first = next((f for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".")), None)
            if first is None:
                return False
            slice_ = pydicom.dcmread(str(first), stop_before_pixels=True, specific_tags=["Manufacturer"], force=True)
            return str(getattr(slice_, "Manufacturer", "")) == DICOM_MANUFACTURER
        if path.name.endswith((".nii", ".nii.gz")):
            descrip = bytes(np.asarray(nib.load(str(path)).header["descrip"]).tobytes()).rstrip(b"\0")
            return descrip.startswith(NIFTI_MARK)
    except Exception:  # noqa: BLE001 - an unreadable file is not evidence of synthetic data
        return False
    return False


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype=np.int16) -> Path:
    """NIfTI with the affine in both sform and qform (code 1, scanner), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header["descrip"] = NIFTI_MARK
    if dtype == np.int16:
        image.header["cal_min"], image.header["cal_max"] = -1024, 240
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path


def save_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))
    return path


def save_csv(path: str | Path, table: pd.DataFrame) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def save_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def deterministic_uid(*parts) -> str:
    """DICOM UID derived from the cohort seed and subject, so reruns produce identical series."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_dicom_series(
    folder: str | Path,
    hu: np.ndarray,
    affine_ras: np.ndarray,
    subject_id: str,
    uid_seed,
    kernel: str = "STANDARD",
    study_description: str = "SYNTHETIC chest CT",
) -> Path:
    """Axial CT series, one file per z slice: stored value = HU + 1024 (uint16), RescaleSlope 1,
    RescaleIntercept -1024; geometry (IPP, IOP, PixelSpacing, SliceThickness) from the RAS affine.
    The whole folder appears at once (written aside, then renamed)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{os.getpid()}-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir = lps[:3, 0] / spacing[0]  # along a row: increasing column index = array x
    col_dir = lps[:3, 1] / spacing[1]  # down a column: increasing row index = array y
    stored = np.clip(np.rint(hu).astype(np.int32) + 1024, 0, 4095).astype(np.uint16)

    study_uid = deterministic_uid(uid_seed, subject_id, "study")
    series_uid = deterministic_uid(uid_seed, subject_id, "series")
    frame_uid = deterministic_uid(uid_seed, subject_id, "frame")
    date = datetime(2000, 1, 1, tzinfo=timezone.utc).strftime("%Y%m%d")
    for k in range(hu.shape[2]):
        sop_uid = deterministic_uid(uid_seed, subject_id, "slice", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = f"SYNTHETIC^{subject_id}"
        ds.PatientID = subject_id
        ds.PatientIdentityRemoved = "YES"
        ds.StudyDate = ds.SeriesDate = date
        ds.StudyDescription = study_description
        ds.SeriesDescription = SYNTHETIC_NOTE
        ds.ImageComments = SYNTHETIC_NOTE
        ds.Manufacturer = DICOM_MANUFACTURER
        ds.ConvolutionKernel = kernel
        ds.PatientPosition = "HFS"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        position = lps @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position[:3]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.r_[row_dir, col_dir]]
        ds.SliceLocation = f"{position[2]:.4f}"
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.SpacingBetweenSlices = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[0])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # DICOM rows = y, columns = x
        ds.save_as(tmp / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


README_TEXT = """SYNTHETIC DATA - NOT REAL PATIENTS.
Generated by the DrasCLR bundle (custom.synthetic, bundle/scripts/generate_demo_cohort.py) from the atlas lung
mask and a stated generative model (bundle/docs/synthetic_cohort.md). It exists to exercise the pipeline
(prepare, pretrain, evaluate) and its tests. No clinical conclusion can be drawn from it.
{cohorts}
"""
README_COHORTS = (("copd", ""), ("covid", "covid_"))
MANIFEST_PATHS = ("image", "label", "lung_mask", "transform", "dicom")


def readme_text(out: Path) -> str:
    """SYNTHETIC_README.txt: the warning and the cohorts the folder holds."""
    lines = []
    for cohort, prefix in README_COHORTS:
        manifest = out / f"{prefix}cohort.csv"
        if manifest.is_file():
            lines.append(f"{cohort}: {manifest.name}, {prefix}clinical.csv ({len(pd.read_csv(manifest))} subjects)")
    return README_TEXT.format(cohorts="\n".join(lines))


class CohortWriter:
    """Writes synthetic cohorts into ``out_dir`` (paths in the CSVs relative to it), every file atomically:
    per subject ``images/<id>.nii.gz`` (int16 HU), ``labels/<id>_lesions.nii.gz``, ``lungs/<id>_lung.nii.gz``,
    ``transforms/<id>.json`` and, when the generator asks for it, ``dicom/<id>/``; per cohort
    ``<prefix>cohort.csv`` (manifest), ``<prefix>clinical.csv``, ``<prefix>datalist.json`` (MONAI datalist),
    ``annotations.csv`` for a cohort with annotations; and ``SYNTHETIC_README.txt``."""

    def __init__(self, out_dir: str | Path, progress: bool = True):
        self.out_dir, self.progress = Path(out_dir), bool(progress)

    def write(self, *generators) -> list[pd.DataFrame]:
        """Write each cohort (one with no subjects is skipped); returns their manifests with absolute paths."""
        return [self.write_cohort(g) for g in generators if g is not None and g.num_subjects > 0]

    def write_subject(self, subject_id: str, volumes: dict, grid, dicom: bool, seed: int, kernel: str) -> dict:
        out = self.out_dir
        paths = {
            "image": f"images/{subject_id}.nii.gz",
            "label": f"labels/{subject_id}_lesions.nii.gz",
            "lung_mask": f"lungs/{subject_id}_lung.nii.gz",
            "transform": f"transforms/{subject_id}.json",
            "dicom": f"dicom/{subject_id}" if dicom else "",
        }
        save_nifti(out / paths["image"], volumes["image"], grid.affine, np.int16)
        save_nifti(out / paths["label"], volumes["lesion"], grid.affine, np.uint8)
        save_nifti(out / paths["lung_mask"], volumes["lung"], grid.affine, np.uint8)
        save_json(out / paths["transform"], {"subject_id": subject_id, **volumes["transform"]})
        if dicom:
            write_dicom_series(out / paths["dicom"], volumes["image"], grid.affine, subject_id, seed, kernel=kernel)
        return paths

    def write_cohort(self, generator) -> pd.DataFrame:
        """Write one cohort (a ``custom.synthetic.subject.SyntheticCohortGenerator``); returns its manifest with
        absolute paths."""
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        grid = generator.grid
        manifest, clinical, annotations = [], [], []
        subjects = tqdm(
            generator.subjects(),
            total=generator.num_subjects,
            desc=f"synthetic {generator.cohort} cohort",
            disable=not self.progress,
        )
        start = time.perf_counter()
        for plan, volumes, boxes in subjects:
            sid = plan.row["subject_id"]
            annotations += boxes
            paths = self.write_subject(
                sid, volumes, grid, generator.wants_dicom(plan.index), generator.seed, plan.protocol["dicom_kernel"]
            )
            clinical.append(generator.table_row(plan, volumes))
            manifest.append(
                {
                    "subject_id": sid,
                    "cohort": generator.cohort,
                    **paths,
                    "shape": "x".join(map(str, grid.shape)),
                    "spacing_mm": "x".join(f"{s:g}" for s in grid.spacing),
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
            start = time.perf_counter()
        prefix = generator.file_prefix
        manifest_df = pd.DataFrame(manifest)
        save_csv(out / f"{prefix}cohort.csv", manifest_df)
        save_csv(out / f"{prefix}clinical.csv", pd.DataFrame(clinical))
        if generator.annotation_columns is not None:
            save_csv(out / f"{prefix}annotations.csv", pd.DataFrame(annotations, columns=generator.annotation_columns))
        datalist = {
            "description": SYNTHETIC_NOTE,
            "training": [
                {"image": m["image"], "label": m["label"], "lung_mask": m["lung_mask"], "subject_id": m["subject_id"]}
                for m in manifest
            ],
        }
        save_json(out / f"{prefix}datalist.json", datalist)
        save_text(out / "SYNTHETIC_README.txt", readme_text(out))
        absolute = manifest_df.copy()
        for column in MANIFEST_PATHS:
            absolute[column] = [str(out / p) if p else "" for p in absolute[column]]
        return absolute
