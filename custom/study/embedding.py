"""Subject embeddings of many encoders over one prepared cohort, for the study's readouts.

The study embeds every method at every share of its budget: tens of encoders over hundreds of subjects. Two
things keep that affordable on a CPU, both the same for every encoder: subjects are batched one landmark at a time
(``custom.evaluation.baselines.landmark_major_means``, the same numbers as the embed workflow's), and a preset may
average every ``landmark_stride``-th landmark instead of all 581 (stride 1 is the paper's subject embedding,
eq. 11). Each table is cached with the weights' SHA-1, the architecture and the stride, so a resumed study and two
methods whose weights are identical (the same untrained encoder) embed once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from custom.atomic_io import atomic_path
from custom.data.atlas import landmark_locations
from custom.embed.cohort import load_network
from custom.evaluation.baselines import cache_subjects, landmark_major_means
from custom.model.network import DrasCLRNetwork
from custom.model.weights import file_sha1
from custom.subject_table import embedding_table, read_embedding_table, write_embedding_table


def landmark_subset(stride: int, atlas_dir=None) -> tuple[slice, np.ndarray]:
    """(slice over the landmark axis, their atlas locations) of every ``stride``-th landmark."""
    stride = int(stride)
    if stride < 1:
        raise ValueError(f"landmark_stride must be >= 1, got {stride}")
    picked = slice(None, None, stride)
    return picked, landmark_locations(atlas_dir)[picked]


def cohort_embeddings(
    weights: str | Path,
    architecture: dict,
    cache_dir: str | Path,
    out_dir: str | Path,
    landmark_stride: int = 1,
    atlas_dir=None,
    batch_size: int = 64,
    progress: str | None = None,
) -> pd.DataFrame:
    """Subject embeddings (mean over the picked landmarks) of the encoder in ``weights`` for every subject of the
    prepared ``cache_dir``; cached in ``out_dir/<sha1>_<stride>.csv``. ``progress``: a progress bar's label."""
    out_dir = Path(out_dir)
    stamp = {"weights_sha1": file_sha1(weights), "architecture": dict(architecture), "landmark_stride": landmark_stride}
    key = f"{stamp['weights_sha1'][:16]}_stride{landmark_stride}"
    table_path, stamp_path = out_dir / f"{key}.csv", out_dir / f"{key}.json"
    subjects = cache_subjects(cache_dir)
    if table_path.is_file() and stamp_path.is_file():
        saved = json.loads(stamp_path.read_text())
        cached = read_embedding_table(table_path)
        if {k: saved.get(k) for k in stamp} == stamp and set(cached.index) >= {s for s, _ in subjects}:
            return cached.loc[[s for s, _ in subjects]]
    picked, locations = landmark_subset(landmark_stride, atlas_dir)
    network = load_network(weights, "cpu", network=DrasCLRNetwork(**architecture))
    arrays = [np.load(path, mmap_mode="r")[picked] for _, path in subjects]  # a strided view: nothing copied
    for (_, path), patches in zip(subjects, arrays):
        if len(patches) != len(locations):
            raise ValueError(f"{path}: {len(patches)} patches at stride {landmark_stride}, expected {len(locations)}")
    means = landmark_major_means(network, arrays, locations, batch_size, progress)
    table = embedding_table([s for s, _ in subjects], means)
    write_embedding_table(table, table_path)
    with atomic_path(stamp_path) as tmp:
        Path(tmp).write_text(json.dumps({**stamp, "weights": str(weights), "subjects": len(subjects)}, indent=1))
    return table
