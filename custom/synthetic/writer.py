"""Atomic writers for the SYNTHETIC cohort: NIfTI, DICOM series, JSON and CSV.

Every file is written under a temporary name in its final folder and moved into place with ``os.replace``,
so an interrupted run never leaves a half-written file that a later step would trust.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from custom.atomic_io import atomic_path

SYNTHETIC_NOTE = "SYNTHETIC DrasCLR demo data - not a real patient"


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype=np.int16) -> Path:
    """NIfTI with the affine in both sform and qform (code 1, scanner), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header["descrip"] = b"SYNTHETIC DrasCLR demo"
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
        ds.Manufacturer = "SYNTHETIC"
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
