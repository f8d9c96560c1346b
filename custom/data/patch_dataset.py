"""Training data over the prepared cache: one item per (subject, landmark) pair.

An item holds two augmented views of x_i^j, augmented views of its l nearest landmarks' patches from the
same subject, their locations and the landmark id (paper §2.3-2.4). Patches are read from the per-subject
``patches.npy`` (J, 32, 32, 32) int16 through a memory map; whole volumes are never loaded.

The sampler yields ``pass * len(dataset) + index`` so the dataset knows the pass of every draw (it seeds the
views) while worker processes stay stateless. Two orders: ``mixed`` (any landmarks in a batch) and
``landmark`` (each global batch, over all DDP ranks, from one landmark: the reference's order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from custom.data.atlas import landmark_locations, landmark_neighbours
from custom.data.augmentation import contrastive_views, make_view, view_seed
from custom.errors import MissingInputError
from custom.prepare import cache

ORDERS = ("mixed", "landmark")


def prepared_patch_files(cache_dir: str | Path) -> List[Path]:
    """Patch files of the subjects a prepare run finished (``manifest.csv`` status ok), sorted by subject id."""
    cache_dir = Path(cache_dir)
    if (cache_dir / cache.MANIFEST).is_file():
        table = cache.read_manifest(cache_dir)  # ids such as "0001" stay text; empty cells are ""
        if "status" in table.columns:
            table = table[table["status"] == "ok"]
        # ``path`` is the subject's folder relative to the cache (ids may have been made folder-safe).
        folders = table["path"] if "path" in table.columns else table["subject_id"]
        files = sorted(cache_dir / str(folder) / "patches.npy" for folder in folders if str(folder))
    else:
        files = sorted(cache_dir.glob("*/patches.npy"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise MissingInputError(
            cache_dir,
            "prepared subjects",
            "prepare",
            "no manifest.csv row with status ok and a patches.npy",
            cache_dir=cache_dir,
        )
    return files


class LandmarkPatchDataset(Dataset):
    def __init__(
        self,
        patch_files: Sequence[str | Path],
        num_neighbours: int = 2,
        augment: bool = True,
        seed: int = 0,
        atlas_dir: Optional[str] = None,
        neighbour_seed: int = 0,
    ):
        self.patch_files = [Path(f) for f in patch_files]
        self.locations = torch.from_numpy(landmark_locations(atlas_dir))
        self.num_landmarks = len(self.locations)
        self.neighbours = torch.from_numpy(landmark_neighbours(num_neighbours, atlas_dir, seed=neighbour_seed).copy())
        self.transform = contrastive_views() if augment else None
        self.seed = seed
        self._arrays: Dict[int, np.ndarray] = {}
        first = self._patches(0)
        if first.ndim != 4 or first.shape[0] != self.num_landmarks:
            raise ValueError(
                f"{self.patch_files[0]}: expected ({self.num_landmarks}, S, S, S) patches, got {first.shape}"
            )

    def __len__(self) -> int:
        return len(self.patch_files) * self.num_landmarks

    def state_dict(self) -> dict:
        """The neighbour table, saved with every training checkpoint."""
        return {"neighbours": self.neighbours.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Train on the checkpoint's neighbour table, whatever today's rule or seed would give."""
        table = torch.as_tensor(state["neighbours"], dtype=torch.long)
        if table.shape != self.neighbours.shape:
            raise ValueError(
                f"the checkpoint's neighbour table is {tuple(table.shape)}, this run's is {tuple(self.neighbours.shape)} "
                f"(num_neighbours or the atlas differ from the run that wrote it)"
            )
        self.neighbours = table.clone()

    def _patches(self, subject: int) -> np.ndarray:
        if subject not in self._arrays:
            self._arrays[subject] = np.load(self.patch_files[subject], mmap_mode="r")
        return self._arrays[subject]

    def __getitem__(self, draw: int) -> Dict[str, torch.Tensor]:
        pass_index, index = divmod(int(draw), len(self))
        subject, landmark = divmod(index, self.num_landmarks)
        patches = self._patches(subject)
        seed = lambda view: view_seed(self.seed, pass_index, index, view)  # noqa: E731
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


class PassSampler(Sampler[int]):
    """The training order: a stream of seeded passes over the (subject, landmark) pairs, split over DDP ranks.

    Pass k is a permutation seeded by (seed, k). Each ``iter()`` yields this rank's share of one pass, starting
    at the position ``set_position`` gave (the engine's iteration when a run starts or resumes), then moves on to
    the next pass; ignite keeps the iterator across epochs when ``epoch_length`` is shorter than a pass and takes
    a new one when it runs dry, so the batch at iteration t is the same in an uninterrupted and a resumed run.

    ``order="landmark"`` (the reference): every step is ONE landmark across all ranks. A global batch of
    ``batch_size * num_replicas`` different subjects of one landmark is cut into ``num_replicas`` chunks, and
    rank r takes chunk r, so the global batch, its negatives, its queue writes and shuffle-BN all concern one
    landmark. ``order="mixed"``: a global batch of any (subject, landmark) pairs, cut the same way.
    Incomplete global batches are dropped, so every rank yields the same number of batches.
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
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"batch_size {batch_size}, num_replicas {num_replicas}, rank {rank}: out of range")
        self.global_batch = batch_size * num_replicas
        if order == "landmark" and num_subjects < self.global_batch:
            raise ValueError(
                f"order 'landmark' fills a global batch ({batch_size} per rank x {num_replicas} ranks) from one "
                f"landmark of different subjects: it needs at least {self.global_batch} subjects, the cache has "
                f"{num_subjects} (use a smaller batch_size or order 'mixed')"
            )
        if order == "mixed" and num_subjects * num_landmarks < self.global_batch:
            raise ValueError(
                f"{num_subjects * num_landmarks} patches cannot fill one global batch of {self.global_batch}"
            )
        self.num_subjects, self.num_landmarks = num_subjects, num_landmarks
        self.batch_size, self.order, self.seed = batch_size, order, seed
        self.num_replicas, self.rank = num_replicas, rank
        self._next_pass, self._next_offset = 0, 0

    @property
    def batches_per_pass(self) -> int:
        if self.order == "landmark":
            return self.num_subjects // self.global_batch * self.num_landmarks
        return self.num_subjects * self.num_landmarks // self.global_batch

    def set_position(self, iteration: int) -> None:
        """The next ``iter()`` starts at global batch ``iteration`` of the stream of passes."""
        self._next_pass, self._next_offset = divmod(int(iteration), self.batches_per_pass)

    def global_batches(self, pass_index: int) -> np.ndarray:
        """(batches_per_pass, global batch) item indices of one pass, identical on every rank."""
        rng = np.random.default_rng([self.seed, pass_index])
        if self.order == "mixed":
            order = rng.permutation(self.num_subjects * self.num_landmarks)
            return order[: self.batches_per_pass * self.global_batch].reshape(-1, self.global_batch)
        per_landmark = self.num_subjects // self.global_batch
        chunks = []
        for landmark in range(self.num_landmarks):
            subjects = rng.permutation(self.num_subjects)[: per_landmark * self.global_batch]
            chunks.append((subjects * self.num_landmarks + landmark).reshape(per_landmark, self.global_batch))
        return np.concatenate(chunks)[rng.permutation(self.batches_per_pass)]

    def __len__(self) -> int:
        return self.batches_per_pass * self.batch_size

    def __iter__(self) -> Iterator[int]:
        pass_index, offset = self._next_pass, self._next_offset
        self._next_pass, self._next_offset = pass_index + 1, 0
        columns = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        batches = self.global_batches(pass_index)[offset:, columns]
        return iter((batches.reshape(-1) + pass_index * self.num_subjects * self.num_landmarks).tolist())
