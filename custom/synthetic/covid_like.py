"""The SYNTHETIC COVID-like cohort (ids COV####): ground glass and consolidation graded CT-0..CT-4 by the share of
lung involved (lesion model: ``custom.synthetic.covid``).

``CovidLikeGenerator`` is the config component (``generate.yaml``: ``covid``); ``custom.synthetic.writer.CohortWriter``
writes what it generates (``covid_cohort.csv``, ``covid_clinical.csv`` with the grade, ``covid_datalist.json``).
"""

from __future__ import annotations

import numpy as np

from custom.synthetic import labels
from custom.synthetic.anatomy import AtlasReference
from custom.synthetic.covid import covid_lesion_hu, draw_covid_row, grade_from_involvement, place_covid_lesions
from custom.synthetic.geometry import DEFAULT_FOV_MM, SubjectGrid
from custom.synthetic.subject import LungRegion, SubjectPlan, SyntheticCohortGenerator, blend

UNINVOLVED_HU = -450.0  # stands in for the NaN outside lesions in the blend target


class CovidLikeGenerator(SyntheticCohortGenerator):
    """COVID-like subjects; grades cycle CT-0..CT-4 with the subject index unless ``grade_probs`` is given."""

    cohort = "covid"
    id_prefix = "COV"
    file_prefix = "covid_"
    lesion_codes = (labels.GROUND_GLASS, labels.CONSOLIDATION)

    def __init__(
        self,
        num_subjects: int = 5,
        seed: int = 0,
        voxel_size: float | tuple = 2.0,
        deformation_mm: float = 4.0,
        dicom_every: int = 0,
        grade_probs=None,
        fov_mm=DEFAULT_FOV_MM,
    ):
        super().__init__(num_subjects, seed, voxel_size, deformation_mm, dicom_every, fov_mm)
        self.grade_probs = grade_probs

    def draw_row(self, rng: np.random.Generator, subject_id: str, index: int) -> dict:
        return draw_covid_row(rng, subject_id, index, self.grade_probs)

    def paint_lesions(
        self, rng: np.random.Generator, region: LungRegion, row: dict, lung_hu: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Peripheral, posterior, lower-zone ground glass with consolidated cores; no emphysema, normal airways."""
        place_covid_lesions(
            rng, region.lesion, region.lung, region.height, region.depth, region.posterior, row, region.spacing
        )
        target = covid_lesion_hu(rng, region.lesion, region.spacing)
        involved = region.lesion > 0
        lung_hu = blend(
            lung_hu, np.nan_to_num(target, nan=UNINVOLVED_HU) + 10.0 * region.fine, involved, region.spacing
        )
        return lung_hu, np.zeros(region.lesion.shape, dtype=bool), 0.0

    def finish(self, plan: SubjectPlan, volumes: dict, grid: SubjectGrid, reference: AtlasReference) -> list[dict]:
        """The involvement measured on the ground-truth lesion map and its grade (equal to the table's)."""
        measured = volumes["measured"]
        involved = measured["measured_ground_glass_fraction"] + measured["measured_consolidation_fraction"]
        plan.row["measured_involvement_fraction"] = round(involved, 5)
        plan.row["measured_grade"] = grade_from_involvement(involved)
        return []
