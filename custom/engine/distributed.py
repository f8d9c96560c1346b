"""What DDP needs for MoCo-style training, harmless in one process.

Keys from every rank are gathered before they are enqueued, so all ranks hold the same queues. BatchNorm in
the key encoder would let a batch "cheat" through batch statistics; MoCo's remedy, used here, is to shuffle
the key batch across ranks, or within one process's batch when BatchNorm is split (``shuffle_batch``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

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
def shuffle_batch(*tensors: torch.Tensor, local: bool = False) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """Shuffle-BN's permutation of the key batch (same permutation for every tensor).

    Under DDP: the global batch is permuted (rank 0's draw, broadcast) and each rank takes its slice of it,
    as the reference does. In one process with ``local=True`` (split BatchNorm, ``custom.model.split_batchnorm``):
    the batch is permuted in place, so the contiguous sub-batches that BatchNorm normalises together are the
    slices R ranks would hold. Otherwise the identity. Returns the shuffled tensors and the index that undoes
    the shuffle (``unshuffle_batch``; None when nothing was shuffled). Both paths draw one ``torch.randperm`` of
    the global batch size from the default generator, so one process and R ranks seeded alike use the same permutation.
    """
    if is_distributed():
        gathered = [concat_all_gather(t) for t in tensors]
        total = gathered[0].shape[0]
        world, rank = dist.get_world_size(), dist.get_rank()
        permutation = torch.randperm(total).to(gathered[0].device)
        dist.broadcast(permutation, src=0)
        local_rows = permutation.view(world, -1)[rank]
        return [g[local_rows] for g in gathered], torch.argsort(permutation)
    if not local:
        return list(tensors), None
    permutation = torch.randperm(tensors[0].shape[0]).to(tensors[0].device)
    return [t[permutation] for t in tensors], torch.argsort(permutation)


@torch.no_grad()
def unshuffle_batch(tensor: torch.Tensor, unshuffle_index: torch.Tensor | None) -> torch.Tensor:
    """Return this rank's original rows of a tensor computed on the shuffled batch (``None``: not shuffled)."""
    if unshuffle_index is None:
        return tensor
    if not is_distributed():
        return tensor[unshuffle_index]
    gathered = concat_all_gather(tensor)
    world, rank = dist.get_world_size(), dist.get_rank()
    return gathered[unshuffle_index.view(world, -1)[rank]]
