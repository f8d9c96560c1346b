"""Training data over the prepared cache: one item per (subject, landmark) pair.

An item holds two augmented views of x_i^j, augmented views of its l nearest landmarks' patches from the
same subject, their locations and the landmark id (paper §2.3-2.4). Patches are read from the per-subject
``patches.npy`` (J, 32, 32, 32) int16 through a memory map; whole volumes are never loaded.

The sampler yields ``epoch * len(dataset) + index`` so the dataset knows the epoch of every draw (it seeds the
views) while worker processes stay stateless. Two orders: ``mixed`` (any landmarks in a batch) and
``landmark`` (each batch from one landmark, the reference's order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from custom.atlas import landmark_locations, landmark_neighbours
from custom.augmentation import contrastive_views, make_view, view_seed

ORDERS = ("mixed", "landmark")


def prepared_patch_files(cache_dir: str | Path) -> List[Path]:
    """Patch files of the subjects a prepare run finished (``manifest.csv`` status ok), sorted by subject id."""
    cache_dir = Path(cache_dir)
    manifest = cache_dir / "manifest.csv"
    if manifest.is_file():
        table = pd.read_csv(manifest, dtype={"subject_id": str})
        if "status" in table.columns:
            table = table[table["status"] == "ok"]
        # ``path`` is the subject's folder relative to the cache (ids may have been made folder-safe).
        folders = table["path"] if "path" in table.columns else table["subject_id"]
        files = sorted(cache_dir / str(folder) / "patches.npy" for folder in folders.dropna())
    else:
        files = sorted(cache_dir.glob("*/patches.npy"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError(f"{cache_dir}: no prepared subjects (run the prepare workflow first)")
    return files


class LandmarkPatchDataset(Dataset):
    def __init__(
        self,
        patch_files: Sequence[str | Path],
        num_neighbours: int = 2,
        augment: bool = True,
        seed: int = 0,
        atlas_dir: Optional[str] = None,
    ):
        self.patch_files = [Path(f) for f in patch_files]
        self.locations = torch.from_numpy(landmark_locations(atlas_dir))
        self.num_landmarks = len(self.locations)
        self.neighbours = torch.from_numpy(landmark_neighbours(num_neighbours, atlas_dir))
        self.transform = contrastive_views() if augment else None
        self.seed = seed
        self._arrays: Dict[int, np.ndarray] = {}
        first = self._patches(0)
        if first.ndim != 4 or first.shape[0] != self.num_landmarks:
            raise ValueError(f"{self.patch_files[0]}: expected ({self.num_landmarks}, S, S, S) patches, got {first.shape}")

    def __len__(self) -> int:
        return len(self.patch_files) * self.num_landmarks

    def _patches(self, subject: int) -> np.ndarray:
        if subject not in self._arrays:
            self._arrays[subject] = np.load(self.patch_files[subject], mmap_mode="r")
        return self._arrays[subject]

    def __getitem__(self, draw: int) -> Dict[str, torch.Tensor]:
        epoch, index = divmod(int(draw), len(self))
        subject, landmark = divmod(index, self.num_landmarks)
        patches = self._patches(subject)
        seed = lambda view: view_seed(self.seed, epoch, index, view)  # noqa: E731
        neighbour_ids = self.neighbours[landmark]
        neighbours = [make_view(self.transform, patches[int(n)], seed(2 + v)) for v, n in enumerate(neighbour_ids)]
        size = patches.shape[1:]
        return {
            "query": make_view(self.transform, patches[landmark], seed(0)),
            "key": make_view(self.transform, patches[landmark], seed(1)),
            "neighbours": torch.stack(neighbours) if neighbours else torch.zeros((0, 1) + tuple(size)),
            "location": self.locations[landmark],
            "neighbour_locations": self.locations[neighbour_ids],
            "landmark_ids": torch.tensor(landmark),
            "subject": torch.tensor(subject),
        }


class EpochSampler(Sampler[int]):
    """Deterministic per-epoch order, split over DDP ranks, resumable mid-epoch.

    ``set_epoch`` picks the permutation (seeded by seed and epoch); ``skip_batches`` drops this rank's first n
    batches once, so a run resumed at iteration t reads exactly the batches an uninterrupted run would.
    In ``landmark`` order each batch holds one landmark (incomplete per-landmark chunks are dropped).
    """

    def __init__(
        self,
        num_subjects: int,
        num_landmarks: int,
        batch_size: int,
        order: str = "mixed",
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if order == "landmark" and num_subjects < batch_size:
            raise ValueError(
                f"order 'landmark' fills a batch from one landmark of different subjects: batch_size {batch_size} "
                f"needs at least that many subjects, the cache has {num_subjects} (use order 'mixed')"
            )
        self.num_subjects, self.num_landmarks = num_subjects, num_landmarks
        self.batch_size, self.order, self.seed = batch_size, order, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_batches(self, count: int) -> None:
        self._skip = int(count)

    def _batches(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.num_subjects * self.num_landmarks
        if self.order == "mixed":
            order = rng.permutation(total)
            usable = len(order) // self.batch_size * self.batch_size
            batches = order[:usable].reshape(-1, self.batch_size)
        else:
            per_landmark = self.num_subjects // self.batch_size
            chunks = []
            for landmark in range(self.num_landmarks):
                subjects = rng.permutation(self.num_subjects)[: per_landmark * self.batch_size]
                chunks.append((subjects * self.num_landmarks + landmark).reshape(per_landmark, self.batch_size))
            batches = np.concatenate(chunks)[rng.permutation(per_landmark * self.num_landmarks)]
        usable = len(batches) // self.num_replicas * self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __len__(self) -> int:
        return len(self._batches()) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        batches = self._batches()[self._skip :]
        self._skip = 0
        offset = self.epoch * self.num_subjects * self.num_landmarks
        return iter((batches.reshape(-1) + offset).tolist())
