"""Per-subject work (prepare, embed, emphysema maps) across processes and nodes on torch.distributed.

Launched by ``torchrun`` (``torchrun --nproc_per_node=N [--nnodes ... rendezvous] -m monai.bundle run prepare ...``),
each process joins a gloo process group (object collectives only: it works beside nccl training and on CPU)
and takes a deterministic share of the subjects: rank r of W takes subjects r, r + W, r + 2W, ... of the input
order, the split ``monai.data.DistributedSampler(shuffle=False, even_divisible=False)`` makes, so every subject
is done exactly once. A failing subject is a row in its rank's results, never a stopped rank. At the end the
rows are gathered and rank 0 alone writes the merged tables (atomically), in the input order, so the outputs
equal a single-process run's. Without torchrun everything here is the identity: one process, all subjects.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Sequence, Tuple

import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_subject_group() -> bool:
    """Join the process group of a torchrun launch (gloo) if there is one and it is not joined yet.
    Returns whether this process is one of several."""
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group("gloo")
    return world() > 1


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence) -> List:
    """This rank's subjects: items r, r + W, ... (all of them in one process)."""
    return list(items[rank() :: world()])


def positions(count: int) -> List[int]:
    """Input positions of this rank's ``count`` items (``shard``'s rule), for merging in input order."""
    return [rank() + k * world() for k in range(count)]


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def gather_in_order(rows: Iterable[Tuple[int, object]]) -> List:
    """(input position, row) pairs from every rank -> all rows in input order, on every rank."""
    rows = list(rows)
    if world() > 1:
        gathered: list = [None] * world()
        dist.all_gather_object(gathered, rows)
        rows = [pair for part in gathered for pair in part]
    return [row for _, row in sorted(rows, key=lambda pair: pair[0])]


def finish() -> None:
    """Leave the process group this module joined (end of a workflow's ``finalize``)."""
    if dist.is_available() and dist.is_initialized() and launched_by_torchrun():
        dist.barrier()
        dist.destroy_process_group()
