"""Paper Fig. 5 of the detection run: F1 of each subtype's binary detector against the share of that subtype's
annotations used for training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from custom.emphysema.detection_rule import SUBTYPES
from custom.figures import save_figure


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
        ax.errorbar(
            100 * pre["fraction"],
            pre["f1_mean"],
            yerr=pre["f1_sd"].fillna(0),
            marker="o",
            capsize=3,
            label="DrasCLR pre-trained, fine-tuned",
        )
        scratch = rows[(rows["init"] == "scratch") & (rows["fraction"] == 1.0)]
        if len(scratch) and np.isfinite(scratch["f1_mean"].iloc[0]):
            mean, sd = float(scratch["f1_mean"].iloc[0]), float(np.nan_to_num(scratch["f1_sd"].iloc[0]))
            ax.axhline(mean, color="tab:red", linestyle="--", label="from scratch, 100 % of annotations")
            ax.axhspan(mean - sd, mean + sd, color="tab:red", alpha=0.12)
        if not np.isfinite(rows["f1_mean"].to_numpy(dtype=float)).any():
            ax.text(
                0.5,
                0.5,
                "no fold could score this subtype\n(see fold_metrics.csv)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
        ax.set_title(f"{subtype} emphysema (vs healthy)")
        ax.set_xlabel(f"{subtype} annotations used for training (%)")
        ax.set_ylabel("F1 (mean ± s.d. over folds)")
        ax.set_xlim(0, 105)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if note:
        fig.suptitle(note)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
