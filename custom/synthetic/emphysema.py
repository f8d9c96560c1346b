"""Emphysema of the SYNTHETIC cohort, each subtype drawn from its own spatial prior (Smith et al. 2014):

- centrilobular (CLE): small low-attenuation clusters, upper and central lung, sparing the subpleural rim;
- paraseptal (PSE): subpleural lucencies lined up along the pleural surface, mildly upper-zone;
- panlobular (PLE, optional): diffuse, uniform loss of density in the lower lobes.

Priors are functions of ``height`` (0 base .. 1 apex) and ``depth_mm`` (distance to the pleura) measured in
the atlas, so they follow the anatomy of every subject. Lesions are placed until a target share of the lung
is reached, so the image carries the disease burden the clinical model was driven by. Under the regional
disease model (``custom.synthetic.regional_disease``) centrilobular seeds are drawn per zone (upper / lower half
of the lung, each with its own target) and centrilobular and paraseptal tissue takes the subject's own mean
attenuation, so part of it lies above -950 HU.
"""

from __future__ import annotations

import numpy as np

from custom.synthetic import labels
from custom.synthetic.texture import smooth_field

LESION_HU = {labels.CENTRILOBULAR: -990.0, labels.PARASEPTAL: -995.0, labels.PANLOBULAR: -968.0}
CLE_RADIUS_MM = (2.5, 5.5)  # grows with severity (confluent clusters in advanced disease)
PSE_RADIUS_MM = (3.5, 8.0)
PSE_BAND_MM = 4.0  # seeds of paraseptal lesions lie this close to the pleura
TEXTURE_HU = 8.0  # amplitude of the fine texture on emphysema painted at LESION_HU
SUBJECT_TEXTURE_HU = 30.0  # amplitude of the fine texture on emphysema painted at the subject's own mean HU
CLE_ZONES = ("centrilobular_upper", "centrilobular_lower")  # keys of zoned centrilobular targets
LOWER_ZONE_HEIGHT = 0.5  # atlas height (0 base .. 1 apex) below which a voxel is in the lower zone


def centrilobular_prior(height: np.ndarray, depth_mm: np.ndarray) -> np.ndarray:
    """Upper-zone and central weight; zero within 4 mm of the pleura."""
    central = np.clip((depth_mm - 4.0) / 20.0, 0.0, 1.0)
    return ((0.1 + height) ** 2 * central).astype(np.float32)


def paraseptal_prior(height: np.ndarray, depth_mm: np.ndarray) -> np.ndarray:
    """Subpleural band, somewhat more in the upper zones."""
    band = (depth_mm > 0.0) & (depth_mm <= PSE_BAND_MM)
    return (band * (0.5 + height)).astype(np.float32)


def panlobular_prior(height: np.ndarray) -> np.ndarray:
    """Lower-lobe predominance."""
    return ((1.0 - height) ** 2).astype(np.float32)


def place_blobs(
    rng: np.random.Generator,
    lesion: np.ndarray,
    lung: np.ndarray,
    prior: np.ndarray,
    target_voxels: int,
    radius_mm: tuple[float, float],
    code: int,
    spacing,
) -> int:
    """Write irregular ellipsoids of ``code`` into ``lesion`` (inside ``lung``, on free voxels) at seeds
    drawn from ``prior`` until ``target_voxels`` are labelled; returns how many were."""
    if target_voxels <= 0:
        return 0
    weights = prior[lung]
    if weights.sum() <= 0:
        return 0
    lung_idx = np.flatnonzero(lung)
    spacing = np.asarray(spacing, dtype=np.float64)
    mean_r = np.mean(radius_mm)
    blob_voxels = max(4.0 / 3.0 * np.pi * mean_r**3 / np.prod(spacing), 1.0)
    num_seeds = int(4 * target_voxels / blob_voxels) + 16
    seeds = rng.choice(lung_idx, size=num_seeds, p=weights / weights.sum())
    seeds = np.stack(np.unravel_index(seeds, lung.shape), axis=1)
    shape = np.asarray(lung.shape)
    placed = 0
    for seed in seeds:
        radii = rng.uniform(*radius_mm) * rng.uniform(0.75, 1.3, size=3)
        half = np.ceil(radii / spacing).astype(int)
        lo = np.maximum(seed - half, 0)
        hi = np.minimum(seed + half + 1, shape)
        # squared normalised distance along each axis, summed by broadcasting: an ellipsoid
        d = [((np.arange(lo[a], hi[a]) - seed[a]) * (spacing[a] / radii[a])) ** 2 for a in range(3)]
        inside = (d[0][:, None, None] + d[1][None, :, None] + d[2][None, None, :]) <= 1.0
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        region = lesion[box]
        free = inside & lung[box] & (region == labels.NONE)
        region[free] = code
        placed += int(np.count_nonzero(free))
        if placed >= target_voxels:
            break
    return placed


def place_diffuse(
    rng: np.random.Generator,
    lesion: np.ndarray,
    lung: np.ndarray,
    prior: np.ndarray,
    target_voxels: int,
    code: int,
    spacing,
    sigma_mm: float = 12.0,
) -> int:
    """Label the ``target_voxels`` free lung voxels where a smooth random field times ``prior`` is largest
    (a quantile threshold hits the target share exactly)."""
    free = lung & (lesion == labels.NONE)
    if target_voxels <= 0 or not free.any():
        return 0
    score = smooth_field(rng, lung.shape, sigma_mm, spacing) + 3.0 * prior
    values = score[free]
    target_voxels = min(int(target_voxels), values.size)
    threshold = np.partition(values, values.size - target_voxels)[values.size - target_voxels]
    chosen = free & (score >= threshold)
    lesion[chosen] = code
    return int(chosen.sum())


def place_emphysema(
    rng: np.random.Generator,
    lesion: np.ndarray,
    lung: np.ndarray,
    height: np.ndarray,
    depth_mm: np.ndarray,
    fractions: dict,
    spacing,
    lower_height: float = LOWER_ZONE_HEIGHT,
) -> dict:
    """Place all subtypes for target lung shares ``fractions`` (keys centrilobular/paraseptal/panlobular, or
    ``CLE_ZONES`` instead of centrilobular: seeds from the centrilobular prior restricted to height >=
    ``lower_height``, then to height < ``lower_height``); returns the voxels placed per subtype (and zone).
    Panlobular goes first: it is diffuse and sets the background."""
    n_lung = int(lung.sum())
    placed = {}
    placed["panlobular"] = place_diffuse(
        rng,
        lesion,
        lung,
        panlobular_prior(height),
        round(fractions.get("panlobular", 0.0) * n_lung),
        labels.PANLOBULAR,
        spacing,
    )
    zoned = any(zone in fractions for zone in CLE_ZONES)
    cle = sum(fractions.get(zone, 0.0) for zone in CLE_ZONES) if zoned else fractions.get("centrilobular", 0.0)
    grow = min(cle / 0.25, 1.0)  # larger, confluent clusters as the burden grows
    cle_radius = (CLE_RADIUS_MM[0], CLE_RADIUS_MM[0] + grow * (CLE_RADIUS_MM[1] - CLE_RADIUS_MM[0]) + 1.0)
    cle_prior = centrilobular_prior(height, depth_mm)
    if zoned:
        upper = height >= lower_height
        for zone, prior in zip(CLE_ZONES, (cle_prior * upper, cle_prior * ~upper)):
            target = round(fractions.get(zone, 0.0) * n_lung)
            placed[zone] = place_blobs(rng, lesion, lung, prior, target, cle_radius, labels.CENTRILOBULAR, spacing)
        placed["centrilobular"] = placed[CLE_ZONES[0]] + placed[CLE_ZONES[1]]
    else:
        placed["centrilobular"] = place_blobs(
            rng, lesion, lung, cle_prior, round(cle * n_lung), cle_radius, labels.CENTRILOBULAR, spacing
        )
    placed["paraseptal"] = place_blobs(
        rng,
        lesion,
        lung,
        paraseptal_prior(height, depth_mm),
        round(fractions.get("paraseptal", 0.0) * n_lung),
        PSE_RADIUS_MM,
        labels.PARASEPTAL,
        spacing,
    )
    return placed


def emphysema_hu(lesion: np.ndarray, fine: np.ndarray, lesion_hu_mean: float | None = None) -> np.ndarray:
    """What emphysema voxels are painted with: ``LESION_HU`` of their subtype plus ``TEXTURE_HU`` of the fine
    texture; given ``lesion_hu_mean`` (the regional model), centrilobular and paraseptal voxels take
    ``lesion_hu_mean + SUBJECT_TEXTURE_HU * fine`` instead (panlobular keeps its ``LESION_HU``)."""
    target = np.full(lesion.shape, LESION_HU[labels.CENTRILOBULAR], dtype=np.float32)
    for code, value in LESION_HU.items():
        target[lesion == code] = value
    painted = target + TEXTURE_HU * fine
    if lesion_hu_mean is not None:
        own = np.isin(lesion, (labels.CENTRILOBULAR, labels.PARASEPTAL))
        painted[own] = np.float32(lesion_hu_mean) + SUBJECT_TEXTURE_HU * fine[own]
    return painted
