"""Paper Table 7 (§4.4): is the pre-trained encoder sensitive to the anatomical location it is routed by?

The linear readout is trained and tested twice on the same folds: once with every box routed by its own atlas
location, once with each box moved, as a whole, to a random atlas lung voxel (the box keeps its image and the
voxel-to-voxel layout of its locations; only where it sits in the atlas changes). If the representation is
anatomy-specific, detection drops with random locations; the paper reports 6 and 16 points less accuracy for
centrilobular and paraseptal emphysema, significant by a one-sided two-sample t-test over the folds.

The random point is a uniformly drawn atlas lung voxel (``source="lung"``, the paper's "random coordinate sampled
in the lung", the default) or the centre of a uniformly drawn atlas landmark (``source="landmarks"``: only
locations the encoder met in pre-training). ``RandomLocations`` is the config component
(``emphysema_finetune.yaml``: ``random_locations``) the detection cross-validation moves the boxes with.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import stats

from custom.data.atlas import atlas_mask_path, landmark_centres
from custom.emphysema.labelled_patches import CENTRE_IN_REGION, LabelledPatches

PATCH_LOCATION, RANDOM_LOCATION = "patch", "random"
LOCATIONS = (PATCH_LOCATION, RANDOM_LOCATION)
SOURCES = ("lung", "landmarks")


def random_lung_voxels(count: int, seed: int = 0, atlas_dir=None) -> np.ndarray:
    """(count, 3) atlas voxels drawn uniformly from the atlas lung mask."""
    mask_path = atlas_mask_path(atlas_dir)
    lung = np.argwhere(np.asarray(nib.load(str(mask_path)).dataobj) > 0)
    if not len(lung):
        raise ValueError(f"{mask_path}: the atlas lung mask is empty")
    return lung[np.random.default_rng(seed).integers(len(lung), size=count)].astype(np.float64)


def random_landmark_voxels(count: int, seed: int = 0, atlas_dir=None) -> np.ndarray:
    """(count, 3) atlas voxels: centres of uniformly drawn atlas landmarks."""
    centres = landmark_centres(atlas_dir).astype(np.float64)
    return centres[np.random.default_rng(seed).integers(len(centres), size=count)]


def with_random_locations(patches: LabelledPatches, seed: int = 0, atlas_dir=None,
                          source: str = "lung") -> LabelledPatches:
    """A copy of ``patches`` whose box centres map to random atlas points of ``source`` (same draw for the same
    seed)."""
    if source not in SOURCES:
        raise ValueError(f"random location source must be one of {SOURCES}, got {source!r}")
    draw = random_lung_voxels if source == "lung" else random_landmark_voxels
    targets = draw(len(patches), seed, atlas_dir)
    matrices = np.array(patches.region_to_atlas, dtype=np.float64, copy=True)
    centre = np.array([CENTRE_IN_REGION] * 3 + [1], dtype=np.float64)
    for matrix, target in zip(matrices, targets):
        matrix[:3, 3] += target - (matrix @ centre)[:3]
    return LabelledPatches(patches.regions, patches.lungs, matrices, patches.labels, patches.table)


class RandomLocations:
    """Moves every box to a random atlas point of ``source`` (``lung`` or ``landmarks``), seeded by ``seed``."""

    def __init__(self, seed: int = 0, atlas_dir=None, source: str = "lung"):
        if source not in SOURCES:
            raise ValueError(f"random location source must be one of {SOURCES}, got {source!r}")
        self.seed, self.atlas_dir, self.source = int(seed), atlas_dir, source

    def apply(self, patches: LabelledPatches) -> LabelledPatches:
        return with_random_locations(patches, self.seed, self.atlas_dir, self.source)


def location_table(fold_metrics: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Table 7 layout: per subtype, ``metric`` mean ± s.d. over folds of the linear readout with random and with
    patch locations, and the one-sided two-sample t-test p-value (patch > random)."""
    rows = []
    runs = fold_metrics[(fold_metrics["scheme"] == "linear_readout") & (fold_metrics["init"] == "pretrained")
                        & (fold_metrics["fraction"] == 1.0)]
    for subtype, group in runs.groupby("subtype", sort=False):
        values = {where: group.loc[group["location"] == where, metric].dropna().to_numpy(dtype=float)
                  for where in LOCATIONS}
        row = {"subtype": subtype}
        for where, label in ((RANDOM_LOCATION, "random location"), (PATCH_LOCATION, "patch location")):
            v = values[where]
            mean = float(v.mean()) if len(v) else np.nan
            sd = float(v.std(ddof=1)) if len(v) > 1 else np.nan
            row[f"{label} mean"], row[f"{label} sd"], row[f"{label} folds"] = round(mean, 4), round(sd, 4), len(v)
            row[label] = "n/a" if not np.isfinite(mean) else (f"{mean:.2f} ± {sd:.2f}" if np.isfinite(sd)
                                                               else f"{mean:.2f}")
        if min(len(values[PATCH_LOCATION]), len(values[RANDOM_LOCATION])) > 1:
            test = stats.ttest_ind(values[PATCH_LOCATION], values[RANDOM_LOCATION], alternative="greater")
            row["p (one-sided t-test)"] = float(f"{test.pvalue:.3g}")
        else:
            row["p (one-sided t-test)"] = np.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    first = ["subtype", "random location", "patch location", "p (one-sided t-test)"]
    return frame[first + [c for c in frame.columns if c not in first]] if len(frame) else frame
