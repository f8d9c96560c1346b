"""The density baseline of Table 5 (paper §4.3.1): a logistic regression on patch-level LAA.

The paper compares its linear readout with "a logistic regression model using patch-level LAA features". Here
a box's features are read from its 32^3 box voxels (``BOX_SLICE`` of the stored 64^3 HU region):

- ``laa950``: LAA-950, the share of the box's lung voxels below -950 HU (strictly below ``threshold_hu``), the
  clinical low-attenuation-area descriptor restricted to the box (the default, and the only feature by default);
- ``perc15``: Perc15, the 15th percentile of the HU of the box's lung voxels (numpy's linear interpolation), the
  other standard CT density measure of emphysema (an option: ``features: [laa950, perc15]``).

"Lung voxels" are those of the stored lung mask inside the box (``within_lung: true``, the default; a box without
any lung voxel falls back to all its voxels); ``within_lung: false`` counts every box voxel (outside-body air and
the -1024 HU fill outside the scan then count as low attenuation). The classifier is sklearn's
``StandardScaler`` + ``LogisticRegression`` (L2, ``C``; ``class_weight="balanced"`` with ``balance_classes``,
as the networks' cross-entropy weights), one per subtype and fold, trained on the same training boxes as the
networks; a box is called positive when its predicted probability of the subtype exceeds 0.5 (the regression's
own decision, ``predict``). It is box-level: no voxel-wise map, so the 25 % rule does not apply to it.
``PatchLAARunner`` is the config component (``emphysema_finetune.yaml``: ``patch_laa``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from custom.emphysema.labelled_patches import BOX_SLICE, LabelledPatches
from custom.emphysema.network import EMPHYSEMA_CLASSES

LAA_THRESHOLD_HU = -950.0
PERCENTILE = 15.0
FEATURES = ("laa950", "perc15")


def box_hu(patches: LabelledPatches, index: int, within_lung: bool = True) -> np.ndarray:
    """HU values (1-d) of box ``index``'s 32^3 box voxels: its lung voxels when ``within_lung`` (all of them when
    the box has none), else every box voxel."""
    box = (BOX_SLICE,) * 3
    hu = np.asarray(patches.regions[index][box], dtype=np.float64)
    if within_lung:
        lung = np.asarray(patches.lungs[index][box], dtype=bool)
        if lung.any():
            return hu[lung]
    return hu.ravel()


def density_features(
    hu: np.ndarray, features: Sequence[str] = ("laa950",), threshold_hu: float = LAA_THRESHOLD_HU
) -> list:
    """The ``features`` of one set of HU values: ``laa950`` = share below ``threshold_hu``, ``perc15`` = 15th
    percentile (HU)."""
    hu = np.asarray(hu, dtype=np.float64)
    values = []
    for name in features:
        if name == "laa950":
            values.append(float((hu < threshold_hu).mean()))
        elif name == "perc15":
            values.append(float(np.percentile(hu, PERCENTILE)))
        else:
            raise ValueError(f"unknown Patch-LAA feature {name!r}; known: {FEATURES}")
    return values


def patch_laa_features(
    patches: LabelledPatches,
    indices=None,
    features: Sequence[str] = ("laa950",),
    within_lung: bool = True,
    threshold_hu: float = LAA_THRESHOLD_HU,
) -> np.ndarray:
    """(n, len(features)) density features of the boxes ``indices`` (all by default)."""
    indices = np.arange(len(patches)) if indices is None else np.asarray(indices, dtype=np.int64)
    rows = [density_features(box_hu(patches, int(i), within_lung), features, threshold_hu) for i in indices]
    return np.asarray(rows, dtype=np.float64).reshape(len(indices), len(features))


@dataclass
class PatchLAADetector:
    """A fitted Patch-LAA logistic regression (output 1 = the subtype) and the feature settings it was fitted
    with."""

    model: object
    features: tuple
    within_lung: bool
    threshold_hu: float

    def features_of(self, patches: LabelledPatches, indices) -> np.ndarray:
        return patch_laa_features(patches, indices, self.features, self.within_lung, self.threshold_hu)

    def probabilities(self, patches: LabelledPatches, indices) -> np.ndarray:
        """(n,) probability of the subtype per box."""
        x = self.features_of(patches, indices)
        return self.model.predict_proba(x)[:, 1] if len(x) else np.zeros(0)

    def predict(self, patches: LabelledPatches, indices=None, subtype: str = "centrilobular") -> pd.DataFrame:
        """One row per box: ``box``, ``subject_id``, ``label`` (its class in ``patches``), the features,
        ``p_<subtype>`` and ``detected_<subtype>`` (the regression's call: probability > 0.5)."""
        indices = np.arange(len(patches)) if indices is None else np.asarray(indices, dtype=np.int64)
        x = self.features_of(patches, indices)
        frame = pd.DataFrame(
            {
                "box": indices,
                "subject_id": patches.subject_ids[indices],
                "label": [EMPHYSEMA_CLASSES[k] for k in patches.labels[indices]],
            }
        )
        for k, name in enumerate(self.features):
            frame[name] = x[:, k]
        frame[f"p_{subtype}"] = self.model.predict_proba(x)[:, 1] if len(x) else []
        frame[f"detected_{subtype}"] = self.model.predict(x).astype(bool) if len(x) else []
        return frame


@dataclass
class PatchLAAResult:
    """What ``PatchLAARunner.train`` returns (the shape of ``finetune.FinetuneResult``): the detector, the
    training log-loss (one "epoch"), seconds and the number of training boxes."""

    model: PatchLAADetector
    epoch_losses: list = field(default_factory=list)
    seconds: float = 0.0
    num_boxes: int = 0


class PatchLAARunner:
    """Fits the Patch-LAA logistic regression on the training boxes of a fold (labels 0 healthy / 1 subtype, the
    binary task's relabelled boxes): ``features`` (``laa950``; optionally ``perc15``), ``within_lung``,
    ``threshold_hu``, ``C`` (inverse L2 strength), ``balance_classes`` (``class_weight="balanced"``)."""

    def __init__(
        self,
        features: Sequence[str] = ("laa950",),
        within_lung: bool = True,
        threshold_hu: float = LAA_THRESHOLD_HU,
        C: float = 1.0,  # noqa: N803 - scikit-learn's name for the inverse L2 strength
        balance_classes: bool = False,
        max_iter: int = 1000,
    ):
        self.features = tuple(features)
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown or not self.features:
            raise ValueError(f"Patch-LAA features must be a non-empty subset of {FEATURES}, got {list(features)}")
        self.within_lung, self.threshold_hu = bool(within_lung), float(threshold_hu)
        self.C, self.balance_classes, self.max_iter = float(C), bool(balance_classes), int(max_iter)

    def train(
        self, patches: LabelledPatches, indices, pretrained_path=None, fold: int = 0, num_classes: int = 2
    ) -> PatchLAAResult:
        """Fit on the boxes ``indices`` (``pretrained_path`` and ``fold`` are not used: no encoder, no random
        initialisation)."""
        if int(num_classes) != 2:
            raise ValueError(f"the Patch-LAA baseline is a binary detector, got num_classes={num_classes}")
        start = time.perf_counter()
        indices = np.asarray(indices, dtype=np.int64)
        labels = np.asarray(patches.labels[indices], dtype=np.int64)
        if set(np.unique(labels)) != {0, 1}:
            raise ValueError(
                f"the Patch-LAA regression needs healthy (0) and subtype (1) training boxes, got "
                f"classes {sorted(set(labels.tolist()))}"
            )
        x = patch_laa_features(patches, indices, self.features, self.within_lung, self.threshold_hu)
        model = make_pipeline(
            StandardScaler(),
            LogisticRegression(
                C=self.C, class_weight="balanced" if self.balance_classes else None, max_iter=self.max_iter
            ),
        )
        model.fit(x, labels)
        p = np.clip(model.predict_proba(x)[:, 1], 1e-12, 1 - 1e-12)
        loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
        detector = PatchLAADetector(model, self.features, self.within_lung, self.threshold_hu)
        return PatchLAAResult(detector, [loss], time.perf_counter() - start, len(indices))

    def describe(self) -> str:
        names = {"laa950": f"LAA{self.threshold_hu:g}", "perc15": "Perc15"}
        where = "lung voxels" if self.within_lung else "voxels"
        return (
            f"Patch LAA: logistic regression on {' + '.join(names[f] for f in self.features)} of the box's "
            f"{where}, positive when p > 0.5"
        )
