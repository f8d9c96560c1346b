"""The emphysema detection rule on annotated boxes (paper §4.3.1).

A box is detected positive for a subtype when at least 25 % of its voxels have p(subtype) > 0.5, where p at a
voxel is the classifier's probability for the 32^3 patch centred at that voxel. The paper's detector of a subtype
is a binary classifier (healthy vs that subtype: ``EmphysemaNetwork(num_classes=2)``, output 1 = the subtype),
so p(subtype) is its output-1 probability (``box_predictions(..., subtype=...)``); a 3-class softmax (healthy /
centrilobular / paraseptal, ``subtype=None``) is a different rule, as the subtypes compete for the probability.

The exact rule needs one forward pass per box voxel (32^3 = 32768); ``stride`` evaluates the voxels of a regular
sub-grid of the box instead (per axis the voxels ``-16 + stride // 2, ... + stride, ...`` around the centre;
stride 1 = every voxel = exact; 8 = 64 voxels, the default; 16 = 8; 32 = the centre only). The share above 0.5 on
the sub-grid estimates the share over the box.

Scores per subtype compare that subtype's boxes (positives) with the healthy boxes (negatives); metrics a set of
boxes cannot define (no positive box, or no positive call) are NaN (``detection_scores``). ``DetectionRule`` is the
config component (``emphysema_finetune.yaml``: ``detection_rule``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from custom.data.location import PATCH_SIZE
from custom.emphysema.folded_classifier import classifier_probabilities_at
from custom.emphysema.labelled_patches import CENTRE_IN_REGION, CONTEXT, LabelledPatches
from custom.emphysema.network import EMPHYSEMA_CLASSES, SUBTYPES

VOXEL_THRESHOLD = 0.5
BOX_FRACTION = 0.25
DEFAULT_STRIDE = 8
METRICS = ("f1", "precision", "recall")


def box_offsets(stride: int = DEFAULT_STRIDE) -> np.ndarray:
    """(M, 3) offsets from the box centre of the voxels the rule evaluates (stride 1: all 32^3 box voxels)."""
    stride = int(stride)
    if not 1 <= stride <= PATCH_SIZE:
        raise ValueError(f"stride must be in [1, {PATCH_SIZE}], got {stride}")
    axis = np.arange(-PATCH_SIZE // 2, PATCH_SIZE // 2)[stride // 2 :: stride]
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    return grid.reshape(-1, 3).astype(np.int64)


def box_probabilities(
    network: torch.nn.Module, patches: LabelledPatches, indices=None, stride: int = DEFAULT_STRIDE, batch_size: int = 64
) -> np.ndarray:
    """(n, M, C) class probabilities of the patches centred at the evaluated voxels of each box.

    Boxes are laid side by side along x in one dense input (each in its own 64-voxel slab, which the patches
    of its box voxels never leave), so each classifier call fills whole batches even at large strides."""
    indices = np.arange(len(patches)) if indices is None else np.asarray(indices, dtype=np.int64)
    offsets = torch.as_tensor(box_offsets(stride) + CENTRE_IN_REGION)
    per_call = max(1, math.ceil(batch_size / len(offsets)))
    was_training = network.training
    network.eval()
    out = []
    for start in range(0, len(indices), per_call):
        chunk = indices[start : start + per_call]
        channels = torch.cat([patches.channels(int(i))[:4] for i in chunk], dim=1)
        centres = torch.cat([offsets + torch.tensor([CONTEXT * k, 0, 0]) for k in range(len(chunk))])
        probabilities = classifier_probabilities_at(network, channels, centres, batch_size=batch_size)
        out.append(probabilities.reshape(len(chunk), len(offsets), -1).numpy())
    network.train(was_training)
    if not out:
        return np.zeros((0, len(offsets), len(EMPHYSEMA_CLASSES)), dtype=np.float32)
    return np.concatenate(out)


def positive_shares(probabilities: np.ndarray, threshold: float = VOXEL_THRESHOLD) -> np.ndarray:
    """(n, C): per box and class, the share of evaluated voxels whose probability exceeds ``threshold``."""
    return (np.asarray(probabilities) > threshold).mean(axis=1)


def detector_classes(subtype: str | None = None) -> tuple:
    """Output classes of a detector: ``("healthy", subtype)`` for the binary detector of ``subtype``, the 3
    ``EMPHYSEMA_CLASSES`` for ``None`` (the 3-class softmax)."""
    if subtype is None:
        return EMPHYSEMA_CLASSES
    if subtype not in SUBTYPES:
        raise ValueError(f"subtype must be one of {SUBTYPES}, got {subtype!r}")
    return ("healthy", subtype)


def box_predictions(
    network: torch.nn.Module,
    patches: LabelledPatches,
    indices=None,
    stride: int = DEFAULT_STRIDE,
    batch_size: int = 64,
    fraction: float = BOX_FRACTION,
    threshold: float = VOXEL_THRESHOLD,
    subtype: str | None = None,
) -> pd.DataFrame:
    """One row per box: ``box`` (index in ``patches``), ``subject_id``, ``label`` (its class in ``patches``),
    ``share_<class>`` (share of evaluated voxels with p(class) > ``threshold``) and ``detected_<subtype>`` (share
    >= ``fraction``). ``subtype`` given: ``network`` is that subtype's binary detector (2 outputs: healthy,
    subtype) and the frame has its ``share_healthy``, ``share_<subtype>``, ``detected_<subtype>``; ``None``: a
    3-class network and every subtype's columns."""
    classes = detector_classes(subtype)
    indices = np.arange(len(patches)) if indices is None else np.asarray(indices, dtype=np.int64)
    probabilities = box_probabilities(network, patches, indices, stride, batch_size)
    if len(probabilities) and probabilities.shape[-1] != len(classes):
        raise ValueError(
            f"the detector has {probabilities.shape[-1]} outputs, the rule for "
            f"{subtype or 'the 3-class softmax'} expects {len(classes)} ({', '.join(classes)})"
        )
    shares = positive_shares(probabilities, threshold)
    frame = pd.DataFrame(
        {
            "box": indices,
            "subject_id": patches.subject_ids[indices],
            "label": [EMPHYSEMA_CLASSES[k] for k in patches.labels[indices]],
        }
    )
    for k, name in enumerate(classes):
        frame[f"share_{name}"] = shares[:, k] if len(shares) else []
    for name in classes[1:]:
        frame[f"detected_{name}"] = frame[f"share_{name}"] >= fraction
    return frame


def detection_scores(truth, called) -> dict:
    """F1, precision, recall and accuracy of box calls ``called`` against ``truth`` (both boolean; True = the
    subtype); NaN where a set of boxes cannot define them (no positive box; no positive call for precision)."""
    truth, called = np.asarray(truth, dtype=bool), np.asarray(called, dtype=bool)
    scores = {"n_positive": int(truth.sum()), "n_healthy": int((~truth).sum())}
    scores["accuracy"] = float((truth == called).mean()) if len(truth) else np.nan
    if not truth.any():
        return {**scores, "f1": np.nan, "precision": np.nan, "recall": np.nan}
    scores["precision"] = float(precision_score(truth, called, zero_division=np.nan))
    scores["recall"] = float(recall_score(truth, called, zero_division=np.nan))
    scores["f1"] = float(f1_score(truth, called, zero_division=np.nan))
    return scores


def subtype_scores(predictions: pd.DataFrame, subtype: str) -> dict:
    """F1, precision, recall and accuracy of the ``subtype`` boxes against the healthy boxes (NaN where
    undefined)."""
    rows = predictions[predictions["label"].isin([subtype, "healthy"])]
    return detection_scores((rows["label"] == subtype).to_numpy(), rows[f"detected_{subtype}"].to_numpy(dtype=bool))


class DetectionRule:
    """The rule with its settings: ``stride`` of the evaluated sub-grid, ``fraction`` of evaluated voxels above
    ``threshold`` that makes a box positive, ``batch_size`` of the classifier calls."""

    def __init__(
        self,
        stride: int = DEFAULT_STRIDE,
        fraction: float = BOX_FRACTION,
        threshold: float = VOXEL_THRESHOLD,
        batch_size: int = 64,
    ):
        self.stride, self.fraction, self.threshold = int(stride), float(fraction), float(threshold)
        self.batch_size = int(batch_size)
        self.voxels_per_box = len(box_offsets(self.stride))

    def predict(
        self, network: torch.nn.Module, patches: LabelledPatches, indices=None, subtype: str | None = None
    ) -> pd.DataFrame:
        """``box_predictions`` of the boxes ``indices`` (all by default): ``subtype``'s binary detector, or the
        3-class softmax (``None``)."""
        return box_predictions(
            network, patches, indices, self.stride, self.batch_size, self.fraction, self.threshold, subtype
        )

    def describe(self) -> str:
        return (
            f"rule: positive when >= {self.fraction:.0%} of the box voxels have p > {self.threshold:g} "
            f"(stride {self.stride}: {self.voxels_per_box} voxels per box)"
        )
