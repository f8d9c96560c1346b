"""The "regional" disease model of the SYNTHETIC COPD-like cohort, the evidence study's cohort (issue 14; stated
with every coefficient in bundle/docs/synthetic_cohort.md, "The regional disease model").

Why it exists: under the density model (``custom.synthetic.clinical``) every lesion is painted near -990 HU and
spirometry and survival follow the whole-lung lesion shares, so whole-lung LAA-950 is close to a sufficient
statistic by construction and comparing learned features against it proves nothing. Here phenotypes and survival
follow where and what the disease is: centrilobular emphysema in the lower half of the lung weighs about three
times (spirometry) to six times (survival) as much as in the upper half, paraseptal weighs little, airway walls
enter survival, and the emphysematous tissue of a subject has its own mean attenuation between -980 HU and
-910 HU, drawn independent of its extent, so part of it sits above -950 HU where LAA-950 cannot count it.
Kernel/dose noise and inspiration (``custom.synthetic.confounders``) still bias whole-lung density. The model was
fixed before the study was run and is not tuned toward any learning method.

Demographics, latent severity, lesion shares, the spirometry noise and every outcome draw are the density
model's own (same functions, same random draws in the same order); the two extra draws of this model
(``cle_lower_share``, ``lesion_hu_mean``) come after all of them from the same clinical stream.
"""

from __future__ import annotations

import numpy as np

from custom.synthetic.clinical import (
    clinical_row,
    draw_demographics,
    draw_disease,
    draw_outcome_noise,
    draw_spirometry_noise,
    outcomes,
    spirometry,
)

# share of the centrilobular volume below atlas height 0.5 (emphysema.LOWER_ZONE_HEIGHT, where painting splits)
CLE_LOWER_SHARE_BETA = (2.0, 3.0)
LESION_HU_RANGE = (-980.0, -910.0)  # mean attenuation of a subject's emphysema (severe .. mild destruction)
# spirometry: the disease terms subtracted, in this order (keys of the regional disease dict)
REGIONAL_FEV1PP_COEFS = {
    "cle_upper_fraction": 90.0,
    "cle_lower_fraction": 260.0,
    "paraseptal_fraction": 20.0,
    "panlobular_fraction": 110.0,
    "airway_disease": 30.0,
    "air_trapping_fraction": 140.0,
}
REGIONAL_FEV1_FVC_COEFS = {
    "cle_upper_fraction": 0.45,
    "cle_lower_fraction": 1.4,
    "paraseptal_fraction": 0.15,
    "panlobular_fraction": 0.8,
    "airway_disease": 0.12,
    "air_trapping_fraction": 0.5,
}
# survival: the disease terms of eta, replacing HAZARD_COEFS["emphysema_fraction"] * emphysema_fraction (the
# other terms of clinical.HAZARD_COEFS are unchanged)
REGIONAL_HAZARD_COEFS = {
    "cle_upper_fraction": 1.0,
    "cle_lower_fraction": 6.0,
    "paraseptal_fraction": 0.5,
    "panlobular_fraction": 3.0,
    "airway_disease": 1.2,
}
REGIONAL_COLUMNS = ("cle_lower_share", "lesion_hu_mean", "cle_upper_fraction", "cle_lower_fraction")


def draw_regional_extent(rng: np.random.Generator, disease: dict) -> dict:
    """The model's own draws (zone split of the centrilobular volume, emphysema attenuation) and the two zone
    fractions; attenuation is drawn independent of extent."""
    lower_share = float(rng.beta(*CLE_LOWER_SHARE_BETA))
    lesion_hu = float(rng.uniform(*LESION_HU_RANGE))
    cle = disease["cle_fraction"]
    return {
        "cle_lower_share": lower_share,
        "lesion_hu_mean": lesion_hu,
        "cle_upper_fraction": cle * (1.0 - lower_share),
        "cle_lower_fraction": cle * lower_share,
    }


def draw_regional_row(rng: np.random.Generator, subject_id: str, index: int, include_panlobular: bool = True) -> dict:
    """One subject's clinical record under the regional model: the density model's columns, plus
    ``REGIONAL_COLUMNS``."""
    demo = draw_demographics(rng)
    disease = draw_disease(rng, demo, index, include_panlobular)
    spiro_noise = draw_spirometry_noise(rng)
    outcome_noise = draw_outcome_noise(rng)
    regional = draw_regional_extent(rng, disease)  # after every draw of the density model
    terms = {**disease, **regional}
    spiro = spirometry(demo, terms, spiro_noise, REGIONAL_FEV1PP_COEFS, REGIONAL_FEV1_FVC_COEFS)
    outcome = outcomes(demo, terms, spiro, outcome_noise, REGIONAL_HAZARD_COEFS)
    return {**clinical_row(subject_id, demo, disease, spiro, outcome), **regional}
