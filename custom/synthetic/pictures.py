"""Pictures of the SYNTHETIC cohort for the docs: a subject's coronal and axial slices with its ground-truth
lesion mask overlaid, and the clinical model's main relations."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from custom.figures import save_figure  # noqa: E402
from custom.synthetic import labels  # noqa: E402

LESION_COLOURS = {
    labels.CENTRILOBULAR: "#ff7f0e",
    labels.PARASEPTAL: "#2ca02c",
    labels.PANLOBULAR: "#9467bd",
    labels.AIRWAY_WALL: "#17becf",
    labels.AIR_TRAPPING: "#8c564b",
    labels.GROUND_GLASS: "#e377c2",
    labels.CONSOLIDATION: "#d62728",
}


def _colour_map() -> ListedColormap:
    colours = ["#000000"] * (max(LESION_COLOURS) + 1)
    for code, colour in LESION_COLOURS.items():
        colours[code] = colour
    return ListedColormap(colours)


def render_subject_files(image_path, label_path, out_png, title: str, window=(-1100.0, -500.0)) -> Path:
    """:func:`render_subject` for a written subject (NIfTI image and lesion map)."""
    image = nib.load(str(image_path))
    hu = np.asarray(image.dataobj, dtype=np.float32)
    lesion = np.asarray(nib.load(str(label_path)).dataobj)
    return render_subject(hu, lesion, np.abs(np.diag(image.affine)[:3]), out_png, title, window)


def render_subject(hu, lesion, spacing, out_png, title: str, window=(-1100.0, -500.0)) -> Path:
    """2x2 panel: coronal and axial lung-window slices, each plain and with the lesion mask overlaid.
    Slices go through the lesion-richest coronal plane and axial level. Displayed in the radiological
    convention (patient's right on the left of the picture; the arrays are (x, y, z) with x to the left)."""
    hu = np.asarray(hu, dtype=np.float32)
    spacing = np.asarray(spacing, dtype=np.float64)
    has = lesion > 0
    if has.any():
        y = int(np.argmax(has.sum(axis=(0, 2))))
        z = int(np.argmax(has.sum(axis=(0, 1))))
    else:
        y, z = hu.shape[1] // 2, hu.shape[2] // 2
    cmap = _colour_map()
    fig, axes = plt.subplots(2, 2, figsize=(10, 10))
    views = [
        ("coronal", hu[:, y, :].T, lesion[:, y, :].T, spacing[2] / spacing[0], "lower"),
        ("axial", hu[:, :, z].T, lesion[:, :, z].T, spacing[1] / spacing[0], "upper"),
    ]
    for row, (name, slice_hu, slice_lesion, aspect, origin) in enumerate(views):
        for col in range(2):
            ax = axes[row, col]
            ax.imshow(slice_hu, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, origin=origin)
            if col == 1:
                masked = np.ma.masked_equal(slice_lesion, 0)
                ax.imshow(
                    masked,
                    cmap=cmap,
                    vmin=0,
                    vmax=cmap.N - 1,
                    alpha=0.55,
                    aspect=aspect,
                    origin=origin,
                    interpolation="nearest",
                )
            ax.set_title(f"{name}{' + lesion mask' if col else ''}", fontsize=10)
            ax.axis("off")
    present = [code for code in LESION_COLOURS if (lesion == code).any()]
    handles = [Patch(color=LESION_COLOURS[c], label=f"{c} {labels.LESION_NAMES[c]}") for c in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=9)
    fig.suptitle(f"SYNTHETIC subject (not a real patient): {title}\nlung window [{window[0]:.0f}, {window[1]:.0f}] HU")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return save_figure(fig, out_png, dpi=80)


def render_clinical_model(table: pd.DataFrame, out_png) -> Path:
    """FEV1pp against emphysema share coloured by GOLD/PRISm, and the CLE visual score distribution."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    stage_colours = {-1: "#7f7f7f", 0: "#2ca02c", 1: "#bcbd22", 2: "#ff7f0e", 3: "#d62728", 4: "#8c1a1a"}
    for stage, colour in stage_colours.items():
        part = table[table["gold"] == stage]
        axes[0].scatter(
            100 * part["emphysema_fraction"],
            part["fev1pp"],
            s=9,
            color=colour,
            label="PRISm" if stage == -1 else f"GOLD {stage}",
        )
    axes[0].set_xlabel("emphysema (% of lung, all subtypes)")
    axes[0].set_ylabel("FEV1 % predicted")
    axes[0].legend(fontsize=8)
    axes[0].set_title("spirometry follows the painted disease")
    counts = table.groupby(["cle_score"]).size()
    axes[1].bar(counts.index, counts.values, color="#ff7f0e")
    axes[1].set_xlabel("CLE visual score")
    axes[1].set_ylabel("subjects")
    axes[1].set_title("CLE visual score distribution")
    fig.suptitle(f"SYNTHETIC clinical model, {len(table)} table-only draws (not real patients)")
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=80)
