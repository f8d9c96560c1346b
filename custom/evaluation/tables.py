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
    results: pd.DataFrame,
    rows: Sequence[str],
    columns: Sequence[tuple[str, str]],
    labels: dict,
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
            cells[f"t = {int(r['percentile'])}th ({r['horizon_years']:.1f} y)"] = format_value(
                r["concordance"], r["standard_error"], "concordance"
            ) + notes.mark(note)
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


def write_table(
    table: pd.DataFrame, stem: str | Path, title: str, footnotes: Sequence[str] = (), caption: str = ""
) -> tuple[Path, Path]:
    """``<stem>.csv`` (the cells as shown) and ``<stem>.md`` (with title and footnotes), written atomically.
    The full notes and unrounded numbers are in the workflow's long-format result files."""
    stem = Path(stem)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown(table, title, footnotes, caption))
    return csv_path, md_path


def parse_columns(columns) -> list[tuple[str, str]]:
    """'target:metric' strings -> (target, metric) pairs."""
    pairs = []
    for item in columns:
        target, _, metric = str(item).partition(":")
        pairs.append((target, metric or "accuracy"))
    return pairs


def _strict(spec, allowed: set, required: set, what: str) -> dict:
    """A config mapping with only the ``allowed`` keys (and every ``required`` one); others are an error."""
    spec = dict(spec or {})
    unknown, missing = sorted(set(spec) - allowed), sorted(required - set(spec))
    if unknown or missing:
        raise ValueError(
            f"{what}: "
            + "; ".join(
                ([f"unknown setting(s) {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])
            )
            + f" (it takes {sorted(allowed)})"
        )
    return spec


SURVIVAL_TITLE = "Table 3: time-dependent concordance C(t) ± bootstrap s.e., Cox model with the five confounders"
SEVERITY_TITLE = "Table 4: COVID-like severity grade, linear readout of the frozen encoder (5-fold CV)"


class TableWriter:
    """Every table of the evaluation as CSV + Markdown under ``out_dir``.

    ``layouts``: readout tables, stem -> {title, rows, columns}: rows are feature sets (a list, a mapping shown
    name -> feature set, or null = all available; rows not available are left out), columns ``target:metric``.
    ``external``: tables another workflow wrote (the emphysema detection's Tables 5 and 7), stem -> {path, title},
    shown when their file exists. ``caption`` goes above every computed table (the synthetic-data warning)."""

    def __init__(
        self, out_dir: str | Path, layouts: dict | None = None, external: dict | None = None, caption: str = ""
    ):
        self.out_dir = Path(out_dir)
        self.layouts = {
            stem: _strict(spec, {"title", "rows", "columns"}, {"columns"}, f"table {stem!r}")
            for stem, spec in (layouts or {}).items()
        }
        self.external = {
            stem: _strict(spec, {"path", "title"}, {"path"}, f"table {stem!r}")
            for stem, spec in (external or {}).items()
        }
        self.caption = caption or ""

    def _emit(self, blocks: list, display: pd.DataFrame, stem: str, title: str, footnotes, caption: str) -> None:
        write_table(display, self.out_dir / stem, title, footnotes, caption)
        blocks.append(markdown(display, title, footnotes, caption))

    def write(
        self,
        readouts: pd.DataFrame,
        labels: dict,
        survival: pd.DataFrame | None = None,
        severity: pd.DataFrame | None = None,
        severity_labels: dict | None = None,
        notes=None,
    ) -> list[str]:
        """Write the tables the results allow; returns their Markdown blocks in table order (and writes them all
        to ``all_tables.md``)."""
        blocks: list[str] = []
        available = list(dict.fromkeys(readouts["feature_set"])) if len(readouts) else []
        for stem, layout in self.layouts.items():
            wanted = layout.get("rows") or available
            shown = {v: k for k, v in wanted.items()} if isinstance(wanted, dict) else {}
            rows = [r for r in (wanted.values() if isinstance(wanted, dict) else wanted) if r in available]
            if not rows:
                notes.add(f"{stem} not written: none of its rows {list(wanted)} is an available feature set")
                continue
            display, footnotes = readout_table(readouts, rows, parse_columns(layout["columns"]), labels, shown)
            self._emit(blocks, display, stem, layout.get("title", stem), footnotes, self.caption)
        if survival is not None and len(survival):
            display, footnotes = survival_table(survival)
            self._emit(blocks, display, "table3_survival", SURVIVAL_TITLE, footnotes, self.caption)
        if severity is not None and len(severity):
            rows = list(dict.fromkeys(severity["feature_set"]))
            name = next(iter(severity["target"]))
            display, footnotes = readout_table(
                severity, rows, [(name, "accuracy"), (name, "one_off")], severity_labels or {}
            )
            self._emit(blocks, display, "table4_covid_severity", SEVERITY_TITLE, footnotes, self.caption)
        for stem, spec in self.external.items():
            path, title = spec["path"], spec.get("title", stem)
            if not path or not Path(path).is_file():
                notes.add(
                    f"{stem} not written: no results file ({path}); it comes from the emphysema detection " "workflow"
                )
                continue
            self._emit(blocks, pd.read_csv(path), stem, title, [f"source: {path}"], "")
        with atomic_path(self.out_dir / "all_tables.md") as tmp:
            tmp.write_text("\n".join(blocks))
        return blocks
