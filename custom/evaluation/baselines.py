"""The baselines the evaluation computes itself from the prepared cache (paper Tables 2-4): the floor and the
clinical reference any representation is compared with.

- LAA-950, the clinical density descriptor: the percentage of lung voxels below -950 HU. The cache stores 581
  landmark patches, not the lung mask, so "lung" is approximated inside each patch by the atlas lung mask over
  the same patch (the subject was affinely registered to the atlas, so patch j covers about the same anatomy)
  intersected with HU < -500. Subject level: one value pooled over all patches (voxels where patches overlap
  count once per patch). Patch level: one value per landmark (581).
- A random-init encoder: a seeded, untrained ``DrasCLRNetwork`` embedding the same patches (mean over
  landmarks, as for DrasCLR); the floor any pre-training must beat. Embedding is the slow part on a CPU, so
  patches are batched one landmark across subjects (see ``landmark_major_means``) and the result is cached per
  subject, keyed by the seed and the patch file's size and modification time.

``Baselines`` is the config component (``evaluate.yaml``: ``baselines``, ``covid#baselines``) that computes the
ones switched on for one cohort.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from custom.atomic_io import atomic_path
from custom.data.atlas import atlas_mask_path, landmark_corners, landmark_locations
from custom.data.intensity import hu_to_network
from custom.data.patch_dataset import prepared_patch_files
from custom.embed.cohort import embed_patches
from custom.evaluation.notes import Notes
from custom.flags import as_bool
from custom.model.network import DrasCLRNetwork, network_input
from custom.prepare import cache
from custom.subject_table import EMBEDDING_FILE, embedding_table, read_embedding_table, write_embedding_table

logger = logging.getLogger(__name__)

PATCH = 32
LAA = "LAA-950"
LAA_PATCH = "LAA-950 (patch)"
RANDOM_INIT = "Random init"


def cache_subjects(cache_dir: str | Path) -> list[tuple[str, Path]]:
    """(subject_id, patches.npy) of every prepared subject, ids taken from the manifest where it has them."""
    files = prepared_patch_files(cache_dir)
    folder_to_id = {}
    if (Path(cache_dir) / cache.MANIFEST).is_file():
        table = cache.read_manifest(cache_dir)  # ids stay text
        if "path" in table.columns:
            folder_to_id = {folder: subject for folder, subject in zip(table["path"], table["subject_id"]) if folder}
    return [(folder_to_id.get(f.parent.name, f.parent.name), f) for f in files]


def atlas_lung_patches(atlas_dir: str | Path | None = None) -> np.ndarray:
    """(J, 32, 32, 32) bool: the atlas lung mask inside every landmark patch."""
    mask = np.asarray(nib.load(str(atlas_mask_path(atlas_dir))).dataobj) > 0
    return np.stack([mask[x : x + PATCH, y : y + PATCH, z : z + PATCH] for x, y, z in landmark_corners(atlas_dir)])


def laa_features(
    cache_dir: str | Path, threshold_hu: float = -950.0, lung_hu: float = -500.0, atlas_dir: str | Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(subject table with column ``laa950``, patch table with ``laa950_000`` ..) in percent of lung voxels."""
    lung_region = atlas_lung_patches(atlas_dir)
    name = f"laa{abs(int(threshold_hu))}"
    subject_rows, patch_rows, ids = [], [], []
    for subject_id, patch_file in cache_subjects(cache_dir):
        hu = np.load(patch_file, mmap_mode="r")
        if hu.shape[0] != lung_region.shape[0]:
            raise ValueError(f"{patch_file}: {hu.shape[0]} patches, the atlas has {lung_region.shape[0]} landmarks")
        lung = lung_region & (hu < lung_hu)
        low = lung & (hu < threshold_hu)
        n_lung = lung.sum(axis=(1, 2, 3))
        n_low = low.sum(axis=(1, 2, 3))
        subject_rows.append(100.0 * n_low.sum() / max(int(n_lung.sum()), 1))
        patch_rows.append(np.where(n_lung > 0, 100.0 * n_low / np.maximum(n_lung, 1), 0.0))
        ids.append(subject_id)
    index = pd.Index(ids, name="subject_id")
    subject = pd.DataFrame({name: subject_rows}, index=index)
    patch = pd.DataFrame(
        np.array(patch_rows), index=index, columns=[f"{name}_{j:03d}" for j in range(lung_region.shape[0])]
    )
    return subject, patch


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def random_init_network(seed: int, architecture: dict | None = None) -> DrasCLRNetwork:
    """An untrained DrasCLRNetwork (sizes: the configs' ``encoder_def``, default the standard ones) with its
    default initialisation under ``torch.manual_seed(seed)``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return DrasCLRNetwork(**(architecture or {})).eval()
    finally:
        torch.random.set_rng_state(state)


@torch.no_grad()
def landmark_major_means(
    network: DrasCLRNetwork,
    patch_arrays: Sequence[np.ndarray],
    locations: np.ndarray,
    batch_size: int = 64,
    progress: str | None = None,
) -> np.ndarray:
    """(subjects, D) mean over landmarks of e(x_i^j, p^j), batching one landmark across subjects.

    Same numbers as ``custom.embed.cohort.embed_patches`` per subject, but a batch that shares one location lets
    every Loc-CondConv run one plain convolution (its shared-location path): about 3x less CPU time here.
    ``progress``: the label of a progress bar over the landmarks (none when None)."""
    from tqdm.auto import tqdm

    total = None
    bar = tqdm(locations, desc=progress, unit="landmark", disable=progress is None, leave=False)
    for j, location in enumerate(bar):
        for start in range(0, len(patch_arrays), batch_size):
            chunk = patch_arrays[start : start + batch_size]
            hu = torch.as_tensor(np.stack([np.asarray(p[j], dtype=np.float32) for p in chunk]))
            where = torch.as_tensor(location).view(1, 3).expand(len(chunk), 3)
            h = network(network_input(hu_to_network(hu).unsqueeze(1), where)).double()
            if total is None:
                total = torch.zeros(len(patch_arrays), h.shape[1], dtype=torch.float64)
            total[start : start + len(chunk)] += h
    return (total / len(locations)).numpy()


def random_init_embeddings(
    cache_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    batch_size: int = 64,
    atlas_dir=None,
    architecture: dict | None = None,
) -> pd.DataFrame:
    """Subject embeddings (mean over landmarks) of a seeded random-init encoder, cached in ``out_dir``."""
    out_dir = Path(out_dir)
    table_path, stamp_path = out_dir / EMBEDDING_FILE, out_dir / "stamps.json"
    cached, stamps = pd.DataFrame(), {}
    if table_path.is_file() and stamp_path.is_file():
        saved = json.loads(stamp_path.read_text())
        if saved.get("seed") == seed and saved.get("architecture") == (architecture or {}):
            cached, stamps = read_embedding_table(table_path), saved.get("subjects", {})
    locations = landmark_locations(atlas_dir)
    rows, new_stamps, todo = {}, {}, []
    for subject_id, patch_file in cache_subjects(cache_dir):
        stamp = _stamp(patch_file)
        new_stamps[subject_id] = stamp
        if stamps.get(subject_id) == stamp and subject_id in cached.index:
            rows[subject_id] = cached.loc[subject_id].to_numpy()
            continue
        patches = np.load(patch_file, mmap_mode="r")
        if len(patches) != len(locations):
            raise ValueError(f"{patch_file}: {len(patches)} patches, the atlas has {len(locations)} landmarks")
        todo.append((subject_id, patches))
    if len(todo) == 1:  # nothing to batch across: the per-subject path
        means = [embed_patches(random_init_network(seed, architecture), todo[0][1], locations, batch_size).mean(axis=0)]
    elif todo:
        means = landmark_major_means(
            random_init_network(seed, architecture), [p for _, p in todo], locations, batch_size
        )
    if todo:
        rows.update({subject_id: mean for (subject_id, _), mean in zip(todo, means)})
    subject_ids = sorted(rows)
    table = embedding_table(subject_ids, [rows[s] for s in subject_ids])
    if todo:
        write_embedding_table(table, table_path)
        with atomic_path(stamp_path) as tmp:
            tmp.write_text(
                json.dumps({"seed": seed, "architecture": architecture or {}, "subjects": new_stamps}, indent=1)
            )
    logger.info("random-init embeddings: %d computed, %d reused from %s", len(todo), len(rows) - len(todo), out_dir)
    return table.astype(np.float64)


class Baselines:
    """The baselines of one cohort, computed from its prepared cache: "LAA-950" (``laa950``), "LAA-950 (patch)"
    (``laa950_patch``, 581 per-landmark values) and "Random init" (``random_init``, an untrained encoder seeded
    with ``random_init_seed``, its embeddings cached under ``cache_dir/<cohort>_random_init_seed<seed>``).

    A cache that is not given or not there skips them with a note (so a run with embedding tables only works)."""

    def __init__(
        self,
        prepared_cache: str | Path | None = None,
        cache_dir: str | Path | None = None,
        atlas_dir: str | Path | None = None,
        laa950: bool = True,
        laa950_patch: bool = True,
        random_init: bool = True,
        random_init_seed: int = 0,
        architecture: dict | None = None,
    ):
        self.prepared_cache = prepared_cache
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.atlas_dir = atlas_dir
        self.laa950, self.laa950_patch = as_bool(laa950), as_bool(laa950_patch)
        self.random_init, self.random_init_seed = as_bool(random_init), int(random_init_seed)
        self.architecture = dict(architecture or {})  # the configs' encoder_def: the random encoder's sizes
        if self.random_init and self.cache_dir is None:
            raise ValueError("Baselines: random_init needs a cache_dir for the random-init embeddings")

    @property
    def wanted(self) -> bool:
        return self.laa950 or self.laa950_patch or self.random_init

    def compute(self, notes: Notes, cohort: str) -> dict[str, pd.DataFrame]:
        """{set name: subject table} of the switched-on baselines, or {} with a note when there is no cache."""
        sets: dict[str, pd.DataFrame] = {}
        if not self.wanted:
            return sets
        if not self.prepared_cache:
            notes.add(f"[{cohort}] LAA-950 and random-init baselines skipped: no prepared cache given")
            return sets
        if not (Path(self.prepared_cache) / "manifest.csv").is_file():
            notes.add(
                f"[{cohort}] LAA-950 and random-init baselines skipped: no prepared cache at " f"{self.prepared_cache}"
            )
            return sets
        if self.laa950 or self.laa950_patch:
            subject, patch = laa_features(self.prepared_cache, atlas_dir=self.atlas_dir)
            if self.laa950:
                sets[LAA] = subject
            if self.laa950_patch:
                sets[LAA_PATCH] = patch
        if self.random_init:
            start = time.perf_counter()
            seed = self.random_init_seed
            sets[RANDOM_INIT] = random_init_embeddings(
                self.prepared_cache,
                self.cache_dir / f"{cohort}_random_init_seed{seed}",
                seed,
                atlas_dir=self.atlas_dir,
                architecture=self.architecture,
            )
            notes.add(f"[{cohort}] random-init embeddings ready in {time.perf_counter() - start:.1f} s")
        return sets
