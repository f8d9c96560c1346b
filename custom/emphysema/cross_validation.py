"""Cross-validation of the emphysema detectors (paper §4.3.1 Table 5, §4.3.2 Fig. 5, §4.4 Table 7).

The paper fine-tunes "in a binary classification task to discriminate between emphysema-annotated patches and
healthy patches", one task per subtype. So every experiment here trains, for each subtype, a binary detector on
the healthy boxes and that subtype's boxes only (labels 0 / 1, ``binary_task``; the other subtype's boxes play no
part) and tests it with the 25 % rule (``custom.emphysema.detection_rule``) on the same subtype's and the healthy
boxes of the test part. Table 5's four rows per subtype are four experiments on the same folds:

- linear readout, Patch LAA: a logistic regression on the box's LAA-950 (``custom.emphysema.patch_laa``);
- linear readout, DrasCLR: the pre-trained encoder frozen, a logistic (linear + softmax) layer on e(x, p);
- full fine-tuning from scratch: the same network, randomly initialised (the "patch-based CNN");
- full fine-tuning, DrasCLR: the pre-trained encoder and the layer trained together.

A 3-class softmax (healthy / centrilobular / paraseptal, ``task="multiclass"``) can be added as an extra row;
it is not the paper's detector.

Folds are stratified by box label and grouped by subject (``StratifiedGroupKFold``, ``SubjectFolds``), so no subject
is in both the training and the test part; the same folds serve every subtype and every experiment. Each
experiment (scheme x initialisation x share of the training annotations x routing location) is trained on the
training part of every fold by the runner of its scheme (``FinetuneRunner``: linear readout or full fine-tuning;
``PatchLAARunner``) with the same settings for both subtypes. A fold whose training part lacks one of the two
classes of a subtype's task is not trained (its metrics row says why and has no numbers). ``DetectionCrossValidation``
is the config component that runs them all (``emphysema_finetune.yaml``: ``detection_cv``); its results are
tabulated by ``custom.emphysema.detection_tables``.
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

from custom.emphysema.detection_rule import SUBTYPES, DetectionRule, detection_scores
from custom.emphysema.finetune import FinetuneResult, finetune
from custom.emphysema.labelled_patches import LabelledPatches
from custom.emphysema.network import EMPHYSEMA_CLASSES, NUM_EMPHYSEMA_CLASSES
from custom.emphysema.random_location import PATCH_LOCATION, RANDOM_LOCATION, RandomLocations

SCHEMES = ("patch_laa", "linear_readout", "full_finetuning")
INITS = ("pretrained", "scratch", "none")  # none: the Patch-LAA regression (no encoder)
BINARY, MULTICLASS = "binary", "multiclass"
TASKS = (BINARY, MULTICLASS)
HEALTHY = EMPHYSEMA_CLASSES.index("healthy")


def subject_folds(patches: LabelledPatches, n_splits: int = 5, seed: int = 0) -> list:
    """[(train indices, test indices)] stratified by box label and grouped by subject (at most one fold per
    subject when there are fewer subjects than ``n_splits``)."""
    subjects = patches.subject_ids
    n_subjects = len(set(subjects))
    if n_subjects < 2:
        raise ValueError(f"cross-validation needs boxes from at least 2 subjects, got {n_subjects}")
    splitter = StratifiedGroupKFold(n_splits=min(int(n_splits), n_subjects), shuffle=True, random_state=seed)
    return [
        (np.sort(train), np.sort(test))
        for train, test in splitter.split(np.zeros(len(patches)), patches.labels, groups=subjects)
    ]


def annotation_subset(
    labels: np.ndarray, train: np.ndarray, fraction: float, seed: int = 0, classes: Sequence[int] | None = None
) -> np.ndarray:
    """``fraction`` of the training boxes ``train`` of each class in ``classes`` (every class when None; at least
    one box of each), the boxes of the other classes all kept; nested: a larger fraction keeps every box of a
    smaller one (one random order per class, drawn whatever the fraction)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"annotation fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    train = np.asarray(train, dtype=np.int64)
    keep = []
    for k in np.unique(labels[train]):
        members = rng.permutation(train[labels[train] == k])
        if classes is None or k in {int(c) for c in classes}:
            members = members[: max(1, math.ceil(round(fraction * len(members), 6)))]
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else train[:0]


def task_labels(labels: np.ndarray, subtype: str) -> np.ndarray:
    """Labels of ``subtype``'s binary task: 1 for its boxes, 0 for healthy boxes, -1 for the others."""
    if subtype not in SUBTYPES:
        raise ValueError(f"subtype must be one of {SUBTYPES}, got {subtype!r}")
    labels = np.asarray(labels)
    out = np.full(labels.shape, -1, dtype=np.int64)
    out[labels == HEALTHY] = 0
    out[labels == EMPHYSEMA_CLASSES.index(subtype)] = 1
    return out


def binary_task(patches: LabelledPatches, subtype: str) -> LabelledPatches:
    """The same boxes (arrays shared, not copied) with ``task_labels``: what a binary detector is trained on."""
    return LabelledPatches(
        patches.regions, patches.lungs, patches.region_to_atlas, task_labels(patches.labels, subtype), patches.table
    )


class SubjectFolds:
    """The fold splitter: ``n_splits`` subject-grouped, label-stratified folds, shuffled with ``seed``."""

    def __init__(self, n_splits: int = 5, seed: int = 0):
        self.n_splits, self.seed = int(n_splits), int(seed)

    def split(self, patches: LabelledPatches) -> list:
        return subject_folds(patches, self.n_splits, self.seed)


@dataclass
class Experiment:
    """One training recipe of the evaluation: scheme, initialisation, share of the training annotations, routing
    location and task (a binary detector per subtype, or one 3-class softmax)."""

    scheme: str  # patch_laa | linear_readout | full_finetuning
    init: str  # pretrained | scratch | none (patch_laa)
    fraction: float = 1.0
    location: str = PATCH_LOCATION  # patch | random (Table 7: boxes routed by random atlas lung locations)
    task: str = BINARY  # binary (one detector per subtype, the paper's) | multiclass (extra)

    def __post_init__(self):
        if self.scheme not in SCHEMES or self.init not in INITS or self.task not in TASKS:
            raise ValueError(
                f"experiment {self.scheme}/{self.init}/{self.task}: scheme must be one of {SCHEMES}, "
                f"init one of {INITS}, task one of {TASKS}"
            )
        if (self.scheme == "patch_laa") != (self.init == "none"):
            raise ValueError(
                f"experiment {self.scheme}/{self.init}: init 'none' is the Patch-LAA regression's, " f"and only its"
            )
        if self.scheme == "patch_laa" and (self.task != BINARY or self.location != PATCH_LOCATION):
            raise ValueError("the Patch-LAA regression is a binary detector and reads no location")

    @property
    def name(self) -> str:
        suffix = "" if self.task == BINARY else f"/{self.task}"
        suffix += "" if self.location == PATCH_LOCATION else f"/{self.location}_location"
        return f"{self.scheme}/{self.init}/{self.fraction:g}{suffix}"


def experiments(
    fractions: Sequence[float] = (),
    scratch: bool = True,
    linear_readout: bool = True,
    random_location: bool = False,
    patch_laa: bool = True,
    multiclass: bool = False,
) -> list[Experiment]:
    """Table 5 (Patch LAA, linear readout, full fine-tuning pre-trained and from scratch, all annotations) +
    Fig. 5 (full fine-tuning pre-trained at each of ``fractions`` < 1) + Table 7 (linear readout with random
    locations) when ``random_location`` + the 3-class softmax (full fine-tuning) when ``multiclass``."""
    runs = [Experiment("patch_laa", "none")] if patch_laa else []
    if linear_readout:
        runs.append(Experiment("linear_readout", "pretrained"))
    if random_location:
        runs.append(Experiment("linear_readout", "pretrained", location=RANDOM_LOCATION))
    runs.append(Experiment("full_finetuning", "pretrained"))
    runs += [Experiment("full_finetuning", "pretrained", float(f)) for f in sorted(set(fractions)) if f < 1.0]
    if scratch:
        runs.append(Experiment("full_finetuning", "scratch"))
    if multiclass:
        runs.append(Experiment("full_finetuning", "pretrained", task=MULTICLASS))
    return runs


class FinetuneRunner:
    """Trains one classifier per fold (``custom.emphysema.finetune.finetune``): ``freeze_encoder`` true is the
    linear readout, false full fine-tuning; Adam with ``lr``, ``weight_decay``; ``epochs`` of ``batch_size``;
    seeded by ``seed`` + the fold."""

    def __init__(
        self,
        freeze_encoder: bool,
        epochs: int = 10,
        lr: float = 5e-4,
        weight_decay: float = 1e-4,
        batch_size: int = 8,
        augment: bool = False,
        balance_classes: bool = True,
        seed: int = 0,
        device: str = "cpu",
    ):
        self.freeze_encoder, self.epochs, self.lr = bool(freeze_encoder), int(epochs), float(lr)
        self.weight_decay, self.batch_size = float(weight_decay), int(batch_size)
        self.augment, self.balance_classes = bool(augment), bool(balance_classes)
        self.seed, self.device = int(seed), str(device)

    def train(
        self,
        patches: LabelledPatches,
        indices,
        pretrained_path: str | Path | None,
        fold: int = 0,
        num_classes: int = NUM_EMPHYSEMA_CLASSES,
    ) -> FinetuneResult:
        return finetune(
            patches,
            indices,
            pretrained_path=pretrained_path,
            freeze_encoder=self.freeze_encoder,
            epochs=self.epochs,
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            seed=self.seed + fold,
            augment=self.augment,
            balance_classes=self.balance_classes,
            device=self.device,
            num_classes=num_classes,
        )


@dataclass
class DetectionResults:
    """Box predictions (one row per experiment x subtype x fold x test box: ``score`` = share of evaluated voxels
    with p > 0.5, or the Patch-LAA regression's probability; ``detected``), per-fold metrics (one row per
    experiment x fold x subtype) and the subject -> fold map, with what the tables' header says about the run."""

    predictions: pd.DataFrame
    fold_metrics: pd.DataFrame
    n_boxes: int
    n_subjects: int
    rule: str
    subject_folds: pd.DataFrame | None = None
    baseline: str = ""

    @property
    def n_folds(self) -> int:
        return int(self.fold_metrics["fold"].nunique())

    def folds(self) -> pd.DataFrame:
        """subject -> fold of its boxes (with its numbers of boxes per class)."""
        if self.subject_folds is not None:
            return self.subject_folds
        if not {"fold", "subject_id"} <= set(self.predictions.columns):
            return pd.DataFrame(columns=["fold", "subject_id"])
        folds = self.predictions.drop_duplicates(["fold", "subject_id"])[["fold", "subject_id"]]
        return folds.sort_values(["fold", "subject_id"]).reset_index(drop=True)


def fold_table(patches: LabelledPatches, folds: list) -> pd.DataFrame:
    """One row per (fold, subject) of the test parts: the subject's numbers of boxes per class."""
    subjects, labels = patches.subject_ids, patches.labels
    rows = []
    for fold, (_, test) in enumerate(folds):
        for subject in sorted(set(subjects[test])):
            mine = test[subjects[test] == subject]
            rows.append(
                {
                    "fold": fold,
                    "subject_id": subject,
                    **{f"n_{name}": int((labels[mine] == k).sum()) for k, name in enumerate(EMPHYSEMA_CLASSES)},
                }
            )
    return pd.DataFrame(rows)


def _long_predictions(frame: pd.DataFrame, subtype: str, scheme: str) -> pd.DataFrame:
    """A detector's box frame as rows of ``subtype``'s comparison (its boxes and the healthy ones): ``score``,
    ``detected`` (+ the Patch-LAA features)."""
    rows = frame[frame["label"].isin([subtype, "healthy"])]
    score = f"p_{subtype}" if scheme == "patch_laa" else f"share_{subtype}"
    out = rows[["box", "subject_id", "label"]].copy()
    out["score"] = rows[score].to_numpy(dtype=float)
    out["detected"] = rows[f"detected_{subtype}"].to_numpy(dtype=bool)
    for extra in ("laa950", "perc15"):
        if extra in rows:
            out[extra] = rows[extra].to_numpy(dtype=float)
    return out.reset_index(drop=True)


class DetectionCrossValidation:
    """Every experiment (``experiments``) on every fold of ``folds`` (a ``SubjectFolds``), for each of ``subtypes``
    (binary experiments; a multiclass one is trained once per fold and scored for each subtype), trained by
    ``runners[experiment.scheme]`` from ``pretrained_path`` (or from scratch), its training boxes the experiment's
    share of the fold's (``annotation_subset`` seeded by ``seed`` + fold: of the subtype's boxes only, the healthy
    ones all kept, unless ``subsample_healthy``), and tested with ``rule`` (the networks) or by the regression's
    own call (Patch LAA). Experiments with random locations use the boxes moved by ``random_locations``."""

    def __init__(
        self,
        patches: LabelledPatches,
        pretrained_path: str | Path | None,
        folds: SubjectFolds,
        experiments: Sequence[Experiment],
        runners: dict,
        rule: DetectionRule,
        random_locations: RandomLocations | None = None,
        seed: int = 0,
        progress: bool = True,
        subtypes: Sequence[str] = SUBTYPES,
        subsample_healthy: bool = False,
    ):
        self.patches, self.pretrained_path, self.folds = patches, pretrained_path, folds
        self.experiments, self.runners, self.rule = list(experiments), dict(runners), rule
        self.random_locations, self.seed, self.progress = random_locations, int(seed), bool(progress)
        self.subtypes, self.subsample_healthy = tuple(subtypes), bool(subsample_healthy)
        unknown = sorted(set(self.subtypes) - set(SUBTYPES))
        if unknown or not self.subtypes:
            raise ValueError(f"subtypes must be a non-empty subset of {SUBTYPES}, got {list(subtypes)}")
        missing = sorted({run.scheme for run in self.experiments} - set(self.runners))
        if missing:
            raise ValueError(f"no runner for the scheme(s) {missing}; runners: {sorted(self.runners)}")
        if self.random_locations is None and any(r.location == RANDOM_LOCATION for r in self.experiments):
            raise ValueError("an experiment routes boxes by random locations but no random_locations is given")

    def jobs(self, n_folds: int) -> list:
        """(fold, experiment, subtype or None for a multiclass experiment), in the order they run."""
        out = []
        for fold in range(n_folds):
            for run in self.experiments:
                out += [(fold, run, None)] if run.task == MULTICLASS else [(fold, run, s) for s in self.subtypes]
        return out

    def run(self) -> DetectionResults:
        patches = self.patches
        folds = self.folds.split(patches)
        variants = {PATCH_LOCATION: patches}
        if any(run.location == RANDOM_LOCATION for run in self.experiments):
            variants[RANDOM_LOCATION] = self.random_locations.apply(patches)
        jobs = self.jobs(len(folds))
        if self.progress:
            from tqdm.auto import tqdm

            jobs = tqdm(jobs, desc="detection CV", unit="model")
        predictions, metrics = [], []
        for fold, run, subtype in jobs:
            frames, rows = self._job(folds, fold, run, subtype, variants)
            predictions += frames
            metrics += rows
        columns = [
            "experiment",
            "scheme",
            "init",
            "fraction",
            "location",
            "task",
            "fold",
            "subtype",
            "box",
            "subject_id",
            "label",
            "score",
            "detected",
        ]
        predictions = pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame(columns=columns)
        baseline = (
            self.runners["patch_laa"].describe()
            if "patch_laa" in self.runners and hasattr(self.runners["patch_laa"], "describe")
            else ""
        )
        return DetectionResults(
            predictions,
            pd.DataFrame(metrics),
            len(patches),
            len(set(patches.subject_ids)),
            self.rule.describe(),
            fold_table(patches, folds),
            baseline,
        )

    def _job(self, folds: list, fold: int, run: Experiment, subtype: str | None, variants: dict):
        """Train and test one experiment on one fold (one subtype's task, or the 3-class one)."""
        train, test = folds[fold]
        boxes = variants[run.location]
        if subtype is None:  # the 3-class softmax: every box, healthy and at least one subtype needed
            labels, view, num_classes, scored = self.patches.labels, boxes, len(EMPHYSEMA_CLASSES), self.subtypes
            chosen = annotation_subset(labels, train, run.fraction, seed=self.seed + fold)
            names = dict(enumerate(EMPHYSEMA_CLASSES))
            present = set(labels[chosen].tolist())
            missing = (
                []
                if HEALTHY in present and len(present) > 1
                else [names[HEALTHY] if HEALTHY not in present else "subtype"]
            )
        else:  # the subtype's binary task: its boxes and the healthy ones, relabelled 1 / 0
            labels, num_classes, scored = task_labels(self.patches.labels, subtype), 2, (subtype,)
            train, test = train[labels[train] >= 0], test[labels[test] >= 0]
            view = binary_task(boxes, subtype)
            chosen = annotation_subset(
                labels, train, run.fraction, seed=self.seed + fold, classes=None if self.subsample_healthy else [1]
            )
            present = set(labels[chosen].tolist())
            missing = [name for k, name in ((0, "healthy"), (1, subtype)) if k not in present]
        info = {"experiment": run.name, **asdict(run), "fold": fold}
        if missing:
            truth_all = self.patches.labels[test]
            rows = [
                {
                    **info,
                    "subtype": s,
                    "status": f"not trained: no {' or '.join(missing)} box in the training part",
                    "n_positive": int((truth_all == EMPHYSEMA_CLASSES.index(s)).sum()),
                    "n_healthy": int((truth_all == HEALTHY).sum()),
                    "n_train_boxes": len(chosen),
                    "n_train_positive": int((labels[chosen] == (1 if subtype else EMPHYSEMA_CLASSES.index(s))).sum()),
                }
                for s in scored
            ]
            return [], rows
        result = self.runners[run.scheme].train(
            view, chosen, self.pretrained_path if run.init == "pretrained" else None, fold, num_classes
        )
        start = time.perf_counter()
        if run.scheme == "patch_laa":
            frame = result.model.predict(boxes, test, subtype)
        else:
            frame = self.rule.predict(result.network, boxes, test, subtype)
        inference_seconds = time.perf_counter() - start
        frames, rows = [], []
        for s in scored:
            long = _long_predictions(frame, s, run.scheme)
            for position, (key, value) in enumerate(info.items()):
                long.insert(position, key, value)
            long.insert(len(info), "subtype", s)
            frames.append(long)
            positive = 1 if subtype else EMPHYSEMA_CLASSES.index(s)
            rows.append(
                {
                    **info,
                    "subtype": s,
                    "status": "ok",
                    **detection_scores(long["label"] == s, long["detected"]),
                    "n_train_boxes": len(chosen),
                    "n_train_positive": int((labels[chosen] == positive).sum()),
                    "train_seconds": round(result.seconds, 2),
                    "inference_seconds": round(inference_seconds, 2),
                    "final_train_loss": round(float(result.epoch_losses[-1]), 4) if result.epoch_losses else np.nan,
                }
            )
        return frames, rows
