"""Where every voxel of a SYNTHETIC subject lies in the atlas: the subject grid and its known transform.

A subject is the atlas lung moved by a known 4x4 world transform ``T`` (atlas physical RAS mm -> subject
physical RAS mm: anisotropic scale, small rotation, translation) plus an optional smooth non-rigid
displacement ``u``. The subject voxel at physical point ``y`` shows the atlas content at
``T^-1 y + u(y)``. With amplitude 0 the subject is exactly ``T`` applied to the atlas, which is what a test of
affine registration needs. ``u`` is a short sum of tensor-product sinusoids, so it is smooth, cheap to evaluate
on a grid (separable) and fully described by a few numbers saved in the subject's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Default field of view: lungs of the atlas scaled by up to ~1.05 stay inside with air around the body.
DEFAULT_FOV_MM = (384.0, 384.0, 336.0)
# Physical point the FOV is centred on (a table position typical of a chest scan).
DEFAULT_FOV_CENTRE_MM = (0.0, 0.0, -180.0)


@dataclass(frozen=True)
class SubjectGrid:
    """Voxel grid of a synthetic CT: axial slices, x to the patient's left, y posterior, z superior (LPS
    voxel axes, as an HFS axial DICOM series), stored with a RAS affine like MONAI's readers give."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray  # 4x4 voxel index (x, y, z) -> RAS mm

    def axis_mm(self, axis: int) -> np.ndarray:
        """Physical RAS coordinate along ``axis`` of the voxels on that axis (the affine is diagonal)."""
        idx = np.arange(self.shape[axis], dtype=np.float64)
        return self.affine[axis, axis] * idx + self.affine[axis, 3]


def make_subject_grid(
    voxel_size: float | tuple[float, float, float] = 2.0,
    fov_mm: tuple[float, float, float] = DEFAULT_FOV_MM,
    fov_centre_mm: tuple[float, float, float] = DEFAULT_FOV_CENTRE_MM,
) -> SubjectGrid:
    """Grid covering ``fov_mm`` at ``voxel_size`` (mm, scalar or per axis), centred on ``fov_centre_mm``."""
    spacing = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,)).copy()
    if np.any(spacing <= 0):
        raise ValueError(f"voxel_size must be positive, got {voxel_size}")
    shape = tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing))
    axis_sign = np.array([-1.0, -1.0, 1.0])  # LPS voxel axes expressed in RAS
    affine = np.eye(4)
    affine[:3, :3] = np.diag(axis_sign * spacing)
    half_extent = (np.asarray(shape) - 1) / 2.0 * spacing * axis_sign
    affine[:3, 3] = np.asarray(fov_centre_mm, dtype=np.float64) - half_extent
    return SubjectGrid(shape=shape, spacing=tuple(float(s) for s in spacing), affine=affine)


def rotation_matrix(angles_deg) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def compose_world_transform(scale, rotation_deg, translation_mm, atlas_centre_mm, target_centre_mm) -> np.ndarray:
    """4x4 atlas-physical -> subject-physical transform: scale and rotate about the atlas lung centre, then
    put that centre at ``target_centre_mm + translation_mm``."""
    linear = rotation_matrix(rotation_deg) @ np.diag(np.asarray(scale, dtype=np.float64))
    transform = np.eye(4)
    transform[:3, :3] = linear
    centre = np.asarray(atlas_centre_mm, dtype=np.float64)
    transform[:3, 3] = np.asarray(target_centre_mm) + np.asarray(translation_mm) - linear @ centre
    return transform


def draw_world_transform(
    rng: np.random.Generator,
    atlas_centre_mm,
    target_centre_mm,
    size_factor: float = 1.0,
    scale_range: tuple[float, float] = (0.86, 1.0),
    anisotropy_sd: float = 0.015,
    max_rotation_deg: float = 4.0,
    max_translation_mm: tuple[float, float, float] = (4.0, 4.0, 6.0),
) -> dict:
    """Random subject pose and size; ``size_factor`` lets the inspiration level enlarge or shrink the lungs."""
    base = rng.uniform(*scale_range) * size_factor
    scale = base * (1.0 + anisotropy_sd * rng.standard_normal(3))
    rotation = rng.uniform(-max_rotation_deg, max_rotation_deg, size=3)
    translation = rng.uniform(-1.0, 1.0, size=3) * np.asarray(max_translation_mm)
    matrix = compose_world_transform(scale, rotation, translation, atlas_centre_mm, target_centre_mm)
    return {
        "scale": scale.tolist(),
        "rotation_deg": rotation.tolist(),
        "translation_mm": translation.tolist(),
        "atlas_centre_mm": np.asarray(atlas_centre_mm, dtype=np.float64).tolist(),
        "target_centre_mm": np.asarray(target_centre_mm, dtype=np.float64).tolist(),
        "atlas_to_subject": matrix.tolist(),
    }


def draw_deformation(rng: np.random.Generator, amplitude_mm: float = 4.0, num_components: int = 3) -> dict:
    """Smooth displacement u(y) = amplitude * sum_k c_k prod_a sin(2 pi f_ka t_a + phi_ka) per output axis,
    with t_a in [0, 1] across the FOV and sum_k |c_k| = 1, so |u| <= amplitude per axis."""
    components = []
    for axis in range(3):
        coefs = rng.uniform(-1.0, 1.0, size=num_components)
        coefs = coefs / max(np.abs(coefs).sum(), 1e-9)
        for k in range(num_components):
            components.append(
                {
                    "axis": axis,
                    "coef": float(coefs[k]),
                    "freq": rng.choice([0.5, 1.0, 1.5], size=3).tolist(),
                    "phase": rng.uniform(0, 2 * np.pi, size=3).tolist(),
                }
            )
    return {"amplitude_mm": float(amplitude_mm), "components": components}


def displacement_on_grid(grid: SubjectGrid, deformation: dict | None) -> np.ndarray | None:
    """(3, X, Y, Z) float32 displacement in atlas mm at every subject voxel; None when there is none."""
    if not deformation or deformation.get("amplitude_mm", 0.0) == 0.0:
        return None
    amp = float(deformation["amplitude_mm"])
    unit = [np.linspace(0.0, 1.0, n, dtype=np.float32) for n in grid.shape]
    disp = np.zeros((3, *grid.shape), dtype=np.float32)
    for comp in deformation["components"]:
        factors = [
            np.sin(2 * np.pi * f * t + p).astype(np.float32) for f, p, t in zip(comp["freq"], comp["phase"], unit)
        ]
        term = (amp * comp["coef"]) * factors[0][:, None, None] * factors[1][None, :, None]
        disp[comp["axis"]] += term * factors[2][None, None, :]
    return disp


def displacement_at(grid: SubjectGrid, deformation: dict | None, voxel: np.ndarray) -> np.ndarray:
    """Displacement (atlas mm) at subject voxel indices (N, 3); matches :func:`displacement_on_grid`."""
    voxel = np.atleast_2d(np.asarray(voxel, dtype=np.float64))
    out = np.zeros_like(voxel)
    if not deformation or deformation.get("amplitude_mm", 0.0) == 0.0:
        return out
    amp = float(deformation["amplitude_mm"])
    unit = voxel / np.maximum(np.asarray(grid.shape, dtype=np.float64) - 1, 1)
    for comp in deformation["components"]:
        term = amp * comp["coef"] * np.ones(len(voxel))
        for a in range(3):
            term *= np.sin(2 * np.pi * comp["freq"][a] * unit[:, a] + comp["phase"][a])
        out[:, comp["axis"]] += term
    return out


def subject_to_atlas_voxel(
    grid: SubjectGrid, atlas_to_subject: np.ndarray, atlas_affine: np.ndarray, deformation: dict | None
) -> np.ndarray:
    """(3, X, Y, Z) float32 atlas voxel coordinates (1 mm atlas grid) of every subject voxel."""
    subject_to_atlas = np.linalg.inv(atlas_affine) @ np.linalg.inv(atlas_to_subject) @ grid.affine
    idx = [np.arange(n, dtype=np.float32) for n in grid.shape]
    coords = np.empty((3, *grid.shape), dtype=np.float32)
    for d in range(3):
        m = subject_to_atlas[d].astype(np.float32)
        coords[d] = (m[0] * idx[0] + m[3])[:, None, None] + (m[1] * idx[1])[None, :, None]
        coords[d] += (m[2] * idx[2])[None, None, :]
    disp = displacement_on_grid(grid, deformation)
    if disp is not None:
        mm_to_voxel = np.linalg.inv(atlas_affine)[:3, :3].astype(np.float32)
        for d in range(3):
            for e in range(3):
                if mm_to_voxel[d, e] != 0.0:
                    coords[d] += mm_to_voxel[d, e] * disp[e]
    return coords


def subject_voxels_to_atlas_voxels(
    grid: SubjectGrid, atlas_to_subject: np.ndarray, atlas_affine: np.ndarray, deformation: dict | None, voxels
) -> np.ndarray:
    """Atlas voxel coordinates (N, 3) of subject voxel indices (N, 3), for annotations and tests."""
    voxels = np.atleast_2d(np.asarray(voxels, dtype=np.float64))
    homog = np.c_[voxels, np.ones(len(voxels))]
    atlas_mm = (np.linalg.inv(atlas_to_subject) @ grid.affine @ homog.T).T[:, :3]
    atlas_mm += displacement_at(grid, deformation, voxels)
    return (np.linalg.inv(atlas_affine) @ np.c_[atlas_mm, np.ones(len(atlas_mm))].T).T[:, :3]


def grid_from_transform(transform: dict) -> SubjectGrid:
    """The subject grid recorded in a subject's transform JSON."""
    return SubjectGrid(
        shape=tuple(int(n) for n in transform["subject_shape"]),
        spacing=tuple(float(s) for s in transform["subject_spacing"]),
        affine=np.asarray(transform["subject_affine"], dtype=np.float64),
    )


def subject_to_atlas_points(transform: dict, subject_voxels) -> np.ndarray:
    """Ground truth for registration tests: atlas voxel coordinates (1 mm grid, (N, 3)) of subject voxels,
    deformation included, from a subject's transform JSON."""
    return subject_voxels_to_atlas_voxels(
        grid_from_transform(transform),
        np.asarray(transform["atlas_to_subject"]),
        np.asarray(transform["atlas_affine"]),
        transform["deformation"],
        subject_voxels,
    )


def atlas_to_subject_points(transform: dict, atlas_voxels, iterations: int = 30) -> np.ndarray:
    """Inverse of :func:`subject_to_atlas_points`: where atlas voxels (e.g. the 581 landmark centres) lie in
    the subject grid. Solves inv(T) A_s v + u(v) = A_a a by fixed-point iteration (u is small and smooth,
    so the map is a contraction); exact in one step when there is no deformation."""
    grid = grid_from_transform(transform)
    atlas_to_subject = np.asarray(transform["atlas_to_subject"])
    atlas_affine = np.asarray(transform["atlas_affine"])
    atlas_voxels = np.atleast_2d(np.asarray(atlas_voxels, dtype=np.float64))
    atlas_mm = (atlas_affine @ np.c_[atlas_voxels, np.ones(len(atlas_voxels))].T).T[:, :3]
    to_subject_voxel = np.linalg.inv(grid.affine) @ atlas_to_subject
    voxels = (to_subject_voxel @ np.c_[atlas_mm, np.ones(len(atlas_mm))].T).T[:, :3]
    for _ in range(iterations):
        target = atlas_mm - displacement_at(grid, transform["deformation"], voxels)
        voxels = (to_subject_voxel @ np.c_[target, np.ones(len(target))].T).T[:, :3]
    return voxels
