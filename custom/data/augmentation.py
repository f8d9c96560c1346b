"""The contrastive view generator (DESIGN.md "Hyper-parameters"; paper §3), built from MONAI transforms.

Views are drawn on shifted HU in [0, 1264] (so the noise std of 50 is the reference's), then mapped to the
network's [-1, 1]. Each view's randomness is seeded from (seed, epoch, sample, view), so a sample's views
do not depend on worker count, batch order or where a run was resumed: that is what makes resume exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandGaussianNoise

from custom.data.intensity import HU_MAX, HU_MIN, HU_SHIFT, shifted_to_network
from custom.data.location import PATCH_SIZE


def contrastive_views(
    rotate: float = math.pi / 18,
    translate: float = 12.0,
    scale: float = 0.1,
    noise_prob: float = 0.25,
    noise_std: float = 50.0,
    contrast_prob: float = 0.25,
) -> Compose:
    """RandAffine (p=1, rotation, translation, scale, border padding, 32^3) + noise + contrast, on [0, 1264]."""
    return Compose(
        [
            RandAffine(
                prob=1.0,
                rotate_range=(rotate, rotate, rotate),
                translate_range=(translate, translate, translate),
                scale_range=(scale, scale, scale),
                padding_mode="border",
                spatial_size=(PATCH_SIZE, PATCH_SIZE, PATCH_SIZE),
                cache_grid=True,
            ),
            RandGaussianNoise(prob=noise_prob, std=noise_std),
            RandAdjustContrast(prob=contrast_prob),
        ]
    )


def view_seed(seed: int, epoch: int, sample: int, view: int) -> int:
    """A 32-bit seed unique to one view of one sample in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, sample, view]).generate_state(1)[0])


def make_view(transform: Compose | None, patch_hu: np.ndarray, seed: int) -> torch.Tensor:
    """int16 HU patch (S, S, S) -> one augmented, network-ready view (1, S, S, S) float32."""
    shifted = np.clip(patch_hu.astype(np.float32), HU_MIN, HU_MAX)[None] + HU_SHIFT
    if transform is not None:
        transform.set_random_state(seed=seed)
        shifted = transform(shifted)
    shifted = torch.as_tensor(np.asarray(shifted), dtype=torch.float32)
    return shifted_to_network(shifted)
