"""COVID-like SYNTHETIC cohort: ground-glass opacities and consolidation, graded CT-0..CT-4 by the share of
lung involved, as in MosMedData (0 %, < 25 %, 25-50 %, 50-75 %, > 75 %).

Lesions are multifocal, peripheral, posterior and lower-zone predominant (the typical COVID-19 pattern).
A smooth random field plus that prior is thresholded at the quantile that involves exactly the target share,
so the grade computed from the ground-truth mask equals the grade in the table.
"""

from __future__ import annotations

import numpy as np

from custom.synthetic import labels
from custom.synthetic.texture import smooth_field

GRADE_NAMES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
GRADE_INVOLVEMENT = {0: (0.0, 0.0), 1: (0.03, 0.22), 2: (0.28, 0.47), 3: (0.53, 0.72), 4: (0.78, 0.90)}
GROUND_GLASS_HU = (-600.0, -300.0)
CONSOLIDATION_HU = (-100.0, 40.0)


def grade_from_involvement(share: float) -> int:
    """MosMed CT grade from the share of lung involved."""
    if share <= 0:
        return 0
    return int(np.searchsorted([0.25, 0.50, 0.75], share, side="right") + 1)


def draw_covid_row(rng: np.random.Generator, subject_id: str, index: int, grade_probs=None) -> dict:
    """Demographics, grade and target involvement; grades cycle with the index unless ``grade_probs``."""
    if grade_probs is None:
        grade = index % len(GRADE_NAMES)
    else:
        grade = int(rng.choice(len(GRADE_NAMES), p=np.asarray(grade_probs) / np.sum(grade_probs)))
    involvement = float(rng.uniform(*GRADE_INVOLVEMENT[grade]))
    consolidation_share = float(rng.uniform(0.05, 0.15) + 0.06 * grade) if grade > 0 else 0.0
    return {
        "subject_id": subject_id,
        "age": round(float(rng.uniform(20.0, 85.0)), 1),
        "sex": "F" if rng.random() < 0.55 else "M",
        "grade": grade,
        "grade_label": GRADE_NAMES[grade],
        "involvement_fraction": involvement,
        "consolidation_share_of_lesion": consolidation_share,
    }


def covid_prior(height: np.ndarray, depth_mm: np.ndarray, posterior: np.ndarray) -> np.ndarray:
    """Peripheral, posterior and lower-zone weight."""
    peripheral = 1.0 - np.clip(depth_mm / 40.0, 0.0, 1.0)
    return (0.5 * peripheral + 0.3 * posterior + 0.2 * (1.0 - height)).astype(np.float32)


def place_covid_lesions(
    rng: np.random.Generator, lesion: np.ndarray, lung: np.ndarray, height, depth_mm, posterior, row: dict, spacing
) -> dict:
    """Label ground glass (6) and, in the lesions' cores, consolidation (7); returns voxel counts."""
    n_lung = int(lung.sum())
    target = int(round(row["involvement_fraction"] * n_lung))
    if target <= 0:
        return {"ground_glass": 0, "consolidation": 0}
    score = smooth_field(rng, lung.shape, 9.0, spacing) + 2.5 * covid_prior(height, depth_mm, posterior)
    values = np.sort(score[lung])[::-1]
    target = min(target, values.size)
    involved = lung & (score >= values[target - 1])
    n_consolidation = int(round(row["consolidation_share_of_lesion"] * target))
    core = involved & (score >= values[max(n_consolidation - 1, 0)]) if n_consolidation > 0 else np.zeros_like(lung)
    lesion[involved] = labels.GROUND_GLASS
    lesion[core] = labels.CONSOLIDATION
    return {"ground_glass": int((involved & ~core).sum()), "consolidation": int(core.sum())}


def covid_lesion_hu(rng: np.random.Generator, lesion: np.ndarray, spacing) -> np.ndarray:
    """Target HU inside lesions (NaN elsewhere): hazy ground glass, near-soft-tissue consolidation."""
    target = np.full(lesion.shape, np.nan, dtype=np.float32)
    gg = lesion == labels.GROUND_GLASS
    co = lesion == labels.CONSOLIDATION
    if gg.any() or co.any():
        field = smooth_field(rng, lesion.shape, 4.0, spacing)
        lo, hi = GROUND_GLASS_HU
        target[gg] = np.clip((lo + hi) / 2 + (hi - lo) / 4 * field[gg], lo, hi)
        lo, hi = CONSOLIDATION_HU
        target[co] = np.clip((lo + hi) / 2 + (hi - lo) / 4 * field[co], lo, hi)
    return target
