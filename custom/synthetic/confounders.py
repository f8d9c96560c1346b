"""Confounders of the SYNTHETIC cohort: why a -950 HU density threshold (LAA-950) is an imperfect read-out,
as in real cohorts.

- Reconstruction kernel and dose: a sharp kernel adds more, finer noise, so normal lung (-850 HU) spills
  below -950 and LAA-950 rises without any disease.
- Inspiration level: a deeper breath lowers lung density globally (and enlarges the lungs); a shallow one
  raises it and hides emphysema-range voxels.
- Disease the threshold cannot see: bronchial wall thickening and air trapping (lobular regions near
  -900 HU) worsen spirometry but add no voxel below -950 HU.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from custom.synthetic import labels
from custom.synthetic.emphysema import place_diffuse

# kernel name -> (DICOM ConvolutionKernel, noise std range in HU, noise correlation in mm)
KERNELS = {
    "soft": ("B", (12.0, 25.0), 1.4),
    "standard": ("STANDARD", (20.0, 35.0), 1.0),
    "sharp": ("LUNG", (35.0, 55.0), 0.5),
}
KERNEL_PROBS = {"soft": 0.35, "standard": 0.35, "sharp": 0.30}
INSPIRATION_SHIFT_HU = (-40.0, 45.0)  # added to lung density; negative = deeper breath
AIR_TRAPPING_SHIFT_HU = -40.0
AIRWAY_WALL_HU = -20.0


def draw_scan_protocol(rng: np.random.Generator) -> dict:
    """Kernel, noise level and inspiration level of one scan (none of them depends on the disease)."""
    names = list(KERNEL_PROBS)
    kernel = names[rng.choice(len(names), p=[KERNEL_PROBS[n] for n in names])]
    dicom_kernel, noise_range, noise_corr_mm = KERNELS[kernel]
    shift = float(rng.uniform(*INSPIRATION_SHIFT_HU))
    return {
        "kernel": kernel,
        "dicom_kernel": dicom_kernel,
        "noise_std_hu": float(rng.uniform(*noise_range)),
        "noise_correlation_mm": float(noise_corr_mm),
        "inspiration_shift_hu": shift,
        # deeper inspiration (negative shift) -> larger lungs, about 1 % per 10 HU
        "lung_size_factor": float(1.0 - 0.001 * shift),
    }


def add_scanner_noise(rng: np.random.Generator, hu: np.ndarray, protocol: dict, spacing) -> None:
    """Add kernel-shaped noise in place, with the protocol's standard deviation."""
    sigma_vox = [protocol["noise_correlation_mm"] / s for s in spacing]
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    if max(sigma_vox) >= 0.3:
        noise = ndimage.gaussian_filter(noise, sigma=sigma_vox, truncate=2.5)
        noise /= max(float(noise[::3, ::3, ::3].std()), 1e-6)
    noise *= np.float32(protocol["noise_std_hu"])
    hu += noise


def air_trapping_prior(height: np.ndarray, posterior: np.ndarray) -> np.ndarray:
    """Small-airway disease: lower zones and dependent (posterior) lung first."""
    return (0.6 * (1.0 - height) + 0.4 * posterior).astype(np.float32)


def place_air_trapping(
    rng: np.random.Generator, lesion: np.ndarray, lung: np.ndarray, height, posterior, fraction: float, spacing
) -> int:
    """Label a lobular, patchy share ``fraction`` of the lung as air trapping (code 5)."""
    target = round(fraction * int(lung.sum()))
    return place_diffuse(
        rng, lesion, lung, air_trapping_prior(height, posterior), target, labels.AIR_TRAPPING, spacing, sigma_mm=5.0
    )
