"""What DDP needs for MoCo-style training, harmless in one process.

Keys from every rank are gathered before they are enqueued, so all ranks hold the same queues. BatchNorm in
the key encoder would let a batch "cheat" through batch statistics; MoCo's remedy, used here, is to shuffle
the key batch across ranks (``shuffle_across_ranks``).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order). No gradient flows through it."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def shuffle_across_ranks(*tensors: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Give each rank a random slice of the global batch (same permutation for every tensor).

    Returns the local shuffled tensors and the index that undoes the shuffle (see ``unshuffle_across_ranks``).
    In one process this is the identity: batch statistics are permutation-invariant there.
    """
    if not is_distributed():
        return list(tensors), torch.arange(tensors[0].shape[0], device=tensors[0].device)
    gathered = [concat_all_gather(t) for t in tensors]
    total = gathered[0].shape[0]
    world, rank = dist.get_world_size(), dist.get_rank()
    permutation = torch.randperm(total, device=gathered[0].device)
    dist.broadcast(permutation, src=0)
    local = permutation.view(world, -1)[rank]
    return [g[local] for g in gathered], torch.argsort(permutation)


@torch.no_grad()
def unshuffle_across_ranks(tensor: torch.Tensor, unshuffle_index: torch.Tensor) -> torch.Tensor:
    """Return this rank's original rows of a tensor computed on the shuffled batch."""
    if not is_distributed():
        return tensor
    gathered = concat_all_gather(tensor)
    world, rank = dist.get_world_size(), dist.get_rank()
    return gathered[unshuffle_index.view(world, -1)[rank]]
