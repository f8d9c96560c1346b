"""The prepared cache: one folder per subject, written atomically, plus a manifest and a failure report.

Format (version 1; the training data loader reads exactly this)::

    <cache_dir>/
      manifest.csv            one row per subject of the last run: subject_id, status (ok | failed), error,
                              error_type, dice, share_inside_lung, seconds, registration_seconds, source, lung_mask,
                              path (the subject folder, relative to cache_dir; empty when failed), qc_status
                              (ok | warning | failed: the anatomy QC, custom.prepare.anatomy_qc), qc_reason (one
                              line, empty when ok), reused (True when an earlier run's entry was kept)
      failures.csv            the failed rows only: subject_id, source, error_type, error
      qc_sheet.html, qc_sheet.png, qc.csv   the cohort QC sheet (custom.prepare.qc_sheet), flagged subjects first
      .qc_failed/<subject_id>.png           QC picture of a subject that failed the anatomy QC
      <subject_id>/
        patches.npy           int16 (581, 32, 32, 32): HU clipped to [-1024, 3071], -1024 outside the scan;
                              axes (x, y, z) of the subject's working grid (below); load with
                              np.load(path, mmap_mode="r"); patch j belongs to atlas landmark j
        landmarks_vox.npy     float64 (581, 3): landmark centres in working-grid voxels (x, y, z);
                              patch j covers voxels [round(c_j) - 16, round(c_j) + 16) on each axis
        transform.mat         ANTs/ITK affine from ants.registration(fixed=atlas mask, moving=subject mask):
                              resamples the subject into atlas space (subject -> atlas); as a point map
                              it sends atlas physical points (LPS mm) to subject physical points
        transform.json        the same registration as 4x4 voxel maps, no ANTs needed:
                              atlas_to_subject_vox, subject_to_atlas_vox (homogeneous, x y z 1),
                              subject_affine_ras and atlas_affine_ras (voxel -> RAS mm), subject_shape
        qc.json               format_version, status "ok", subject_id, source, lung_mask ("auto" or the
                              user's file), num_landmarks, dice, share_inside_lung, atlas_share_inside_lung,
                              lung_volume_ml, seconds, registration_seconds, registration_recipe,
                              spacing (1,1,1), shape, original_spacing, original_shape, axcodes, and the
                              anatomy QC: qc_status (ok | warning), qc_reasons, qc_checks, edge_share,
                              orientation_dice, flip_gain, slice_mm, share_ratio, qc_limits, qc_accept,
                              qc_accepted (failures let through only by qc_accept: a resumed run reuses
                              the entry only when it accepts them too), qc_seconds
        qc.png                the QC picture (optional: entries of older versions have none)

The working grid is the scan oriented to the atlas's axis codes (LAS for the shipped atlas: x runs to the
patient's left, y anterior, z superior), resampled to 1 mm isotropic with origin and directions kept;
``subject_affine_ras`` is its voxel-to-world matrix.

Atomicity: an entry is written into ``<cache_dir>/.tmp-<subject_id>-<random>/`` and renamed into place with
``os.replace``; a killed run leaves at most a ``.tmp-*`` folder, which is never read and is removed by the
next run. ``manifest.csv`` and ``failures.csv`` are written to a temporary file and renamed too.
A subject counts as done (and is skipped on resume) only when :func:`is_complete` accepts its folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from custom.atomic_io import atomic_path

FORMAT_VERSION = 1
PATCHES = "patches.npy"
LANDMARKS = "landmarks_vox.npy"
TRANSFORM_MAT = "transform.mat"
TRANSFORM_JSON = "transform.json"
QC = "qc.json"
ENTRY_FILES = (PATCHES, LANDMARKS, TRANSFORM_MAT, TRANSFORM_JSON, QC)
QC_PICTURE = "qc.png"  # optional file of an entry: its QC picture
QC_FAILED_DIR = ".qc_failed"  # <cache_dir>/.qc_failed/<subject_id>.png / .json: subjects that failed the QC
MANIFEST = "manifest.csv"
FAILURES = "failures.csv"
MANIFEST_COLUMNS = [
    "subject_id",
    "status",
    "error",
    "error_type",
    "dice",
    "share_inside_lung",
    "seconds",
    "registration_seconds",
    "source",
    "lung_mask",
    "path",
    "qc_status",
    "qc_reason",
]
FAILURE_COLUMNS = ["subject_id", "source", "error_type", "error"]
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def safe_subject_id(raw: str) -> str:
    """A subject id usable as a folder name: other characters become '_'; never hidden, never empty."""
    cleaned = _SAFE_ID.sub("_", str(raw).strip()).strip("._")
    if not cleaned:
        raise ValueError(f"subject id {raw!r} has no usable characters")
    return cleaned


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())


def _save_json(path: Path, payload: dict) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, default=_json_default)
        handle.flush()
        os.fsync(handle.fileno())


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_subject_entry(
    cache_dir: str | Path,
    subject_id: str,
    patches: np.ndarray,
    landmarks_vox: np.ndarray,
    transform_mat: str | Path | bytes,
    transform: dict,
    qc: dict,
    extra_files: dict | None = None,
) -> Path:
    """Write one subject's entry into a temporary folder, then move it into place in one rename.
    ``transform_mat``: the ANTs transform file, or its bytes. ``extra_files``: {file name: bytes} written too
    (the QC picture); ``None`` values are skipped."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / subject_id
    tmp = cache_dir / f"{TMP_PREFIX}{subject_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _save_npy(tmp / PATCHES, np.ascontiguousarray(patches, dtype=np.int16))
        _save_npy(tmp / LANDMARKS, np.asarray(landmarks_vox, dtype=np.float64))
        if isinstance(transform_mat, bytes):
            with open(tmp / TRANSFORM_MAT, "wb") as handle:
                handle.write(transform_mat)
                handle.flush()
                os.fsync(handle.fileno())
        else:
            shutil.copyfile(transform_mat, tmp / TRANSFORM_MAT)
        _save_json(tmp / TRANSFORM_JSON, transform)
        for name, payload in (extra_files or {}).items():
            if payload is not None:
                (tmp / Path(name).name).write_bytes(payload)
        _save_json(tmp / QC, {"format_version": FORMAT_VERSION, "status": "ok", **qc})  # written last
        if final.exists():  # a stale or invalid entry being redone: move it aside, then swap in one step
            trash = cache_dir / f"{TRASH_PREFIX}{subject_id}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_qc(entry: str | Path) -> dict:
    return json.loads((Path(entry) / QC).read_text())


def is_complete(cache_dir: str | Path, subject_id: str, num_landmarks: int | None = None) -> bool:
    """True when the subject's folder holds every file, readable and with the documented shapes."""
    entry = Path(cache_dir) / subject_id
    if not all((entry / name).is_file() for name in ENTRY_FILES):
        return False
    try:
        qc = read_qc(entry)
        if qc.get("status") != "ok" or qc.get("format_version") != FORMAT_VERSION:
            return False
        expected = int(num_landmarks if num_landmarks is not None else qc["num_landmarks"])
        patches = np.load(entry / PATCHES, mmap_mode="r")
        landmarks = np.load(entry / LANDMARKS, mmap_mode="r")
        transform = json.loads((entry / TRANSFORM_JSON).read_text())
        return (
            patches.dtype == np.int16
            and patches.shape == (expected, 32, 32, 32)
            and landmarks.shape == (expected, 3)
            and len(transform["atlas_to_subject_vox"]) == 4
            and (entry / TRANSFORM_MAT).stat().st_size > 0
        )
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return False


def remove_stale_temporaries(cache_dir: str | Path) -> list:
    """Delete ``.tmp-*`` / ``.trash-*`` folders a killed run left behind; returns what was removed."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    stale = [p for p in cache_dir.iterdir() if p.name.startswith((TMP_PREFIX, TRASH_PREFIX))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def qc_fields(cache_dir: str | Path | None, row: dict) -> dict:
    """``qc_status`` and ``qc_reason`` of a manifest row: from the entry's qc.json for a prepared subject
    (entries of older versions, without QC, are "ok"), "failed" and the error for a failed one."""
    if row.get("status") == "failed":
        from custom.prepare.anatomy_qc import reason_of_error

        return {"qc_status": "failed", "qc_reason": reason_of_error(row.get("error"), row.get("source"))}
    qc = {}
    if cache_dir is not None and row.get("path"):
        try:
            qc = read_qc(Path(cache_dir) / str(row["path"]))
        except (OSError, ValueError):
            qc = {}
    reasons = qc.get("qc_reasons") or []
    return {
        "qc_status": qc.get("qc_status", "ok"),
        "qc_reason": "; ".join(reasons) if isinstance(reasons, (list, tuple)) else str(reasons),
    }


def manifest_table(rows: list, cache_dir: str | Path | None = None) -> pd.DataFrame:
    """The manifest of ``rows`` (one dict per subject), columns in the documented order. Rows without
    ``qc_status`` get it (and ``qc_reason``) from ``qc_fields``, once: the row dict keeps them."""
    for row in rows:
        if not row.get("qc_status"):
            row.update(qc_fields(cache_dir, row))
    manifest = pd.DataFrame(rows)
    for column in MANIFEST_COLUMNS:
        if column not in manifest:
            manifest[column] = None
    return manifest[MANIFEST_COLUMNS + [c for c in manifest.columns if c not in MANIFEST_COLUMNS]]


def write_manifest(cache_dir: str | Path, rows: list) -> pd.DataFrame:
    """Rewrite manifest.csv (all subjects) and failures.csv (failed ones) atomically."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifest_table(rows, cache_dir)
    _write_csv_atomic(manifest, cache_dir / MANIFEST)
    failed = manifest[manifest.status == "failed"] if len(manifest) else manifest
    failures = pd.DataFrame({c: failed[c] if c in failed else None for c in FAILURE_COLUMNS})
    _write_csv_atomic(failures, cache_dir / FAILURES)
    return manifest


def read_manifest(cache_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(cache_dir) / MANIFEST, keep_default_na=False, dtype={"subject_id": str, "path": str})
