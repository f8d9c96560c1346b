"""A picture of a prepared subject: CT, lung mask and mapped landmarks on a coronal and an axial slice.

Prepare writes one into every cache entry (``qc.png``, ``subject_png``: small, what the cohort QC sheet of
``custom.prepare.qc_sheet`` shows); also used for the docs (``bundle/docs/images/prepare_*.png``) and to eyeball a
subject whose QC looks odd. Display follows the radiological habit: patient's right on the left of the image,
anterior / superior up. Landmarks within ``slab_mm`` of the slice are drawn: filled when inside the lung mask,
hollow otherwise. With the subject's QC (``qc``) the title carries its status (coloured) and reasons.
"""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import numpy as np

from custom.data.intensity import HU_MAX, HU_MIN
from custom.figures import save_figure

STATUS_COLOURS = {"ok": "#1a7f37", "warning": "#b35900", "failed": "#c0001a"}


def qc_title(title: str, qc: dict | None) -> tuple:
    """(title text, colour) of a picture: the subject, its QC status and numbers, the reasons."""
    if not qc:
        return title, "black"
    status = qc.get("qc_status", "ok")
    numbers = []
    if qc.get("dice") is not None:
        numbers.append(f"Dice {qc['dice']:.2f}")
    if qc.get("share_inside_lung") is not None:
        atlas = qc.get("atlas_share_inside_lung")
        numbers.append(f"landmarks in lung {qc['share_inside_lung']:.0%}" + (f" (atlas {atlas:.0%})" if atlas else ""))
    if qc.get("slice_mm") is not None:
        numbers.append(f"slices {qc['slice_mm']:g} mm")
    text = f"{title}  [{status.upper()}]  " + ", ".join(numbers)
    reasons = qc.get("qc_reasons") or []
    for reason in reasons[:3]:
        text += "\n" + textwrap.shorten(str(reason), 150, placeholder=" ...")
    return text, STATUS_COLOURS.get(status, "black")


def plot_subject(
    hu: np.ndarray,
    lung: np.ndarray,
    landmarks_vox: np.ndarray,
    title: str,
    out_file: str | Path,
    slab_mm: float = 6.0,
    qc: dict | None = None,
    dpi: int = 90,
) -> Path:
    """Write a two-panel PNG (coronal, axial) of an (x, y, z) LAS 1 mm volume."""
    return save_figure(_subject_figure(hu, lung, landmarks_vox, title, slab_mm, qc, (11, 5.4)), out_file, dpi=dpi)


def subject_png(
    hu: np.ndarray,
    lung: np.ndarray,
    landmarks_vox: np.ndarray,
    title: str,
    qc: dict | None = None,
    slab_mm: float = 6.0,
    dpi: int = 64,
) -> bytes:
    """The picture of ``plot_subject`` as PNG bytes, small (about 576 x 320 pixels): each cache entry's qc.png."""
    import matplotlib.pyplot as plt

    figure = _subject_figure(hu, lung, landmarks_vox, title, slab_mm, qc, (9, 5.0))
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(figure)
    return _small_png(buffer.getvalue())


def _small_png(png: bytes, colours: int = 128) -> bytes:
    """The PNG with a palette of ``colours`` (octree: the status colours survive; about a fifth of the bytes)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        out = io.BytesIO()
        image.convert("RGB").quantize(colors=colours, method=Image.Quantize.FASTOCTREE).save(
            out, format="PNG", optimize=True
        )
    return out.getvalue()


def _subject_figure(hu, lung, landmarks_vox, title, slab_mm, qc, figsize):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inside_lm = landmarks_vox[_inside(landmarks_vox, lung)]
    y_cut = int(np.median(inside_lm[:, 1])) if len(inside_lm) else hu.shape[1] // 2
    z_cut = int(np.median(inside_lm[:, 2])) if len(inside_lm) else hu.shape[2] // 2
    inside = _inside(landmarks_vox, lung)
    fig, axes = plt.subplots(1, 2, figsize=figsize, layout="constrained")
    views = [
        ("coronal", hu[:, y_cut, :], lung[:, y_cut, :], 1, y_cut, (0, 2), "z (superior)"),
        ("axial", hu[:, :, z_cut], lung[:, :, z_cut], 2, z_cut, (0, 1), "y (anterior)"),
    ]
    for ax, (name, image, mask, axis, cut, (u, v), ylabel) in zip(axes, views):
        ax.imshow(image.T, cmap="gray", vmin=HU_MIN, vmax=HU_MAX, origin="lower", interpolation="nearest")
        ax.contour(mask.T.astype(float), levels=[0.5], colors=["#00c8ff"], linewidths=1.0, origin="lower")
        near = np.abs(landmarks_vox[:, axis] - cut) <= slab_mm
        ax.scatter(
            landmarks_vox[near & inside, u],
            landmarks_vox[near & inside, v],
            s=14,
            c="#ffb000",
            edgecolors="k",
            linewidths=0.3,
            label="landmark in lung",
        )
        ax.scatter(
            landmarks_vox[near & ~inside, u],
            landmarks_vox[near & ~inside, v],
            s=14,
            facecolors="none",
            edgecolors="#ff3060",
            linewidths=0.8,
            label="landmark outside lung",
        )
        ax.set_title(f"{name} slice {cut} (landmarks within {slab_mm:g} mm)", fontsize=10)
        ax.set_xlabel("x (patient left)")
        ax.set_ylabel(ylabel)
    axes[1].legend(loc="lower right", fontsize=8, framealpha=0.7)
    text, colour = qc_title(title, qc)
    fig.suptitle(text, fontsize=11 if "\n" not in text else 9, color=colour)
    return fig


def _inside(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    idx = np.rint(points).astype(np.int64)
    valid = np.all((idx >= 0) & (idx < np.asarray(mask.shape)), axis=1)
    out = np.zeros(len(points), dtype=bool)
    out[valid] = mask[idx[valid, 0], idx[valid, 1], idx[valid, 2]] > 0
    return out


def plot_cache_entry(cache_dir: str | Path, subject_id: str, out_file: str | Path, title: str | None = None) -> Path:
    """Picture of a prepared subject: reloads its scan and lung mask the way preparation made them (the scan
    pipeline's ``LoadCTd`` and ``LungMaskd``)."""
    from custom.prepare.transforms import load_scan

    entry = Path(cache_dir) / subject_id
    qc = json.loads((entry / "qc.json").read_text())
    image, lung = load_scan(qc["source"], qc["lung_mask"], axcodes=qc["axcodes"])
    hu = image[0].numpy()
    landmarks = np.load(entry / "landmarks_vox.npy")
    return plot_subject(hu, lung, landmarks, title or subject_id, out_file, qc=qc)
