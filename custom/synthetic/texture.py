"""Spatially correlated random fields: the raw material of parenchymal texture, vessels, airways, lesions and
scanner noise in the SYNTHETIC cohort. Correlation lengths are given in mm so a cohort looks the same at any
voxel size."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PARENCHYMA_HU = -850.0  # healthy lung at a standard inspiration


def smooth_field(rng: np.random.Generator, shape, sigma_mm: float, spacing, truncate: float = 3.0) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length ``sigma_mm``."""
    white = rng.standard_normal(tuple(shape), dtype=np.float32)
    sigma_vox = [sigma_mm / s for s in spacing]
    if max(sigma_vox) < 0.3:
        return white
    field = ndimage.gaussian_filter(white, sigma=sigma_vox, truncate=truncate, mode="wrap")
    std = float(field[::3, ::3, ::3].std())
    field /= max(std, 1e-6)
    return field


def tube_radius_field(rng: np.random.Generator, shape, sigma_mm: float, spacing) -> np.ndarray:
    """sqrt(g1^2 + g2^2) of two independent fields: its small values trace curved, branching-looking tubes
    (the intersection of two random zero surfaces), which stand in for vessels and airways."""
    g1 = smooth_field(rng, shape, sigma_mm, spacing)
    g2 = smooth_field(rng, shape, sigma_mm, spacing)
    np.multiply(g1, g1, out=g1)
    g1 += g2 * g2
    return np.sqrt(g1, out=g1)


def parenchymal_texture(
    rng: np.random.Generator, shape, spacing, amplitude_hu: float = 22.0
) -> tuple[np.ndarray, np.ndarray]:
    """Correlated texture of normal lung in HU (secondary lobules, vessels below resolution), and its fine
    unit-variance component, which lesions reuse for their own texture."""
    fine = smooth_field(rng, shape, 1.5, spacing)
    coarse = smooth_field(rng, shape, 6.0, spacing)
    return amplitude_hu * (0.8 * fine + 0.6 * coarse), fine
