"""Pictures of an emphysema map in the style of the paper's Fig. 3: lung in blue, emphysema in red (one shade per
subtype), over the CT in the window [-1060, -825] HU that makes low attenuation visible.

Two figures per scan: coronal slices evenly spaced through the lung, and a coronal projection (per pixel, the
share of the lung depth along the anterior-posterior line that is emphysema of each subtype).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from custom.emphysema.network import HEALTHY_LABEL, MAP_LABELS, SUBTYPE_LABELS  # noqa: E402
from custom.figures import save_figure  # noqa: E402

WINDOW_HU = (-1060.0, -825.0)
LUNG_BLUE = "#3b6fd8"
SUBTYPE_REDS = ("#ff2020", "#9c0a0a")  # centrilobular, paraseptal
# one colour per map label (``MAP_LABELS``): background clear, healthy lung blue, subtypes red
LABEL_COLOURS = {0: (0, 0, 0, 0), HEALTHY_LABEL: LUNG_BLUE, **dict(zip(SUBTYPE_LABELS.values(), SUBTYPE_REDS))}


def _overlay_image(lung_2d: np.ndarray, labels_2d: np.ndarray) -> np.ndarray:
    """(H, W) map labels to draw: the map's own labels, healthy lung wherever ``lung`` says lung but the map
    says background (a map cut to another lung mask)."""
    return np.where(lung_2d & (labels_2d == 0), HEALTHY_LABEL, labels_2d)


def _colours() -> ListedColormap:
    return ListedColormap([LABEL_COLOURS[code] for code in range(len(MAP_LABELS))])


def _legend():
    return [Patch(color=LABEL_COLOURS[code], label=f"{code} {MAP_LABELS[code]}") for code in range(1, len(MAP_LABELS))]


def _titles(fig, title: str, warning: str | None) -> None:
    """The title, and under a warning (e.g. a model trained on synthetic data) a red banner across the top."""
    if warning:
        fig.suptitle(f"{title}\n{warning.upper()}", fontsize=10, color="#c00000", fontweight="bold")
    else:
        fig.suptitle(title, fontsize=10)


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=110, tight=True)


def coronal_slices(
    hu: np.ndarray,
    lung: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    title: str = "",
    num_slices: int = 4,
    alpha: float = 0.45,
    warning: str | None = None,
) -> Path:
    """Coronal slices (fixed y) of a (x, y, z) LAS-grid scan; patient right on the viewer's left, head up."""
    lung = np.asarray(lung, dtype=bool)
    ys = np.nonzero(lung.any(axis=(0, 2)))[0]
    picks = np.linspace(ys[0], ys[-1], num_slices + 2)[1:-1].round().astype(int) if len(ys) else [hu.shape[1] // 2]
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.6))
    for ax, y in zip(np.atleast_1d(axes), picks):
        ax.imshow(hu[:, y, :].T, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], origin="lower")
        ax.imshow(
            _overlay_image(lung[:, y, :], labels[:, y, :]).T,
            cmap=_colours(),
            vmin=0,
            vmax=len(MAP_LABELS) - 1,
            alpha=alpha,
            origin="lower",
            interpolation="nearest",
        )
        ax.set_title(f"coronal y={y}", fontsize=9)
        ax.axis("off")
    fig.legend(handles=_legend(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    _titles(fig, title, warning)
    return _save(fig, Path(path))


def coronal_projection(
    lung: np.ndarray, labels: np.ndarray, path: str | Path, title: str = "", warning: str | None = None
) -> Path:
    """Coronal projection: lung depth in blue, per subtype the share of that depth that is emphysema in red."""
    lung = np.asarray(lung, dtype=bool)
    depth = lung.sum(axis=1).astype(np.float64)
    fig, axes = plt.subplots(1, len(SUBTYPE_LABELS), figsize=(4.0 * len(SUBTYPE_LABELS), 4.2))
    for ax, code in zip(np.atleast_1d(axes), SUBTYPE_LABELS.values()):
        colour = LABEL_COLOURS[code]
        share = np.divide((labels == code).sum(axis=1), depth, out=np.zeros_like(depth), where=depth > 0)
        ax.imshow(np.where(depth > 0, 1.0, np.nan).T, cmap=ListedColormap([LUNG_BLUE]), origin="lower", alpha=0.35)
        red = ListedColormap([colour])
        ax.imshow(
            np.where(share > 0, 1.0, np.nan).T, cmap=red, origin="lower", alpha=np.clip(0.25 + 3.0 * share, 0, 1).T
        )
        ax.set_title(f"{code} {MAP_LABELS[code]}: {100.0 * (labels == code)[lung].mean():.2f} % of lung", fontsize=9)
        ax.axis("off")
    fig.legend(handles=_legend(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    _titles(fig, title, warning)
    return _save(fig, Path(path))
