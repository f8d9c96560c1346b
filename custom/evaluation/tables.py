"""Result tables laid out like the paper's Tables 2-8, written as CSV (for programs) and Markdown (for people).

Cells read "mean ± s.d." over cross-validation folds (R² and concordance with two decimals, accuracies in
percent with one). A cell that could not be computed reads "n/a"; a bracketed number points to a footnote
under the table with the reason, or with how the cross-validation was adapted to a small cohort (fewer folds,
classes missing from some folds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from custom.atomic_io import atomic_path

METRIC_HEADERS = {"r2": "R²", "accuracy": "% acc.", "one_off": "1-off %", "concordance": "C"}
PERCENT_METRICS = ("accuracy", "one_off")


def format_value(mean: float, sd: float, metric: str) -> str:
    """'0.63 ± 0.01' (R², C) or '65.0 ± 0.6' (accuracies in percent); s.d. omitted when undefined."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    scale, digits = (100.0, 1) if metric in PERCENT_METRICS else (1.0, 2)
    text = f"{mean * scale:.{digits}f}"
    if sd is not None and math.isfinite(sd):
        text += f" ± {sd * scale:.{digits}f}"
    return text


class Footnotes:
    """Numbered, de-duplicated footnotes of one table."""

    def __init__(self):
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if not text:
            return ""
        if text not in self.texts:
            self.texts.append(text)
        return f" [{self.texts.index(text) + 1}]"

    def lines(self) -> list[str]:
        return [f"[{i + 1}] {t}" for i, t in enumerate(self.texts)]


def readout_table(
    results: pd.DataFrame, rows: Sequence[str], columns: Sequence[tuple[str, str]], labels: dict,
    shown_names: dict | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Rows = feature sets (shown as ``shown_names[set]`` when given), columns = (target, metric) pairs, from the
    long readout results (one row per feature_set, target, metric with mean, sd, status, note)."""
    notes = Footnotes()
    index = results.set_index(["feature_set", "target", "metric"])
    body = []
    for row in rows:
        cells = {"Method": (shown_names or {}).get(row, row)}
        for target, metric in columns:
            header = f"{labels.get(target, target)} ({METRIC_HEADERS.get(metric, metric)})"
            if (row, target, metric) not in index.index:
                cells[header] = "n/a" + notes.mark(f"{labels.get(target, target)}: not evaluated for this set")
                continue
            r = index.loc[(row, target, metric)]
            note = f"{labels.get(target, target)}: {r['note']}" if isinstance(r["note"], str) and r["note"] else ""
            cells[header] = format_value(r["mean"], r["sd"], metric) + notes.mark(note)
        body.append(cells)
    return pd.DataFrame(body), notes.lines()


def survival_table(results: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Table 3: group (Imaging / Clinical / Imaging + Clinical), method, C(t) ± s.e. at each percentile."""
    notes = Footnotes()
    body = []
    for (group, name), block in results.groupby(["group", "feature_row"], sort=False):
        cells = {"Feature": group, "Method": name}
        for _, r in block.sort_values("percentile").iterrows():
            note = r["note"] if isinstance(r["note"], str) else ""
            cells[f"t = {int(r['percentile'])}th ({r['horizon_years']:.1f} y)"] = (
                format_value(r["concordance"], r["standard_error"], "concordance") + notes.mark(note)
            )
        body.append(cells)
    return pd.DataFrame(body), notes.lines()


def markdown(table: pd.DataFrame, title: str, footnotes: Sequence[str] = (), caption: str = "") -> str:
    """A GitHub-flavoured Markdown table with a title, an optional caption and footnotes."""
    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    lines = [f"### {title}", ""]
    if caption:
        lines += [caption, ""]
    lines += [header, rule]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    if footnotes:
        lines += [""] + [f"{f}  " for f in footnotes]
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, stem: str | Path, title: str, footnotes: Sequence[str] = (),
                caption: str = "") -> tuple[Path, Path]:
    """``<stem>.csv`` (the cells as shown) and ``<stem>.md`` (with title and footnotes), written atomically.
    The full notes and unrounded numbers are in the workflow's long-format result files."""
    stem = Path(stem)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown(table, title, footnotes, caption))
    return csv_path, md_path
