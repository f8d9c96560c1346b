"""Damaged versions of a good scan, to calibrate and test the anatomy QC (``custom.prepare.anatomy_qc``).

The damage is what goes wrong with real inputs, made on the scan's own voxel grid (as read, oriented to the
atlas's axis codes, before any resampling) and written as NIfTI:
- ``cut``: the field of view ends inside the lungs (slices removed below / above a height);
- ``flip``: the voxel data mirrored along one axis while the header stays (a wrong slice order or direction);
- ``thicken``: thick slices, each the mean of the signal over its own thickness (as a thick reconstruction
  averages), every ``slice_mm`` along the head-feet axis.
Heights are world z (RAS mm, superior positive); ``lung_heights`` finds the lung base and apex on a lung mask.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from custom.prepare.io import load_oriented


def read_scan(path: str | Path, axcodes: str = "LAS") -> tuple:
    """(array (x, y, z) float32 on the input's own grid oriented to ``axcodes``, RAS affine)."""
    return load_oriented(path, axcodes)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, mask: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.asarray(array) > 0).astype(np.uint8) if mask else np.clip(np.rint(array), -1024, 3071).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64)), str(path))
    return path


def _z_axis(affine: np.ndarray) -> int:
    return int(np.argmax(np.abs(np.asarray(affine)[2, :3])))


def slice_heights(affine: np.ndarray, shape) -> np.ndarray:
    """World z (mm) of every index along the grid's head-feet axis."""
    axis = _z_axis(affine)
    return affine[2, axis] * np.arange(shape[axis]) + affine[2, 3]


def lung_heights(lung: np.ndarray, affine: np.ndarray, apex_share: float = 0.02) -> tuple:
    """(base, apex) world z of a lung mask: the lowest slice with lung, and the highest whose lung cross-section
    is at least ``apex_share`` of the largest (so the trachea above the apices does not count)."""
    axis = _z_axis(affine)
    area = np.asarray(lung > 0).sum(axis=tuple(a for a in range(3) if a != axis)).astype(np.float64)
    z = slice_heights(affine, lung.shape)
    present = np.nonzero(area > 0)[0]
    big = np.nonzero(area >= apex_share * area.max())[0]
    return float(z[present].min()), float(z[big].max())


def cut(array: np.ndarray, affine: np.ndarray, below_mm: float | None = None, above_mm: float | None = None):
    """Keep only slices with world z >= ``below_mm`` and <= ``above_mm``; returns (array, affine)."""
    axis = _z_axis(affine)
    z = slice_heights(affine, array.shape)
    keep = np.ones(len(z), dtype=bool)
    if below_mm is not None:
        keep &= z >= below_mm
    if above_mm is not None:
        keep &= z <= above_mm
    index = np.nonzero(keep)[0]
    if len(index) < 2:
        raise ValueError("the cut leaves fewer than two slices")
    lo, hi = int(index.min()), int(index.max()) + 1
    out = np.take(array, np.arange(lo, hi), axis=axis)
    shift = np.eye(4)
    shift[axis, 3] = lo
    return out, affine @ shift


def flip(array: np.ndarray, axis: int) -> np.ndarray:
    """The voxel data mirrored along ``axis``; the header (affine) is kept by the caller."""
    return np.ascontiguousarray(np.flip(array, axis))


def thicken(array: np.ndarray, affine: np.ndarray, slice_mm: float, mask: bool = False):
    """Slices ``slice_mm`` apart along the head-feet axis, each the mean over ``slice_mm`` of the signal
    (linear at 1 mm first); a mask is averaged and thresholded at 0.5. Returns (array, affine)."""
    axis = _z_axis(affine)
    spacing = float(np.linalg.norm(affine[:3, axis]))
    n = array.shape[axis]
    fine_pos = np.arange(0.0, (n - 1) * spacing + 1e-6, 1.0) / spacing  # 1 mm samples, in input indices
    lo = np.floor(fine_pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (fine_pos - lo).reshape([-1 if a == axis else 1 for a in range(3)])
    data = np.asarray(array, dtype=np.float32)
    fine = np.take(data, lo, axis=axis) * (1 - w) + np.take(data, hi, axis=axis) * w
    width = max(1, int(round(slice_mm)))
    count = fine.shape[axis] // width
    fine = np.take(fine, np.arange(count * width), axis=axis)
    shape = list(fine.shape)
    shape[axis : axis + 1] = [count, width]
    thick = fine.reshape(shape).mean(axis=axis + 1)
    if mask:
        thick = (thick >= 0.5).astype(np.uint8)
    out = np.eye(4)
    out[:3, :3] = affine[:3, :3]
    out[:3, axis] = affine[:3, axis] / spacing * width
    out[:3, 3] = affine[:3, 3] + affine[:3, axis] / spacing * (width - 1) / 2.0  # centre of the first slab
    return thick, out


__all__ = ["cut", "flip", "lung_heights", "read_scan", "slice_heights", "thicken", "write_nifti"]
