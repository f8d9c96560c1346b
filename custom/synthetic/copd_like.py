"""The SYNTHETIC COPD-like cohort (ids SYN####): emphysema subtypes with their spatial priors, air trapping and
airway-wall thickening from the stated clinical model (``custom.synthetic.clinical``), and COPDGene-style 32 mm
box annotations of emphysema and of healthy lung.

Two disease models (``disease_model``): "density" (``custom.synthetic.clinical``, the demo's) and "regional"
(``custom.synthetic.regional_disease``, the evidence study's: zoned centrilobular emphysema, a subject's own
emphysema attenuation, phenotypes from regional disease).

``CopdLikeGenerator`` is the config component (``generate.yaml``: ``copd``); ``custom.synthetic.writer.CohortWriter``
writes what it generates (``cohort.csv``, ``clinical.csv``, ``annotations.csv``, ``datalist.json``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from custom.flags import as_bool
from custom.synthetic import labels
from custom.synthetic.anatomy import AtlasReference, lung_height, sample_atlas
from custom.synthetic.annotations import (
    ANNOTATION_COLUMNS,
    BOX_MM,
    HEALTHY_PLACEMENTS,
    lesion_boxes,
    matched_healthy_boxes,
    random_healthy_boxes,
)
from custom.synthetic.clinical import draw_clinical_row, is_healthy_control
from custom.synthetic.confounders import AIR_TRAPPING_SHIFT_HU, place_air_trapping
from custom.synthetic.emphysema import (
    CLE_RADIUS_MM,
    LOWER_ZONE_HEIGHT,
    PSE_RADIUS_MM,
    centrilobular_prior,
    emphysema_hu,
    paraseptal_prior,
    place_emphysema,
)
from custom.synthetic.geometry import (
    DEFAULT_FOV_MM,
    SubjectGrid,
    subject_to_atlas_voxel,
    subject_voxels_to_atlas_voxels,
)
from custom.synthetic.regional_disease import draw_regional_row
from custom.synthetic.subject import (
    LungRegion,
    SubjectPlan,
    SyntheticCohortGenerator,
    blend,
    lung_crop,
    protocol_columns,
)

# disease_model -> the clinical row it draws (custom.synthetic.clinical, custom.synthetic.regional_disease)
DISEASE_MODELS = {"density": draw_clinical_row, "regional": draw_regional_row}
# healthy lung dominates a map; paraseptal 6 like centrilobular (few subjects have it, each gives up to 6)
DEFAULT_MAX_BOXES = {"centrilobular": 6, "paraseptal": 6, "healthy": 12, "healthy_other": 4}
# which subjects give healthy boxes: the paper's protocol (GOLD 0 controls without emphysema), or every subject
# (controls as above, any other subject up to max_boxes["healthy_other"] boxes free of emphysema)
HEALTHY_SUBJECTS = ("controls", "all")
# Healthy boxes matched to each subtype's prior: (prior of (height, depth_mm), minimum lung share of the box,
# power of the box-mean prior, blur of the centre prior in mm). Minima: about the lowest lung share the subtype's
# own boxes have (centrilobular boxes are all lung, paraseptal ones sit at the pleura); powers: how sharply the
# densest-box rule concentrates them; blur: the rms offset of a lesion voxel from its seed (0.45 mean radius).
HEALTHY_MATCH = {
    "centrilobular": (centrilobular_prior, 0.9, 4.0, 0.45 * float(np.mean(CLE_RADIUS_MM))),
    "paraseptal": (paraseptal_prior, 0.45, 1.0, 0.45 * float(np.mean(PSE_RADIUS_MM))),
}


class CopdLikeGenerator(SyntheticCohortGenerator):
    """COPD-like subjects; ``include_panlobular`` lets the clinical model draw panlobular emphysema;
    ``annotation_fraction`` is the share of emphysema subjects that get box annotations (healthy controls always
    get healthy boxes); ``max_boxes`` caps the boxes per subject and label; ``healthy_placement`` is where healthy
    boxes go: "matched" (default) at the subtypes' places, "random" anywhere mostly in lung (the earlier behaviour,
    a location shortcut; see ``custom.synthetic.annotations``); ``healthy_subjects`` who gives them: "all"
    (default: the controls, and every other subject up to ``max_boxes["healthy_other"]`` emphysema-free boxes, so
    healthy and emphysema boxes share subjects) or "controls" (the paper's protocol: GOLD-0 subjects without
    emphysema only; here a subject-level shortcut, bundle/docs/emphysema.md "Maps against the truth");
    ``disease_model`` one of ``DISEASE_MODELS`` ("density", the default and the demo's; "regional", the evidence
    study's, bundle/docs/synthetic_cohort.md)."""

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
        healthy_placement: str = "matched",
        healthy_subjects: str = "all",
        disease_model: str = "density",
    ):
        if disease_model not in DISEASE_MODELS:
            raise ValueError(f"disease_model must be one of {tuple(DISEASE_MODELS)}, got {disease_model!r}")
        self.disease_model = disease_model
        super().__init__(num_subjects, seed, voxel_size, deformation_mm, dicom_every, fov_mm)
        if healthy_subjects not in HEALTHY_SUBJECTS:
            raise ValueError(f"healthy_subjects must be one of {HEALTHY_SUBJECTS}, got {healthy_subjects!r}")
        self.healthy_subjects = healthy_subjects
        self.include_panlobular = as_bool(include_panlobular)
        self.annotation_fraction = float(annotation_fraction)
        self.max_boxes = {**DEFAULT_MAX_BOXES, **(max_boxes or {})}
        if healthy_placement not in HEALTHY_PLACEMENTS:
            raise ValueError(f"healthy_placement must be one of {HEALTHY_PLACEMENTS}, got {healthy_placement!r}")
        self.healthy_placement = healthy_placement

    def draw_row(self, rng: np.random.Generator, subject_id: str, index: int) -> dict:
        return DISEASE_MODELS[self.disease_model](rng, subject_id, index, self.include_panlobular)

    def paint_lesions(
        self, rng: np.random.Generator, region: LungRegion, row: dict, lung_hu: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Centrilobular (per zone under the regional model), paraseptal and panlobular emphysema, then air
        trapping; thickened airway walls."""
        regional = self.disease_model == "regional"
        fractions = {"paraseptal": row["paraseptal_fraction"], "panlobular": row["panlobular_fraction"]}
        if regional:
            fractions.update(
                centrilobular_upper=row["cle_upper_fraction"], centrilobular_lower=row["cle_lower_fraction"]
            )
        else:
            fractions["centrilobular"] = row["cle_fraction"]
        lesion, spacing = region.lesion, region.spacing
        place_emphysema(rng, lesion, region.lung, region.height, region.depth, fractions, spacing)
        place_air_trapping(
            rng, lesion, region.lung, region.height, region.posterior, row["air_trapping_fraction"], spacing
        )
        lung_hu[lesion == labels.AIR_TRAPPING] += AIR_TRAPPING_SHIFT_HU
        emphysema = np.isin(lesion, labels.EMPHYSEMA_CODES)
        painted = emphysema_hu(lesion, region.fine, row["lesion_hu_mean"] if regional else None)
        lung_hu = blend(lung_hu, painted, emphysema, spacing)
        return lung_hu, emphysema, row["airway_disease"]

    def finish(self, plan: SubjectPlan, volumes: dict, grid: SubjectGrid, reference: AtlasReference) -> list[dict]:
        """The subject's 32 mm boxes: its densest centrilobular / paraseptal regions when it is annotated (a share
        ``annotation_fraction`` of subjects, drawn from its annotation stream), healthy boxes of controls. Under the
        regional model it first adds ``measured_cle_lower_share`` to the row."""
        if self.disease_model == "regional":
            plan.row["measured_cle_lower_share"] = measured_cle_lower_share(volumes, grid, reference)
        rng = plan.streams["annotation"]
        annotate = rng.random() < self.annotation_fraction
        return annotation_rows(
            plan.row,
            volumes,
            grid,
            reference,
            rng,
            annotate,
            self.max_boxes,
            self.healthy_placement,
            self.healthy_subjects,
        )

    def clinical_table(self) -> pd.DataFrame:
        """The clinical table without images (the rows ``clinical.csv`` has, minus the image-measured columns)."""
        rows = []
        for index in range(self.num_subjects):
            plan = self.plan(index)
            rows.append({**plan.row, **protocol_columns(plan.protocol)})
        return pd.DataFrame(rows)


def atlas_height_depth(
    volumes: dict, grid: SubjectGrid, reference: AtlasReference, crop: tuple
) -> tuple[np.ndarray, np.ndarray]:
    """``height`` (0 base .. 1 apex) and pleural ``depth_mm`` of the voxels in ``crop``, the inputs of the
    emphysema priors, recomputed from the subject's transform record exactly as synthesis computed them (no
    random draw, so the images stay as they are)."""
    transform = volumes["transform"]
    atlas_vox = subject_to_atlas_voxel(
        grid, np.asarray(transform["atlas_to_subject"]), reference.affine_1mm, transform["deformation"]
    )[(slice(None), *crop)]
    _, depth = sample_atlas(reference, atlas_vox)
    return lung_height(reference, atlas_vox[2]), depth


def measured_cle_lower_share(volumes: dict, grid: SubjectGrid, reference: AtlasReference) -> float:
    """Share of the centrilobular voxels of the written lesion map below atlas height ``LOWER_ZONE_HEIGHT`` (NaN
    without any): blobs seeded in one zone may reach into the other, so it differs a little from the drawn
    ``cle_lower_share``."""
    lung = volumes["lung"] > 0
    crop = lung_crop(lung, margin=0)
    cle = volumes["lesion"][crop] == labels.CENTRILOBULAR
    if not cle.any():
        return float("nan")
    height, _ = atlas_height_depth(volumes, grid, reference, crop)
    return round(float(np.mean(height[cle] < LOWER_ZONE_HEIGHT)), 5)


def healthy_box_centres(
    rng, volumes: dict, grid: SubjectGrid, reference: AtlasReference, crop: tuple, max_boxes: int, placement: str
) -> list[tuple[np.ndarray, float, str]]:
    """(centre in ``crop``, lung share, subtype matched or "random") of a healthy control's boxes; "matched"
    splits ``max_boxes`` between the subtypes of ``HEALTHY_MATCH`` (the first gets the odd one) and draws each
    share from that subtype's prior. The matched subtype is not written to the table (its columns stay as they
    are); tests read it here."""
    lung, lesion = volumes["lung"][crop] > 0, volumes["lesion"][crop]
    if placement == "random":
        return [(c, share, "random") for c, share in random_healthy_boxes(rng, lesion, lung, grid.spacing, max_boxes)]
    height, depth = atlas_height_depth(volumes, grid, reference, crop)
    counts = np.full(len(HEALTHY_MATCH), max_boxes // len(HEALTHY_MATCH))
    counts[: max_boxes % len(HEALTHY_MATCH)] += 1
    quotas = {
        name: (prior(height, depth), count, min_lung_share, power, blur_mm)
        for (name, (prior, min_lung_share, power, blur_mm)), count in zip(HEALTHY_MATCH.items(), counts)
    }
    return matched_healthy_boxes(rng, lesion, lung, grid.spacing, quotas)


def annotation_rows(
    row: dict,
    volumes: dict,
    grid: SubjectGrid,
    reference: AtlasReference,
    rng,
    annotate: bool,
    max_boxes: dict,
    healthy_placement: str = "matched",
    healthy_subjects: str = "all",
) -> list[dict]:
    """Box rows (``ANNOTATION_COLUMNS``): centre voxel, centre in mm, size, centre in the atlas, lesion share
    (lung share for healthy boxes)."""
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
    control = is_healthy_control(row)
    if control or healthy_subjects == "all":
        count = max_boxes["healthy"] if control else max_boxes["healthy_other"]
        picked = healthy_box_centres(rng, volumes, grid, reference, crop, count, healthy_placement)
        for centre, share, _ in picked:
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


def draw_clinical_table(
    num_subjects: int, seed: int = 0, include_panlobular: bool = True, disease_model: str = "density"
) -> pd.DataFrame:
    """The COPD clinical table without images (identical to the one the cohort writes, minus the image-measured
    columns): cheap enough for hundreds of draws in tests and power calculations."""
    return CopdLikeGenerator(
        num_subjects, seed, include_panlobular=include_panlobular, disease_model=disease_model
    ).clinical_table()
