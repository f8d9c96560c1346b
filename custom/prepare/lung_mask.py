"""Classical lung segmentation (no downloaded weights): air inside the body, the largest one or two regions.

Registration only needs the lung outline, so a threshold method is enough and runs anywhere:
1. body = the largest connected region above -500 HU, holes filled slice by slice (lungs become "inside");
2. candidates = voxels below -400 HU inside the body, not touching the side faces of the volume
   (the top and bottom faces are allowed: the trachea leaves through the top of most scans);
3. keep the largest region, and the second largest when it is at least 15 % of the first (two separate lungs;
   smaller ones are bowel gas or the airway);
4. fill vessel holes slice by slice. A result under ``min_volume_ml`` means there are no lungs to prepare.
The work runs on a 2 mm copy and is brought back to the 1 mm grid with the threshold applied again, so
vessel-sized detail comes from the full-resolution image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_HU = -500.0
AIR_HU = -400.0
SECOND_LUNG_FRACTION = 0.15
MIN_LUNG_ML = 300.0

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


class NoLungError(ValueError):
    """The scan holds no lung-sized air region inside the body."""


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial (z) slice: vessels inside the lung, the lungs inside the body."""
    return ndimage.binary_fill_holes(mask, structure=_IN_PLANE)


def segment_lungs(
    hu: np.ndarray, spacing_mm: float = 1.0, source: str = "", min_volume_ml: float = MIN_LUNG_ML
) -> np.ndarray:
    """Boolean lung mask of an (x, y, z) HU volume on an isotropic grid (z = axial axis)."""
    step = max(1, int(round(2.0 / spacing_mm)))
    coarse = hu[::step, ::step, ::step]
    voxel_ml = (spacing_mm * step) ** 3 / 1000.0

    body = fill_holes_per_slice(_largest_component(coarse > BODY_HU))
    candidates = (coarse < AIR_HU) & body
    labels, count = ndimage.label(candidates)
    sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
    sizes[0] = 0
    side_faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1]]
    for face in side_faces:
        sizes[np.unique(face)] = 0
    order = np.argsort(sizes)[::-1]
    keep = [order[0]] if count and sizes[order[0]] > 0 else []
    if len(order) > 1 and keep and sizes[order[1]] >= SECOND_LUNG_FRACTION * sizes[order[0]]:
        keep.append(order[1])
    volume_ml = float(sizes[keep].sum()) * voxel_ml
    if volume_ml < min_volume_ml:
        where = f"{source}: " if source else ""
        raise NoLungError(
            f"{where}no lungs found: the largest air region inside the body is {volume_ml:.0f} ml "
            f"(a lung needs at least {min_volume_ml:.0f} ml); is this a chest CT?"
        )
    coarse_lung = fill_holes_per_slice(np.isin(labels, keep))
    coarse_lung = ndimage.binary_closing(coarse_lung, iterations=1)

    if step == 1:
        return coarse_lung
    # back to the full grid: nearest-neighbour upsampling, then refine the border with the full-res threshold
    lung = coarse_lung
    for axis in range(3):
        lung = np.repeat(lung, step, axis=axis)
    lung = lung[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    pad = [(0, hu.shape[a] - lung.shape[a]) for a in range(3)]
    if any(p[1] for p in pad):
        lung = np.pad(lung, pad, mode="edge")
    grown = ndimage.binary_dilation(lung, iterations=1)
    lung = grown & (hu < AIR_HU)
    return fill_holes_per_slice(lung)
