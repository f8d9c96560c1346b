"""The readable numbers of an emphysema map: per subject a JSON report, per cohort one CSV row per subject.

For the whole lung, each lung (right / left) and each zone (upper / middle / lower third of that lung's
cranio-caudal extent): lung volume, emphysema % of lung per subtype (voxels whose map label, ``MAP_LABELS``, is
that subtype), and
beside them the two classical densitometry numbers, LAA-950 (% of lung voxels below -950 HU) and Perc15 (the
15th percentile of lung HU). Everything is counted on the prepared 1 mm grid the classifier ran on.

Right and left are split at the atlas midline (the sagittal plane where the atlas lung is thinnest between the
two lungs): every lung voxel has an atlas location, so touching lungs are still separated.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from custom.atomic_io import atomic_path
from custom.emphysema.network import EMPHYSEMA_CLASSES, MAP_LABELS, SUBTYPE_LABELS

LAA_THRESHOLD_HU = -950.0
PERCENTILE = 15.0
ZONES = ("upper", "middle", "lower")
LUNGS = ("right", "left")


@lru_cache(maxsize=2)
def atlas_midline(atlas_dir: str | None = None) -> tuple:
    """(atlas x index of the midline, True when larger x is the patient's left) of the atlas lung mask."""
    from custom.prepare.transforms import load_atlas

    atlas = load_atlas(atlas_dir)
    profile = atlas.mask.sum(axis=(1, 2))
    xs = np.nonzero(profile)[0]
    lo, hi = xs[0] + (xs[-1] - xs[0]) * 3 // 10, xs[0] + (xs[-1] - xs[0]) * 7 // 10
    return float(lo + np.argmin(profile[lo:hi])), atlas.axcodes[0] == "L"


def region_masks(
    lung: np.ndarray, atlas_x: np.ndarray, superior_is_high_z: bool = True, atlas_dir: str | None = None
) -> dict:
    """Boolean masks (X, Y, Z) of every reported region: ``lung``, ``right``, ``left`` and ``<lung>_<zone>``.

    ``atlas_x``: atlas x coordinate of every voxel (same shape). Zones are thirds of each lung's z extent.
    """
    lung = np.asarray(lung, dtype=bool)
    midline, high_x_is_left = atlas_midline(atlas_dir)
    left = lung & ((atlas_x > midline) if high_x_is_left else (atlas_x <= midline))
    regions = {"lung": lung, "right": lung & ~left, "left": left}
    z = np.arange(lung.shape[2])
    for side in LUNGS:
        mask = regions[side]
        zs = np.nonzero(mask.any(axis=(0, 1)))[0]
        thirds = {}
        if len(zs):
            # thirds of [z0, z1 + 1): boundaries at one and two thirds of the extent
            z0, z1 = zs[0], zs[-1] + 1
            b1, b2 = z0 + (z1 - z0) / 3.0, z0 + 2.0 * (z1 - z0) / 3.0
            low, mid, high = z < b1, (z >= b1) & (z < b2), z >= b2
            upper, lower = (high, low) if superior_is_high_z else (low, high)
            thirds = {"upper": upper, "middle": mid, "lower": lower}
        for zone in ZONES:
            in_zone = thirds.get(zone, np.zeros_like(z, dtype=bool))
            regions[f"{side}_{zone}"] = mask & in_zone[None, None, :]
    return regions


def region_numbers(hu: np.ndarray, labels: np.ndarray, mask: np.ndarray, voxel_ml: float) -> dict:
    """The numbers of one region: volume, emphysema % per subtype and in total, LAA-950 %, Perc15. ``labels`` are
    map labels (``MAP_LABELS``)."""
    count = int(mask.sum())
    out = {"volume_ml": round(count * voxel_ml, 3)}
    region_labels = labels[mask]
    for name, code in SUBTYPE_LABELS.items():
        out[f"{name}_pct"] = round(100.0 * float((region_labels == code).sum()) / count, 4) if count else None
    emphysema = np.isin(region_labels, list(SUBTYPE_LABELS.values()))
    out["emphysema_pct"] = round(100.0 * float(emphysema.sum()) / count, 4) if count else None
    region_hu = hu[mask]
    out["laa950_pct"] = round(100.0 * float((region_hu < LAA_THRESHOLD_HU).sum()) / count, 4) if count else None
    out["perc15_hu"] = round(float(np.percentile(region_hu, PERCENTILE)), 2) if count else None
    return out


def emphysema_report(
    hu: np.ndarray,
    lung: np.ndarray,
    labels: np.ndarray,
    atlas_x: np.ndarray,
    voxel_ml: float = 0.001,
    superior_is_high_z: bool = True,
    **info,
) -> dict:
    """The report of one scan (a JSON-ready dict); ``info`` (subject id, source, settings) is stored as given."""
    regions = region_masks(lung, atlas_x, superior_is_high_z)
    report = dict(info)
    report["classes"] = list(EMPHYSEMA_CLASSES)
    report["map_labels"] = {str(code): name for code, name in enumerate(MAP_LABELS)}
    report["regions"] = {name: region_numbers(hu, labels, mask, voxel_ml) for name, mask in regions.items()}
    return report


def write_report_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return path


def report_row(report: dict) -> dict:
    """One flat CSV row: the info fields, then ``<region>_<number>`` for every region."""
    row = {
        k: v
        for k, v in report.items()
        if k not in ("regions", "classes", "map_labels") and not isinstance(v, (dict, list))
    }
    for region, numbers in report["regions"].items():
        for key, value in numbers.items():
            row[f"{region}_{key}"] = value
    return row


def write_cohort_csv(reports: list, path: str | Path, earlier: pd.DataFrame | None = None) -> Path:
    """The cohort table, one row per subject report, after the rows of ``earlier`` (kept from earlier runs)."""
    path = Path(path)
    table = pd.DataFrame([report_row(r) for r in reports])
    if earlier is not None and len(earlier):
        table = pd.concat([earlier, table], ignore_index=True)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path
