"""Emphysema box annotations of the SYNTHETIC cohort, made the way COPDGene's were: a reader clicks the
centre of a region of one subtype and a fixed 32 mm box is drawn around it (paper section 4.1.1). Centres are
where the subtype is densest (greedy, boxes do not overlap), so every box really contains its subtype.

Healthy boxes come from GOLD-0 subjects without emphysema, at the places the subtypes' boxes are drawn from
(``placement="matched"``): each subtype's share of them is drawn from that subtype's spatial prior, shaped
the way the densest-box rule shapes the lesion boxes (``matched_healthy_boxes``). The classifier is conditioned
on atlas location, so healthy boxes at other places (``placement="random"``, the earlier behaviour: anywhere
with >= 60 % lung, hence hardly ever at the pleura) let it learn where a label is instead of what it looks like.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from custom.synthetic import labels

BOX_MM = 32.0
ANNOTATION_COLUMNS = [
    "subject_id",
    "label",
    "centre_x",
    "centre_y",
    "centre_z",
    "centre_x_mm",
    "centre_y_mm",
    "centre_z_mm",
    "size_mm",
    "atlas_x",
    "atlas_y",
    "atlas_z",
    "share_in_box",
]


def box_voxels(spacing) -> np.ndarray:
    """Box edge in voxels (odd, so it has a centre voxel)."""
    size = np.maximum(np.round(BOX_MM / np.asarray(spacing, dtype=np.float64)), 1).astype(int)
    return size + (size % 2 == 0)


def densest_boxes(
    share: np.ndarray, allowed: np.ndarray, spacing, max_boxes: int, min_share: float
) -> list[tuple[np.ndarray, float]]:
    """Greedy non-overlapping box centres where the box-mean of ``share`` is highest (>= ``min_share``)."""
    size = box_voxels(spacing)
    density = ndimage.uniform_filter(share.astype(np.float32), size=size, mode="constant")
    density[~allowed] = 0.0
    picked = []
    for _ in range(max_boxes):
        flat = int(np.argmax(density))
        best = float(density.flat[flat])
        if best < min_share:
            break
        centre = np.array(np.unravel_index(flat, density.shape))
        picked.append((centre, best))
        _exclude(density, centre, size, 0.0)  # next box must not overlap this one
    return picked


def lesion_boxes(lesion: np.ndarray, lung: np.ndarray, code: int, spacing, max_boxes: int, min_share: float = 0.04):
    """Boxes centred on the densest regions of subtype ``code`` (centre voxel inside the lung)."""
    return densest_boxes(lesion == code, lung & (lesion == code), spacing, max_boxes, min_share)


HEALTHY_PLACEMENTS = ("matched", "random")
RANDOM_MIN_LUNG_SHARE = 0.6  # the earlier (random) placement: boxes mostly in lung, so off the pleura


def _exclude(field: np.ndarray, centre: np.ndarray, size: np.ndarray, value: float) -> None:
    """Set ``field`` to ``value`` wherever a box centred there would overlap the box at ``centre``."""
    lo = np.maximum(centre - size + 1, 0)
    hi = centre + size
    field[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value


def _shares(lesion: np.ndarray, lung: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """Box-mean lung share and box-mean emphysema share of a box centred at every voxel."""
    emphysema = np.isin(lesion, labels.EMPHYSEMA_CODES)
    lung_share = ndimage.uniform_filter(lung.astype(np.float32), size=size, mode="constant")
    emph_share = ndimage.uniform_filter(emphysema.astype(np.float32), size=size, mode="constant")
    return lung_share, emph_share


def random_healthy_boxes(rng: np.random.Generator, lesion: np.ndarray, lung: np.ndarray, spacing, max_boxes: int):
    """The earlier placement: boxes with >= 60 % lung and no emphysema inside, at random places."""
    size = box_voxels(spacing)
    lung_share, emph_share = _shares(lesion, lung, size)
    ok = lung & (lung_share >= RANDOM_MIN_LUNG_SHARE) & (emph_share == 0.0)
    # random priority instead of density: a random field keeps the picks spread and reproducible
    priority = rng.random(lung.shape, dtype=np.float32) * ok + 1e-3 * ok
    out = []
    for _ in range(max_boxes):
        flat = int(np.argmax(priority))
        if priority.flat[flat] <= 0:
            break
        centre = np.array(np.unravel_index(flat, priority.shape))
        out.append((centre, float(lung_share[tuple(centre)])))
        _exclude(priority, centre, size, 0.0)
    return out


def matched_healthy_boxes(
    rng: np.random.Generator, lesion: np.ndarray, lung: np.ndarray, spacing, quotas: dict
) -> list[tuple[np.ndarray, float, str]]:
    """Healthy boxes at the subtypes' places. ``quotas`` maps a name to (prior, number of boxes, minimum lung
    share, power, blur_mm): that many centres are drawn without replacement with probability proportional to
    ``prior`` blurred by ``blur_mm`` (a lesion box is centred on a lesion voxel, which lies up to a lesion radius
    from its seed) times the box-mean of ``prior`` raised to ``power`` (lesion boxes are the densest ones), among
    lung voxels whose box has no emphysema and at least that lung share (a box on the pleura is about half lung,
    as paraseptal boxes are). Picks alternate between the names and no two boxes overlap. Returns (centre, lung
    share, name)."""
    size = box_voxels(spacing)
    lung_share, emph_share = _shares(lesion, lung, size)
    free = lung & (emph_share == 0.0)
    keys, left = {}, {}
    for name, (prior, count, min_lung_share, power, blur_mm) in quotas.items():
        prior = np.where(lung, prior, 0.0).astype(np.float32)
        box_prior = ndimage.uniform_filter(prior, size=size, mode="constant").astype(np.float64)
        centre_prior = ndimage.gaussian_filter(prior, sigma=[blur_mm / s for s in spacing], mode="constant")
        weight = np.where(free & (lung_share >= min_lung_share), centre_prior * box_prior**power, 0.0)
        # Efraimidis-Spirakis keys log(u) / w: taking the largest keys samples in proportion to w without
        # replacement, and striking out the overlapping boxes after each pick keeps that order
        with np.errstate(divide="ignore"):
            keys[name] = np.where(weight > 0, np.log(rng.random(lung.shape)) / weight, -np.inf)
        left[name] = int(count)
    out = []
    while any(left.values()):
        for name in quotas:
            if left[name] == 0:
                continue
            flat = int(np.argmax(keys[name]))
            if not np.isfinite(keys[name].flat[flat]):
                left[name] = 0  # no room left for this prior
                continue
            centre = np.array(np.unravel_index(flat, lung.shape))
            out.append((centre, float(lung_share[tuple(centre)]), name))
            left[name] -= 1
            for field in keys.values():
                _exclude(field, centre, size, -np.inf)
    return out
