"""Affine registration of a subject's lung mask to the atlas lung mask with antspyx (mutual information).

As in the paper (section 3) masks are registered, not raw CT: it is faster and robust to disease and contrast.
The atlas is the fixed image and the subject the moving one, so ANTs' forward transform resamples the subject
into atlas space (subject -> atlas); as a point map it sends atlas points to subject points, which is how the
landmarks travel (atlas -> subject, paper: p_i^j = phi_i^{-1}(p^j)).

Two recipes:
- ``REFERENCE``: the reference run (full 1 mm masks, MI, 500x250x100 iterations, shrink 4x2x1, smoothing
  2x1x0 voxels); about 6-7 minutes per subject on one CPU.
- ``FAST`` (default): masks cropped to the lung with a 20 mm margin and block-averaged to 3 mm (the border
  stays a soft fraction, so sub-voxel position survives), shrink 2x1 (6 mm then 3 mm), 40x20 iterations, 10 %
  random sampling (seeded, one ITK thread: reproducible), centre-of-mass start. A smooth lung outline needs no
  finer grid, so the result is as accurate at a small fraction of the time;
  ``bundle/scripts/benchmark_registration.py`` measures both side by side.

World coordinates: MONAI affines are RAS; ANTs/ITK physical space is LPS. ``ras_to_ants`` converts headers so
the ANTs transform file is a valid ITK transform between the two physical spaces.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# ITK reads its thread count once, when the process makes its first ITK object. Multi-threaded metric sums make
# the registration differ from run to run even with a seed, so prepare runs ITK in one thread (the fast recipe
# works on a 3 mm grid: threads gain little; parallelism comes from subjects, in workers or ranks). A user who
# sets the variable keeps their value, and with it run-to-run variation.
ITK_THREADS = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
os.environ.setdefault(ITK_THREADS, "1")


@dataclass(frozen=True)
class RegistrationRecipe:
    """How to run the ANTs affine registration (see the module docstring for the two shipped ones)."""

    name: str
    working_mm: float  # masks are averaged down to this spacing before ANTs sees them
    crop_margin_mm: float | None  # crop both masks to the lung bounding box plus this margin; None = no crop
    iterations: tuple = (40, 20)
    shrink_factors: tuple = (2, 1)
    smoothing_sigmas: tuple = (1, 0)  # voxels of the working grid
    metric: str = "mattes"  # Mattes mutual information
    histogram_bins: int = 32
    sampling_rate: float = 0.25
    extra: dict = field(default_factory=dict)


FAST = RegistrationRecipe(name="fast", working_mm=3.0, crop_margin_mm=20.0, iterations=(40, 20), sampling_rate=0.1)
REFERENCE = RegistrationRecipe(
    name="reference",
    working_mm=1.0,
    crop_margin_mm=None,
    iterations=(500, 250, 100),
    shrink_factors=(4, 2, 1),
    smoothing_sigmas=(2, 1, 0),
    sampling_rate=0.2,
)
RECIPES = {r.name: r for r in (FAST, REFERENCE)}


def get_recipe(recipe: str | RegistrationRecipe) -> RegistrationRecipe:
    if isinstance(recipe, RegistrationRecipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown registration recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[recipe]


@dataclass
class AffineRegistration:
    """Result: voxel-to-voxel maps both ways (4x4, homogeneous) and the ANTs transform file (subject->atlas)."""

    atlas_to_subject_vox: np.ndarray
    subject_to_atlas_vox: np.ndarray
    ants_transform_path: str
    seconds: float
    recipe: str

    def cleanup(self) -> None:
        shutil.rmtree(os.path.dirname(self.ants_transform_path), ignore_errors=True)


def ras_to_ants(array: np.ndarray, affine_ras: np.ndarray):
    """ANTs image of an (x, y, z) array with a RAS affine (ANTs headers are LPS)."""
    import ants

    lps = RAS_TO_LPS @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return ants.from_numpy(
        np.asarray(array, dtype=np.float32),
        origin=[float(v) for v in lps[:3, 3]],
        spacing=[float(v) for v in spacing],
        direction=lps[:3, :3] / spacing,
    )


def ants_affine_to_matrix(path: str) -> np.ndarray:
    """4x4 LPS point map of an ITK/ANTs affine file: y = A (x - c) + t + c."""
    import ants

    tx = ants.read_transform(path)
    params = np.asarray(tx.parameters, dtype=np.float64)
    centre = np.asarray(tx.fixed_parameters, dtype=np.float64)
    linear = params[:9].reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = params[9:12] + centre - linear @ centre
    return matrix


def crop_to_mask(mask: np.ndarray, affine: np.ndarray, margin_mm: float):
    """Crop to the mask's bounding box plus a margin; returns (cropped mask, its affine)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    nonzero = (
        np.nonzero(mask.any(axis=(1, 2)))[0],
        np.nonzero(mask.any(axis=(0, 2)))[0],
        np.nonzero(mask.any(axis=(0, 1)))[0],
    )
    if any(len(n) == 0 for n in nonzero):
        raise ValueError("empty lung mask: nothing to register")
    lo = [max(0, int(n[0] - np.ceil(margin_mm / s))) for n, s in zip(nonzero, spacing)]
    hi = [min(mask.shape[a], int(n[-1] + 1 + np.ceil(margin_mm / s))) for a, (n, s) in enumerate(zip(nonzero, spacing))]
    shift = np.eye(4)
    shift[:3, 3] = lo
    return mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], affine @ shift


def average_down(mask: np.ndarray, affine: np.ndarray, factor: int):
    """Block-average a binary mask by an integer factor: a soft border keeps sub-voxel position information."""
    if factor == 1:
        return mask.astype(np.float32), affine
    pad = [(0, (-n) % factor) for n in mask.shape]
    padded = np.pad(mask.astype(np.float32), pad)
    shape = []
    for n in padded.shape:
        shape += [n // factor, factor]
    coarse = padded.reshape(shape).mean(axis=(1, 3, 5))
    scale = np.eye(4)
    scale[:3, :3] *= factor
    scale[:3, 3] = (factor - 1) / 2.0  # centre of the block, in fine voxels
    return coarse, affine @ scale


def working_image(mask: np.ndarray, affine: np.ndarray, recipe: RegistrationRecipe):
    """The ANTs image a recipe registers: optional crop, then block averaging to the working spacing."""
    binary = np.asarray(mask) > 0
    if recipe.crop_margin_mm is not None:
        binary, affine = crop_to_mask(binary, affine, recipe.crop_margin_mm)
    spacing = float(np.linalg.norm(affine[:3, :3], axis=0).mean())
    factor = max(1, int(round(recipe.working_mm / spacing)))
    soft, affine = average_down(binary, affine, factor)
    return ras_to_ants(soft, affine)


REGISTRATION_SEED = 2024


@contextmanager
def _seeded_ants(seed: int | None):
    """ANTs' random metric sampling with a fixed seed (restored afterwards). With one ITK thread (set when this
    module is imported, see ``ITK_THREADS``) the sampled points then do not depend on the run or on thread
    scheduling, so preparing a scan twice, or on another rank, gives the same transform. ``seed=None``: as ANTs
    does by default, a new draw each run. ANTs treats seed 0 as "unseeded", so 0 is refused."""
    if seed is None:
        yield
        return
    if int(seed) <= 0:
        raise ValueError(f"registration seed must be a positive integer (ANTs treats 0 as unseeded), got {seed}")
    import ants

    saved = ants.config._random_seed
    ants.config._random_seed = int(seed)
    try:
        yield
    finally:
        ants.config._random_seed = saved


def register_to_atlas(
    subject_mask: np.ndarray,
    subject_affine: np.ndarray,
    atlas_mask: np.ndarray,
    atlas_affine: np.ndarray,
    recipe: str | RegistrationRecipe = "fast",
    atlas_image=None,
    seed: int | None = REGISTRATION_SEED,
) -> AffineRegistration:
    """Affine-register the subject lung mask (moving) to the atlas lung mask (fixed); RAS affines in.
    Seeded by default, so the result is reproducible (see ``_deterministic_ants``)."""
    import ants

    recipe = get_recipe(recipe)
    start = time.perf_counter()
    fixed = atlas_image if atlas_image is not None else working_image(atlas_mask, atlas_affine, recipe)
    moving = working_image(subject_mask, subject_affine, recipe)
    out_dir = tempfile.mkdtemp(prefix="drasclr_reg_")
    with _seeded_ants(seed):
        result = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform="Affine",
            aff_metric=recipe.metric,
            aff_sampling=recipe.histogram_bins,
            aff_random_sampling_rate=recipe.sampling_rate,
            aff_iterations=tuple(recipe.iterations),
            aff_shrink_factors=tuple(recipe.shrink_factors),
            aff_smoothing_sigmas=tuple(recipe.smoothing_sigmas),
            outprefix=os.path.join(out_dir, "reg_"),
            **recipe.extra,
        )
    transform_path = result["fwdtransforms"][0]
    atlas_lps_to_subject_lps = ants_affine_to_matrix(transform_path)
    atlas_vox_to_lps = RAS_TO_LPS @ atlas_affine
    subject_vox_to_lps = RAS_TO_LPS @ subject_affine
    atlas_to_subject = np.linalg.solve(subject_vox_to_lps, atlas_lps_to_subject_lps @ atlas_vox_to_lps)
    return AffineRegistration(
        atlas_to_subject_vox=atlas_to_subject,
        subject_to_atlas_vox=np.linalg.inv(atlas_to_subject),
        ants_transform_path=transform_path,
        seconds=time.perf_counter() - start,
        recipe=recipe.name,
    )
