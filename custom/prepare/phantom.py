"""Small CT volumes made from the atlas lung mask with a KNOWN affine: ground truth for tests and benchmarks.

The subject's world (RAS, mm) is sent to the atlas world by ``subject_to_atlas_world``; each subject voxel
looks the atlas lung mask up there, so where a landmark should land in the subject is known exactly. Lungs get
about -850 HU, an elliptic body 40 HU, air -1000, plus noise. These are not the demo cohort (see
``custom/synthetic``); they exist so preparation can be checked against a known answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from custom.data.atlas import atlas_mask_path, landmark_centres


@dataclass
class Phantom:
    path: Path
    subject_to_atlas_world: np.ndarray  # 4x4, RAS mm -> RAS mm

    def true_landmarks_world(self, atlas_dir=None) -> np.ndarray:
        """Where the known transform puts the atlas landmark centres, in subject world (RAS mm)."""
        atlas = nib.load(str(atlas_mask_path(atlas_dir)))
        centres = np.c_[landmark_centres(atlas_dir), np.ones(len(landmark_centres(atlas_dir)))]
        atlas_world = centres @ atlas.affine.T
        return (atlas_world @ np.linalg.inv(self.subject_to_atlas_world).T)[:, :3]


def random_subject_to_atlas(
    rng: np.random.Generator,
    atlas_lung_centre_world: np.ndarray,
    max_rotation_deg: float = 8.0,
    scale_range=(0.9, 1.1),
    max_shift_mm: float = 15.0,
) -> np.ndarray:
    """A plausible patient pose: small rotations, anisotropic scale, a shift, and its own world origin."""
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    linear = rot @ np.diag(rng.uniform(*scale_range, 3))
    subject_centre = np.array([rng.uniform(-20, 20), rng.uniform(-180, -120), rng.uniform(-250, -150)])
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = atlas_lung_centre_world + rng.uniform(-max_shift_mm, max_shift_mm, 3) - linear @ subject_centre
    return out


def make_phantom(
    path: str | Path,
    subject_to_atlas_world: np.ndarray | None = None,
    seed: int = 0,
    spacing_mm: float = 2.0,
    lungs: bool = True,
    axcodes: str = "RAS",
    scale_range=(0.9, 1.1),
    lung_mask_path: str | Path | None = None,
    atlas_dir=None,
) -> Phantom:
    """Write a NIfTI HU phantom; ``lungs=False`` gives a body with no lungs (must be refused).

    ``scale_range`` bounds the per-axis scale of subject -> atlas: above 1 the subject is smaller than the atlas
    (a smaller volume, quicker tests). ``lung_mask_path`` also writes the true lung mask (uint8).
    """
    rng = np.random.default_rng(seed)
    atlas_img = nib.load(str(atlas_mask_path(atlas_dir)))
    atlas = np.asarray(atlas_img.dataobj) > 0
    idx = np.argwhere(atlas)
    atlas_centre_world = (atlas_img.affine @ np.r_[idx.mean(0), 1.0])[:3]
    if subject_to_atlas_world is None:
        subject_to_atlas_world = random_subject_to_atlas(rng, atlas_centre_world, scale_range=scale_range)
    atlas_to_subject = np.linalg.inv(subject_to_atlas_world)

    # the subject's field of view: the mapped lung bounding box plus room for the body
    lo, hi = idx.min(0), idx.max(0)
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = (corners @ atlas_img.affine.T) @ atlas_to_subject.T
    margin = np.array([35.0, 35.0, 15.0])
    box_lo, box_hi = world[:, :3].min(0) - margin, world[:, :3].max(0) + margin
    shape = np.ceil((box_hi - box_lo) / spacing_mm).astype(int) + 1

    flips = np.array([1.0 if c in "RAS" else -1.0 for c in axcodes])
    affine = np.eye(4)
    affine[:3, :3] = np.diag(flips * spacing_mm)
    affine[:3, 3] = np.where(flips > 0, box_lo, box_hi)

    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
    vox_to_atlas_vox = np.linalg.inv(atlas_img.affine) @ subject_to_atlas_world @ affine
    coords = grid.reshape(-1, 3) @ vox_to_atlas_vox[:3, :3].T.astype(np.float32) + vox_to_atlas_vox[:3, 3]
    lung = ndimage.map_coordinates(atlas.astype(np.float32), coords.T, order=1, cval=0.0) > 0.5
    lung = lung.reshape(tuple(shape)) & lungs

    world_xyz = grid.reshape(-1, 3) @ affine[:3, :3].T + affine[:3, 3]
    centre = (box_lo + box_hi) / 2.0
    half = (box_hi - box_lo) / 2.0 - np.array([8.0, 8.0, 0.0])
    body = (((world_xyz[:, 0] - centre[0]) / half[0]) ** 2 + ((world_xyz[:, 1] - centre[1]) / half[1]) ** 2) <= 1
    body = body.reshape(tuple(shape))

    hu = np.full(tuple(shape), -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu[lung] = -850.0
    hu += rng.normal(0.0, 20.0, hu.shape).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    if lung_mask_path is not None:
        nib.save(nib.Nifti1Image(lung.astype(np.uint8), affine), str(lung_mask_path))
    return Phantom(path=path, subject_to_atlas_world=subject_to_atlas_world)
