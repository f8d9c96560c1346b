"""Cut the 32^3 HU patches x_i^j centred at the mapped landmarks (paper section 2.1).

A landmark at subject voxel coordinate c gets the patch whose corner is round(c) - 16, the same
corner = centre - 16 convention as the atlas (DESIGN.md "Atlas"), so patch voxel (16, 16, 16) is the voxel
nearest the landmark. Voxels outside the scan are air (-1024 HU). Values are HU clipped to the int16-safe
range [-1024, 3071]; the method's [-1024, 240] window is applied later (``custom.data.intensity``).
"""

from __future__ import annotations

import numpy as np

from custom.data.location import PATCH_SIZE

PAD_HU = -1024
HU_STORE_RANGE = (-1024, 3071)


def patch_corners(landmarks_vox: np.ndarray, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """(J, 3) int64 corner voxel of each patch: nearest voxel to the landmark minus half the patch."""
    return np.floor(np.asarray(landmarks_vox, dtype=np.float64) + 0.5).astype(np.int64) - patch_size // 2


def extract_patches(
    hu: np.ndarray, landmarks_vox: np.ndarray, patch_size: int = PATCH_SIZE, pad_value: int = PAD_HU
) -> np.ndarray:
    """(J, s, s, s) int16 patches in the (x, y, z) axis order of ``hu``, padded with ``pad_value`` outside."""
    volume = np.clip(np.rint(hu), *HU_STORE_RANGE).astype(np.int16) if hu.dtype != np.int16 else hu
    corners = patch_corners(landmarks_vox, patch_size)
    out = np.full((len(corners), patch_size, patch_size, patch_size), pad_value, dtype=np.int16)
    shape = np.asarray(volume.shape)
    for j, corner in enumerate(corners):
        lo = np.maximum(corner, 0)
        hi = np.minimum(corner + patch_size, shape)
        if np.any(hi <= lo):
            continue  # wholly outside the scan: all air
        dst_lo = lo - corner
        dst_hi = dst_lo + (hi - lo)
        out[j, dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = volume[
            lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]
        ]
    return out
