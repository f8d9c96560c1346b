"""The prepare workflow on a real chest CT (DICOM series).

Data: TCIA Lung-PET-CT-Dx, subject Lung_Dx-A0001 (CC BY 4.0). Li, P., et al. (2020). A Large-Scale CT and
PET/CT Dataset for Lung Cancer Diagnosis (Lung-PET-CT-Dx). The Cancer Imaging Archive.
https://doi.org/10.7937/TCIA.2020.NNC20461
Read from ``../shared/data/real_ct`` beside the repository (``$DRASCLR_SHARED_DATA/real_ct``), or from
``$DRASCLR_REAL_CT``; never copied into the repository.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REAL_CT
from conftest import REAL_CT_SERIES as SERIES

from custom.prepare import cache
from custom.prepare.workflow import discover_inputs, prepare_cohort

pytestmark = pytest.mark.skipif(not SERIES.is_dir(), reason=f"real CT not found at {SERIES} (set DRASCLR_REAL_CT)")


def test_real_ct_folder_lists_both_dicom_series():
    ids = [item.subject_id for item in discover_inputs(REAL_CT)]
    assert ids == ["lung_pet_ct_dx_A0001_sharp_kernel_L", "lung_pet_ct_dx_A0001_soft_kernel_B"]


def test_real_ct_dicom_prepares_with_most_landmarks_inside_the_lung(tmp_path):
    manifest = prepare_cohort(SERIES, tmp_path, progress=False)
    row = manifest.iloc[0]
    assert row.status == "ok", row.error
    entry = tmp_path / row.subject_id
    assert cache.is_complete(tmp_path, row.subject_id)
    qc = json.loads((entry / "qc.json").read_text())
    assert qc["original_spacing"] == pytest.approx([0.8418, 0.8418, 5.0], abs=1e-3)
    # the anatomy QC passes the unmodified scan, and the cohort QC sheet lists it with its picture
    assert qc["qc_status"] == "ok" and row.qc_status == "ok" and row.qc_reason == "", qc["qc_reasons"]
    assert (entry / "qc.png").stat().st_size > 5000
    sheet = pd.read_csv(tmp_path / "qc.csv", keep_default_na=False)
    assert sheet.subject_id.tolist() == [row.subject_id] and sheet.picture[0] == f"{row.subject_id}/qc.png"
    assert (tmp_path / "qc_sheet.html").is_file() and (tmp_path / "qc_sheet.png").is_file()
    assert qc["spacing"] == [1.0, 1.0, 1.0]
    assert 3000 < qc["lung_volume_ml"] < 8000  # an adult's lungs, found by the built-in segmentation
    assert qc["dice"] > 0.8
    # most landmarks inside the lung: near the atlas's own share (64 % of centres are in the atlas lung)
    assert qc["share_inside_lung"] > 0.5
    assert qc["share_inside_lung"] > 0.85 * qc["atlas_share_inside_lung"]
    patches = np.load(entry / "patches.npy", mmap_mode="r")
    assert patches.shape == (581, 32, 32, 32) and patches.dtype == np.int16
    # the lung is dark: the median patch-centre value of the landmarks is lung parenchyma, not tissue
    assert np.median(patches[:, 16, 16, 16]) < -500
