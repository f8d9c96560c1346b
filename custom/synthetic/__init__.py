"""SYNTHETIC demo cohorts for the DrasCLR bundle (no real patient data can ship with it).

A COPD-like cohort built on the real atlas lung mask (emphysema subtypes with their spatial priors,
confounders of density thresholds, a stated clinical generative model, COPDGene-style box annotations) and a
COVID-like cohort (ground glass and consolidation graded CT-0..CT-4). See bundle/docs/synthetic_cohort.md.
The steps every subject shares are ``custom.synthetic.subject``; the two cohorts are ``copd_like`` and
``covid_like``; ``writer.CohortWriter`` writes them.
"""

from custom.synthetic.cohort import generate_cohort, generate_covid_cohort
from custom.synthetic.copd_like import CopdLikeGenerator, draw_clinical_table
from custom.synthetic.covid_like import CovidLikeGenerator
from custom.synthetic.geometry import atlas_to_subject_points, subject_to_atlas_points
from custom.synthetic.labels import LESION_NAMES
from custom.synthetic.writer import CohortWriter

__all__ = [
    "LESION_NAMES",
    "CohortWriter",
    "CopdLikeGenerator",
    "CovidLikeGenerator",
    "atlas_to_subject_points",
    "draw_clinical_table",
    "generate_cohort",
    "generate_covid_cohort",
    "subject_to_atlas_points",
]
