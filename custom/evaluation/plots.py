"""Figures of the evaluation: emphysema fraction by GOLD stage (paper Fig. 4) and the label-efficiency curve
(paper Fig. 5). Written as PNG with matplotlib's non-interactive backend, atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from custom.figures import save_figure


def gold_stage_name(gold) -> str:
    return "PRISm" if int(gold) == -1 else f"GOLD {int(gold)}"


def _save(figure, path: Path) -> Path:
    return save_figure(figure, path, dpi=120, tight=True)


def fraction_by_gold(
    table: pd.DataFrame, columns: Sequence[str], titles: Sequence[str], path: str | Path, gold_column: str = "gold",
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
            ax.plot(np.full(len(values), i) + np.linspace(-0.08, 0.08, max(len(values), 1))[: len(values)], values,
                    "o", ms=3, alpha=0.7, color="tab:blue")
        ax.set_title(title)
        ax.set_ylabel("% of lung")
        ax.tick_params(axis="x", rotation=30)
    if suptitle:
        figure.suptitle(suptitle)
    return _save(figure, Path(path))


def label_efficiency(
    table: pd.DataFrame, path: str | Path, x: str, y: str, hue: str, yerr: str | None = None,
    panel: str | None = None, ylabel: str = "F1",
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
