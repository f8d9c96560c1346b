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

import json
import logging
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
from custom.prepare import anatomy_qc, cache
from custom.prepare.io import CTVolume, InputError, is_nifti, load_ct, load_mask_like
from custom.prepare.landmarks import (
    RegistrationQCError,
    atlas_share_inside_lung,
    map_landmarks,
    registration_dice,
    share_inside,
)
from custom.prepare.lung_mask import MIN_LUNG_ML, segment_lungs
from custom.prepare.patches import extract_patches
from custom.prepare.registration import get_recipe, register_to_atlas, working_image

DEFAULT_MIN_DICE = 0.5
logger = logging.getLogger("drasclr.prepare")
AUTO_MASK = "auto"  # ``lung_mask`` of qc.json when the built-in segmentation was used
TRANSFORM_KEYS = (
    "atlas_to_subject_vox",
    "subject_to_atlas_vox",
    "subject_affine_ras",
    "atlas_affine_ras",
    "subject_shape",
    "atlas_shape",
)  # what transform.json holds


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
    return AtlasContext(
        mask=mask,
        affine=image.affine,
        axcodes="".join(nib.aff2axcodes(image.affine)),
        centres=centres,
        share_inside_lung=atlas_share_inside_lung(mask, centres),
        fixed_images={},
    )


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
    return CTVolume(
        hu=image[0].numpy(),
        affine=_affine(image),
        source=str(meta.get("filename_or_obj", "")),
        original_spacing=(),
        original_shape=(),
    )


def _lung_of(mask) -> np.ndarray:
    """Boolean (X, Y, Z) lung of a (1, X, Y, Z) mask (MetaTensor, tensor or array) under the item's mask key."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return array[0] > 0


def _axcodes(image: MetaTensor, atlas_dir: str | None) -> str:
    return str(image.meta.get("axcodes") or load_atlas(atlas_dir).axcodes)


def transform_error(err: BaseException) -> BaseException:
    """The error a transform raised, below MONAI's ``RuntimeError("applying transform ...")`` wrappers (one per
    ``Compose`` / ``Dataset`` level), whose message would hide the one that names the file."""
    while isinstance(err, RuntimeError) and str(err).startswith("applying transform") and err.__cause__ is not None:
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

    def __init__(
        self,
        keys: KeysCollection = "image",
        atlas_dir: str | None = None,
        axcodes: str | None = None,
        allow_missing_keys: bool = False,
    ):
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
            meta = {
                "filename_or_obj": str(path),
                "original_affine": original_affine,
                "spatial_shape": np.asarray(original_shape),
                "subject_id": str(d.get("subject_id") or subject_id_of(path)),
                "axcodes": axcodes,
                "original_spacing": np.asarray(ct.original_spacing, dtype=np.float64),
                "original_shape": np.asarray(ct.original_shape, dtype=np.int64),
            }
            d[key] = MetaTensor(torch.from_numpy(ct.hu)[None], affine=torch.as_tensor(ct.affine), meta=meta)
            d.setdefault("subject_id", meta["subject_id"])
        return d


class LungMaskd(MapTransform):
    """The lung mask of ``keys`` (a loaded CT) into ``mask_key`` as a (1, X, Y, Z) uint8 MetaTensor: the user's
    mask when ``mask_key`` holds a path (sampled onto the CT grid), else the built-in classical segmentation.
    Less than ``min_lung_ml`` of lung is an error naming the file. The mask's meta ``lung_mask_source`` is the
    user's file or ``"auto"``."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "lung_mask",
        min_lung_ml: float = MIN_LUNG_ML,
        atlas_dir: str | None = None,
        allow_missing_keys: bool = False,
    ):
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
                lung = segment_lungs(
                    ct.hu, spacing_mm=float(np.mean(ct.spacing)), source=ct.source, min_volume_ml=self.min_lung_ml
                )
                source = AUTO_MASK
            meta = {**meta_of(image), "lung_mask_source": source}
            d[self.mask_key] = MetaTensor(
                torch.from_numpy(np.asarray(lung, dtype=np.uint8))[None], affine=image.affine, meta=meta
            )
        return d


class RegisterToAtlasd(MapTransform):
    """Affine registration of the lung mask (``mask_key``) to the atlas lung mask with a ``custom.prepare``
    recipe, then the anatomy QC of ``custom.prepare.anatomy_qc``: field of view (lungs cut off at an edge),
    orientation (an axis flipped), slice spacing, registration quality (Dice, landmarks inside the lung). A
    failure raises ``AnatomyQCError`` (a ``RegistrationQCError``) naming the file and every reason; ``accept``
    (e.g. ``["cut_off"]``, ``"cut_off,flipped"``) lets cut-off or flipped scans through knowingly, as warnings.
    Warnings are logged and kept with the result. ``check_orientation=False`` skips the four coarse extra
    registrations of the orientation check (about 2 s).

    Image meta: ``atlas_from_world`` (world -> atlas voxel; cropping does not change it), ``registration_dice``,
    ``registration_seconds``, ``qc_status`` (ok / warning) and ``qc_reasons`` (one line). ``registration_key``
    of the item: the whole result, what the cache entry stores (``TRANSFORM_KEYS`` as in ``transform.json``,
    ``transform_mat`` = the bytes of the ANTs/ITK transform file, ``dice``, ``seconds``, ``recipe``, ``qc``: the
    QC fields of ``qc.json``). With ``failure_pictures`` and an item ``cache_dir`` (prepare, embed) or else
    ``output_dir`` (a scan of the emphysema inference), a subject that fails QC leaves its picture and numbers in
    ``<that folder>/.qc_failed/<subject_id>.png`` / ``.json`` for the cohort QC sheet."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "lung_mask",
        registration: str = "fast",
        min_dice: float = DEFAULT_MIN_DICE,
        atlas_dir: str | None = None,
        registration_key: str = "registration",
        accept=(),
        check_orientation: bool = True,
        max_edge_share: float = anatomy_qc.QCLimits.max_edge_share,
        flip_margin: float = anatomy_qc.QCLimits.flip_margin,
        max_slice_mm: float = anatomy_qc.QCLimits.max_slice_mm,
        warn_dice: float = anatomy_qc.QCLimits.warn_dice,
        warn_share_ratio: float = anatomy_qc.QCLimits.warn_share_ratio,
        failure_pictures: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.recipe = get_recipe(registration)
        self.min_dice = float(min_dice)
        self.atlas_dir = _atlas_dir(atlas_dir)
        self.registration_key = registration_key
        self.accept = anatomy_qc.parse_accept(accept)
        self.check_orientation = bool(check_orientation)
        self.limits = anatomy_qc.QCLimits(
            max_edge_share=float(max_edge_share),
            flip_margin=float(flip_margin),
            max_slice_mm=float(max_slice_mm),
            min_dice=self.min_dice,
            warn_dice=float(warn_dice),
            warn_share_ratio=float(warn_share_ratio),
        )
        self.failure_pictures = bool(failure_pictures)

    def __call__(self, data):
        d = dict(data)
        atlas = load_atlas(self.atlas_dir)
        for key in self.key_iterator(d):
            image = d[key]
            source = image.meta.get("filename_or_obj", key)
            lung = _lung_of(d[self.mask_key])
            affine = _affine(image)
            try:
                result = register_to_atlas(
                    lung, affine, atlas.mask, atlas.affine, self.recipe, atlas_image=atlas.fixed_image(self.recipe)
                )
            except Exception as err:
                raise RegistrationQCError(f"{source}: affine registration to the atlas failed: {err}") from err
            try:
                dice = registration_dice(lung, result.subject_to_atlas_vox, atlas.mask)
                transform_mat = Path(result.ants_transform_path).read_bytes()
            finally:
                result.cleanup()
            started = time.perf_counter()
            axcodes = _axcodes(image, self.atlas_dir)
            landmarks = map_landmarks(result.atlas_to_subject_vox, atlas.centres)
            spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
            measures = {
                "dice": round(float(dice), 4),
                "share_inside_lung": round(share_inside(landmarks, lung), 4),
                "atlas_share_inside_lung": round(atlas.share_inside_lung, 4),
                "edge_share": anatomy_qc.edge_shares(
                    lung, spacing, axcodes, self.limits.edge_mm, self.limits.airway_mm2
                ),
                "orientation_dice": (
                    anatomy_qc.orientation_dice(
                        lung,
                        affine,
                        atlas.mask,
                        atlas.affine,
                        axcodes,
                        self.limits.orientation_mm,
                        given_atlas_to_subject_world=affine @ result.atlas_to_subject_vox @ np.linalg.inv(atlas.affine),
                    )
                    if self.check_orientation
                    else None
                ),
                "slice_mm": anatomy_qc.slice_spacing(image.meta.get("original_spacing", ()), axcodes),
            }
            verdict = anatomy_qc.assess(measures, self.limits, self.accept)
            qc = verdict.as_qc()
            qc["qc_seconds"] = round(time.perf_counter() - started, 2)
            subject_id = str(d.get("subject_id") or image.meta.get("subject_id") or subject_id_of(source))
            if verdict.failures:
                record_dir = d.get("cache_dir") or d.get("output_dir")  # prepare / embed; emphysema inference
                if self.failure_pictures and record_dir:
                    _failure_record(record_dir, subject_id, str(source), image, lung, landmarks, qc)
                accept_hint = sorted({f.check for f in verdict.failures} & set(anatomy_qc.ACCEPTABLE))
                hint = f" (to prepare it anyway: register accept {accept_hint})" if accept_hint else ""
                raise anatomy_qc.AnatomyQCError(
                    f"{source}: failed QC: " + "; ".join(f.text() for f in verdict.failures) + hint,
                    qc={"subject_id": subject_id, "source": str(source), **qc},
                )
            if verdict.status == anatomy_qc.WARNING:
                logger.warning("%s: QC warning: %s", source, anatomy_qc.reason_text(qc))
            image.meta["atlas_from_world"] = result.subject_to_atlas_vox @ np.linalg.inv(affine)
            image.meta["registration_dice"] = round(float(dice), 4)
            image.meta["registration_seconds"] = round(result.seconds, 2)
            image.meta["qc_status"] = verdict.status
            image.meta["qc_reasons"] = anatomy_qc.reason_text(qc)
            d[self.registration_key] = {
                "atlas_to_subject_vox": result.atlas_to_subject_vox,
                "subject_to_atlas_vox": result.subject_to_atlas_vox,
                "subject_affine_ras": affine,
                "atlas_affine_ras": atlas.affine,
                "subject_shape": [int(s) for s in image.shape[1:]],
                "atlas_shape": list(atlas.mask.shape),
                "transform_mat": transform_mat,
                "dice": float(dice),
                "seconds": result.seconds,
                "recipe": result.recipe,
                "qc": qc,
            }
        return d


def _failure_record(cache_dir, subject_id: str, source: str, image, lung, landmarks, qc: dict) -> None:
    """The QC picture and numbers of a subject that failed QC (``<cache_dir>/.qc_failed/<subject_id>.png`` /
    ``.json``), for the cohort sheet; a problem here never hides the failure."""
    try:
        from custom.atomic_io import atomic_path

        folder = Path(cache_dir) / cache.QC_FAILED_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = cache.safe_subject_id(subject_id)
        record = {"subject_id": subject_id, "source": source, **qc}
        with atomic_path(folder / f"{name}.json") as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2, default=cache._json_default))
        png = _picture_bytes(image, lung, landmarks, record)
        if png is not None:
            with atomic_path(folder / f"{name}.png") as tmp:
                Path(tmp).write_bytes(png)
    except Exception as err:  # noqa: BLE001
        logger.debug("%s: no QC failure record: %s", subject_id, err)


def _forget_failure(cache_dir, subject_id: str) -> None:
    """A subject prepared now: its failure record of an earlier run goes."""
    for suffix in (".png", ".json"):
        (Path(cache_dir) / cache.QC_FAILED_DIR / f"{subject_id}{suffix}").unlink(missing_ok=True)


class LandmarkPatchesd(MapTransform):
    """The atlas landmark centres sent through the registration's atlas -> subject map (``landmarks_key``,
    (J, 3) float64 voxels), their 32^3 int16 HU patches (``patches_key``, (J, 32, 32, 32)), and the QC numbers of
    ``qc.json`` (``qc_key``): subject, source, lung mask, Dice, share of landmarks inside the lung and the atlas's
    own share, lung volume, registration time and recipe, grid and input spacing / shape, axis codes, and the
    anatomy QC of ``RegisterToAtlasd`` (``qc_status``, ``qc_reasons``, its numbers)."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "lung_mask",
        registration_key: str = "registration",
        atlas_dir: str | None = None,
        patches_key: str = "patches",
        landmarks_key: str = "landmarks_vox",
        qc_key: str = "qc",
        allow_missing_keys: bool = False,
    ):
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
            image, mask, registration = d[key], d[self.mask_key], d[self.registration_key]
            landmarks = map_landmarks(registration["atlas_to_subject_vox"], atlas.centres)
            d[self.landmarks_key] = landmarks
            d[self.patches_key] = extract_patches(image[0].numpy(), landmarks)
            d[self.qc_key] = _qc_record(d, image, mask, registration, landmarks, atlas, self.atlas_dir)
        return d


def _qc_record(d: dict, image, mask, registration: dict, landmarks: np.ndarray, atlas, atlas_dir) -> dict:
    """The QC numbers of qc.json for one registered scan (one definition for the prepare cache entry and the
    emphysema inference's ``<output_dir>/<subject_id>/qc.json``)."""
    meta = image.meta
    lung = _lung_of(mask)
    spacing = tuple(float(s) for s in np.linalg.norm(_affine(image)[:3, :3], axis=0))
    source = str(meta.get("filename_or_obj", ""))
    return {
        "subject_id": str(d.get("subject_id") or meta.get("subject_id") or subject_id_of(source)),
        "source": source,
        "lung_mask": str(getattr(mask, "meta", {}).get("lung_mask_source", AUTO_MASK)),
        "num_landmarks": int(len(landmarks)),
        "dice": round(registration["dice"], 4),
        "share_inside_lung": round(share_inside(landmarks, lung), 4),
        "atlas_share_inside_lung": round(atlas.share_inside_lung, 4),
        "lung_volume_ml": round(float(lung.sum()) * float(np.prod(spacing)) / 1000.0, 1),
        "registration_seconds": round(registration["seconds"], 2),
        "registration_recipe": registration["recipe"],
        "spacing": list(spacing),
        "shape": [int(s) for s in image.shape[1:]],
        "original_spacing": np.asarray(meta["original_spacing"], dtype=np.float64).tolist(),
        "original_shape": np.asarray(meta["original_shape"], dtype=np.int64).tolist(),
        "axcodes": _axcodes(image, atlas_dir),
        **registration.get("qc", {}),  # qc_status, qc_reasons and the anatomy QC numbers
    }


class SaveQCRecordd(MapTransform):
    """The anatomy QC of a registered scan (``RegisterToAtlasd``'s ``registration_key``) written beside a
    workflow's other per-subject outputs, for the cohort QC sheet of a workflow that keeps no prepared cache (the
    emphysema inference): ``<output_dir>/<subject_id>/qc.json`` (the fields of a cache entry's qc.json but the
    patch ones) and ``qc.png`` (the same picture), under the item's ``output_dir``, else ``output_dir``; nothing
    without either (a MONAI Label request). A scan that fails the QC never reaches this step:
    ``RegisterToAtlasd`` leaves ``<output_dir>/.qc_failed/<subject_id>.*`` instead."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        output_dir: str | None = None,
        mask_key: str = "lung_mask",
        registration_key: str = "registration",
        atlas_dir: str | None = None,
        picture: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = output_dir
        self.mask_key = mask_key
        self.registration_key = registration_key
        self.atlas_dir = _atlas_dir(atlas_dir)
        self.picture = bool(picture)

    def __call__(self, data):
        from custom.atomic_io import atomic_path

        d = dict(data)
        output_dir = d.get("output_dir") or self.output_dir  # the item's own folder first (inference dataset)
        if not output_dir:
            return d
        atlas = load_atlas(self.atlas_dir)
        for key in self.key_iterator(d):
            image, mask, registration = d[key], d[self.mask_key], d[self.registration_key]
            landmarks = map_landmarks(registration["atlas_to_subject_vox"], atlas.centres)
            qc = _qc_record(d, image, mask, registration, landmarks, atlas, self.atlas_dir)
            folder = Path(output_dir) / qc["subject_id"]
            folder.mkdir(parents=True, exist_ok=True)
            png = _picture_bytes(image, _lung_of(mask), landmarks, qc) if self.picture else None
            if png is not None:
                with atomic_path(folder / cache.QC_PICTURE) as tmp:
                    Path(tmp).write_bytes(png)
            with atomic_path(folder / cache.QC) as tmp:
                Path(tmp).write_text(json.dumps(qc, indent=2, default=cache._json_default))
            _forget_failure(output_dir, qc["subject_id"])
        return d


class WritePreparedSubjectd(MapTransform):
    """Write the prepared subject (``keys``: its patches; landmarks, registration and QC from the keys of
    ``LandmarkPatchesd`` / ``RegisterToAtlasd``) as one cache entry ``<cache_dir>/<subject_id>/``
    (``custom.prepare.cache.write_subject_entry``: a temporary folder renamed into place). ``cache_dir``: fixed
    here, or else the item's ``cache_dir_key`` (what ``prepare_subject`` sets). QC ``seconds`` counts from the
    item's ``started`` (``time.perf_counter()`` when the subject began). The entry's path goes to ``entry_key``.
    ``picture``: the entry also holds ``qc.png``, the subject's QC picture (``custom.prepare.qc_figure``; CT
    ``image_key``, lung ``mask_key``, landmarks; a small PNG, what the cohort QC sheet shows)."""

    def __init__(
        self,
        keys: KeysCollection = "patches",
        cache_dir: str | None = None,
        cache_dir_key: str = "cache_dir",
        landmarks_key: str = "landmarks_vox",
        registration_key: str = "registration",
        qc_key: str = "qc",
        entry_key: str = "entry",
        picture: bool = True,
        image_key: str = "image",
        mask_key: str = "lung_mask",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.picture = bool(picture)
        self.image_key = image_key
        self.mask_key = mask_key
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
            extra = {}
            if self.picture and self.image_key in d and self.mask_key in d:
                extra[cache.QC_PICTURE] = _picture_bytes(
                    d[self.image_key], _lung_of(d[self.mask_key]), d[self.landmarks_key], qc
                )
            entry = cache.write_subject_entry(
                cache_dir,
                qc["subject_id"],
                d[key],
                d[self.landmarks_key],
                registration["transform_mat"],
                transform,
                qc,
                extra_files=extra,
            )
            _forget_failure(cache_dir, qc["subject_id"])
            d[self.entry_key] = str(entry)
            d[self.qc_key] = qc
        return d


def _picture_bytes(image, lung: np.ndarray, landmarks: np.ndarray, qc: dict) -> bytes | None:
    """The QC picture as PNG bytes (``None`` when it cannot be drawn: a picture never fails a subject)."""
    try:
        from custom.prepare.qc_figure import subject_png

        return subject_png(image[0].numpy(), lung, landmarks, str(qc.get("subject_id", "")), qc=qc)
    except Exception as err:  # noqa: BLE001
        logger.debug("%s: no QC picture: %s", qc.get("subject_id"), err)
        return None


def load_scan(
    image: str | Path, lung_mask: str | Path | None = None, axcodes: str | None = None, atlas_dir: str | None = None
) -> tuple:
    """``LoadCTd`` then ``LungMaskd`` on one scan (``lung_mask``: the user's mask, or None / "auto" for the
    built-in segmentation): (the (1, X, Y, Z) HU MetaTensor, the boolean (X, Y, Z) lung mask), as the scan
    pipeline makes them. Reloads a prepared subject with its ``qc.json`` ``source``, ``lung_mask``, ``axcodes``."""
    from monai.transforms import Compose

    user_mask = None if lung_mask in (None, "", AUTO_MASK) else str(lung_mask)
    chain = Compose(
        [
            LoadCTd("image", atlas_dir=atlas_dir, axcodes=axcodes),
            LungMaskd("image", mask_key="lung_mask", atlas_dir=atlas_dir),
        ]
    )
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
    "SaveQCRecordd",
    "WritePreparedSubjectd",
    "input_grid",
    "load_atlas",
    "load_scan",
    "meta_of",
    "run_transforms",
    "subject_id_of",
    "transform_error",
]
