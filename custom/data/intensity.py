"""CT intensity convention shared by preparation, training and inference (DESIGN.md "Intensity").

HU are clipped to [-1024, 240]; augmentations work on the shifted values HU + 1024 in [0, 1264] (so the
Gaussian noise std of 50 means the same thing as in the reference); the network sees (HU + 1024) / 632 - 1.
"""

from __future__ import annotations

import numpy as np
import torch

HU_MIN = -1024.0
HU_MAX = 240.0
HU_SHIFT = 1024.0
HALF_RANGE = (HU_MAX - HU_MIN) / 2.0  # 632


def clip_hu(hu):
    """Clip Hounsfield units to the window the method uses."""
    if isinstance(hu, torch.Tensor):
        return hu.clamp(HU_MIN, HU_MAX)
    return np.clip(hu, HU_MIN, HU_MAX)


def hu_to_shifted(hu):
    """HU -> clipped, shifted intensity in [0, 1264] (the space augmentations run in)."""
    return clip_hu(hu) + HU_SHIFT


def shifted_to_network(shifted):
    """Shifted intensity [0, 1264] -> network input [-1, 1]."""
    return shifted / HALF_RANGE - 1.0


def hu_to_network(hu):
    """HU -> network input in [-1, 1]."""
    return shifted_to_network(hu_to_shifted(hu))
