"""The detection cross-validation's results as the paper lays them out: the tidy summary over folds, Table 5
(per subtype its four rows: Patch LAA and DrasCLR under linear readout, from scratch and DrasCLR under full
fine-tuning; F1 / precision / recall), the Fig. 5 data (F1 against the share of annotations) and Markdown
renderings. Table 7 is ``custom.emphysema.random_location.location_table``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from custom.emphysema.detection_rule import METRICS, SUBTYPES
from custom.emphysema.random_location import PATCH_LOCATION

# Table 5 rows per subtype, in the paper's order: (scheme, initialisation, task, model as the table names it)
TABLE5_ROWS = (
    ("patch_laa", "none", "binary", "Patch LAA (logistic regression)"),
    ("linear_readout", "pretrained", "binary", "DrasCLR (ours)"),
    ("full_finetuning", "scratch", "binary", "patch-based CNN from scratch"),
    ("full_finetuning", "pretrained", "binary", "DrasCLR (ours)"),
)
# extra rows, not the paper's: shown when the run has them
EXTRA_ROWS = (("full_finetuning", "pretrained", "multiclass", "DrasCLR, one 3-class softmax (extra, not the paper's)"),)
SCHEME_NAMES = {
    "patch_laa": "linear readout",
    "linear_readout": "linear readout",
    "full_finetuning": "full fine-tuning",
}


def summarise(fold_metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean, s.d. and number of folds of F1 / precision / recall (and accuracy) per experiment and subtype (tidy,
    one row per experiment x subtype), a ``<metric>_text`` column "0.82 ± 0.03", and the mean numbers of training
    boxes."""
    keys = [k for k in ("experiment", "scheme", "init", "fraction", "location", "task", "subtype") if k in fold_metrics]
    rows = []
    for values, group in fold_metrics.groupby(keys, sort=False):
        row = dict(zip(keys, values))
        for metric in [m for m in METRICS + ("accuracy",) if m in group]:
            column = group[metric].dropna()
            row[f"{metric}_mean"] = float(column.mean()) if len(column) else np.nan
            row[f"{metric}_sd"] = float(column.std(ddof=1)) if len(column) > 1 else np.nan
            row[f"{metric}_n_folds"] = len(column)
            row[f"{metric}_text"] = mean_sd_text(row[f"{metric}_mean"], row[f"{metric}_sd"])
        for count in ("n_train_boxes", "n_train_positive"):
            if count in group:
                row[f"{count}_mean"] = float(group[count].mean())
        if "status" in group:
            row["folds_trained"] = int((group["status"] == "ok").sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _patch_location(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows of models routed by the boxes' own locations (Tables 5 and Fig. 5; Table 7 has the others)."""
    return summary[summary["location"] == PATCH_LOCATION] if "location" in summary else summary


def _task(summary: pd.DataFrame, task: str = "binary") -> pd.DataFrame:
    return summary[summary["task"] == task] if "task" in summary else summary


def mean_sd_text(mean: float, sd: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.2f} ± {sd:.2f}" if np.isfinite(sd) else f"{mean:.2f}"


def detection_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 5, long layout: per subtype (of the summary) its four paper rows (``TABLE5_ROWS``; "not run" when the
    run did not have one) and any ``EXTRA_ROWS`` it had, with F1 / precision / recall (mean ± s.d. over the folds
    that define them) and the number of folds with an F1."""
    full = _patch_location(summary)
    full = full[full["fraction"] == 1.0]
    subtypes = [s for s in SUBTYPES if s in set(full["subtype"])]
    rows = []
    for subtype in subtypes:
        mine = full[full["subtype"] == subtype]
        for (scheme, init, task, model), paper in [(r, True) for r in TABLE5_ROWS] + [(r, False) for r in EXTRA_ROWS]:
            match = mine[(mine["scheme"] == scheme) & (mine["init"] == init)]
            if "task" in match:
                match = match[match["task"] == task]
            elif task != "binary":
                match = match.iloc[:0]
            if not len(match) and not paper:
                continue
            row = {"subtype": subtype, "scheme": SCHEME_NAMES[scheme], "model": model}
            for metric in METRICS:
                row[metric] = match[f"{metric}_text"].iloc[0] if len(match) else "not run"
            row["folds"] = int(match["f1_n_folds"].iloc[0]) if len(match) else 0
            rows.append(row)
    return pd.DataFrame(rows, columns=["subtype", "scheme", "model", *METRICS, "folds"])


def efficiency_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Fig. 5 data: per subtype, F1 mean / s.d. of its binary detector (full fine-tuning) against the share of
    annotations, pre-trained and from scratch, with the mean numbers of training boxes."""
    full = _task(_patch_location(summary))
    full = full[full["scheme"] == "full_finetuning"]
    columns = ["init", "fraction", "subtype", "f1_mean", "f1_sd", "f1_n_folds", "f1_text"]
    columns += [c for c in ("n_train_positive_mean", "n_train_boxes_mean") if c in full]
    return full[columns].sort_values(["subtype", "init", "fraction"]).reset_index(drop=True)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (numbers with 3 significant digits)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "n/a" if not np.isfinite(value) else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"
