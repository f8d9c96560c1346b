"""The detection cross-validation's results as the paper lays them out: the tidy summary over folds, Table 5
(scheme x initialisation, F1 / precision / recall per subtype), the Fig. 5 data (F1 against the share of
annotations) and Markdown renderings. Table 7 is ``custom.emphysema.random_location.location_table``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from custom.emphysema.detection_rule import METRICS, SUBTYPES
from custom.emphysema.random_location import PATCH_LOCATION


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


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (numbers with 3 decimals)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "n/a" if not np.isfinite(value) else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"
