"""Paper Table 7 (§4.4): is the pre-trained encoder sensitive to the anatomical location it is routed by?

The linear readout is trained and tested twice on the same folds: once with every box routed by its own atlas
location, once with each box moved, as a whole, to a random atlas lung voxel (the box keeps its image and the
voxel-to-voxel layout of its locations; only where it sits in the atlas changes). If the representation is
anatomy-specific, detection drops with random locations; the paper reports 6 and 16 points less accuracy for
centrilobular and paraseptal emphysema, significant by a one-sided two-sample t-test over the folds. Both arms
use the same folds, so the test here is the paired one (``paired_location_test``: ``scipy.stats.ttest_rel``,
one-sided) on the per-fold numbers (``location_folds``). The detectors are the binary ones of each subtype
(``custom.emphysema.cross_validation``).

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


def with_random_locations(
    patches: LabelledPatches, seed: int = 0, atlas_dir=None, source: str = "lung"
) -> LabelledPatches:
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


def _table7_runs(fold_metrics: pd.DataFrame) -> pd.DataFrame:
    """The linear readout rows (pre-trained, all annotations; the subtype's binary detector when the frame says)."""
    runs = fold_metrics[
        (fold_metrics["scheme"] == "linear_readout")
        & (fold_metrics["init"] == "pretrained")
        & (fold_metrics["fraction"] == 1.0)
    ]
    return runs[runs["task"] == "binary"] if "task" in runs else runs


def location_folds(fold_metrics: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Table 7's per-fold numbers: one row per subtype x fold with ``metric`` of the linear readout routed by the
    boxes' own (``patch``) and by random locations (``random``) and ``difference`` = patch - random (NaN where
    either is missing)."""
    runs = _table7_runs(fold_metrics)
    rows = []
    for (subtype, fold), group in runs.groupby(["subtype", "fold"], sort=False):
        row = {"subtype": subtype, "fold": int(fold)}
        for where in LOCATIONS:
            values = group.loc[group["location"] == where, metric].dropna()
            row[where] = float(values.iloc[0]) if len(values) else np.nan
        row["difference"] = row[PATCH_LOCATION] - row[RANDOM_LOCATION]
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["subtype", "fold", PATCH_LOCATION, RANDOM_LOCATION, "difference"])
    order = {s: k for k, s in enumerate(dict.fromkeys(frame["subtype"]))}  # subtypes in their first-seen order
    return frame.sort_values(
        ["subtype", "fold"], key=lambda c: c.map(order) if c.name == "subtype" else c, kind="stable"
    ).reset_index(drop=True)


def paired_location_test(patch, random) -> dict:
    """One-sided paired t-test (``scipy.stats.ttest_rel``, alternative: patch > random) over the folds where both
    numbers exist. Paired because both arms are trained and tested on the same folds: the fold-to-fold spread
    (which test boxes a fold holds) is common to both and cancels in the differences. Not Wilcoxon's signed-rank
    test: with n folds its smallest one-sided p is 2^-n (0.03 for 5 folds), so it could never show the paper's
    p < 0.005. p is NaN with fewer than 2 pairs or when the differences have no spread (the t statistic is then
    0/0 or infinite)."""
    patch, random = np.asarray(patch, dtype=float), np.asarray(random, dtype=float)
    both = np.isfinite(patch) & np.isfinite(random)
    patch, random = patch[both], random[both]
    difference = patch - random
    out = {
        "n_pairs": int(both.sum()),
        "mean_difference": float(difference.mean()) if both.any() else np.nan,
        "t": np.nan,
        "p": np.nan,
    }
    if out["n_pairs"] < 2 or np.ptp(np.round(difference, 12)) == 0:
        return out
    test = stats.ttest_rel(patch, random, alternative="greater")
    out["t"], out["p"] = float(test.statistic), float(test.pvalue)
    return out


def location_table(fold_metrics: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Table 7 layout: per subtype, ``metric`` mean ± s.d. over folds of the linear readout with random and with
    patch locations, the mean paired difference and the one-sided paired t-test p-value (patch > random,
    ``paired_location_test``) over the same folds."""
    per_fold = location_folds(fold_metrics, metric)
    rows = []
    for subtype, group in per_fold.groupby("subtype", sort=False):
        row = {"subtype": subtype}
        for where, label in ((RANDOM_LOCATION, "random location"), (PATCH_LOCATION, "patch location")):
            v = group[where].dropna().to_numpy(dtype=float)
            mean = float(v.mean()) if len(v) else np.nan
            sd = float(v.std(ddof=1)) if len(v) > 1 else np.nan
            row[f"{label} mean"], row[f"{label} sd"], row[f"{label} folds"] = round(mean, 4), round(sd, 4), len(v)
            row[label] = (
                "n/a" if not np.isfinite(mean) else (f"{mean:.2f} ± {sd:.2f}" if np.isfinite(sd) else f"{mean:.2f}")
            )
        test = paired_location_test(group[PATCH_LOCATION], group[RANDOM_LOCATION])
        row["paired folds"], row["mean difference"] = test["n_pairs"], round(test["mean_difference"], 4)
        row["t (paired)"] = round(test["t"], 4)
        row["p (one-sided paired t-test)"] = float(f"{test['p']:.3g}") if np.isfinite(test["p"]) else np.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    first = ["subtype", "random location", "patch location", "paired folds", "p (one-sided paired t-test)"]
    return frame[first + [c for c in frame.columns if c not in first]] if len(frame) else frame
