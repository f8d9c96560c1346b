"""Generative clinical model of the SYNTHETIC COPD cohort (stated with its coefficients in
bundle/docs/synthetic_cohort.md). Demographics and smoking drive a latent disease severity; the severity sets
the lung shares of each lesion type the image generator then paints; spirometry, visual scores, exacerbations
and survival follow from those shares plus non-imaging confounders (age, sex, restriction, reader noise).
This is the "density" model; ``custom.synthetic.regional_disease`` is the "regional" one, which reuses these
draws: each step's random draws (``draw_*_noise``) are apart from the values they feed (``spirometry``,
``outcomes``) so that model can draw more after them without moving any of them.

GOLD and PRISm follow the spirometric rules exactly: FEV1/FVC < 0.70 is obstruction, graded by FEV1pp
(>= 80 GOLD 1, 50-80 GOLD 2, 30-50 GOLD 3, < 30 GOLD 4); FEV1/FVC >= 0.70 with FEV1pp < 80 is PRISm
(gold = -1, prism = 1); otherwise GOLD 0.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, ndtri

SEVERITY_STRATA = 4  # the latent noise is stratified by subject index so small cohorts span all severities

# survival: Weibull proportional hazards h(t) = WEIBULL_SCALE * k * t^(k-1) * exp(eta)
WEIBULL_SHAPE = 1.3
WEIBULL_SCALE = 0.010
HAZARD_COEFS = {
    "age_per_year": 0.065,  # centred at 62
    "male": 0.30,
    "fev1pp_deficit_per_point": 0.025,  # (80 - FEV1pp)
    "emphysema_fraction": 3.0,
    "exacerbation_history": 0.40,
    "current_smoker": 0.35,
}
FOLLOW_UP_YEARS = (5.0, 12.0)  # staggered enrolment: administrative censoring
DROPOUT_MEAN_YEARS = 25.0
# spirometry: the disease terms subtracted, in this order, from FEV1pp and from FEV1/FVC (keys of the disease dict)
FEV1PP_COEFS = {
    "cle_fraction": 190.0,
    "panlobular_fraction": 110.0,
    "paraseptal_fraction": 60.0,
    "airway_disease": 22.0,
    "air_trapping_fraction": 140.0,
}
FEV1_FVC_COEFS = {
    "cle_fraction": 1.0,
    "panlobular_fraction": 0.8,
    "paraseptal_fraction": 0.4,
    "airway_disease": 0.08,
    "air_trapping_fraction": 0.5,
}
FEV1PP_RANGE = (12.0, 140.0)
FEV1_FVC_RANGE = (0.25, 0.92)


def gold_stage(fev1pp, fev1_fvc):
    """(gold, prism) by the spirometric rules; gold = -1 marks PRISm."""
    fev1pp = np.asarray(fev1pp, dtype=np.float64)
    ratio = np.asarray(fev1_fvc, dtype=np.float64)
    obstructed = ratio < 0.70
    gold = np.where(fev1pp >= 80, 1, np.where(fev1pp >= 50, 2, np.where(fev1pp >= 30, 3, 4)))
    gold = np.where(obstructed, gold, np.where(fev1pp < 80, -1, 0))
    return gold.astype(np.int64), (gold == -1).astype(np.int64)


def gold_label(gold: int) -> str:
    return "PRISm" if gold == -1 else f"GOLD {gold}"


def cle_visual_score(fraction: float) -> int:
    """Fleischner-style CLE grade from the lung share: 0 none, 1 trace, 2 mild, 3 moderate, 4 confluent,
    5 advanced destructive."""
    if fraction <= 0:
        return 0
    return int(np.searchsorted([0.005, 0.03, 0.10, 0.20], fraction, side="right") + 1)


def paraseptal_visual_score(fraction: float) -> int:
    """0 none, 1 mild, 2 substantial."""
    if fraction <= 0:
        return 0
    return 1 if fraction < 0.02 else 2


def draw_demographics(rng: np.random.Generator) -> dict:
    age = float(rng.uniform(45.0, 80.0))
    sex = "F" if rng.random() < 0.47 else "M"
    race = "NHW" if rng.random() < 0.67 else "AA"
    status = ["never", "former", "current"][rng.choice(3, p=[0.06, 0.46, 0.48])]
    pack_years = 0.0 if status == "never" else float(10.0 + rng.gamma(2.0, 16.0))
    return {"age": age, "sex": sex, "race": race, "smoking_status": status, "pack_years": pack_years}


def draw_disease(rng: np.random.Generator, demo: dict, stratum: int, include_panlobular: bool = True) -> dict:
    """Latent severity -> target lung shares of each lesion type and airway disease (0..1)."""
    current = demo["smoking_status"] == "current"
    u = (stratum % SEVERITY_STRATA + rng.uniform(0.02, 0.98)) / SEVERITY_STRATA
    z = (
        -0.1
        + 0.035 * (demo["pack_years"] - 40.0)
        + 0.04 * (demo["age"] - 62.0)
        + 0.25 * current
        - 0.3 * (demo["race"] == "AA")
        - 1.5 * (demo["smoking_status"] == "never")
        + float(ndtri(u))
    )
    cle = min(0.30, 0.08 * max(z, 0.0) * float(np.exp(0.25 * rng.standard_normal())))
    has_pse = rng.random() < 0.15 + 0.5 * expit(z)
    pse = float(rng.uniform(0.005, 0.04) * (0.5 + expit(z))) if has_pse else 0.0
    has_ple = include_panlobular and (rng.random() < 0.05 + 0.05 * (z > 1.0))
    ple = float(rng.uniform(0.04, 0.15)) if has_ple else 0.0
    airway_logit = -1.0 + 0.02 * (demo["pack_years"] - 40.0) + 0.8 * current + 0.5 * z
    airway = float(expit(airway_logit + 0.8 * rng.standard_normal()))
    air_trapping = float(0.12 * airway * rng.uniform(0.3, 1.0))
    restriction = float(rng.uniform(10.0, 30.0)) if rng.random() < 0.12 else 0.0
    return {
        "severity_latent": float(z),
        "cle_fraction": float(cle),
        "paraseptal_fraction": pse,
        "panlobular_fraction": ple,
        "airway_disease": airway,
        "air_trapping_fraction": air_trapping,
        "restriction_fev1pp": restriction,
    }


def draw_spirometry_noise(rng: np.random.Generator) -> tuple[float, float]:
    """The two standard-normal draws of spirometry (FEV1pp, then FEV1/FVC), apart from the values they shift so
    a model can draw more per subject after them (``custom.synthetic.regional_disease``)."""
    return float(rng.standard_normal()), float(rng.standard_normal())


def spirometry(
    demo: dict,
    disease: dict,
    noise: tuple[float, float],
    fev1pp_coefs: dict | None = None,
    ratio_coefs: dict | None = None,
) -> dict:
    """FEV1pp and FEV1/FVC: the disease terms (disease key -> coefficient; default the density model's
    ``FEV1PP_COEFS``, ``FEV1_FVC_COEFS``) lower both; restriction lowers FEV1pp only. Terms are subtracted one by
    one in the order given, the order the density model's formula has always had, so its numbers stay exact."""
    age = demo["age"] - 62.0
    fev1pp = 102.0 - 0.15 * age
    for key, coef in (fev1pp_coefs or FEV1PP_COEFS).items():
        fev1pp = fev1pp - coef * disease[key]
    fev1pp = fev1pp - disease["restriction_fev1pp"] + 9.0 * noise[0]
    ratio = 0.79 - 0.0025 * age
    for key, coef in (ratio_coefs or FEV1_FVC_COEFS).items():
        ratio = ratio - coef * disease[key]
    ratio = ratio + 0.035 * noise[1]
    return {"fev1pp": float(np.clip(fev1pp, *FEV1PP_RANGE)), "fev1_fvc": float(np.clip(ratio, *FEV1_FVC_RANGE))}


def draw_spirometry(rng: np.random.Generator, demo: dict, disease: dict) -> dict:
    """FEV1pp and FEV1/FVC of the density model: emphysema and small-airway disease lower both."""
    return spirometry(demo, disease, draw_spirometry_noise(rng))


def draw_outcome_noise(rng: np.random.Generator) -> dict:
    """The random draws of ``outcomes``, in their order: reader bias, exacerbation, event time, censoring."""
    return {
        "reader": float(np.exp(0.2 * rng.standard_normal())),  # one reader's bias, shared by both scores
        "exacerbation_u": rng.random(),
        "event_u": rng.uniform(1e-12, 1.0),
        "follow_up": rng.uniform(*FOLLOW_UP_YEARS),
        "dropout": rng.exponential(DROPOUT_MEAN_YEARS),
    }


def outcomes(demo: dict, disease: dict, spiro: dict, noise: dict, hazard_coefs: dict | None = None) -> dict:
    """Visual scores (with reader noise), exacerbation history and censored Weibull survival; ``hazard_coefs``
    (disease key -> coefficient) are the disease terms of eta, added in order between FEV1pp and exacerbation."""
    reader = noise["reader"]
    cle_score = cle_visual_score(disease["cle_fraction"] * reader)
    pse_score = paraseptal_visual_score(disease["paraseptal_fraction"] * reader)
    current = demo["smoking_status"] == "current"
    logit = -1.3 - 0.045 * (spiro["fev1pp"] - 70.0) + 0.4 * current + 1.0 * disease["airway_disease"]
    exacerbation = int(noise["exacerbation_u"] < expit(logit))
    eta = (
        HAZARD_COEFS["age_per_year"] * (demo["age"] - 62.0)
        + HAZARD_COEFS["male"] * (demo["sex"] == "M")
        + HAZARD_COEFS["fev1pp_deficit_per_point"] * (80.0 - spiro["fev1pp"])
    )
    for key, coef in (hazard_coefs or {"emphysema_fraction": HAZARD_COEFS["emphysema_fraction"]}).items():
        eta = eta + coef * disease[key]
    eta = eta + HAZARD_COEFS["exacerbation_history"] * exacerbation + HAZARD_COEFS["current_smoker"] * current
    event_time = (-np.log(noise["event_u"]) / (WEIBULL_SCALE * np.exp(eta))) ** (1.0 / WEIBULL_SHAPE)
    censor_time = min(noise["follow_up"], noise["dropout"])
    return {
        "cle_score": cle_score,
        "paraseptal_score": pse_score,
        "exacerbation_history": exacerbation,
        "survival_years": round(float(min(event_time, censor_time)), 3),
        "death_event": int(event_time <= censor_time),
        "hazard_log_ratio": float(eta),
    }


def emphysema_fraction(disease: dict) -> float:
    """The true whole-lung emphysema share: CLE + PSE + PLE."""
    return disease["cle_fraction"] + disease["paraseptal_fraction"] + disease["panlobular_fraction"]


def draw_outcomes(rng: np.random.Generator, demo: dict, disease: dict, spiro: dict) -> dict:
    """Outcomes of the density model: eta has the whole-lung emphysema share."""
    return outcomes(
        demo, {**disease, "emphysema_fraction": emphysema_fraction(disease)}, spiro, draw_outcome_noise(rng)
    )


def clinical_row(subject_id: str, demo: dict, disease: dict, spiro: dict, outcome: dict) -> dict:
    """The table row (columns in their written order), GOLD staged on the rounded spirometry that is written."""
    fev1pp, ratio = round(spiro["fev1pp"], 2), round(spiro["fev1_fvc"], 4)
    gold, prism = gold_stage(fev1pp, ratio)  # rules hold on the rounded values written
    row = {"subject_id": subject_id, **demo, "age": round(demo["age"], 1), "pack_years": round(demo["pack_years"], 1)}
    row.update({"fev1pp": fev1pp, "fev1_fvc": ratio, "gold": int(gold), "prism": int(prism)})
    row["gold_label"] = gold_label(int(gold))
    row.update(outcome)
    row.update(disease)
    row["emphysema_fraction"] = emphysema_fraction(disease)
    return row


def draw_clinical_row(rng: np.random.Generator, subject_id: str, index: int, include_panlobular: bool = True) -> dict:
    """One subject's clinical record and the disease targets its image is made from (the density model)."""
    demo = draw_demographics(rng)
    disease = draw_disease(rng, demo, index, include_panlobular)
    spiro = draw_spirometry(rng, demo, disease)
    return clinical_row(subject_id, demo, disease, spiro, draw_outcomes(rng, demo, disease, spiro))


def is_healthy_control(row: dict) -> bool:
    """GOLD 0 and no emphysema by visual scores (nor in truth): where healthy patches are sampled."""
    no_emphysema = row["cle_score"] == 0 and row["paraseptal_score"] == 0 and row["emphysema_fraction"] == 0
    return row["gold"] == 0 and no_emphysema
