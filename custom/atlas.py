"""The shipped lung atlas and its 581 canonical landmarks (bundle/resources/atlas).

Landmarks are stored as patch-corner voxel indices (x, y, z) in the 387x387x319, 1 mm atlas grid; the
landmark itself is the patch centre (corner + 16). Neighbours for the neighbouring contrastive loss are the
nearest other landmarks by atlas distance, as in the reference.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from custom.location import HALF_PATCH, corner_to_location

NUM_LANDMARKS = 581


def resources_dir() -> Path:
    """Folder holding the atlas; ``DRASCLR_ATLAS_DIR`` overrides it (a user's own atlas)."""
    env = os.environ.get("DRASCLR_ATLAS_DIR")
    if env:
        return Path(env)
    from custom import bundle_root

    return Path(bundle_root()) / "resources" / "atlas"


def atlas_mask_path(atlas_dir: str | Path | None = None) -> Path:
    return Path(atlas_dir or resources_dir()) / "atlas_lung_mask.nii.gz"


def landmark_corners(atlas_dir: str | Path | None = None) -> np.ndarray:
    """(J, 3) int64 corner voxel indices (x, y, z) of the landmark patches."""
    path = Path(atlas_dir or resources_dir()) / "atlas_patch_loc.npy"
    if not path.is_file():
        raise FileNotFoundError(f"atlas landmarks not found: {path}")
    corners = np.load(path)
    if corners.ndim != 2 or corners.shape[1] != 3:
        raise ValueError(f"{path}: expected an (J, 3) array of patch corners, got shape {corners.shape}")
    return corners.astype(np.int64)


def landmark_centres(atlas_dir: str | Path | None = None) -> np.ndarray:
    """(J, 3) atlas voxel coordinates (x, y, z) of the landmarks (patch centres)."""
    return landmark_corners(atlas_dir) + HALF_PATCH


def landmark_locations(atlas_dir: str | Path | None = None) -> np.ndarray:
    """(J, 3) float32 normalised locations p of the landmarks (the routing input)."""
    return corner_to_location(landmark_corners(atlas_dir)).astype(np.float32)


def nearest_neighbours(centres: np.ndarray, num_neighbours: int) -> np.ndarray:
    """(J, num_neighbours) indices of each landmark's nearest other landmarks (ties broken by index)."""
    if num_neighbours <= 0:
        return np.zeros((len(centres), 0), dtype=np.int64)
    if num_neighbours >= len(centres):
        raise ValueError(f"asked for {num_neighbours} neighbours of {len(centres)} landmarks")
    diff = centres[:, None, :].astype(np.float64) - centres[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    return np.argsort(dist, axis=1, kind="stable")[:, :num_neighbours].astype(np.int64)


@lru_cache(maxsize=4)
def landmark_neighbours(num_neighbours: int = 2, atlas_dir: str | None = None) -> np.ndarray:
    """Neighbour table for the shipped (or given) landmarks."""
    return nearest_neighbours(landmark_centres(atlas_dir), num_neighbours)
