"""Cross-validation of the emphysema detectors (paper §4.3.1 Table 5, §4.3.2 Fig. 5, §4.4 Table 7).

Folds are stratified by box label and grouped by subject (``StratifiedGroupKFold``, ``SubjectFolds``), so no subject
is in both the training and the test part. Each experiment (scheme x initialisation x share of the training
annotations x routing location) is trained on the training part of every fold by the runner of its scheme
(``FinetuneRunner``: linear readout or full fine-tuning) and tested on the rest with the detection rule
(``custom.emphysema.detection_rule``). ``DetectionCrossValidation`` is the config component that runs them all
(``emphysema_finetune.yaml``: ``detection_cv``); its results are tabulated by ``custom.emphysema.detection_tables``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from custom.emphysema.detection_rule import SUBTYPES, DetectionRule, subtype_scores
from custom.emphysema.finetune import FinetuneResult, finetune
from custom.emphysema.labelled_patches import LabelledPatches
from custom.emphysema.random_location import PATCH_LOCATION, RANDOM_LOCATION, RandomLocations

SCHEMES = ("linear_readout", "full_finetuning")
INITS = ("pretrained", "scratch")


def subject_folds(patches: LabelledPatches, n_splits: int = 5, seed: int = 0) -> list:
    """[(train indices, test indices)] stratified by box label and grouped by subject (at most one fold per
    subject when there are fewer subjects than ``n_splits``)."""
    subjects = patches.subject_ids
    n_subjects = len(set(subjects))
    if n_subjects < 2:
        raise ValueError(f"cross-validation needs boxes from at least 2 subjects, got {n_subjects}")
    splitter = StratifiedGroupKFold(n_splits=min(int(n_splits), n_subjects), shuffle=True, random_state=seed)
    return [(np.sort(train), np.sort(test))
            for train, test in splitter.split(np.zeros(len(patches)), patches.labels, groups=subjects)]


def annotation_subset(labels: np.ndarray, train: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """``fraction`` of the training boxes, per class (at least one of each class present); nested: a larger
    fraction keeps every box of a smaller one (one random order per class)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"annotation fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    keep = []
    for k in np.unique(labels[train]):
        members = rng.permutation(train[labels[train] == k])
        keep.append(members[: max(1, math.ceil(round(fraction * len(members), 6)))])
    return np.sort(np.concatenate(keep))


class SubjectFolds:
    """The fold splitter: ``n_splits`` subject-grouped, label-stratified folds, shuffled with ``seed``."""

    def __init__(self, n_splits: int = 5, seed: int = 0):
        self.n_splits, self.seed = int(n_splits), int(seed)

    def split(self, patches: LabelledPatches) -> list:
        return subject_folds(patches, self.n_splits, self.seed)


@dataclass
class Experiment:
    """One training recipe of the evaluation: scheme, initialisation and share of the training annotations."""

    scheme: str  # linear_readout | full_finetuning
    init: str  # pretrained | scratch
    fraction: float = 1.0
    location: str = PATCH_LOCATION  # patch | random (Table 7: boxes routed by random atlas lung locations)

    def __post_init__(self):
        if self.scheme not in SCHEMES or self.init not in INITS:
            raise ValueError(f"experiment {self.scheme}/{self.init}: scheme must be one of {SCHEMES}, "
                             f"init one of {INITS}")

    @property
    def name(self) -> str:
        suffix = "" if self.location == PATCH_LOCATION else f"/{self.location}_location"
        return f"{self.scheme}/{self.init}/{self.fraction:g}{suffix}"


def experiments(fractions: Sequence[float] = (), scratch: bool = True, linear_readout: bool = True,
                random_location: bool = False) -> list[Experiment]:
    """Table 5 (linear readout, full fine-tuning) + Fig. 5 (pre-trained at ``fractions``, scratch at 100 %)
    + Table 7 (linear readout with random locations) when ``random_location``."""
    runs = [Experiment("linear_readout", "pretrained")] if linear_readout else []
    if random_location:
        runs.append(Experiment("linear_readout", "pretrained", location=RANDOM_LOCATION))
    runs.append(Experiment("full_finetuning", "pretrained"))
    runs += [Experiment("full_finetuning", "pretrained", float(f)) for f in sorted(set(fractions)) if f < 1.0]
    if scratch:
        runs.append(Experiment("full_finetuning", "scratch"))
    return runs


class FinetuneRunner:
    """Trains one classifier per fold (``custom.emphysema.finetune.finetune``): ``freeze_encoder`` true is the
    linear readout, false full fine-tuning; Adam with ``lr``, ``weight_decay``; ``epochs`` of ``batch_size``;
    seeded by ``seed`` + the fold."""

    def __init__(self, freeze_encoder: bool, epochs: int = 10, lr: float = 5e-4, weight_decay: float = 1e-4,
                 batch_size: int = 8, augment: bool = False, balance_classes: bool = True, seed: int = 0,
                 device: str = "cpu"):
        self.freeze_encoder, self.epochs, self.lr = bool(freeze_encoder), int(epochs), float(lr)
        self.weight_decay, self.batch_size = float(weight_decay), int(batch_size)
        self.augment, self.balance_classes = bool(augment), bool(balance_classes)
        self.seed, self.device = int(seed), str(device)

    def train(self, patches: LabelledPatches, indices, pretrained_path: str | Path | None,
              fold: int = 0) -> FinetuneResult:
        return finetune(patches, indices, pretrained_path=pretrained_path, freeze_encoder=self.freeze_encoder,
                        epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
                        seed=self.seed + fold, augment=self.augment, balance_classes=self.balance_classes,
                        device=self.device)


@dataclass
class DetectionResults:
    """Box predictions (one row per experiment x fold x test box) and per-fold metrics (one row per experiment x
    fold x subtype), with what the tables' header says about the run."""

    predictions: pd.DataFrame
    fold_metrics: pd.DataFrame
    n_boxes: int
    n_subjects: int
    rule: str

    @property
    def n_folds(self) -> int:
        return int(self.predictions["fold"].nunique())

    def folds(self) -> pd.DataFrame:
        """subject -> fold of its boxes."""
        folds = self.predictions.drop_duplicates(["fold", "subject_id"])[["fold", "subject_id"]]
        return folds.sort_values(["fold", "subject_id"])


class DetectionCrossValidation:
    """Every experiment (``experiments``) on every fold of ``folds`` (a ``SubjectFolds``), trained by
    ``runners[experiment.scheme]`` from ``pretrained_path`` (or from scratch), its training boxes the experiment's
    share of the fold's (``annotation_subset`` seeded by ``seed`` + fold), and tested with ``rule``. Experiments
    with random locations use the boxes moved by ``random_locations``."""

    def __init__(self, patches: LabelledPatches, pretrained_path: str | Path | None, folds: SubjectFolds,
                 experiments: Sequence[Experiment], runners: dict, rule: DetectionRule,
                 random_locations: RandomLocations | None = None, seed: int = 0, progress: bool = True):
        self.patches, self.pretrained_path, self.folds = patches, pretrained_path, folds
        self.experiments, self.runners, self.rule = list(experiments), dict(runners), rule
        self.random_locations, self.seed, self.progress = random_locations, int(seed), bool(progress)
        missing = sorted({run.scheme for run in self.experiments} - set(self.runners))
        if missing:
            raise ValueError(f"no runner for the scheme(s) {missing}; runners: {sorted(self.runners)}")
        if self.random_locations is None and any(r.location == RANDOM_LOCATION for r in self.experiments):
            raise ValueError("an experiment routes boxes by random locations but no random_locations is given")

    def run(self) -> DetectionResults:
        patches = self.patches
        folds = self.folds.split(patches)
        variants = {PATCH_LOCATION: patches}
        if any(run.location == RANDOM_LOCATION for run in self.experiments):
            variants[RANDOM_LOCATION] = self.random_locations.apply(patches)
        jobs = [(fold, run) for fold in range(len(folds)) for run in self.experiments]
        if self.progress:
            from tqdm.auto import tqdm

            jobs = tqdm(jobs, desc="detection CV", unit="model")
        predictions, metrics = [], []
        for fold, run in jobs:
            train, test = folds[fold]
            chosen = annotation_subset(patches.labels, train, run.fraction, seed=self.seed + fold)
            boxes = variants[run.location]
            result = self.runners[run.scheme].train(
                boxes, chosen, self.pretrained_path if run.init == "pretrained" else None, fold)
            start = time.perf_counter()
            frame = self.rule.predict(result.network, boxes, test)
            inference_seconds = time.perf_counter() - start
            frame.insert(0, "fold", fold)
            for key, value in (("experiment", run.name), ("scheme", run.scheme), ("init", run.init),
                               ("fraction", run.fraction), ("location", run.location)):
                frame.insert(0, key, value)
            predictions.append(frame)
            for subtype in SUBTYPES:
                metrics.append({"experiment": run.name, **asdict(run), "fold": fold, "subtype": subtype,
                                **subtype_scores(frame, subtype), "n_train_boxes": len(chosen),
                                "train_seconds": round(result.seconds, 2),
                                "inference_seconds": round(inference_seconds, 2),
                                "final_train_loss": round(result.epoch_losses[-1], 4)})
        return DetectionResults(pd.concat(predictions, ignore_index=True), pd.DataFrame(metrics), len(patches),
                                len(set(patches.subject_ids)), self.rule.describe())
