"""Anatomy of a SYNTHETIC subject: the real atlas lung mask carried into the subject grid, wrapped in a body
(fat, muscle, ribs, spine, mediastinum, trachea) and filled with vessels and airways.

Everything outside the lungs is analytic in atlas coordinates, so a subject only costs two look-ups into the
atlas (lung label and signed distance to the pleura). Priors of the lesion modules are expressed with the same
atlas quantities: ``height`` (0 at the lung base, 1 at the apex) and ``depth_mm`` (distance to the pleura).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage

from custom.data.atlas import atlas_mask_path
from custom.synthetic import labels
from custom.synthetic.texture import tube_radius_field

SOFT_TISSUE_HU = 40.0
FAT_HU = -100.0
BONE_HU = 650.0
AIR_HU = -1000.0
BLOOD_HU = 40.0


@dataclass(frozen=True)
class AtlasReference:
    """The atlas lung mask at a working resolution, with what the generator needs from it."""

    lung: np.ndarray  # uint8 lung label (labels.LUNG_*), atlas grid subsampled by ``step``
    signed_depth_mm: np.ndarray  # float32, > 0 inside the lung (distance to pleura), < 0 outside
    step: int
    affine_1mm: np.ndarray  # the shipped atlas affine (voxel -> RAS mm)
    lung_min_vox: np.ndarray  # lung bounding box in 1 mm atlas voxels (x, y, z)
    lung_max_vox: np.ndarray
    lung_centre_vox: np.ndarray  # lung centroid, 1 mm atlas voxels

    @property
    def lung_centre_mm(self) -> np.ndarray:
        return (self.affine_1mm @ np.r_[self.lung_centre_vox, 1.0])[:3]


OUTSIDE_DEPTH_MM = -30.0  # signed depth is only resolved this far outside the lungs (enough for ribs, body)


@lru_cache(maxsize=2)
def _atlas_image(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded atlas array and affine (decompressing 48 M voxels once per process is enough)."""
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine.copy()


@lru_cache(maxsize=4)
def load_atlas_reference(step: int = 2, atlas_path: str | None = None) -> AtlasReference:
    """Subsample the 1 mm atlas by ``step`` (nearest) and compute the signed pleural distance once
    (within the lung bounding box plus a margin; farther out it is clamped to ``OUTSIDE_DEPTH_MM``)."""
    raw, affine = _atlas_image(str(atlas_path or atlas_mask_path()))
    inside_1mm = raw > 0
    # bounding box and centroid from axis projections (argwhere on the 48 M voxel grid is slow)
    counts = [inside_1mm.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64) for axis in range(3)]
    lung_min = np.array([np.flatnonzero(c)[0] for c in counts], dtype=np.float64)
    lung_max = np.array([np.flatnonzero(c)[-1] for c in counts], dtype=np.float64)
    centre = np.array([(np.arange(c.size) * c).sum() / c.sum() for c in counts])
    raw_small = raw[::step, ::step, ::step]
    lung_small = np.zeros(raw_small.shape, dtype=np.uint8)
    for atlas_value, code in labels.ATLAS_LUNG_LABELS.items():
        lung_small[raw_small == atlas_value] = code
    inside = lung_small > 0
    margin = int(np.ceil(-OUTSIDE_DEPTH_MM / step)) + 1
    lo = np.maximum((lung_min // step).astype(int) - margin, 0)
    hi = np.minimum((lung_max // step).astype(int) + margin + 1, inside.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sampling = [float(step)] * 3
    signed = np.full(inside.shape, OUTSIDE_DEPTH_MM, dtype=np.float32)
    depth = ndimage.distance_transform_edt(inside[box], sampling=sampling)
    outside = ndimage.distance_transform_edt(~inside[box], sampling=sampling)
    signed[box] = np.maximum(depth - outside, OUTSIDE_DEPTH_MM)
    return AtlasReference(
        lung=lung_small,
        signed_depth_mm=signed,
        step=step,
        affine_1mm=affine,
        lung_min_vox=lung_min,
        lung_max_vox=lung_max,
        lung_centre_vox=centre,
    )


def sample_atlas(reference: AtlasReference, atlas_vox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lung label and signed pleural depth at atlas voxel coordinates (3, X, Y, Z). The lung is where the
    linearly interpolated depth is positive (smooth pleura); its side comes from the nearest atlas label."""
    scaled = atlas_vox / np.float32(reference.step)
    depth = ndimage.map_coordinates(
        reference.signed_depth_mm, scaled, order=1, mode="constant", cval=OUTSIDE_DEPTH_MM
    ).astype(np.float32)
    inside = depth > 0
    side = ndimage.map_coordinates(reference.lung, scaled[:, inside], order=0, mode="constant", cval=0)
    by_position = np.where(
        atlas_vox[0][inside] < float(reference.lung_centre_vox[0]), labels.LUNG_RIGHT, labels.LUNG_LEFT
    )
    lung = np.zeros(depth.shape, dtype=np.uint8)
    lung[inside] = np.where(side > 0, side, by_position)
    return lung, depth


def lung_height(reference: AtlasReference, atlas_z: np.ndarray) -> np.ndarray:
    """0 at the lung base, 1 at the apex (atlas z index grows superiorly)."""
    z0, z1 = float(reference.lung_min_vox[2]), float(reference.lung_max_vox[2])
    return np.clip((atlas_z - z0) / (z1 - z0), 0.0, 1.0).astype(np.float32)


def draw_body_habitus(rng: np.random.Generator) -> dict:
    """Per-subject body wall: subcutaneous fat and muscle thickness (mm)."""
    return {
        "fat_mm": float(rng.uniform(5.0, 18.0)),
        "muscle_mm": float(rng.uniform(8.0, 14.0)),
        "rib_phase": float(rng.uniform(0.0, 1.0)),
    }


def body_hu(reference: AtlasReference, atlas_vox: np.ndarray, depth_mm: np.ndarray, habitus: dict) -> np.ndarray:
    """HU of everything outside the lungs: air around an elliptic body of fat and muscle, ribs hugging the
    pleura, a spine behind the mediastinum and a blind-ending trachea above the carina."""
    x, y, z = atlas_vox[0], atlas_vox[1], atlas_vox[2]
    cx, cy = float(reference.lung_centre_vox[0]), float(reference.lung_centre_vox[1])
    half_width = float(reference.lung_max_vox[0] - reference.lung_min_vox[0]) / 2.0
    half_depth = float(reference.lung_max_vox[1] - reference.lung_min_vox[1]) / 2.0
    wall = habitus["fat_mm"] + habitus["muscle_mm"]
    ax, ay = half_width + wall, half_depth + wall + 6.0
    # normalised elliptic radius; (1 - r) * semi-axis approximates the depth below the skin
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - (cy - 4.0)) / ay) ** 2)
    skin_depth = (1.0 - r) * min(ax, ay)
    hu = np.full(x.shape, AIR_HU, dtype=np.float32)
    body = (r <= 1.0) | (depth_mm > -8.0)
    hu[body] = SOFT_TISSUE_HU
    hu[body & (skin_depth < habitus["fat_mm"])] = FAT_HU
    # ribs: 10 mm bands every 24 mm along z, just outside the pleura, slanting downwards anteriorly
    rib_wave = np.sin(2 * np.pi * ((z + 0.35 * (y - cy)) / 24.0 + habitus["rib_phase"]))
    # only in the chest wall (outer part of the axial ellipse), not under the diaphragm or in the mediastinum
    ribs = (depth_mm < -4.0) & (depth_mm > -13.0) & (rib_wave > 0.45) & (r > 0.72) & body
    hu[ribs] = BONE_HU
    # spine: a vertebral column behind the lungs' centre line, never touching the lung
    spine_y = float(reference.lung_min_vox[1]) + 22.0
    spine = ((x - cx) ** 2 + (y - spine_y) ** 2 < 17.0**2) & (depth_mm < -3.0)
    hu[spine] = BONE_HU * 0.6
    # trachea: air tube from the top of the scan down to the carina, separated from the lungs by tissue
    z0, z1 = float(reference.lung_min_vox[2]), float(reference.lung_max_vox[2])
    carina_z = z0 + 0.62 * (z1 - z0)
    trachea = ((x - cx) ** 2 + (y - (cy + 8.0)) ** 2 < 8.5**2) & (z > carina_z) & (depth_mm < -5.0)
    hu[trachea] = AIR_HU
    return hu


def draw_vessel_tree(
    rng: np.random.Generator, shape, spacing, depth_mm: np.ndarray, vessel_share: float = 0.035
) -> np.ndarray:
    """Soft vessel occupancy in [0, 1]: tubes thicker near the hilum (deep in the lung), thin at the pleura."""
    radius = tube_radius_field(rng, shape, 7.0, spacing)
    centrality = np.clip(depth_mm / 35.0, 0.0, 1.0)
    # P(radius < e) ~ e^2 / 2 for small e; widen tubes centrally, shrink them under the pleura
    base = np.sqrt(2.0 * vessel_share)
    width = base * (0.45 + 0.9 * centrality)
    occupancy = np.clip((width - radius) / (0.5 * width), 0.0, 1.0)
    occupancy[depth_mm <= 0] = 0.0
    return occupancy.astype(np.float32)


def draw_airways(
    rng: np.random.Generator, shape, spacing, depth_mm: np.ndarray, thickening: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Airway lumen, normal wall and thickened-wall masks. ``thickening`` in [0, 1] widens the walls, which
    raises lung density (a disease a -950 HU threshold cannot see)."""
    radius = tube_radius_field(rng, shape, 10.0, spacing)
    central = depth_mm > 12.0
    lumen_e = 0.11
    normal_e = lumen_e * 1.7
    thick_e = lumen_e * (1.7 + 1.6 * float(thickening))
    lumen = central & (radius < lumen_e)
    wall = central & (radius >= lumen_e) & (radius < normal_e)
    thick = central & (radius >= normal_e) & (radius < thick_e)
    return lumen, wall, thick
