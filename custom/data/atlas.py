"""The shipped lung atlas and its 581 canonical landmarks (bundle/resources/atlas).

Landmarks are stored as patch-corner voxel indices (x, y, z) in the 387x387x319, 1 mm atlas grid; the
landmark itself is the patch centre (corner + 16). Neighbours for the neighbouring contrastive loss are the
nearest other landmarks by atlas distance, as in the reference; ties between equidistant landmarks (common on
the regular grid) are broken by a seeded random draw rather than the reference's lowest index, so that every
direction is used (docs/neighbours.md).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from custom.data.location import HALF_PATCH, corner_to_location

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


TIE_RULES = ("random", "index")
DISTANCE_TOLERANCE_MM = 1e-6
DIRECTIONS = ("+x", "-x", "+y", "-y", "+z", "-z")


def _check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _distance_matrix(centres: np.ndarray) -> np.ndarray:
    centres = np.asarray(centres, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] != 3:
        raise ValueError(f"centres must be a (J, 3) array, got shape {centres.shape}")
    diff = centres[:, None, :] - centres[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    return dist


def nearest_neighbours(
    centres: np.ndarray,
    num_neighbours: int,
    seed: int = 0,
    ties: str = "random",
    tol: float = DISTANCE_TOLERANCE_MM,
) -> np.ndarray:
    """(J, num_neighbours) indices of each landmark's nearest other landmarks.

    On the regular landmark grid many candidates are equidistant (the face neighbours), so the rule for ties
    decides which directions the neighbour loss sees (docs/neighbours.md):

    - ``ties="random"`` (default): every candidate strictly nearer than the k-th nearest distance d_k is kept;
      the remaining slots are filled uniformly at random, without replacement, from the candidates at d_k
      (distance within ``tol`` mm of d_k), with the generator ``np.random.default_rng([seed, j])`` for
      landmark j. The table is a pure function of (centres, num_neighbours, seed).
    - ``ties="index"``: the lowest landmark indices win (a stable argsort, the reference code's behaviour);
      ``seed`` is ignored. On the shipped atlas this points mostly to -x and -y.

    Each row is ordered by distance, then landmark index.
    """
    num_neighbours = _check_int("num_neighbours", num_neighbours)
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    seed = _check_int("seed", seed)
    if not tol >= 0:
        raise ValueError(f"tol must be a non-negative distance in mm, got {tol!r}")
    dist = _distance_matrix(centres)
    num = len(dist)
    if num_neighbours == 0:
        return np.zeros((num, 0), dtype=np.int64)
    if num_neighbours >= num:
        raise ValueError(f"asked for {num_neighbours} neighbours of {num} landmarks")
    order = np.argsort(dist, axis=1, kind="stable")
    if ties == "index":
        return order[:, :num_neighbours].astype(np.int64)
    table = np.empty((num, num_neighbours), dtype=np.int64)
    for j in range(num):
        row = dist[j]
        d_k = row[order[j, num_neighbours - 1]]
        nearer = np.flatnonzero(row < d_k - tol)
        tied = np.flatnonzero(np.abs(row - d_k) <= tol)
        rng = np.random.default_rng([seed, j])
        drawn = rng.choice(tied, size=num_neighbours - len(nearer), replace=False)
        chosen = np.concatenate([nearer, drawn])
        table[j] = chosen[np.lexsort((chosen, row[chosen]))]
    return table


@lru_cache(maxsize=8)
def landmark_neighbours(
    num_neighbours: int = 2, atlas_dir: str | None = None, seed: int = 0, ties: str = "random"
) -> np.ndarray:
    """Neighbour table for the shipped (or given) landmarks; see :func:`nearest_neighbours` for the rule.

    Cached, so the arguments must be hashable (``atlas_dir`` a str or Path); the array returned is shared
    between callers, do not modify it.
    """
    return nearest_neighbours(landmark_centres(atlas_dir), num_neighbours, seed=seed, ties=ties)


def neighbour_direction_histogram(centres: np.ndarray, table: np.ndarray) -> dict:
    """Counts of the dominant-axis direction of each neighbour offset (centres[n] - centres[j]).

    Keys ``+x -x +y -y +z -z`` (all present, possibly 0). The dominant axis is the one with the largest
    absolute offset; an exact tie between axes (a diagonal offset) goes to the first of x, y, z.
    """
    centres = np.asarray(centres, dtype=np.float64)
    table = np.asarray(table)
    if table.ndim != 2 or len(table) != len(centres):
        raise ValueError(f"table must be (J, l) for J = {len(centres)} landmarks, got shape {table.shape}")
    counts = dict.fromkeys(DIRECTIONS, 0)
    if table.size == 0:
        return counts
    offsets = centres[table] - centres[:, None, :]  # (J, l, 3)
    axis = np.abs(offsets).argmax(-1)
    sign = np.take_along_axis(offsets, axis[..., None], -1)[..., 0]
    if np.any(sign == 0):
        raise ValueError("a neighbour coincides with its landmark (zero offset)")
    for a, name in enumerate("xyz"):
        counts["+" + name] = int(np.sum((axis == a) & (sign > 0)))
        counts["-" + name] = int(np.sum((axis == a) & (sign < 0)))
    return counts
