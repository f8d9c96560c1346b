"""Saving matplotlib figures: one place that writes a picture atomically and frees the figure.

Pictures are written by long batch jobs (preparation QC, maps, evaluation); a job killed mid-write must not
leave a truncated PNG, and a figure left open keeps its memory for the rest of the run.
"""

from __future__ import annotations

from pathlib import Path

from custom.atomic_io import atomic_path


def save_figure(figure, path: str | Path, dpi: int = 110, tight: bool = False) -> Path:
    """Write ``figure`` to ``path`` (format from the suffix; parent folders created), then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=dpi, bbox_inches="tight" if tight else None)
    finally:
        plt.close(figure)
    return path
