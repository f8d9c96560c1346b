"""Prepare a cohort: find the scans, run each through load -> lung mask -> registration -> landmarks -> patches,
write the cache, and report. Parallel workers, a progress bar, resume, and a failure report naming each bad
input and why; one bad scan never stops the others.

Inputs (``source``):
- a CSV with columns ``subject_id,image[,lung_mask]`` (relative paths are relative to the CSV's folder);
- a folder: every ``*.nii`` / ``*.nii.gz`` is a subject (id = its path below the folder, without suffix, with
  ``/`` turned into ``_``), and every folder holding DICOM files is one series = one subject. A file
  ``<name>_lung_mask.nii.gz`` beside ``<name>.nii.gz`` is that scan's lung mask (a user mask wins over the
  built-in segmentation);
- a single NIfTI file or DICOM series folder.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from custom.data.atlas import atlas_mask_path, landmark_centres, resources_dir
from custom.prepare import cache
from custom.prepare.io import InputError, is_dicom_file, is_nifti, load_ct, load_mask_like
from custom.prepare.landmarks import (RegistrationQCError, atlas_share_inside_lung, map_landmarks,
                                     registration_dice, share_inside)
from custom.prepare.lung_mask import MIN_LUNG_ML, segment_lungs
from custom.prepare.patches import extract_patches
from custom.prepare.registration import get_recipe, register_to_atlas, working_image

logger = logging.getLogger("drasclr.prepare")
MASK_SUFFIX = "_lung_mask"
DEFAULT_MIN_DICE = 0.5


@dataclass(frozen=True)
class SubjectInput:
    subject_id: str
    image: str
    lung_mask: str | None = None


# ----------------------------------------------------------------------------------------------- inputs
def _strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _looks_like_dicom_dir(folder: Path, files: list) -> bool:
    return any(f.lower().endswith(".dcm") or is_dicom_file(folder / f) for f in files)


def discover_inputs(source: str | Path) -> list:
    """The subjects a CSV, a folder, or a single scan names (see the module docstring)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _inputs_from_csv(source)
    if is_nifti(source):
        return [SubjectInput(cache.safe_subject_id(_strip_nifti_suffix(source.name)), str(source))]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such CSV, NIfTI file or folder")
    items = []
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        folder = Path(folder)
        relative = folder.relative_to(source)
        if _looks_like_dicom_dir(folder, files):
            name = source.name if str(relative) == "." else str(relative)
            items.append(SubjectInput(cache.safe_subject_id(name.replace(os.sep, "_")), str(folder)))
        for name in sorted(files):
            stem = _strip_nifti_suffix(name)
            if stem == name or stem.endswith(MASK_SUFFIX):
                continue
            mask = next((folder / f"{stem}{MASK_SUFFIX}{s}" for s in (".nii.gz", ".nii")
                         if (folder / f"{stem}{MASK_SUFFIX}{s}").is_file()), None)
            subject_id = str(relative / stem) if str(relative) != "." else stem
            items.append(SubjectInput(cache.safe_subject_id(subject_id.replace(os.sep, "_")), str(folder / name),
                                      str(mask) if mask else None))
    if not items:
        raise FileNotFoundError(f"{source}: no NIfTI files or DICOM series found")
    return _check_unique(items, source)


def _inputs_from_csv(path: Path) -> list:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"subject_id", "image"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected subject_id,image[,lung_mask]")

    def resolve(value: str) -> str | None:
        if not value.strip():
            return None
        candidate = Path(value.strip())
        return str(candidate if candidate.is_absolute() else path.parent / candidate)

    items = [SubjectInput(cache.safe_subject_id(row["subject_id"]), resolve(row["image"]) or "",
                          resolve(row.get("lung_mask", "") or "")) for _, row in table.iterrows()]
    return _check_unique(items, path)


def _check_unique(items: list, source: Path) -> list:
    seen, duplicates = set(), set()
    for item in items:
        (duplicates if item.subject_id in seen else seen).add(item.subject_id)
    if duplicates:
        raise ValueError(f"{source}: duplicate subject ids {sorted(duplicates)}; subject ids must be unique")
    return items


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


# ----------------------------------------------------------------------------------------------- one subject
def prepare_subject(item: SubjectInput, cache_dir: str | Path, atlas_dir: str | None = None,
                    registration: str = "fast", min_dice: float = DEFAULT_MIN_DICE) -> dict:
    """Prepare one scan and write its cache entry; raises with a message naming the file on any problem."""
    start = time.perf_counter()
    atlas = load_atlas(atlas_dir)
    recipe = get_recipe(registration)
    if not item.image:
        raise InputError(f"subject {item.subject_id}: no image path given")
    ct = load_ct(item.image, axcodes=atlas.axcodes)
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    if item.lung_mask:
        lung = load_mask_like(item.lung_mask, ct, axcodes=atlas.axcodes)
        if lung.sum() * voxel_ml < MIN_LUNG_ML:
            raise InputError(f"{item.lung_mask}: lung mask holds only {lung.sum() * voxel_ml:.0f} ml")
    else:
        lung = segment_lungs(ct.hu, spacing_mm=float(np.mean(ct.spacing)), source=ct.source)
    result = register_to_atlas(lung, ct.affine, atlas.mask, atlas.affine, recipe,
                               atlas_image=atlas.fixed_image(recipe))
    try:
        landmarks = map_landmarks(result.atlas_to_subject_vox, atlas.centres)
        dice = registration_dice(lung, result.subject_to_atlas_vox, atlas.mask)
        if dice < min_dice:
            raise RegistrationQCError(f"{item.image}: registration to the atlas failed QC: lung overlap (Dice) "
                             f"{dice:.2f} < {min_dice:.2f}; check the lung mask and the image orientation")
        patches = extract_patches(ct.hu, landmarks)
        qc = {
            "subject_id": item.subject_id, "source": item.image, "lung_mask": item.lung_mask or "auto",
            "num_landmarks": int(len(landmarks)), "dice": round(dice, 4),
            "share_inside_lung": round(share_inside(landmarks, lung), 4),
            "atlas_share_inside_lung": round(atlas.share_inside_lung, 4),
            "lung_volume_ml": round(float(lung.sum()) * voxel_ml, 1),
            "registration_seconds": round(result.seconds, 2), "registration_recipe": recipe.name,
            "spacing": list(ct.spacing), "shape": list(ct.hu.shape),
            "original_spacing": list(ct.original_spacing), "original_shape": list(ct.original_shape),
            "axcodes": atlas.axcodes,
        }
        transform = {
            "atlas_to_subject_vox": result.atlas_to_subject_vox, "subject_to_atlas_vox": result.subject_to_atlas_vox,
            "subject_affine_ras": ct.affine, "atlas_affine_ras": atlas.affine,
            "subject_shape": list(ct.hu.shape), "atlas_shape": list(atlas.mask.shape),
        }
        qc["seconds"] = round(time.perf_counter() - start, 2)
        cache.write_subject_entry(cache_dir, item.subject_id, patches, landmarks, result.ants_transform_path,
                                  transform, qc)
    finally:
        result.cleanup()
    return _ok_row(item.subject_id, qc, reused=False)


def _ok_row(subject_id: str, qc: dict, reused: bool) -> dict:
    return {"subject_id": subject_id, "status": "ok", "error": "", "error_type": "",
            "dice": qc.get("dice"), "share_inside_lung": qc.get("share_inside_lung"),
            "seconds": qc.get("seconds"), "registration_seconds": qc.get("registration_seconds"),
            "source": qc.get("source"), "lung_mask": qc.get("lung_mask"), "path": subject_id, "reused": reused}


def _failed_row(item: SubjectInput, err: BaseException) -> dict:
    message = " ".join((str(err) or type(err).__name__).split())[:1000]  # one line in the report
    if item.image and item.image not in message:
        message = f"{item.image}: {message}"
    return {"subject_id": item.subject_id, "status": "failed", "error": message, "error_type": type(err).__name__,
            "source": item.image, "lung_mask": item.lung_mask or "auto", "path": "", "reused": False}


def _prepare_safely(item: SubjectInput, cache_dir: str, options: dict) -> dict:
    """Worker body: a failure becomes a manifest row, never an exception that stops the cohort."""
    try:
        return prepare_subject(item, cache_dir, **options)
    except Exception as err:  # noqa: BLE001 - every failure is reported per subject
        logger.debug("subject %s failed:\n%s", item.subject_id, traceback.format_exc())
        return _failed_row(item, err)


def _init_worker(threads: int) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- cohort
def prepare_cohort(source: str | Path, cache_dir: str | Path, atlas_dir: str | None = None,
                   registration: str = "fast", num_workers: int = 1, resume: bool = True,
                   progress: bool = True, min_dice: float = DEFAULT_MIN_DICE) -> pd.DataFrame:
    """Prepare every subject of ``source`` into ``cache_dir``; returns the manifest (also written to disk).

    ``resume``: subjects whose cache folder is complete and valid are not redone (``reused`` is True in the
    returned manifest); failed subjects are retried. ``num_workers`` > 1 runs subjects in separate processes.
    """
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atlas_dir = str(atlas_dir) if atlas_dir else str(resources_dir())
    get_recipe(registration)  # fail early on a typo
    items = discover_inputs(source)
    removed = cache.remove_stale_temporaries(cache_dir)
    if removed:
        logger.info("removed %d unfinished entries left by an interrupted run", len(removed))
    num_landmarks = len(landmark_centres(atlas_dir))

    rows = {}
    todo = []
    for item in items:
        if resume and cache.is_complete(cache_dir, item.subject_id, num_landmarks):
            rows[item.subject_id] = _ok_row(item.subject_id, cache.read_qc(cache_dir / item.subject_id), reused=True)
        else:
            todo.append(item)
    order = [item.subject_id for item in items]

    def flush() -> pd.DataFrame:
        return cache.write_manifest(cache_dir, [rows[s] for s in order if s in rows])

    flush()
    options = dict(atlas_dir=atlas_dir, registration=registration, min_dice=min_dice)
    bar = tqdm(total=len(todo), desc="prepare", unit="subject", disable=not progress or not todo)
    if num_workers <= 1 or len(todo) <= 1:
        for item in todo:
            rows[item.subject_id] = _prepare_safely(item, str(cache_dir), options)
            flush()
            bar.update()
    else:
        workers = min(num_workers, len(todo))
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            futures = {pool.submit(_prepare_safely, item, str(cache_dir), options): item for item in todo}
            for future in as_completed(futures):
                item = futures[future]
                try:
                    rows[item.subject_id] = future.result()
                except Exception as err:  # noqa: BLE001 - a crashed worker process is one subject's failure
                    rows[item.subject_id] = _failed_row(item, err)
                flush()
                bar.update()
    bar.close()
    manifest = flush()
    failed = manifest[manifest.status == "failed"]
    for _, row in failed.iterrows():
        logger.warning("FAILED %s: %s", row.subject_id, row.error)
    logger.info("prepared %d of %d subjects (%d reused from the cache, %d failed) into %s",
                int((manifest.status == "ok").sum()), len(manifest), int(manifest.reused.sum()), len(failed),
                cache_dir)
    return manifest


def summary(manifest: pd.DataFrame) -> dict:
    """Counts for a log line or a CLI exit code."""
    return {"subjects": len(manifest), "ok": int((manifest.status == "ok").sum()),
            "failed": int((manifest.status == "failed").sum()), "reused": int(manifest.reused.sum())}


__all__ = ["SubjectInput", "discover_inputs", "prepare_subject", "prepare_cohort", "summary", "load_atlas"]
