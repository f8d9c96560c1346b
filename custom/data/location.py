"""Atlas location normalisation: the routing input p of Loc-CondConv (DESIGN.md "Location").

p = 2 * c / c_max - 1 per axis, where c is the atlas voxel index (x, y, z) of the patch CORNER (= centre - 16)
and c_max = (312, 286, 286), the per-axis maximum of the 581 released landmark corners. This is the reference
normalisation, so the released weights keep their meaning. Any atlas point has a location, not only landmarks.
"""

from __future__ import annotations

import numpy as np
import torch

PATCH_SIZE = 32
HALF_PATCH = PATCH_SIZE // 2
CORNER_MAX = (312.0, 286.0, 286.0)


def corner_to_location(corner):
    """Atlas voxel index of a patch corner (..., 3) -> normalised location p (..., 3)."""
    if isinstance(corner, torch.Tensor):
        cmax = torch.as_tensor(CORNER_MAX, dtype=torch.float32, device=corner.device)
        return 2.0 * corner.float() / cmax - 1.0
    return 2.0 * np.asarray(corner, dtype=np.float64) / np.asarray(CORNER_MAX) - 1.0


def centre_to_location(centre):
    """Atlas coordinate (voxel index) of a patch centre (..., 3) -> normalised location p (..., 3)."""
    return corner_to_location(centre - HALF_PATCH)


def location_to_centre(location):
    """Inverse of :func:`centre_to_location`: p (..., 3) -> atlas voxel index of the patch centre."""
    if isinstance(location, torch.Tensor):
        cmax = torch.as_tensor(CORNER_MAX, dtype=location.dtype, device=location.device)
        return (location + 1.0) * cmax / 2.0 + HALF_PATCH
    return (np.asarray(location, dtype=np.float64) + 1.0) * np.asarray(CORNER_MAX) / 2.0 + HALF_PATCH
