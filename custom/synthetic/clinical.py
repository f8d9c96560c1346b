"""Generative clinical model of the SYNTHETIC COPD cohort (stated with its coefficients in
bundle/docs/synthetic_cohort.md). Demographics and smoking drive a latent disease severity; the severity sets
the lung shares of each lesion type the image generator then paints; spirometry, visual scores, exacerbations
and survival follow from those shares plus non-imaging confounders (age, sex, restriction, reader noise).

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


def draw_spirometry(rng: np.random.Generator, demo: dict, disease: dict) -> dict:
    """FEV1pp and FEV1/FVC: emphysema and small-airway disease lower both; restriction lowers FEV1pp only."""
    age = demo["age"] - 62.0
    cle, pse, ple = disease["cle_fraction"], disease["paraseptal_fraction"], disease["panlobular_fraction"]
    airway, trap = disease["airway_disease"], disease["air_trapping_fraction"]
    fev1pp = (
        102.0
        - 0.15 * age
        - 190.0 * cle
        - 110.0 * ple
        - 60.0 * pse
        - 22.0 * airway
        - 140.0 * trap
        - disease["restriction_fev1pp"]
        + 9.0 * rng.standard_normal()
    )
    ratio = (
        0.79
        - 0.0025 * age
        - 1.0 * cle
        - 0.8 * ple
        - 0.4 * pse
        - 0.08 * airway
        - 0.5 * trap
        + 0.035 * rng.standard_normal()
    )
    return {"fev1pp": float(np.clip(fev1pp, 12.0, 140.0)), "fev1_fvc": float(np.clip(ratio, 0.25, 0.92))}


def draw_outcomes(rng: np.random.Generator, demo: dict, disease: dict, spiro: dict) -> dict:
    """Visual scores (with reader noise), exacerbation history and censored Weibull survival."""
    reader = float(np.exp(0.2 * rng.standard_normal()))  # one reader's bias, shared by both scores
    cle_score = cle_visual_score(disease["cle_fraction"] * reader)
    pse_score = paraseptal_visual_score(disease["paraseptal_fraction"] * reader)
    current = demo["smoking_status"] == "current"
    logit = -1.3 - 0.045 * (spiro["fev1pp"] - 70.0) + 0.4 * current + 1.0 * disease["airway_disease"]
    exacerbation = int(rng.random() < expit(logit))
    emphysema = disease["cle_fraction"] + disease["paraseptal_fraction"] + disease["panlobular_fraction"]
    eta = (
        HAZARD_COEFS["age_per_year"] * (demo["age"] - 62.0)
        + HAZARD_COEFS["male"] * (demo["sex"] == "M")
        + HAZARD_COEFS["fev1pp_deficit_per_point"] * (80.0 - spiro["fev1pp"])
        + HAZARD_COEFS["emphysema_fraction"] * emphysema
        + HAZARD_COEFS["exacerbation_history"] * exacerbation
        + HAZARD_COEFS["current_smoker"] * current
    )
    event_time = (-np.log(rng.uniform(1e-12, 1.0)) / (WEIBULL_SCALE * np.exp(eta))) ** (1.0 / WEIBULL_SHAPE)
    censor_time = min(rng.uniform(*FOLLOW_UP_YEARS), rng.exponential(DROPOUT_MEAN_YEARS))
    return {
        "cle_score": cle_score,
        "paraseptal_score": pse_score,
        "exacerbation_history": exacerbation,
        "survival_years": round(float(min(event_time, censor_time)), 3),
        "death_event": int(event_time <= censor_time),
        "hazard_log_ratio": float(eta),
    }


def draw_clinical_row(rng: np.random.Generator, subject_id: str, index: int, include_panlobular: bool = True) -> dict:
    """One subject's clinical record and the disease targets its image is made from."""
    demo = draw_demographics(rng)
    disease = draw_disease(rng, demo, index, include_panlobular)
    spiro = draw_spirometry(rng, demo, disease)
    gold, prism = gold_stage(spiro["fev1pp"], spiro["fev1_fvc"])
    outcomes = draw_outcomes(rng, demo, disease, spiro)
    row = {"subject_id": subject_id, **demo, **spiro, "gold": int(gold), "prism": int(prism)}
    row["gold_label"] = gold_label(int(gold))
    row.update(outcomes)
    row.update(disease)
    row["emphysema_fraction"] = sum(disease[k] for k in ("cle_fraction", "paraseptal_fraction", "panlobular_fraction"))
    row["age"] = round(row["age"], 1)
    row["pack_years"] = round(row["pack_years"], 1)
    row["fev1pp"] = round(row["fev1pp"], 2)
    row["fev1_fvc"] = round(row["fev1_fvc"], 4)
    gold, prism = gold_stage(row["fev1pp"], row["fev1_fvc"])  # rules hold on the rounded values written
    row["gold"], row["prism"], row["gold_label"] = int(gold), int(prism), gold_label(int(gold))
    return row


def is_healthy_control(row: dict) -> bool:
    """GOLD 0 and no emphysema by visual scores (nor in truth): where healthy patches are sampled."""
    no_emphysema = row["cle_score"] == 0 and row["paraseptal_score"] == 0 and row["emphysema_fraction"] == 0
    return row["gold"] == 0 and no_emphysema
