"""The scan pipeline: the MONAI dictionary transforms every workflow that reads a CT runs (DESIGN.md
"Architecture": one scan pipeline shared by prepare, embed, emphysema maps, fine-tuning boxes and MONAI Label).

    LoadCTd            path -> (1, X, Y, Z) HU MetaTensor: read (NIfTI / DICOM series), orient to the atlas's
                       axis codes, resample to 1 mm, check HU (``custom.prepare.io``)
    LungMaskd          the user's lung mask when the item names one, else the built-in segmentation
                       (``custom.prepare.lung_mask``); refuses less than ``min_lung_ml`` of lung
    RegisterToAtlasd   affine registration lung mask -> atlas lung mask (``custom.prepare.registration``) and its
                       Dice QC; the world -> atlas voxel map in the image meta, the whole result in ``registration``
    LandmarkPatchesd   the 581 atlas landmarks mapped into the subject, their 32^3 int16 HU patches and the QC
                       numbers of ``qc.json`` (``custom.prepare.landmarks``, ``custom.prepare.patches``)
    WritePreparedSubjectd  the cache entry of ``custom.prepare.cache`` (one atomic rename)

The bundle configs give them the same ids (``load``, ``lung_mask``, ``register``, then ``patches``, ``write`` in
``scan_pipeline``) in ``configs/prepare.yaml``, ``configs/embed.yaml`` and ``configs/inference.yaml`` (whose
``preprocessing`` continues with the emphysema channels, ``custom.emphysema.scan_transforms``), so overriding one
id on the command line changes every workflow alike. ``custom.prepare.pipeline.prepare_subject`` runs the chain
for one subject of a cohort.

Items are dicts ``{"image": path, "lung_mask": path or absent, "subject_id": ...}``. Every error names the file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from custom.data.atlas import atlas_mask_path, landmark_centres
from custom.prepare import cache
from custom.prepare.io import CTVolume, InputError, is_nifti, load_ct, load_mask_like
from custom.prepare.landmarks import (RegistrationQCError, atlas_share_inside_lung, map_landmarks,
                                     registration_dice, share_inside)
from custom.prepare.lung_mask import MIN_LUNG_ML, segment_lungs
from custom.prepare.patches import extract_patches
from custom.prepare.registration import get_recipe, register_to_atlas, working_image

DEFAULT_MIN_DICE = 0.5
AUTO_MASK = "auto"  # ``lung_mask`` of qc.json when the built-in segmentation was used
TRANSFORM_KEYS = ("atlas_to_subject_vox", "subject_to_atlas_vox", "subject_affine_ras", "atlas_affine_ras",
                  "subject_shape", "atlas_shape")  # what transform.json holds


# ----------------------------------------------------------------------------------------------- atlas
@dataclass
class AtlasContext:
    """The atlas as each worker needs it, loaded once per process."""

    mask: np.ndarray
    affine: np.ndarray
    axcodes: str
    centres: np.ndarray
    share_inside_lung: float
    fixed_images: dict

    def fixed_image(self, recipe):
        if recipe.name not in self.fixed_images:
            self.fixed_images[recipe.name] = working_image(self.mask, self.affine, recipe)
        return self.fixed_images[recipe.name]


@lru_cache(maxsize=2)
def load_atlas(atlas_dir: str | None = None) -> AtlasContext:
    image = nib.load(str(atlas_mask_path(atlas_dir)))
    mask = np.asarray(image.dataobj) > 0
    centres = landmark_centres(atlas_dir)
    return AtlasContext(mask=mask, affine=image.affine, axcodes="".join(nib.aff2axcodes(image.affine)),
                        centres=centres, share_inside_lung=atlas_share_inside_lung(mask, centres), fixed_images={})


def _atlas_dir(atlas_dir) -> str | None:
    return str(atlas_dir) if atlas_dir else None


# ----------------------------------------------------------------------------------------------- helpers
def _strip_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def subject_id_of(path: str | Path) -> str:
    return _strip_suffix(Path(str(path)).name) or "scan"


def input_grid(path: str | Path, ct: CTVolume) -> tuple:
    """(affine, shape) of the input's voxel grid: a NIfTI file's own grid; for a DICOM series its voxel lattice
    at its own spacing, in the atlas's axis order."""
    path = Path(path)
    if is_nifti(path):
        header = nib.load(str(path))
        return np.asarray(header.affine, dtype=np.float64), tuple(int(s) for s in header.shape[:3])
    affine = ct.affine.copy()  # the oriented input lattice: same origin and directions, native spacing
    affine[:3, :3] = ct.affine[:3, :3] * np.asarray(ct.original_spacing) / np.asarray(ct.spacing)
    return affine, tuple(ct.original_shape)


def meta_of(image: MetaTensor) -> dict:
    """The meta data to carry to a new MetaTensor on the same grid (the affine is passed separately)."""
    return {k: v for k, v in image.meta.items() if k != "affine"}


def _affine(image: MetaTensor) -> np.ndarray:
    return np.asarray(image.affine, dtype=np.float64)


def _as_ct(image: MetaTensor) -> CTVolume:
    meta = image.meta
    return CTVolume(hu=image[0].numpy(), affine=_affine(image), source=str(meta.get("filename_or_obj", "")),
                    original_spacing=(), original_shape=())


def _lung_of(mask) -> np.ndarray:
    """Boolean (X, Y, Z) lung of a (1, X, Y, Z) mask (MetaTensor, tensor or array) under the item's mask key."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return array[0] > 0


def _axcodes(image: MetaTensor, atlas_dir: str | None) -> str:
    return str(image.meta.get("axcodes") or load_atlas(atlas_dir).axcodes)


def transform_error(err: BaseException) -> BaseException:
    """The error a transform raised, below MONAI's ``RuntimeError("applying transform ...")`` wrappers (one per
    ``Compose`` / ``Dataset`` level), whose message would hide the one that names the file."""
    while (isinstance(err, RuntimeError) and str(err).startswith("applying transform")
           and err.__cause__ is not None):
        err = err.__cause__
    return err


def run_transforms(transforms, data: dict) -> dict:
    """``transforms(data)``, re-raising the error of the transform that failed (``transform_error``)."""
    try:
        return transforms(data)
    except RuntimeError as err:
        cause = transform_error(err)
        if cause is err:
            raise
        raise cause from None


# ----------------------------------------------------------------------------------------------- transforms
class LoadCTd(MapTransform):
    """Path (NIfTI file or DICOM series folder) -> (1, X, Y, Z) HU MetaTensor on the 1 mm grid in the atlas's
    axis order (``axcodes`` overrides it); meta: ``filename_or_obj``, ``subject_id``, ``axcodes``, the input
    grid (``original_affine``, ``spatial_shape``) and the oriented input's ``original_spacing`` / ``original_shape``.
    """

    def __init__(self, keys: KeysCollection = "image", atlas_dir: str | None = None, axcodes: str | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.atlas_dir = _atlas_dir(atlas_dir)
        self.axcodes = axcodes

    def __call__(self, data):
        d = dict(data)
        axcodes = self.axcodes or load_atlas(self.atlas_dir).axcodes
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, (str, Path)):
                raise TypeError(f"{key}: expected the path of a NIfTI file or DICOM folder, got {type(path).__name__}")
            if not str(path):
                raise InputError(f"subject {d.get('subject_id', '?')}: no image path given")
            ct = load_ct(path, axcodes=axcodes)
            original_affine, original_shape = input_grid(path, ct)
            meta = {"filename_or_obj": str(path), "original_affine": original_affine,
                    "spatial_shape": np.asarray(original_shape),
                    "subject_id": str(d.get("subject_id") or subject_id_of(path)), "axcodes": axcodes,
                    "original_spacing": np.asarray(ct.original_spacing, dtype=np.float64),
                    "original_shape": np.asarray(ct.original_shape, dtype=np.int64)}
            d[key] = MetaTensor(torch.from_numpy(ct.hu)[None], affine=torch.as_tensor(ct.affine), meta=meta)
            d.setdefault("subject_id", meta["subject_id"])
        return d


class LungMaskd(MapTransform):
    """The lung mask of ``keys`` (a loaded CT) into ``mask_key`` as a (1, X, Y, Z) uint8 MetaTensor: the user's
    mask when ``mask_key`` holds a path (sampled onto the CT grid), else the built-in classical segmentation.
    Less than ``min_lung_ml`` of lung is an error naming the file. The mask's meta ``lung_mask_source`` is the
    user's file or ``"auto"``."""

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "lung_mask", min_lung_ml: float = MIN_LUNG_ML,
                 atlas_dir: str | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.min_lung_ml = float(min_lung_ml)
        self.atlas_dir = _atlas_dir(atlas_dir)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            ct = _as_ct(image)
            voxel_ml = float(np.prod(ct.spacing)) / 1000.0
            user_mask = d.get(self.mask_key)
            if isinstance(user_mask, (str, Path)) and str(user_mask):
                lung = load_mask_like(user_mask, ct, axcodes=_axcodes(image, self.atlas_dir))
                if lung.sum() * voxel_ml < self.min_lung_ml:
                    raise InputError(f"{user_mask}: lung mask holds only {lung.sum() * voxel_ml:.0f} ml")
                source = str(user_mask)
            else:
                lung = segment_lungs(ct.hu, spacing_mm=float(np.mean(ct.spacing)), source=ct.source,
                                     min_volume_ml=self.min_lung_ml)
                source = AUTO_MASK
            meta = {**meta_of(image), "lung_mask_source": source}
            d[self.mask_key] = MetaTensor(torch.from_numpy(np.asarray(lung, dtype=np.uint8))[None],
                                          affine=image.affine, meta=meta)
        return d


class RegisterToAtlasd(MapTransform):
    """Affine registration of the lung mask (``mask_key``) to the atlas lung mask with a ``custom.prepare``
    recipe, and its QC: a lung overlap (Dice) below ``min_dice`` is a ``RegistrationQCError`` naming the file.

    Image meta: ``atlas_from_world`` (world -> atlas voxel; cropping does not change it), ``registration_dice``,
    ``registration_seconds``. ``registration_key`` of the item: the whole result, what the cache entry stores
    (``TRANSFORM_KEYS`` as in ``transform.json``, ``transform_mat`` = the bytes of the ANTs/ITK transform file,
    ``dice``, ``seconds``, ``recipe``)."""

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "lung_mask", registration: str = "fast",
                 min_dice: float = DEFAULT_MIN_DICE, atlas_dir: str | None = None,
                 registration_key: str = "registration", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.recipe = get_recipe(registration)
        self.min_dice = float(min_dice)
        self.atlas_dir = _atlas_dir(atlas_dir)
        self.registration_key = registration_key

    def __call__(self, data):
        d = dict(data)
        atlas = load_atlas(self.atlas_dir)
        for key in self.key_iterator(d):
            image = d[key]
            source = image.meta.get("filename_or_obj", key)
            lung = _lung_of(d[self.mask_key])
            affine = _affine(image)
            try:
                result = register_to_atlas(lung, affine, atlas.mask, atlas.affine, self.recipe,
                                           atlas_image=atlas.fixed_image(self.recipe))
            except Exception as err:
                raise RegistrationQCError(f"{source}: affine registration to the atlas failed: {err}") from err
            try:
                dice = registration_dice(lung, result.subject_to_atlas_vox, atlas.mask)
                transform_mat = Path(result.ants_transform_path).read_bytes()
            finally:
                result.cleanup()
            if dice < self.min_dice:
                raise RegistrationQCError(f"{source}: registration to the atlas failed QC: lung overlap (Dice) "
                                          f"{dice:.2f} < {self.min_dice:.2f}; check the lung mask and the image "
                                          "orientation")
            image.meta["atlas_from_world"] = result.subject_to_atlas_vox @ np.linalg.inv(affine)
            image.meta["registration_dice"] = round(float(dice), 4)
            image.meta["registration_seconds"] = round(result.seconds, 2)
            d[self.registration_key] = {
                "atlas_to_subject_vox": result.atlas_to_subject_vox,
                "subject_to_atlas_vox": result.subject_to_atlas_vox,
                "subject_affine_ras": affine, "atlas_affine_ras": atlas.affine,
                "subject_shape": [int(s) for s in image.shape[1:]], "atlas_shape": list(atlas.mask.shape),
                "transform_mat": transform_mat, "dice": float(dice), "seconds": result.seconds,
                "recipe": result.recipe,
            }
        return d


class LandmarkPatchesd(MapTransform):
    """The atlas landmark centres sent through the registration's atlas -> subject map (``landmarks_key``,
    (J, 3) float64 voxels), their 32^3 int16 HU patches (``patches_key``, (J, 32, 32, 32)), and the QC numbers of
    ``qc.json`` (``qc_key``): subject, source, lung mask, Dice, share of landmarks inside the lung and the atlas's
    own share, lung volume, registration time and recipe, grid and input spacing / shape, axis codes."""

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "lung_mask",
                 registration_key: str = "registration", atlas_dir: str | None = None,
                 patches_key: str = "patches", landmarks_key: str = "landmarks_vox", qc_key: str = "qc",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.registration_key = registration_key
        self.atlas_dir = _atlas_dir(atlas_dir)
        self.patches_key = patches_key
        self.landmarks_key = landmarks_key
        self.qc_key = qc_key

    def __call__(self, data):
        d = dict(data)
        atlas = load_atlas(self.atlas_dir)
        for key in self.key_iterator(d):
            image = d[key]
            meta = image.meta
            mask = d[self.mask_key]
            registration = d[self.registration_key]
            hu = image[0].numpy()
            lung = _lung_of(mask)
            spacing = tuple(float(s) for s in np.linalg.norm(_affine(image)[:3, :3], axis=0))
            voxel_ml = float(np.prod(spacing)) / 1000.0
            landmarks = map_landmarks(registration["atlas_to_subject_vox"], atlas.centres)
            d[self.landmarks_key] = landmarks
            d[self.patches_key] = extract_patches(hu, landmarks)
            d[self.qc_key] = {
                "subject_id": str(d.get("subject_id") or meta.get("subject_id")),
                "source": str(meta.get("filename_or_obj", "")),
                "lung_mask": str(getattr(mask, "meta", {}).get("lung_mask_source", AUTO_MASK)),
                "num_landmarks": int(len(landmarks)), "dice": round(registration["dice"], 4),
                "share_inside_lung": round(share_inside(landmarks, lung), 4),
                "atlas_share_inside_lung": round(atlas.share_inside_lung, 4),
                "lung_volume_ml": round(float(lung.sum()) * voxel_ml, 1),
                "registration_seconds": round(registration["seconds"], 2),
                "registration_recipe": registration["recipe"],
                "spacing": list(spacing), "shape": [int(s) for s in hu.shape],
                "original_spacing": np.asarray(meta["original_spacing"], dtype=np.float64).tolist(),
                "original_shape": np.asarray(meta["original_shape"], dtype=np.int64).tolist(),
                "axcodes": _axcodes(image, self.atlas_dir),
            }
        return d


class WritePreparedSubjectd(MapTransform):
    """Write the prepared subject (``keys``: its patches; landmarks, registration and QC from the keys of
    ``LandmarkPatchesd`` / ``RegisterToAtlasd``) as one cache entry ``<cache_dir>/<subject_id>/``
    (``custom.prepare.cache.write_subject_entry``: a temporary folder renamed into place). ``cache_dir``: fixed
    here, or else the item's ``cache_dir_key`` (what ``prepare_subject`` sets). QC ``seconds`` counts from the
    item's ``started`` (``time.perf_counter()`` when the subject began). The entry's path goes to ``entry_key``."""

    def __init__(self, keys: KeysCollection = "patches", cache_dir: str | None = None, cache_dir_key: str = "cache_dir",
                 landmarks_key: str = "landmarks_vox", registration_key: str = "registration", qc_key: str = "qc",
                 entry_key: str = "entry", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.cache_dir = cache_dir
        self.cache_dir_key = cache_dir_key
        self.landmarks_key = landmarks_key
        self.registration_key = registration_key
        self.qc_key = qc_key
        self.entry_key = entry_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            cache_dir = self.cache_dir or d.get(self.cache_dir_key)
            if not cache_dir:
                raise ValueError(f"WritePreparedSubjectd: no cache_dir, and the item has no {self.cache_dir_key!r}")
            registration = d[self.registration_key]
            qc = dict(d[self.qc_key])
            started = d.get("started")
            qc["seconds"] = round(time.perf_counter() - started, 2) if started is not None else None
            transform = {k: registration[k] for k in TRANSFORM_KEYS}
            entry = cache.write_subject_entry(cache_dir, qc["subject_id"], d[key], d[self.landmarks_key],
                                              registration["transform_mat"], transform, qc)
            d[self.entry_key] = str(entry)
            d[self.qc_key] = qc
        return d


def load_scan(image: str | Path, lung_mask: str | Path | None = None, axcodes: str | None = None,
              atlas_dir: str | None = None) -> tuple:
    """``LoadCTd`` then ``LungMaskd`` on one scan (``lung_mask``: the user's mask, or None / "auto" for the
    built-in segmentation): (the (1, X, Y, Z) HU MetaTensor, the boolean (X, Y, Z) lung mask), as the scan
    pipeline makes them. Reloads a prepared subject with its ``qc.json`` ``source``, ``lung_mask``, ``axcodes``."""
    from monai.transforms import Compose

    user_mask = None if lung_mask in (None, "", AUTO_MASK) else str(lung_mask)
    chain = Compose([LoadCTd("image", atlas_dir=atlas_dir, axcodes=axcodes),
                     LungMaskd("image", mask_key="lung_mask", atlas_dir=atlas_dir)])
    out = run_transforms(chain, {"image": str(image), "lung_mask": user_mask})
    return out["image"], _lung_of(out["lung_mask"])


__all__ = [
    "AUTO_MASK",
    "AtlasContext",
    "DEFAULT_MIN_DICE",
    "LandmarkPatchesd",
    "LoadCTd",
    "LungMaskd",
    "RegisterToAtlasd",
    "WritePreparedSubjectd",
    "input_grid",
    "load_atlas",
    "load_scan",
    "meta_of",
    "run_transforms",
    "subject_id_of",
    "transform_error",
]
