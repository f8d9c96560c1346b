"""Figures of the evaluation: emphysema fraction by GOLD stage (paper Fig. 4) and the label-efficiency curve
(paper Fig. 5). Written as PNG with matplotlib's non-interactive backend, atomically.

``FractionByGold`` and ``LabelEfficiencyPlot`` are the config components (``evaluate.yaml``:
``detection#detected_fractions``, ``detection#label_efficiency``) that read their inputs and draw them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from custom.evaluation.baselines import LAA  # noqa: E402
from custom.figures import save_figure  # noqa: E402
from custom.subject_table import read_subject_table, require_columns  # noqa: E402


def gold_stage_name(gold) -> str:
    return "PRISm" if int(gold) == -1 else f"GOLD {int(gold)}"


def _save(figure, path: Path) -> Path:
    return save_figure(figure, path, dpi=120, tight=True)


def fraction_by_gold(
    table: pd.DataFrame,
    columns: Sequence[str],
    titles: Sequence[str],
    path: str | Path,
    gold_column: str = "gold",
    suptitle: str = "",
) -> Path:
    """One box plot per column of ``table`` (per-subject fractions in %), subjects grouped by GOLD stage."""
    stages = sorted(table[gold_column].dropna().astype(int).unique(), key=lambda g: (g != -1, g))
    figure, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.6), squeeze=False)
    for ax, column, title in zip(axes[0], columns, titles):
        groups = [table.loc[table[gold_column] == g, column].dropna().to_numpy() for g in stages]
        ax.boxplot(groups, showfliers=False)
        ax.set_xticks(range(1, len(stages) + 1), [gold_stage_name(g) for g in stages])
        for i, values in enumerate(groups, start=1):  # every subject as a dot: demo cohorts are small
            ax.plot(
                np.full(len(values), i) + np.linspace(-0.08, 0.08, max(len(values), 1))[: len(values)],
                values,
                "o",
                ms=3,
                alpha=0.7,
                color="tab:blue",
            )
        ax.set_title(title)
        ax.set_ylabel("% of lung")
        ax.tick_params(axis="x", rotation=30)
    if suptitle:
        figure.suptitle(suptitle)
    return _save(figure, Path(path))


def label_efficiency(
    table: pd.DataFrame,
    path: str | Path,
    x: str,
    y: str,
    hue: str,
    yerr: str | None = None,
    panel: str | None = None,
    ylabel: str = "F1",
) -> Path:
    """Metric against the share of annotations used, one line per ``hue`` value (e.g. pre-trained vs random
    initialisation), one panel per ``panel`` value (e.g. emphysema subtype)."""
    panels = sorted(table[panel].unique()) if panel else [None]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        block = table if name is None else table[table[panel] == name]
        for label, line in block.groupby(hue, sort=True):
            line = line.sort_values(x)
            err = line[yerr] if yerr and yerr in line else None
            ax.errorbar(line[x], line[y], yerr=err, marker="o", capsize=3, label=str(label))
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(ylabel)
        if name is not None:
            ax.set_title(str(name))
        ax.legend()
    return _save(figure, Path(path))


# ---------------------------------------------------------------- the figure components of evaluate.yaml


class FractionByGold:
    """Paper Fig. 4: per-subject emphysema shares by GOLD stage. Panels: the detected shares of ``path`` (one row
    per subject: subject_id + ``columns``, in ``unit`` percent or fraction; the emphysema maps' report) when it
    exists, and always the LAA-950 baseline when the cohort has it (labelled as the density threshold)."""

    def __init__(
        self,
        path: str | Path | None = None,
        columns: Sequence[str] | None = None,
        unit: str = "percent",
        gold_column: str = "gold",
        file_name: str = "fraction_by_gold.png",
    ):
        if unit not in ("percent", "fraction"):
            raise ValueError(f"unit must be 'percent' or 'fraction', got {unit!r}")
        self.path, self.columns, self.unit = path, None if columns is None else list(columns), unit
        self.gold_column, self.file_name = gold_column, file_name

    def draw(self, out_dir: Path, cohort, notes) -> Path | None:
        clinical = cohort.clinical
        if self.gold_column not in clinical.columns:
            notes.add(f"emphysema by GOLD stage not drawn: the clinical table has no {self.gold_column!r} column")
            return None
        table, panels, titles = clinical[[self.gold_column]], [], []
        if self.path and Path(self.path).is_file():
            detected = read_subject_table(self.path, "detected emphysema fractions")
            columns = self.columns or [c for c in detected.columns if c.endswith("_pct")]
            require_columns(detected, columns, self.path)
            scale = 1.0 if self.unit == "percent" else 100.0
            table = table.join(scale * detected[columns].astype(float), how="inner")
            panels += columns
            titles += ["detected " + re.sub(r"^lung_|_pct$|_fraction$", "", c).replace("_", " ") for c in columns]
        elif self.path:
            notes.add(f"detected emphysema box plot: {self.path} not found (emphysema detection writes it)")
        if LAA in cohort.sets:
            table = table.join(cohort.sets[LAA].rename(columns=lambda c: "LAA-950 %"), how="inner")
            panels.append("LAA-950 %")
            titles.append("LAA-950 (density threshold, not the detector)")
        if not panels:
            return None
        return fraction_by_gold(
            table,
            panels,
            titles,
            Path(out_dir) / self.file_name,
            gold_column=self.gold_column,
            suptitle="Emphysema by GOLD stage",
        )


class LabelEfficiencyPlot:
    """Paper Fig. 5 from the detection run's ``label_efficiency.csv`` (``path``): ``y`` (± ``yerr``) against
    ``x``, one line per ``hue``, one panel per ``panel``. Skipped with a note until that file exists."""

    def __init__(
        self,
        path: str | Path | None = None,
        x: str = "fraction",
        y: str = "f1_mean",
        hue: str = "init",
        yerr: str | None = None,
        panel: str | None = None,
        ylabel: str = "F1",
        file_name: str = "label_efficiency.png",
    ):
        self.path, self.x, self.y, self.hue, self.yerr, self.panel = path, x, y, hue, yerr, panel
        self.ylabel, self.file_name = ylabel, file_name

    def draw(self, out_dir: Path, cohort, notes) -> Path | None:
        if not (self.path and Path(self.path).is_file()):
            notes.add(
                f"label-efficiency curve not drawn: no results file ({self.path}); "
                "the emphysema detection workflow writes it"
            )
            return None
        curve = pd.read_csv(self.path)
        require_columns(curve, [k for k in (self.x, self.y, self.hue, self.yerr, self.panel) if k], self.path)
        return label_efficiency(
            curve, Path(out_dir) / self.file_name, self.x, self.y, self.hue, self.yerr, self.panel, self.ylabel
        )
