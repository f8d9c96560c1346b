"""Emphysema box annotations of the SYNTHETIC cohort, made the way COPDGene's were: a reader clicks the
centre of a region of one subtype and a fixed 32 mm box is drawn around it (paper section 4.1.1). Healthy
boxes come from GOLD-0 subjects without emphysema. Centres are where the subtype is densest (greedy, boxes do
not overlap), so every box really contains its subtype.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from custom.synthetic import labels

BOX_MM = 32.0
ANNOTATION_COLUMNS = [
    "subject_id",
    "label",
    "centre_x",
    "centre_y",
    "centre_z",
    "centre_x_mm",
    "centre_y_mm",
    "centre_z_mm",
    "size_mm",
    "atlas_x",
    "atlas_y",
    "atlas_z",
    "share_in_box",
]


def box_voxels(spacing) -> np.ndarray:
    """Box edge in voxels (odd, so it has a centre voxel)."""
    size = np.maximum(np.round(BOX_MM / np.asarray(spacing, dtype=np.float64)), 1).astype(int)
    return size + (size % 2 == 0)


def densest_boxes(
    share: np.ndarray, allowed: np.ndarray, spacing, max_boxes: int, min_share: float
) -> list[tuple[np.ndarray, float]]:
    """Greedy non-overlapping box centres where the box-mean of ``share`` is highest (>= ``min_share``)."""
    size = box_voxels(spacing)
    density = ndimage.uniform_filter(share.astype(np.float32), size=size, mode="constant")
    density[~allowed] = 0.0
    picked = []
    for _ in range(max_boxes):
        flat = int(np.argmax(density))
        best = float(density.flat[flat])
        if best < min_share:
            break
        centre = np.array(np.unravel_index(flat, density.shape))
        picked.append((centre, best))
        lo = np.maximum(centre - size + 1, 0)
        hi = centre + size
        density[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 0.0  # next box must not overlap this one
    return picked


def lesion_boxes(lesion: np.ndarray, lung: np.ndarray, code: int, spacing, max_boxes: int, min_share: float = 0.04):
    """Boxes centred on the densest regions of subtype ``code`` (centre voxel inside the lung)."""
    return densest_boxes(lesion == code, lung & (lesion == code), spacing, max_boxes, min_share)


def healthy_boxes(rng: np.random.Generator, lesion: np.ndarray, lung: np.ndarray, spacing, max_boxes: int):
    """Boxes mostly in lung with no emphysema anywhere inside, at random places."""
    emphysema = np.isin(lesion, labels.EMPHYSEMA_CODES)
    size = box_voxels(spacing)
    lung_share = ndimage.uniform_filter(lung.astype(np.float32), size=size, mode="constant")
    emph_share = ndimage.uniform_filter(emphysema.astype(np.float32), size=size, mode="constant")
    ok = lung & (lung_share >= 0.6) & (emph_share == 0.0)
    # random priority instead of density: a random field keeps the picks spread and reproducible
    priority = rng.random(lung.shape, dtype=np.float32) * ok + 1e-3 * ok
    out = []
    for _ in range(max_boxes):
        flat = int(np.argmax(priority))
        if priority.flat[flat] <= 0:
            break
        centre = np.array(np.unravel_index(flat, priority.shape))
        out.append((centre, float(lung_share[tuple(centre)])))
        lo = np.maximum(centre - size + 1, 0)
        hi = centre + size
        priority[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 0.0
    return out
