"""Dense network input for a whole scan: every voxel gets its intensity and its atlas location.

The emphysema map classifies the 32^3 patch centred at a voxel v; its routing location is that of the patch
corner in atlas space: p(v) = 2 * (A v - 16) / c_max - 1 (DESIGN.md "Location"), with A the prepared
subject-to-atlas voxel transform (``transform.json``). ``scan_channels`` stacks, on the prepared 1 mm grid,
channel 0 = normalised intensity, 1-3 = p(v), 4 = lung mask; the network reads channels 0-3 of a patch,
the sliding-window inferer uses channel 4 to decide where to look.
"""

from __future__ import annotations

import numpy as np
import torch

from custom.data.intensity import hu_to_network
from custom.data.location import PATCH_SIZE, centre_to_location

LUNG_CHANNEL = 4
HALF = PATCH_SIZE // 2


def location_channels(shape, subject_to_atlas_vox: np.ndarray) -> torch.Tensor:
    """(3, X, Y, Z) float32: p of the patch centred at every voxel of a grid of ``shape``."""
    matrix = torch.as_tensor(np.asarray(subject_to_atlas_vox, dtype=np.float64)[:3], dtype=torch.float32)
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    out = torch.empty((3, *shape), dtype=torch.float32)
    for row in range(3):
        a, b, c, t = matrix[row]
        # affine map is separable in x, y, z: broadcast the three 1-d terms instead of a (N, 3) matmul
        atlas = a * axes[0][:, None, None] + b * axes[1][None, :, None] + c * axes[2][None, None, :] + t
        out[row] = atlas
    return centre_to_location(out.permute(1, 2, 3, 0)).permute(3, 0, 1, 2).contiguous()


def scan_channels(hu: np.ndarray, lung: np.ndarray, subject_to_atlas_vox: np.ndarray) -> torch.Tensor:
    """(5, X, Y, Z) float32: intensity, location (3) and lung mask of a prepared-grid scan."""
    hu_t = torch.as_tensor(np.asarray(hu, dtype=np.float32))
    if hu_t.shape != tuple(np.asarray(lung).shape):
        raise ValueError(f"CT {tuple(hu_t.shape)} and lung mask {np.asarray(lung).shape} differ in shape")
    intensity = hu_to_network(hu_t)[None]
    lung_t = torch.as_tensor(np.asarray(lung) > 0, dtype=torch.float32)[None]
    return torch.cat([intensity, location_channels(hu_t.shape, subject_to_atlas_vox), lung_t], dim=0)


def intensity_patches_at(channels: torch.Tensor, centres: torch.Tensor, pad_intensity: float = -1.0) -> torch.Tensor:
    """(N, 1, 32, 32, 32) intensity of the patches centred at integer voxels ``centres`` (N, 3); outside the
    scan is air (-1 after normalisation)."""
    centres = torch.as_tensor(centres, dtype=torch.long)
    offsets = torch.arange(PATCH_SIZE) - HALF
    # gather with clamped indices, then overwrite what lies outside the scan (no padded copy of the scan)
    index, outside = [], torch.zeros((len(centres), 1, 1, 1), dtype=torch.bool)
    for axis, size in enumerate(channels.shape[1:]):
        along = centres[:, axis, None] + offsets
        view = [len(centres), 1, 1, 1]
        view[axis + 1] = PATCH_SIZE
        index.append(along.clamp(0, size - 1).view(view))
        outside = outside | ((along < 0) | (along >= size)).view(view)
    patches = channels[0][index[0], index[1], index[2]]
    if bool(outside.any()):
        patches = patches.masked_fill(outside, pad_intensity)
    return patches[:, None]


def patches_at(channels: torch.Tensor, centres: torch.Tensor, pad_intensity: float = -1.0) -> torch.Tensor:
    """(N, 4, 32, 32, 32) network inputs for the patches centred at integer voxels ``centres`` (N, 3).

    Intensity outside the scan is air (-1 after normalisation); the location channels are filled with the
    patch-centre location, the only value the network reads from them.
    """
    centres = torch.as_tensor(centres, dtype=torch.long)
    intensity = intensity_patches_at(channels, centres, pad_intensity)
    loc = channels[1:4, centres[:, 0], centres[:, 1], centres[:, 2]].T
    n = len(centres)
    return torch.cat([intensity, loc.view(n, 3, 1, 1, 1).expand(n, 3, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE)], 1)


@torch.no_grad()
def outputs_at(network: torch.nn.Module, channels: torch.Tensor, centres: torch.Tensor, batch_size: int = 64):
    """(N, C) raw network outputs (logits) for the patches centred at ``centres`` of a (5|4, X, Y, Z) scan."""
    device = next(network.parameters()).device
    out = []
    for start in range(0, len(centres), batch_size):
        x = patches_at(channels, centres[start : start + batch_size]).to(device)
        out.append(network(x).float().cpu())
    if out:
        return torch.cat(out)
    width = network.classifier.out_features if hasattr(network, "classifier") else len(network.detectors)
    return torch.zeros((0, width))


def probabilities_at(
    network: torch.nn.Module, channels: torch.Tensor, centres: torch.Tensor, batch_size: int = 64, log: bool = False
) -> torch.Tensor:
    """(N, C) class probabilities (softmax; ``log``: log-softmax) of a classifier's patches (``outputs_at``)."""
    normalise = torch.log_softmax if log else torch.softmax
    return normalise(outputs_at(network, channels, centres, batch_size), dim=1)
