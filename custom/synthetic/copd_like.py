"""The SYNTHETIC COPD-like cohort (ids SYN####): emphysema subtypes with their spatial priors, air trapping and
airway-wall thickening from the stated clinical model (``custom.synthetic.clinical``), and COPDGene-style 32 mm
box annotations of emphysema and of healthy lung.

``CopdLikeGenerator`` is the config component (``generate.yaml``: ``copd``); ``custom.synthetic.writer.CohortWriter``
writes what it generates (``cohort.csv``, ``clinical.csv``, ``annotations.csv``, ``datalist.json``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from custom.flags import as_bool
from custom.synthetic import labels
from custom.synthetic.anatomy import AtlasReference
from custom.synthetic.annotations import ANNOTATION_COLUMNS, BOX_MM, healthy_boxes, lesion_boxes
from custom.synthetic.clinical import draw_clinical_row, is_healthy_control
from custom.synthetic.confounders import AIR_TRAPPING_SHIFT_HU, place_air_trapping
from custom.synthetic.emphysema import LESION_HU, place_emphysema
from custom.synthetic.geometry import DEFAULT_FOV_MM, SubjectGrid, subject_voxels_to_atlas_voxels
from custom.synthetic.subject import (
    LungRegion,
    SubjectPlan,
    SyntheticCohortGenerator,
    blend,
    lung_crop,
    protocol_columns,
)

DEFAULT_MAX_BOXES = {"centrilobular": 6, "paraseptal": 4, "healthy": 12}  # healthy lung dominates a map


class CopdLikeGenerator(SyntheticCohortGenerator):
    """COPD-like subjects; ``include_panlobular`` lets the clinical model draw panlobular emphysema;
    ``annotation_fraction`` is the share of emphysema subjects that get box annotations (healthy controls always
    get healthy boxes); ``max_boxes`` caps the boxes per subject and label."""

    cohort = "copd"
    id_prefix = "SYN"
    file_prefix = ""
    lesion_codes = (labels.CENTRILOBULAR, labels.PARASEPTAL, labels.PANLOBULAR, labels.AIRWAY_WALL, labels.AIR_TRAPPING)
    annotation_columns = tuple(ANNOTATION_COLUMNS)

    def __init__(
        self,
        num_subjects: int = 8,
        seed: int = 0,
        voxel_size: float | tuple = 2.0,
        deformation_mm: float = 4.0,
        dicom_every: int = 4,
        include_panlobular: bool = True,
        annotation_fraction: float = 1.0,
        max_boxes: dict | None = None,
        fov_mm=DEFAULT_FOV_MM,
    ):
        super().__init__(num_subjects, seed, voxel_size, deformation_mm, dicom_every, fov_mm)
        self.include_panlobular = as_bool(include_panlobular)
        self.annotation_fraction = float(annotation_fraction)
        self.max_boxes = {**DEFAULT_MAX_BOXES, **(max_boxes or {})}

    def draw_row(self, rng: np.random.Generator, subject_id: str, index: int) -> dict:
        return draw_clinical_row(rng, subject_id, index, self.include_panlobular)

    def paint_lesions(
        self, rng: np.random.Generator, region: LungRegion, row: dict, lung_hu: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Centrilobular, paraseptal and panlobular emphysema, then air trapping; thickened airway walls."""
        fractions = {
            "centrilobular": row["cle_fraction"],
            "paraseptal": row["paraseptal_fraction"],
            "panlobular": row["panlobular_fraction"],
        }
        lesion, spacing = region.lesion, region.spacing
        place_emphysema(rng, lesion, region.lung, region.height, region.depth, fractions, spacing)
        place_air_trapping(
            rng, lesion, region.lung, region.height, region.posterior, row["air_trapping_fraction"], spacing
        )
        lung_hu[lesion == labels.AIR_TRAPPING] += AIR_TRAPPING_SHIFT_HU
        emphysema = np.isin(lesion, labels.EMPHYSEMA_CODES)
        target = np.full(lesion.shape, LESION_HU[labels.CENTRILOBULAR], dtype=np.float32)
        for code, value in LESION_HU.items():
            target[lesion == code] = value
        lung_hu = blend(lung_hu, target + 8.0 * region.fine, emphysema, spacing)
        return lung_hu, emphysema, row["airway_disease"]

    def finish(self, plan: SubjectPlan, volumes: dict, grid: SubjectGrid, reference: AtlasReference) -> list[dict]:
        """The subject's 32 mm boxes: its densest centrilobular / paraseptal regions when it is annotated (a share
        ``annotation_fraction`` of subjects, drawn from its annotation stream), healthy boxes of controls."""
        rng = plan.streams["annotation"]
        annotate = rng.random() < self.annotation_fraction
        return annotation_rows(plan.row, volumes, grid, reference, rng, annotate, self.max_boxes)

    def clinical_table(self) -> pd.DataFrame:
        """The clinical table without images (the rows ``clinical.csv`` has, minus the image-measured columns)."""
        rows = []
        for index in range(self.num_subjects):
            plan = self.plan(index)
            rows.append({**plan.row, **protocol_columns(plan.protocol)})
        return pd.DataFrame(rows)


def annotation_rows(
    row: dict, volumes: dict, grid: SubjectGrid, reference: AtlasReference, rng, annotate: bool, max_boxes: dict
) -> list[dict]:
    """Box rows (``ANNOTATION_COLUMNS``): centre voxel, centre in mm, size, centre in the atlas, lesion share."""
    lung = volumes["lung"] > 0
    lesion = volumes["lesion"]
    crop = lung_crop(lung, margin=0)
    offset = np.array([s.start for s in crop])
    found = []
    if annotate:
        for code, name in ((labels.CENTRILOBULAR, "centrilobular"), (labels.PARASEPTAL, "paraseptal")):
            if volumes["measured"][f"measured_{name}_fraction"] > 0:
                for centre, share in lesion_boxes(lesion[crop], lung[crop], code, grid.spacing, max_boxes[name]):
                    found.append((name, centre + offset, share))
    if is_healthy_control(row):
        for centre, share in healthy_boxes(rng, lesion[crop], lung[crop], grid.spacing, max_boxes["healthy"]):
            found.append(("healthy", centre + offset, share))
    transform = volumes["transform"]
    out = []
    for name, centre, share in found:
        mm = (grid.affine @ np.r_[centre, 1.0])[:3]
        atlas = subject_voxels_to_atlas_voxels(
            grid, np.asarray(transform["atlas_to_subject"]), reference.affine_1mm, transform["deformation"], centre
        )[0]
        values = [
            row["subject_id"],
            name,
            *map(int, centre),
            *np.round(mm, 2),
            BOX_MM,
            *np.round(atlas, 1),
            round(share, 4),
        ]
        out.append(dict(zip(ANNOTATION_COLUMNS, values)))
    return out


def draw_clinical_table(num_subjects: int, seed: int = 0, include_panlobular: bool = True) -> pd.DataFrame:
    """The COPD clinical table without images (identical to the one the cohort writes, minus the image-measured
    columns): cheap enough for hundreds of draws in tests and power calculations."""
    return CopdLikeGenerator(num_subjects, seed, include_panlobular=include_panlobular).clinical_table()
