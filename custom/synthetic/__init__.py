"""SYNTHETIC demo cohorts for the DrasCLR bundle (no real patient data can ship with it).

A COPD-like cohort built on the real atlas lung mask (emphysema subtypes with their spatial priors,
confounders of density thresholds, a stated clinical generative model, COPDGene-style box annotations) and a
COVID-like cohort (ground glass and consolidation graded CT-0..CT-4). See bundle/docs/synthetic_cohort.md.
"""

from custom.synthetic.cohort import (
    draw_clinical_table,
    generate_cohort,
    generate_covid_cohort,
    plan_subject,
    synthesize_subject,
)
from custom.synthetic.geometry import atlas_to_subject_points, subject_to_atlas_points
from custom.synthetic.labels import LESION_NAMES

__all__ = [
    "LESION_NAMES",
    "atlas_to_subject_points",
    "draw_clinical_table",
    "generate_cohort",
    "generate_covid_cohort",
    "plan_subject",
    "subject_to_atlas_points",
    "synthesize_subject",
]
