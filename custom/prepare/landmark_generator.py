"""Landmarks for a user's own atlas: a regular grid of patches over its lung mask (paper section 3).

Patches of 32^3 voxels are laid every 26 voxels from the atlas origin (so neighbours overlap by 6), kept when
they lie wholly inside the volume and more than 10 % of their voxels are lung. The landmark is the patch
centre (corner + 16). On the shipped atlas this gives 575 patches, every one of them among the 581 released
ones (the released set has 6 more, chosen by hand or by a variant we cannot reconstruct); the shipped 581
stay canonical, because the official weights and their queues are indexed by them.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from custom.data.location import PATCH_SIZE

STEP = 26
MIN_LUNG_FRACTION = 0.10


def generate_landmark_corners(
    lung_mask: np.ndarray, patch_size: int = PATCH_SIZE, step: int = STEP, min_lung_fraction: float = MIN_LUNG_FRACTION
) -> np.ndarray:
    """(J, 3) int64 patch-corner voxel indices (x, y, z), in x-major then y then z order."""
    lung = np.asarray(lung_mask) > 0
    starts = [range(0, n - patch_size + 1, step) for n in lung.shape]
    threshold = min_lung_fraction * patch_size**3
    corners = [
        (x, y, z)
        for x in starts[0]
        for y in starts[1]
        for z in starts[2]
        if np.count_nonzero(lung[x : x + patch_size, y : y + patch_size, z : z + patch_size]) > threshold
    ]
    return np.asarray(corners, dtype=np.int64).reshape(-1, 3)


def generate_atlas_landmarks(
    atlas_mask_file: str | Path,
    out_file: str | Path | None = None,
    patch_size: int = PATCH_SIZE,
    step: int = STEP,
    min_lung_fraction: float = MIN_LUNG_FRACTION,
) -> np.ndarray:
    """Landmarks of an atlas lung mask file; with ``out_file`` also saved as ``atlas_patch_loc.npy`` format."""
    mask = np.asarray(nib.load(str(atlas_mask_file)).dataobj)
    corners = generate_landmark_corners(mask, patch_size, step, min_lung_fraction)
    if len(corners) == 0:
        raise ValueError(f"{atlas_mask_file}: no patch is more than {min_lung_fraction:.0%} lung; is it a lung mask?")
    if out_file is not None:
        np.save(str(out_file), corners)
    return corners
