"""Full-state checkpoints of a pre-training run, exact resume, and the export of the query encoder.

A checkpoint holds the model (both encoders, queues and pointers), optimizer, scheduler, the engine's
iteration/epoch and the RNG states. ``TrainingCheckpoint`` adds the engine it is attached to, which a bundle
config cannot reference from inside the engine's own handler list.

``RNGState`` carries Python, NumPy and torch generator states so a resumed run draws the same numbers (the
views themselves are seeded per sample, see ``custom.data.augmentation``). Checkpoints are named by iteration
(``checkpoint_iteration=N.pt``), so the newest is the one with the largest N.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from custom.atomic_io import atomic_path
from custom.errors import MissingInputError
from custom.flags import as_bool


class RNGState:
    def state_dict(self) -> dict:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])


def _iteration_of(path: Path) -> int:
    return int(re.search(r"iteration=(\d+)", path.name).group(1))


def latest_checkpoint(checkpoint_dir: str | Path) -> Optional[str]:
    """Path of the most advanced ``checkpoint_iteration=N.pt`` in ``checkpoint_dir``, or None when there is none."""
    checkpoint_dir = Path(checkpoint_dir)
    files = list(checkpoint_dir.glob("checkpoint_iteration=*.pt")) if checkpoint_dir.is_dir() else []
    if not files:
        return None
    return str(max(files, key=_iteration_of))


def resume_path(checkpoint_dir: str | Path, resume: bool) -> Optional[str]:
    """The checkpoint to resume from when ``resume`` is set (error if asked to resume with none there)."""
    if not as_bool(resume):
        return None
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        raise MissingInputError(
            checkpoint_dir,
            "checkpoint to resume from",
            "training",
            "resume requested but the folder holds no checkpoint",
        )
    return path


class ExportQueryEncoder:
    """At each epoch end and at completion, write the query encoder as ``models/pretrained.pt`` (the pre-trained encoder)
    (the state dict of ``custom.model.network.DrasCLRNetwork``), atomically. Rank 0 only.

    ``snapshot_dir``: also keep the encoder of every epoch end as ``encoder_iteration=N.pt`` there, and the
    untrained one (N = 0) when a run starts from scratch: the weights at several shares of one budget, which the
    evidence study reads out (``custom.study``)."""

    def __init__(self, model, path: str | Path, snapshot_dir: str | Path | None = None):
        self.model = model
        self.path = Path(path)
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self)
        if self.snapshot_dir is not None:
            engine.add_event_handler(Events.STARTED, self._snapshot)  # after a resume has loaded its checkpoint
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._snapshot)

    @staticmethod
    def _rank0() -> bool:
        return not (
            torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0
        )

    def _state(self) -> dict:
        model = getattr(self.model, "module", self.model)
        return {f"encoder.{k}": v.detach().cpu() for k, v in model.encoder_q.state_dict().items()}

    def __call__(self, engine=None) -> None:
        if not self._rank0():
            return
        with atomic_path(self.path) as tmp:
            torch.save(self._state(), tmp)

    def _snapshot(self, engine) -> None:
        iteration = int(engine.state.iteration or 0)
        target = self.snapshot_dir / f"encoder_iteration={iteration}.pt"
        if not self._rank0() or target.is_file():
            return
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            torch.save(self._state(), tmp)


def encoder_snapshots(snapshot_dir: str | Path) -> dict[int, Path]:
    """{iteration: file} of the encoder snapshots ``ExportQueryEncoder`` kept in ``snapshot_dir``."""
    snapshot_dir = Path(snapshot_dir)
    files = snapshot_dir.glob("encoder_iteration=*.pt") if snapshot_dir.is_dir() else []
    return {_iteration_of(f): f for f in sorted(files, key=_iteration_of)}


class TrainingCheckpoint:
    """Save the full state every ``every_n_iterations`` and at every epoch end (written by rank 0; keeps the newest
    ``n_saved``). Pass the unwrapped model (not its DDP wrapper) so checkpoints load anywhere."""

    def __init__(self, save_dir: str | Path, objects: dict, every_n_iterations: int = 0, n_saved: int = 2):
        self.save_dir, self.objects = Path(save_dir), dict(objects)
        self.every_n_iterations, self.n_saved = int(every_n_iterations or 0), n_saved

    def attach(self, engine) -> None:
        from ignite.engine import Events
        from ignite.handlers import Checkpoint, DiskSaver

        # Built on every rank: ignite's Checkpoint syncs its distributed context collectively, and its
        # DiskSaver writes on rank 0 only.
        to_save = {**self.objects, "trainer": engine}
        checkpoint = Checkpoint(
            to_save,
            DiskSaver(str(self.save_dir), require_empty=False, atomic=True),
            filename_prefix="checkpoint",
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.iteration,
            filename_pattern="{filename_prefix}_iteration={global_step}.{ext}",
        )
        engine.add_event_handler(Events.STARTED, self._remember_start)  # after a resume has loaded its checkpoint
        engine.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.prune)
        if self.every_n_iterations:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_n_iterations), checkpoint)
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_n_iterations), self.prune)

    def _remember_start(self, engine) -> None:
        self._start_iteration = int(engine.state.iteration or 0)

    def prune(self, engine=None) -> None:
        """Rotate out the checkpoints of the run this one resumed (at or before the iteration it started from):
        ignite's Checkpoint rotates only the files it wrote itself, so a killed process's files would stay
        forever. Together with this process's files, the newest ``n_saved`` are kept; files of this process
        are left to ignite, and a fresh run (started at 0) deletes nothing (rank 0 only)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            return
        start = getattr(self, "_start_iteration", 0)
        if not start:
            return
        files = list(self.save_dir.glob("checkpoint_iteration=*.pt"))
        own = sum(_iteration_of(f) > start for f in files)
        earlier = sorted((f for f in files if _iteration_of(f) <= start), key=_iteration_of)
        for old in earlier[: max(0, len(earlier) - max(0, int(self.n_saved) - own))]:
            old.unlink(missing_ok=True)


class ResumeFromCheckpoint:
    """At start, load a full-state checkpoint into the objects and the engine (no-op when path is None)."""

    def __init__(self, path: Optional[str], objects: dict):
        self.path, self.objects = path, dict(objects)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.path:
            engine.add_event_handler(Events.STARTED, self._load)

    def _load(self, engine) -> None:
        from ignite.handlers import Checkpoint

        checkpoint = torch.load(self.path, map_location="cpu", weights_only=False)
        Checkpoint.load_objects(to_load={**self.objects, "trainer": engine}, checkpoint=checkpoint)
        engine.logger.info(f"resumed from {self.path} at iteration {engine.state.iteration}")


def dump_rank_state(model, directory: Optional[str]) -> None:
    """Write this rank's model state (weights, queues, pointers) to ``directory/rank{r}.pt`` (if given)."""
    if not directory:
        return
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    Path(directory).mkdir(parents=True, exist_ok=True)
    torch.save(getattr(model, "module", model).state_dict(), Path(directory) / f"rank{rank}.pt")
