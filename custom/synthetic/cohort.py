"""SYNTHETIC demo cohorts for the DrasCLR bundle in one call: a COPD-like cohort (emphysema subtypes, confounders,
clinical table, box annotations; ``custom.synthetic.copd_like``) and a COVID-like cohort (ground glass,
consolidation, CT-0..CT-4; ``custom.synthetic.covid_like``), written by ``custom.synthetic.writer.CohortWriter``.
``bundle/configs/generate.yaml`` builds the same components declaratively.

Output layout under ``out_dir`` (paths in the CSVs are relative to ``out_dir``)::

    images/<id>.nii.gz            int16 HU, RAS affine with the true spacing
    labels/<id>_lesions.nii.gz    uint8 lesion codes (custom.synthetic.labels)
    lungs/<id>_lung.nii.gz        uint8 lung mask, 1 right, 2 left
    transforms/<id>.json          atlas->subject 4x4 world transform and the non-rigid part
    dicom/<id>/IM0001.dcm ...     the same image as a DICOM series (every ``dicom_every``-th subject)
    cohort.csv / covid_cohort.csv manifest; clinical.csv / covid_clinical.csv; annotations.csv;
    datalist.json / covid_datalist.json (MONAI datalist); SYNTHETIC_README.txt
"""

from __future__ import annotations

import pandas as pd

from custom.synthetic.copd_like import CopdLikeGenerator
from custom.synthetic.covid_like import CovidLikeGenerator
from custom.synthetic.geometry import DEFAULT_FOV_MM
from custom.synthetic.writer import CohortWriter


def generate_cohort(
    out_dir,
    num_subjects: int = 8,
    seed: int = 0,
    voxel_size: float | tuple[float, float, float] = 2.0,
    deformation_mm: float = 4.0,
    include_panlobular: bool = True,
    dicom_every: int = 4,
    annotation_fraction: float = 1.0,
    fov_mm=DEFAULT_FOV_MM,
    progress: bool = True,
) -> pd.DataFrame:
    """Write the SYNTHETIC COPD-like cohort and return its manifest (absolute paths; ``cohort.csv`` holds
    the same with paths relative to ``out_dir``). ``dicom_every=k`` also writes subjects 0, k, 2k, ... as
    DICOM (0: none); ``deformation_mm=0`` makes every subject exactly an affine image of the atlas."""
    generator = CopdLikeGenerator(
        num_subjects,
        seed,
        voxel_size,
        deformation_mm,
        dicom_every,
        include_panlobular,
        annotation_fraction,
        fov_mm=fov_mm,
    )
    return CohortWriter(out_dir, progress).write_cohort(generator)


def generate_covid_cohort(
    out_dir,
    num_subjects: int = 5,
    seed: int = 0,
    voxel_size: float | tuple[float, float, float] = 2.0,
    deformation_mm: float = 4.0,
    dicom_every: int = 0,
    grade_probs=None,
    fov_mm=DEFAULT_FOV_MM,
    progress: bool = True,
) -> pd.DataFrame:
    """Write the SYNTHETIC COVID-like cohort (``covid_cohort.csv``, ``covid_clinical.csv`` with the CT grade)
    and return its manifest. Grades cycle CT-0..CT-4 with the subject index unless ``grade_probs`` is given."""
    generator = CovidLikeGenerator(
        num_subjects, seed, voxel_size, deformation_mm, dicom_every, grade_probs, fov_mm=fov_mm
    )
    return CohortWriter(out_dir, progress).write_cohort(generator)
