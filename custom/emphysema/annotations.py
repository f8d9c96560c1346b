"""Emphysema box annotations: read the table, put every box centre on the subject's prepared 1 mm grid.

A reader clicks the centre of a region of one subtype and a fixed 32 mm box is drawn around it (paper §4.1.1);
healthy boxes come from subjects without emphysema. The table (CSV) needs the columns ``subject_id, label,
centre_x_mm, centre_y_mm, centre_z_mm``; ``label`` is one of ``EMPHYSEMA_CLASSES``. Centres are world
coordinates in mm, RAS by default (the frame of a NIfTI affine, which is what the synthetic cohort's
``annotations.csv`` uses); ``coordinate_system="LPS"`` accepts DICOM / ITK points. The prepared grid of a
subject is the CT oriented like the atlas and resampled to 1 mm; ``transform.json`` holds its voxel-to-RAS
matrix (``subject_affine_ras``) and its map to atlas voxels (``subject_to_atlas_vox``), so a centre in mm
becomes a voxel by inverting the first and an atlas point by applying the second.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from custom.emphysema.network import EMPHYSEMA_CLASSES
from custom.errors import MissingInputError, producer_of
from custom.prepare.cache import read_manifest

REQUIRED_COLUMNS = ("subject_id", "label", "centre_x_mm", "centre_y_mm", "centre_z_mm")
CENTRE_MM = ("centre_x_mm", "centre_y_mm", "centre_z_mm")
VOXEL = ("voxel_x", "voxel_y", "voxel_z")
ATLAS = ("atlas_vox_x", "atlas_vox_y", "atlas_vox_z")
BOX_MM = 32.0
COORDINATE_SYSTEMS = ("RAS", "LPS")
logger = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation table that cannot be used; the message names the file and the problem."""


@dataclass
class PreparedSubject:
    """What the prepared cache knows about one subject's 1 mm working grid."""

    subject_id: str
    folder: Path
    source: str
    lung_mask: str
    affine_ras: np.ndarray
    shape: tuple
    subject_to_atlas_vox: np.ndarray


def read_annotations(path: str | Path) -> pd.DataFrame:
    """The annotation table with checked columns, labels (lower-cased) and finite numeric centres."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            path, "annotation table", producer_of(path, "your own box CSV (docs/emphysema_finetune.md)")
        )
    try:
        table = pd.read_csv(path, dtype={"subject_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not a readable CSV table ({err})") from err
    return check_annotations(table, str(path))


def _lines(table: pd.DataFrame, mask) -> list:
    """Table lines (1-based, after the header) of the rows selected by ``mask``; at most five."""
    return (np.flatnonzero(np.asarray(mask)) + 2).tolist()[:5]


def check_annotations(table: pd.DataFrame, source: str = "annotation table") -> pd.DataFrame:
    """Validated copy of an annotation table (index reset); errors name ``source`` and the offending lines."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise AnnotationError(f"{source}: missing column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}")
    if table.empty:
        raise AnnotationError(f"{source}: the table has no rows")
    table = table.reset_index(drop=True)
    table["subject_id"] = table["subject_id"].astype(str).str.strip()
    table["label"] = table["label"].astype(str).str.strip().str.lower()
    unknown = sorted(set(table["label"]) - set(EMPHYSEMA_CLASSES))
    if unknown:
        raise AnnotationError(
            f"{source}: unknown label(s) {unknown} (lines {_lines(table, table['label'].isin(unknown))}); "
            f"expected one of {list(EMPHYSEMA_CLASSES)}"
        )
    centres = table[list(CENTRE_MM)].apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(centres.to_numpy(dtype=np.float64)).all(axis=1)
    if bad.any():
        raise AnnotationError(f"{source}: non-numeric or empty box centre on line(s) {_lines(table, bad)}")
    table[list(CENTRE_MM)] = centres
    if "size_mm" in table.columns:
        sizes = pd.to_numeric(table["size_mm"], errors="coerce")
        if (np.abs(sizes - BOX_MM) > 0.5).any():
            logger.warning(
                "%s: some boxes are not %g mm; the classifier still reads 32 mm patches at their centres",
                source,
                BOX_MM,
            )
    return table


def prepared_subjects(prepared_dir: str | Path) -> dict:
    """subject_id -> folder for every subject a prepare run finished (``manifest.csv`` status ok)."""
    prepared_dir = Path(prepared_dir)
    manifest = prepared_dir / "manifest.csv"
    if not manifest.is_file():
        raise MissingInputError(manifest, "prepared cache manifest", "prepare", cache_dir=prepared_dir)
    table = read_manifest(prepared_dir)
    table = table[table["status"] == "ok"] if "status" in table.columns else table
    folders = table["path"] if "path" in table.columns else table["subject_id"]
    return {str(s): prepared_dir / str(f) for s, f in zip(table["subject_id"], folders) if str(f)}


def load_prepared_subject(prepared_dir: str | Path, subject_id: str) -> PreparedSubject:
    """Grid, transform and source scan of one prepared subject (reads ``transform.json`` and the manifest)."""
    prepared_dir = Path(prepared_dir)
    folder = prepared_subjects(prepared_dir).get(str(subject_id))
    if folder is None or not (folder / "transform.json").is_file():
        raise FileNotFoundError(
            f"{prepared_dir}: subject {subject_id!r} is not prepared (no ok manifest row " "or no transform.json)"
        )
    manifest = pd.read_csv(prepared_dir / "manifest.csv", dtype={"subject_id": str}, keep_default_na=False)
    row = manifest[manifest["subject_id"] == str(subject_id)].iloc[-1]
    transform = json.loads((folder / "transform.json").read_text())
    return PreparedSubject(
        subject_id=str(subject_id),
        folder=folder,
        source=str(row.get("source", "")),
        lung_mask=str(row.get("lung_mask", "") or "auto"),
        affine_ras=np.asarray(transform["subject_affine_ras"], dtype=np.float64),
        shape=tuple(int(s) for s in transform["subject_shape"]),
        subject_to_atlas_vox=np.asarray(transform["subject_to_atlas_vox"], dtype=np.float64),
    )


def world_to_voxel(points_mm: np.ndarray, affine_ras: np.ndarray, coordinate_system: str = "RAS") -> np.ndarray:
    """(N, 3) world points in mm -> (N, 3) nearest voxel indices of the grid with voxel-to-RAS ``affine_ras``."""
    if coordinate_system not in COORDINATE_SYSTEMS:
        raise ValueError(f"coordinate_system must be one of {COORDINATE_SYSTEMS}, got {coordinate_system!r}")
    points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3).copy()
    if coordinate_system == "LPS":
        points[:, :2] *= -1.0  # LPS -> RAS: flip x and y
    homogeneous = np.c_[points, np.ones(len(points))]
    voxels = np.linalg.solve(affine_ras, homogeneous.T).T[:, :3]
    return np.rint(voxels).astype(np.int64)


def map_annotations(
    annotations: str | Path | pd.DataFrame, prepared_dir: str | Path, coordinate_system: str = "RAS"
) -> pd.DataFrame:
    """The annotation table plus, per box, its centre voxel on the prepared grid (``voxel_x/y/z``), the atlas
    voxel of that centre (``atlas_vox_x/y/z``) and the prepared folder (row order kept, index reset). Raises,
    naming the table, when a subject is not prepared or a centre lies outside its scan."""
    if isinstance(annotations, pd.DataFrame):
        source = "annotation table"
        table = check_annotations(annotations.copy(), source)
    else:
        source = str(annotations)
        table = read_annotations(annotations)
    available = prepared_subjects(prepared_dir)
    missing = sorted(set(table["subject_id"]) - set(available))
    if missing:
        raise AnnotationError(
            f"{source}: subject(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} not "
            f"prepared in {prepared_dir} (run the prepare workflow on their scans first)"
        )
    table[list(VOXEL)] = 0
    table[list(ATLAS)] = 0.0
    table["prepared_folder"] = ""
    for subject_id, rows in table.groupby("subject_id", sort=True):
        subject = load_prepared_subject(prepared_dir, subject_id)
        voxels = world_to_voxel(rows[list(CENTRE_MM)].to_numpy(), subject.affine_ras, coordinate_system)
        outside = ((voxels < 0) | (voxels >= np.asarray(subject.shape))).any(axis=1)
        if outside.any():
            raise AnnotationError(
                f"{source}: box centre(s) on line(s) {_lines(table, table.index.isin(rows.index[outside]))} "
                f"(subject {subject_id}) lie outside its scan (grid {subject.shape} voxels; centres are "
                f"{coordinate_system} mm in the scan's world frame)"
            )
        atlas = (subject.subject_to_atlas_vox @ np.c_[voxels, np.ones(len(voxels))].T).T[:, :3]
        table.loc[rows.index, list(VOXEL)] = voxels
        table.loc[rows.index, list(ATLAS)] = atlas
        table.loc[rows.index, "prepared_folder"] = str(subject.folder)
    table[list(VOXEL)] = table[list(VOXEL)].astype(np.int64)
    return table
