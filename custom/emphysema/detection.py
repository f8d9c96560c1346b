"""Emphysema detection on annotated boxes (paper §4.3.1, Table 5), the label-efficiency curve (§4.3.2, Fig. 5)
and the sensitivity to the routing location (§4.4, Table 7; ``custom.emphysema.random_location``).

The rule: a box is detected positive for a subtype when at least 25 % of its voxels have p(subtype) > 0.5,
where p at a voxel is the classifier's probability for the 32^3 patch centred at that voxel. The exact rule
needs one forward pass per box voxel (32^3 = 32768); ``stride`` evaluates the voxels of a regular sub-grid
of the box instead (per axis the voxels ``-16 + stride // 2, ... + stride, ...`` around the centre; stride 1 =
every voxel = exact; 8 = 64 voxels, the default; 16 = 8; 32 = the centre only). The share above 0.5 on the
sub-grid estimates the share over the box.

Scores per subtype compare that subtype's boxes (positives) with the healthy boxes (negatives). Folds are
stratified by box label and grouped by subject (``StratifiedGroupKFold``), so no subject is in both the
training and the test part. Metrics a fold cannot define (no positive box, or no positive call) are NaN and
left out of the mean ± s.d.; ``n_folds`` says how many folds gave a number.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score, precision_score, recall_score
from sklearn.model_selection import StratifiedGroupKFold

from custom.atomic_io import atomic_path
from custom.emphysema.folded_classifier import classifier_probabilities_at
from custom.emphysema.finetune import finetune
from custom.emphysema.labelled_patches import CENTRE_IN_REGION, CONTEXT, LabelledPatches
from custom.emphysema.network import EMPHYSEMA_CLASSES
from custom.emphysema.random_location import PATCH_LOCATION, RANDOM_LOCATION, location_table, with_random_locations
from custom.figures import save_figure
from custom.data.location import PATCH_SIZE

SUBTYPES = ("centrilobular", "paraseptal")
VOXEL_THRESHOLD = 0.5
BOX_FRACTION = 0.25
DEFAULT_STRIDE = 8
METRICS = ("f1", "precision", "recall")
logger = logging.getLogger(__name__)


def box_offsets(stride: int = DEFAULT_STRIDE) -> np.ndarray:
    """(M, 3) offsets from the box centre of the voxels the rule evaluates (stride 1: all 32^3 box voxels)."""
    stride = int(stride)
    if not 1 <= stride <= PATCH_SIZE:
        raise ValueError(f"stride must be in [1, {PATCH_SIZE}], got {stride}")
    axis = np.arange(-PATCH_SIZE // 2, PATCH_SIZE // 2)[stride // 2 :: stride]
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    return grid.reshape(-1, 3).astype(np.int64)


def box_probabilities(network: torch.nn.Module, patches: LabelledPatches, indices=None,
                      stride: int = DEFAULT_STRIDE, batch_size: int = 64) -> np.ndarray:
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


def box_predictions(network: torch.nn.Module, patches: LabelledPatches, indices=None,
                    stride: int = DEFAULT_STRIDE, batch_size: int = 64, fraction: float = BOX_FRACTION,
                    threshold: float = VOXEL_THRESHOLD) -> pd.DataFrame:
    """One row per box: ``box`` (index in ``patches``), ``subject_id``, ``label``, ``share_<class>`` (share of
    evaluated voxels with p > ``threshold``) and ``detected_<subtype>`` (share >= ``fraction``)."""
    indices = np.arange(len(patches)) if indices is None else np.asarray(indices, dtype=np.int64)
    shares = positive_shares(box_probabilities(network, patches, indices, stride, batch_size), threshold)
    frame = pd.DataFrame({"box": indices, "subject_id": patches.subject_ids[indices],
                          "label": [EMPHYSEMA_CLASSES[k] for k in patches.labels[indices]]})
    for k, name in enumerate(EMPHYSEMA_CLASSES):
        frame[f"share_{name}"] = shares[:, k] if len(shares) else []
    for subtype in SUBTYPES:
        frame[f"detected_{subtype}"] = frame[f"share_{subtype}"] >= fraction
    return frame


def subtype_scores(predictions: pd.DataFrame, subtype: str) -> dict:
    """F1, precision, recall and accuracy of the ``subtype`` boxes against the healthy boxes (NaN where
    undefined)."""
    rows = predictions[predictions["label"].isin([subtype, "healthy"])]
    truth = (rows["label"] == subtype).to_numpy()
    called = rows[f"detected_{subtype}"].to_numpy(dtype=bool)
    scores = {"n_positive": int(truth.sum()), "n_healthy": int((~truth).sum())}
    scores["accuracy"] = float((truth == called).mean()) if len(truth) else np.nan
    if not truth.any():
        return {**scores, "f1": np.nan, "precision": np.nan, "recall": np.nan}
    scores["precision"] = float(precision_score(truth, called, zero_division=np.nan))
    scores["recall"] = float(recall_score(truth, called, zero_division=np.nan))
    scores["f1"] = float(f1_score(truth, called, zero_division=np.nan))
    return scores


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


@dataclass
class Experiment:
    """One training recipe of the evaluation: scheme, initialisation and share of the training annotations."""

    scheme: str  # linear_readout | full_finetuning
    init: str  # pretrained | scratch
    fraction: float = 1.0
    location: str = PATCH_LOCATION  # patch | random (Table 7: boxes routed by random atlas lung locations)

    @property
    def name(self) -> str:
        suffix = "" if self.location == PATCH_LOCATION else f"/{self.location}_location"
        return f"{self.scheme}/{self.init}/{self.fraction:g}{suffix}"


def experiments(fractions=(), scratch: bool = True, linear_readout: bool = True,
                random_location: bool = False) -> list:
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


@dataclass
class TrainingSettings:
    """Compute knobs of the evaluation (the demo uses a small version; see docs/emphysema_finetune.md)."""

    epochs_linear: int = 30
    epochs_full: int = 10
    lr_linear: float = 1e-3
    lr_full: float = 5e-4
    batch_size: int = 8
    weight_decay: float = 1e-4
    augment: bool = False
    balance_classes: bool = True
    stride: int = DEFAULT_STRIDE
    inference_batch_size: int = 64
    seed: int = 0
    device: str = "cpu"


def cross_validate(patches: LabelledPatches, pretrained_path: str | Path, runs: list, n_splits: int = 5,
                   settings: TrainingSettings | None = None, progress: bool = True, atlas_dir=None) -> tuple:
    """Train every experiment on every fold and apply the rule to the test boxes.

    Returns (box predictions with ``experiment, scheme, init, fraction, fold`` columns, per-fold metrics)."""
    settings = settings or TrainingSettings()
    folds = subject_folds(patches, n_splits, settings.seed)
    variants = {PATCH_LOCATION: patches}
    if any(run.location == RANDOM_LOCATION for run in runs):
        variants[RANDOM_LOCATION] = with_random_locations(patches, seed=settings.seed, atlas_dir=atlas_dir)
    jobs = [(fold, run) for fold in range(len(folds)) for run in runs]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="detection CV", unit="model")
    predictions, metrics = [], []
    for fold, run in jobs:
        train, test = folds[fold]
        chosen = annotation_subset(patches.labels, train, run.fraction, seed=settings.seed + fold)
        linear = run.scheme == "linear_readout"
        boxes = variants[run.location]
        result = finetune(
            boxes, chosen, pretrained_path=pretrained_path if run.init == "pretrained" else None,
            freeze_encoder=linear, epochs=settings.epochs_linear if linear else settings.epochs_full,
            lr=settings.lr_linear if linear else settings.lr_full, weight_decay=settings.weight_decay,
            batch_size=settings.batch_size, seed=settings.seed + fold, augment=settings.augment,
            balance_classes=settings.balance_classes, device=settings.device)
        start = time.perf_counter()
        frame = box_predictions(result.network, boxes, test, settings.stride, settings.inference_batch_size)
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
    return pd.concat(predictions, ignore_index=True), pd.DataFrame(metrics)


def summarise(fold_metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean, s.d. and number of folds of F1 / precision / recall per experiment and subtype (tidy, one row
    per experiment x subtype), plus a ``<metric>_text`` column "0.82 ± 0.03"."""
    keys = [k for k in ("experiment", "scheme", "init", "fraction", "location", "subtype") if k in fold_metrics]
    rows = []
    for values, group in fold_metrics.groupby(keys, sort=False):
        row = dict(zip(keys, values))
        for metric in [m for m in METRICS + ("accuracy",) if m in group]:
            column = group[metric].dropna()
            row[f"{metric}_mean"] = float(column.mean()) if len(column) else np.nan
            row[f"{metric}_sd"] = float(column.std(ddof=1)) if len(column) > 1 else np.nan
            row[f"{metric}_n_folds"] = len(column)
            row[f"{metric}_text"] = mean_sd_text(row[f"{metric}_mean"], row[f"{metric}_sd"])
        rows.append(row)
    return pd.DataFrame(rows)


def _patch_location(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows of models routed by the boxes' own locations (Tables 5 and Fig. 5; Table 7 has the others)."""
    return summary[summary["location"] == PATCH_LOCATION] if "location" in summary else summary


def mean_sd_text(mean: float, sd: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.2f} ± {sd:.2f}" if np.isfinite(sd) else f"{mean:.2f}"


def detection_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 5 layout: one row per scheme (all annotations), columns <subtype> F1 / precision / recall."""
    full = _patch_location(summary)
    full = full[full["fraction"] == 1.0]
    rows = []
    for (scheme, init), group in full.groupby(["scheme", "init"], sort=False):
        row = {"scheme": scheme.replace("_", " "), "initialisation": init}
        for subtype in SUBTYPES:
            match = group[group["subtype"] == subtype]
            for metric in METRICS:
                row[f"{subtype} {metric}"] = match[f"{metric}_text"].iloc[0] if len(match) else "n/a"
        rows.append(row)
    return pd.DataFrame(rows)


def efficiency_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Fig. 5 data: F1 mean / s.d. per subtype against the share of annotations (full fine-tuning)."""
    full = _patch_location(summary)
    full = full[full["scheme"] == "full_finetuning"]
    columns = ["init", "fraction", "subtype", "f1_mean", "f1_sd", "f1_n_folds", "f1_text"]
    return full[columns].sort_values(["subtype", "init", "fraction"]).reset_index(drop=True)


def plot_label_efficiency(efficiency: pd.DataFrame, path: str | Path, note: str = "") -> Path:
    """PNG of F1 against the share of annotations: pre-trained (points, ± s.d.) vs scratch with all of them
    (dashed line, band = ± s.d.), one panel per subtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, len(SUBTYPES), figsize=(5 * len(SUBTYPES), 4), squeeze=False)
    for ax, subtype in zip(axes[0], SUBTYPES):
        rows = efficiency[efficiency["subtype"] == subtype]
        pre = rows[rows["init"] == "pretrained"].sort_values("fraction")
        ax.errorbar(100 * pre["fraction"], pre["f1_mean"], yerr=pre["f1_sd"].fillna(0), marker="o", capsize=3,
                    label="DrasCLR pre-trained, fine-tuned")
        scratch = rows[(rows["init"] == "scratch") & (rows["fraction"] == 1.0)]
        if len(scratch) and np.isfinite(scratch["f1_mean"].iloc[0]):
            mean, sd = float(scratch["f1_mean"].iloc[0]), float(np.nan_to_num(scratch["f1_sd"].iloc[0]))
            ax.axhline(mean, color="tab:red", linestyle="--", label="from scratch, 100 % of annotations")
            ax.axhspan(mean - sd, mean + sd, color="tab:red", alpha=0.12)
        ax.set_title(f"{subtype} emphysema")
        ax.set_xlabel("annotations used for training (%)")
        ax.set_ylabel("F1 (mean ± s.d. over folds)")
        ax.set_xlim(0, 105)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if note:
        fig.suptitle(note)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (numbers with 3 decimals)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "n/a" if not np.isfinite(value) else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def run_detection(annotations, prepared_dir: str | Path, pretrained_path: str | Path, output_dir: str | Path,
                  n_splits: int = 5, fractions=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                  settings: TrainingSettings | None = None, cache_path: str | Path | None = None,
                  coordinate_system: str = "RAS", note: str = "", progress: bool = True,
                  random_location: bool = True, atlas_dir: str | Path | None = None) -> dict:
    """The whole evaluation: labelled boxes -> CV of every experiment -> CSV + Markdown tables + Fig. 5 PNG
    in ``output_dir``. Returns the tables and the paths written."""
    from custom.emphysema.labelled_patches import load_labelled_patches

    start = time.perf_counter()
    settings = settings or TrainingSettings()
    output_dir = Path(output_dir)
    patches = load_labelled_patches(annotations, prepared_dir, cache_path, coordinate_system, progress=progress)
    runs = experiments(fractions, random_location=random_location)
    predictions, fold_metrics = cross_validate(patches, pretrained_path, runs, n_splits, settings, progress,
                                               atlas_dir=atlas_dir)
    summary = summarise(fold_metrics)
    table5, efficiency = detection_table(summary), efficiency_table(summary)
    table7 = location_table(fold_metrics) if random_location else None
    folds = predictions.drop_duplicates(["fold", "subject_id"])[["fold", "subject_id"]].sort_values(["fold", "subject_id"])
    paths = {
        "box_predictions": output_dir / "box_predictions.csv", "fold_metrics": output_dir / "fold_metrics.csv",
        "summary": output_dir / "detection_summary.csv", "table": output_dir / "detection_table.csv",
        "table_md": output_dir / "detection_table.md", "efficiency": output_dir / "label_efficiency.csv",
        "efficiency_md": output_dir / "label_efficiency.md", "curve": output_dir / "label_efficiency.png",
        "folds": output_dir / "folds.csv",
    }
    for key, frame in (("box_predictions", predictions), ("fold_metrics", fold_metrics), ("summary", summary),
                       ("table", table5), ("efficiency", efficiency), ("folds", folds)):
        _write_csv(frame, paths[key])
    header = (f"{note}\n\n" if note else "") + (
        f"{len(patches)} boxes from {len(set(patches.subject_ids))} subjects, {predictions['fold'].nunique()} "
        f"subject-grouped folds; rule: positive when >= {BOX_FRACTION:.0%} of the box voxels have p > "
        f"{VOXEL_THRESHOLD} (stride {settings.stride}: {len(box_offsets(settings.stride))} voxels per box). "
        "Mean ± s.d. over folds.\n\n")
    _write_text(paths["table_md"], header + markdown_table(table5))
    _write_text(paths["efficiency_md"], header + markdown_table(efficiency.drop(columns=["f1_text"])))
    plot_label_efficiency(efficiency, paths["curve"], note=note)
    if table7 is not None:
        paths["location_table"] = output_dir / "table7_location_sensitivity.csv"
        paths["location_table_md"] = output_dir / "table7_location_sensitivity.md"
        _write_csv(table7, paths["location_table"])
        shown = table7[["subtype", "random location", "patch location", "p (one-sided t-test)"]]
        _write_text(paths["location_table_md"], header.replace("Mean ± s.d. over folds.", "Linear readout, "
                    "box accuracy (subtype vs healthy boxes), mean ± s.d. over folds.") + markdown_table(shown))
    seconds = time.perf_counter() - start
    logger.info("detection evaluation done in %.0f s; outputs in %s", seconds, output_dir)
    return {"summary": summary, "table": table5, "efficiency": efficiency, "location_table": table7,
            "fold_metrics": fold_metrics,
            "predictions": predictions, "paths": paths, "seconds": seconds}
