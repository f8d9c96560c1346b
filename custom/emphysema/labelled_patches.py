"""The labelled patch set: one entry per annotated box, cut from the subject's prepared 1 mm grid.

Training needs the 32^3 patch centred at a box centre; the detection rule (``custom.emphysema.detection``)
classifies the patch centred at every voxel of the 32^3 box, which reaches 32 voxels either side of the centre.
So each entry keeps the 64^3 HU region around the centre (voxel r of the region = grid voxel centre - 32 + r;
-1024 HU outside the scan), its lung mask, and the subject-to-atlas map shifted to the region's origin.
``scan_channels`` / ``patches_at`` (``custom.emphysema.dense_input``) then give exactly the network input of
the whole scan. The prepared cache keeps no whole volumes, so building the set reloads each CT once
(the scan pipeline's ``LoadCTd`` and ``LungMaskd``, as preparation did); the result is cached in one ``.npz``
(written atomically) keyed by the annotations and the prepared transforms, so repeated fine-tuning and CV runs
do not reload CTs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from custom.atomic_io import atomic_path
from custom.data.intensity import HU_MIN
from custom.data.location import PATCH_SIZE
from custom.emphysema.annotations import VOXEL, load_prepared_subject, map_annotations
from custom.emphysema.dense_input import patches_at, scan_channels
from custom.emphysema.network import EMPHYSEMA_CLASSES

CONTEXT = 2 * PATCH_SIZE  # 64: patches centred anywhere in a 32^3 box stay inside the 64^3 region
CENTRE_IN_REGION = PATCH_SIZE  # region voxel of the box centre (32, 32, 32)
BOX_SLICE = slice(CENTRE_IN_REGION - PATCH_SIZE // 2, CENTRE_IN_REGION + PATCH_SIZE // 2)  # region voxels of the box
CACHE_VERSION = 1
logger = logging.getLogger(__name__)


@dataclass
class LabelledPatches:
    """Boxes as arrays: ``regions`` (N, 64, 64, 64) int16 HU, ``lungs`` (N, 64, 64, 64) bool,
    ``region_to_atlas`` (N, 4, 4) region voxel -> atlas voxel, ``labels`` (N,) class index in
    ``EMPHYSEMA_CLASSES``, ``table`` the mapped annotation rows (same order)."""

    regions: np.ndarray
    lungs: np.ndarray
    region_to_atlas: np.ndarray
    labels: np.ndarray
    table: pd.DataFrame

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def subject_ids(self) -> np.ndarray:
        return self.table["subject_id"].astype(str).to_numpy()

    def channels(self, index: int) -> torch.Tensor:
        """(5, 64, 64, 64) dense input of box ``index``: intensity, atlas location (3), lung."""
        return scan_channels(self.regions[index], self.lungs[index], self.region_to_atlas[index])

    def inputs(self, index: int) -> torch.Tensor:
        """(4, 32, 32, 32) network input of the patch centred at the box centre."""
        centre = torch.full((1, 3), CENTRE_IN_REGION, dtype=torch.long)
        return patches_at(self.channels(index), centre)[0]

    def subset(self, indices) -> LabelledPatches:
        indices = np.asarray(indices, dtype=np.int64)
        return LabelledPatches(
            self.regions[indices],
            self.lungs[indices],
            self.region_to_atlas[indices],
            self.labels[indices],
            self.table.iloc[indices].reset_index(drop=True),
        )


class LabelledPatchDataset(Dataset):
    """Items ``{"image": (4, 32, 32, 32), "label": class index}`` for ``monai.engines.SupervisedTrainer``;
    ``transform`` (optional) acts on the 4-channel image."""

    def __init__(self, patches: LabelledPatches, indices=None, transform=None):
        self.patches = patches
        self.indices = np.arange(len(patches)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict:
        index = int(self.indices[item])
        image = self.patches.inputs(index)
        if self.transform is not None:
            image = torch.as_tensor(np.asarray(self.transform(image)), dtype=torch.float32)
        return {"image": image, "label": torch.tensor(int(self.patches.labels[index]), dtype=torch.long)}


def crop_region(volume: np.ndarray, centre, size: int = CONTEXT, fill=0) -> np.ndarray:
    """The ``size``^3 block starting at ``centre - size // 2``, filled with ``fill`` outside ``volume``."""
    start = np.asarray(centre, dtype=np.int64) - size // 2
    out = np.full((size,) * 3, fill, dtype=volume.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, volume.shape)
    if np.any(hi <= lo):
        return out
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    out[dst] = volume[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return out


def translated(matrix: np.ndarray, offset) -> np.ndarray:
    """``matrix`` (4x4 voxel map) composed with a shift of the voxel origin by ``offset``."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(offset, dtype=np.float64)
    return np.asarray(matrix, dtype=np.float64) @ shift


def _subject_volumes(prepared_dir: Path, subject_id: str):
    """Reload a prepared subject's CT (and lung mask) on the prepared grid with the scan pipeline's ``LoadCTd``
    and ``LungMaskd`` (``custom.prepare.transforms.load_scan``), as preparation made them."""
    from custom.prepare.transforms import load_scan

    subject = load_prepared_subject(prepared_dir, subject_id)
    qc_path = subject.folder / "qc.json"
    axcodes = json.loads(qc_path.read_text()).get("axcodes", "LAS") if qc_path.is_file() else "LAS"
    if isinstance(axcodes, (list, tuple)):
        axcodes = "".join(axcodes)
    image, lung = load_scan(subject.source, subject.lung_mask, axcodes=axcodes)
    hu, affine = image[0].numpy(), np.asarray(image.affine, dtype=np.float64)
    if tuple(hu.shape) != subject.shape or not np.allclose(affine, subject.affine_ras, atol=1e-3):
        raise ValueError(
            f"{subject.source}: the scan no longer matches its prepared grid in {subject.folder} "
            f"(shape {hu.shape} vs {subject.shape}); prepare it again"
        )
    return subject, hu, lung


def _cache_key(table: pd.DataFrame) -> str:
    """Fingerprint of what the set depends on: the mapped boxes and every subject's prepared transform."""
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}".encode())
    columns = ["subject_id", "label", *VOXEL]
    digest.update(table[columns].to_csv(index=False).encode())
    for folder in sorted(set(table["prepared_folder"])):
        digest.update((Path(folder) / "transform.json").read_bytes())
    return digest.hexdigest()


def build_labelled_patches(
    annotations, prepared_dir: str | Path, coordinate_system: str = "RAS", progress: bool = False
) -> LabelledPatches:
    """Map the boxes onto the prepared grids and cut their 64^3 regions (one CT load per subject)."""
    prepared_dir = Path(prepared_dir)
    table = map_annotations(annotations, prepared_dir, coordinate_system).reset_index(drop=True)
    n = len(table)
    regions = np.empty((n, CONTEXT, CONTEXT, CONTEXT), dtype=np.int16)
    lungs = np.empty((n, CONTEXT, CONTEXT, CONTEXT), dtype=bool)
    to_atlas = np.empty((n, 4, 4), dtype=np.float64)
    groups = list(table.groupby("subject_id", sort=True))
    if progress:
        from tqdm import tqdm

        groups = tqdm(groups, desc="box regions", unit="subject")
    for subject_id, rows in groups:
        subject, hu, lung = _subject_volumes(prepared_dir, subject_id)
        hu16 = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
        for index, centre in zip(rows.index, rows[list(VOXEL)].to_numpy(dtype=np.int64)):
            regions[index] = crop_region(hu16, centre, fill=np.int16(HU_MIN))
            lungs[index] = crop_region(lung.astype(bool), centre, fill=False)
            to_atlas[index] = translated(subject.subject_to_atlas_vox, centre - CONTEXT // 2)
        del hu, lung, hu16
    labels = np.array([EMPHYSEMA_CLASSES.index(label) for label in table["label"]], dtype=np.int64)
    box_lung = lungs[:, BOX_SLICE, BOX_SLICE, BOX_SLICE].mean(axis=(1, 2, 3)) if n else np.zeros(0)
    table["lung_share_in_box"] = np.round(box_lung, 4)
    return LabelledPatches(regions, lungs, to_atlas, labels, table)


def save_labelled_patches(patches: LabelledPatches, path: str | Path, key: str = "") -> Path:
    """Write the set as one compressed ``.npz`` (atomic)."""
    path = Path(path)
    table = patches.table
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(
            handle,
            regions=patches.regions,
            lungs=patches.lungs,
            region_to_atlas=patches.region_to_atlas,
            labels=patches.labels,
            table=np.array(table.to_json(orient="split")),
            key=np.array(key),
            version=np.array(CACHE_VERSION),
        )
    return path


def read_labelled_patches(path: str | Path) -> tuple[LabelledPatches, str]:
    """The set saved by :func:`save_labelled_patches` and its cache key."""
    from io import StringIO

    with np.load(Path(path), allow_pickle=False) as data:
        table = pd.read_json(StringIO(str(data["table"])), orient="split", dtype={"subject_id": str})
        patches = LabelledPatches(data["regions"], data["lungs"], data["region_to_atlas"], data["labels"], table)
        return patches, str(data["key"])


def default_cache_path(prepared_dir: str | Path) -> Path:
    return Path(prepared_dir) / "labelled_boxes.npz"


def load_labelled_patches(
    annotations,
    prepared_dir: str | Path,
    cache_path: str | Path | None = None,
    coordinate_system: str = "RAS",
    progress: bool = False,
) -> LabelledPatches:
    """The labelled patch set, from ``cache_path`` when it was built from the same boxes and transforms, else
    built (reloading the CTs) and cached there. ``cache_path`` defaults to ``<prepared_dir>/labelled_boxes.npz``."""
    cache_path = Path(cache_path) if cache_path else default_cache_path(prepared_dir)
    table = map_annotations(annotations, prepared_dir, coordinate_system).reset_index(drop=True)
    key = _cache_key(table)
    if cache_path.is_file():
        try:
            cached, cached_key = read_labelled_patches(cache_path)
            if cached_key == key:
                return cached
            logger.info("%s: built from other boxes or transforms; rebuilding", cache_path)
        except (OSError, ValueError, KeyError) as err:
            logger.warning("%s: unreadable cache (%s); rebuilding", cache_path, err)
    patches = build_labelled_patches(table, prepared_dir, coordinate_system, progress=progress)
    save_labelled_patches(patches, cache_path, key)
    return patches
