"""Emphysema maps judged against the SYNTHETIC generator's ground truth, voxel by voxel, on the same grid.

A map (``emphysema_mask.nii.gz``, ``custom.emphysema.network.MAP_LABELS``: 0 outside the lung, 1 healthy lung,
2 centrilobular, 3 paraseptal) is compared with the generator's lesion map (``custom.synthetic.labels``: 1
centrilobular, 2 paraseptal, 3 panlobular, 4 airway wall, 5 air trapping) inside the generator's lung mask, so a
lung voxel the map's own lung segmentation missed counts as "not emphysema" there.

- Per subtype (centrilobular: map 2 vs lesion 1; paraseptal: map 3 vs lesion 2): precision, recall, F1 (= Dice).
  Every other lung voxel is a negative of that subtype, panlobular included: the map has no panlobular class, so a
  subtype called on panlobular tissue is a false positive of that subtype (the subtype is wrong).
- "Any emphysema" (map 2 or 3 vs lesion 1, 2 or 3): panlobular counts as emphysema here, so a subtype called on
  it is a true positive. Airway wall thickening and air trapping are not emphysema anywhere.
- Shares of the lung: mapped (2, 3, either) and true (1, 2, 3, any of them); for a subject without emphysema (no
  emphysema voxel in the truth) the mapped emphysema share is its false-positive share.
A ratio whose denominator is 0 (precision with nothing mapped, recall with nothing true, F1 with neither) is
undefined (NaN) and left out of the cohort mean; the pooled figures sum the voxel counts of all subjects first.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from custom.emphysema.network import BACKGROUND_LABEL, SUBTYPE_LABELS
from custom.synthetic.labels import CENTRILOBULAR, EMPHYSEMA_CODES, PANLOBULAR, PARASEPTAL

# subtype name -> (its map label, its lesion code in the generator's truth)
SUBTYPE_TRUTH = {
    "centrilobular": (SUBTYPE_LABELS["centrilobular"], CENTRILOBULAR),
    "paraseptal": (SUBTYPE_LABELS["paraseptal"], PARASEPTAL),
}
ANY = "emphysema"  # the "any emphysema" comparison: map 2|3 vs lesion 1|2|3
SCORED = (*SUBTYPE_TRUTH, ANY)
AFFINE_TOLERANCE_MM = 1e-3


def load_grid(path: str | Path) -> nib.Nifti1Image:
    """The NIfTI image at ``path``, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return nib.load(str(path))
    except Exception as error:  # noqa: BLE001 - any reader error becomes one line naming the file
        raise ValueError(f"{path}: not a readable NIfTI file ({type(error).__name__}: {error})") from error


def check_same_grid(images: dict) -> None:
    """``{path: nibabel image}`` must share shape and affine (to ``AFFINE_TOLERANCE_MM``): a voxel comparison of
    maps on different grids is meaningless, so it fails naming both files."""
    for path, image in images.items():
        if len(image.shape) != 3:
            raise ValueError(f"{path}: shape {tuple(image.shape)} is not a 3-D label map")
    (first_path, first), *others = images.items()
    for path, image in others:
        if tuple(image.shape) != tuple(first.shape):
            raise ValueError(
                f"{path}: shape {tuple(image.shape)} differs from {first_path}: {tuple(first.shape)} "
                "(maps and truth must be on the same 3-D grid)"
            )
        difference = float(np.abs(np.asarray(image.affine) - np.asarray(first.affine)).max())
        if difference > AFFINE_TOLERANCE_MM:
            raise ValueError(
                f"{path}: affine differs from {first_path}'s by up to {difference:.4g} mm "
                "(maps and truth must be on the same grid)"
            )


def load_subject(map_path, lesion_path, lung_path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(map labels, lesion codes, lung bool) of one subject from its three files, checked to share one grid."""
    images = {str(p): load_grid(p) for p in (map_path, lesion_path, lung_path)}
    check_same_grid(images)
    arrays = [np.asarray(image.dataobj) for image in images.values()]
    return arrays[0].astype(np.uint8), arrays[1].astype(np.uint8), arrays[2] > 0


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else math.nan


def scores_from_counts(counts: dict) -> dict:
    """Precision, recall, F1 per ``SCORED`` comparison and the shares of the lung, from voxel counts (one
    subject's, or a cohort's summed: the pooled figures)."""
    out = {}
    for name in SCORED:
        tp, fp, fn = (counts[f"{name}_{k}"] for k in ("tp", "fp", "fn"))
        out[f"{name}_precision"] = _ratio(tp, tp + fp)
        out[f"{name}_recall"] = _ratio(tp, tp + fn)
        out[f"{name}_f1"] = _ratio(2 * tp, 2 * tp + fp + fn)
    lung = counts["lung_voxels"]
    for name in SCORED:
        out[f"mapped_{name}_share"] = _ratio(counts[f"{name}_tp"] + counts[f"{name}_fp"], lung)
        out[f"true_{name}_share"] = _ratio(counts[f"{name}_tp"] + counts[f"{name}_fn"], lung)
    out["true_panlobular_share"] = _ratio(counts["panlobular_voxels"], lung)
    out["panlobular_called_emphysema"] = _ratio(counts["panlobular_called"], counts["panlobular_voxels"])
    out["lung_dice"] = _ratio(2 * counts["lung_overlap"], counts["lung_voxels"] + counts["map_lung_voxels"])
    return out


def subject_counts(map_labels: np.ndarray, lesions: np.ndarray, lung: np.ndarray) -> dict:
    """Voxel counts of one subject inside the truth's ``lung``: tp/fp/fn per ``SCORED`` comparison, lung voxels
    (truth and map), their overlap, and panlobular voxels (all, and those the map calls either subtype)."""
    if not (map_labels.shape == lesions.shape == lung.shape):
        raise ValueError(f"shapes differ: map {map_labels.shape}, lesions {lesions.shape}, lung {lung.shape}")
    lung = np.asarray(lung, dtype=bool)
    mapped, truth = map_labels[lung], lesions[lung]
    counts = {"lung_voxels": int(lung.sum()), "map_lung_voxels": int((map_labels != BACKGROUND_LABEL).sum())}
    counts["lung_overlap"] = int((mapped != BACKGROUND_LABEL).sum())
    pairs = {name: (mapped == label, truth == code) for name, (label, code) in SUBTYPE_TRUTH.items()}
    mapped_any = np.isin(mapped, list(SUBTYPE_LABELS.values()))
    pairs[ANY] = (mapped_any, np.isin(truth, EMPHYSEMA_CODES))
    for name, (called, true) in pairs.items():
        counts[f"{name}_tp"] = int((called & true).sum())
        counts[f"{name}_fp"] = int((called & ~true).sum())
        counts[f"{name}_fn"] = int((~called & true).sum())
    panlobular = truth == PANLOBULAR
    counts["panlobular_voxels"] = int(panlobular.sum())
    counts["panlobular_called"] = int((panlobular & mapped_any).sum())
    return counts


def compare_map(map_labels: np.ndarray, lesions: np.ndarray, lung: np.ndarray) -> dict:
    """One subject's row: voxel counts, scores, shares, ``has_emphysema`` (any emphysema voxel in the truth) and
    ``false_positive_share`` (the mapped emphysema share of a subject without emphysema; NaN for the others)."""
    counts = subject_counts(map_labels, lesions, lung)
    row = {**counts, **scores_from_counts(counts)}
    row["has_emphysema"] = bool(counts[f"{ANY}_tp"] + counts[f"{ANY}_fn"])
    row["false_positive_share"] = math.nan if row["has_emphysema"] else row[f"mapped_{ANY}_share"]
    return row


def compare_files(map_path, lesion_path, lung_path) -> dict:
    """``compare_map`` of one subject's files (map on the input grid, the generator's lesions and lung)."""
    return compare_map(*load_subject(map_path, lesion_path, lung_path))


COUNT_COLUMNS = (
    "lung_voxels",
    "map_lung_voxels",
    "lung_overlap",
    *(f"{name}_{k}" for name in SCORED for k in ("tp", "fp", "fn")),
    "panlobular_voxels",
    "panlobular_called",
)


def cohort_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per metric: subjects with a defined value, their mean and s.d. (n - 1), and the pooled value from the summed
    voxel counts. ``false_positive_share`` pools over the subjects without emphysema only."""
    if rows.empty:
        raise ValueError("no subject rows to summarise")
    pooled = scores_from_counts({c: int(rows[c].sum()) for c in COUNT_COLUMNS})
    healthy = rows[~rows["has_emphysema"].astype(bool)]
    if len(healthy):
        counts = {c: int(healthy[c].sum()) for c in COUNT_COLUMNS}
        pooled["false_positive_share"] = scores_from_counts(counts)[f"mapped_{ANY}_share"]
    else:
        pooled["false_positive_share"] = math.nan
    out = []
    for metric, pooled_value in pooled.items():
        values = pd.to_numeric(rows[metric], errors="coerce").dropna()
        out.append(
            {
                "metric": metric,
                "n": int(len(values)),
                "mean": float(values.mean()) if len(values) else math.nan,
                "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                "pooled": pooled_value,
            }
        )
    return pd.DataFrame(out)
