"""The DrasCLR pre-training model: query encoder, momentum key encoder and landmark-conditioned queues.

One ``forward`` is one MoCo step of the paper (eq. 5-9): embed the query patch and its l neighbours with the
query encoder, update the key encoder by EMA (m = 0.999, no gradients), embed the second view with it, score
both against the queue of the query's landmark, then enqueue the keys (gathered from every rank under DDP).
For the ablations (paper §4.4): ``conditioning`` swaps the encoder's location conditioning, and
``global_queue=True`` keeps plain MoCo's single dictionary shared by all landmarks (a key from any landmark is
a negative for every query).
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from custom.engine.distributed import concat_all_gather, shuffle_batch, unshuffle_batch
from custom.model.encoder import DrasCLREncoder
from custom.model.landmark_queue import LandmarkQueue
from custom.model.loc_condconv import INITS
from custom.model.losses import NEIGHBOUR_VARIANTS, local_contrastive_loss, neighbour_contrastive_loss
from custom.model.split_batchnorm import use_split_batchnorm


class DrasCLR(nn.Module):
    def __init__(
        self,
        num_landmarks: int = 581,
        queue_size: int = 4096,
        representation_dim: int = 128,
        projection_dim: int = 128,
        num_experts: int = 8,
        momentum: float = 0.999,
        temperature: float = 0.2,
        neighbour_loss: str = "paper",
        half_precision_queue: bool = False,
        conv_mode: str = "grouped",
        conditioning: str = "loc_condconv",
        global_queue: bool = False,
        init: str = "reference",
        bn_splits: int = 1,
    ):
        super().__init__()
        check_settings(momentum, temperature, queue_size, num_landmarks, neighbour_loss, init, bn_splits)
        self.momentum = momentum
        self.temperature = temperature
        self.neighbour_loss = neighbour_loss
        self.bn_splits = int(bn_splits)
        encoder = DrasCLREncoder(1, representation_dim, projection_dim, num_experts, conv_mode, conditioning, init)
        self.encoder_q = use_split_batchnorm(encoder, self.bn_splits) if self.bn_splits > 1 else encoder
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for parameter in self.encoder_k.parameters():
            parameter.requires_grad_(False)
        self.global_queue = global_queue
        self.queue = LandmarkQueue(
            1 if global_queue else num_landmarks, queue_size, projection_dim, half_precision_queue
        )

    def queue_ids(self, landmark_ids: torch.Tensor) -> torch.Tensor:
        """The dictionary each landmark reads and writes: its own, or the single shared one (plain MoCo)."""
        return torch.zeros_like(landmark_ids) if self.global_queue else landmark_ids

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q (parameters only; BN statistics stay each encoder's own)."""
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(self.momentum).add_(param_q.detach(), alpha=1.0 - self.momentum)

    def embed_queries(self, patches: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_q(patches, locations)[1], dim=1)

    @torch.no_grad()
    def embed_keys(self, patches: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """Keys from the momentum encoder, computed on a shuffled batch (shuffle-BN: across ranks under DDP,
        within the batch when BatchNorm is split in one process) and returned in the original order."""
        (patches, locations), unshuffle = shuffle_batch(patches, locations, local=self.bn_splits > 1)
        keys = F.normalize(self.encoder_k(patches, locations)[1], dim=1)
        return unshuffle_batch(keys, unshuffle)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        location: torch.Tensor,
        landmark_ids: torch.Tensor,
        neighbours: Optional[torch.Tensor] = None,
        neighbour_locations: Optional[torch.Tensor] = None,
        update: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """One step. query/key: (B, 1, S, S, S) two views of x_i^j; location: (B, 3) p^j; landmark_ids: (B,);
        neighbours: (B, L, 1, S, S, S) views of x_i^l with locations (B, L, 3). ``update=False`` leaves the key
        encoder and the queues untouched (evaluation).
        """
        q = self.embed_queries(query, location)
        if update:
            self.momentum_update()
        k = self.embed_keys(key, location)
        out: Dict[str, torch.Tensor] = {}
        queue_ids = self.queue_ids(landmark_ids)
        negatives = self.queue.similarities(q.unsqueeze(1), queue_ids).squeeze(1)
        out["loss_local"], out["acc_local"] = local_contrastive_loss(q, k, negatives, self.temperature)
        loss = out["loss_local"]
        if neighbours is not None and neighbours.shape[1] > 0:
            b, num_neighbours = neighbours.shape[:2]
            r = self.embed_queries(neighbours.flatten(0, 1), neighbour_locations.reshape(-1, 3))
            r = r.view(b, num_neighbours, -1)
            neighbour_negatives = self.queue.similarities(r, queue_ids)
            out["loss_neighbour"], out["acc_neighbour"] = neighbour_contrastive_loss(
                r, k, neighbour_negatives, self.temperature, self.neighbour_loss
            )
            loss = loss + out["loss_neighbour"]
        out["loss"] = loss
        if update:
            self.queue.enqueue(concat_all_gather(k), concat_all_gather(queue_ids.to(k.device)))
        return out


def check_settings(
    momentum: float,
    temperature: float,
    queue_size: int,
    num_landmarks: int,
    neighbour_loss: str,
    init: str,
    bn_splits: int,
) -> None:
    """Refuse settings that would train something else silently (one message per problem, naming the key)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"ema_momentum must lie in [0, 1), got {momentum}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(queue_size) < 1:
        raise ValueError(f"queue_size must be at least 1, got {queue_size}")
    if int(num_landmarks) < 1:
        raise ValueError(f"num_landmarks must be at least 1, got {num_landmarks}")
    if neighbour_loss not in NEIGHBOUR_VARIANTS:
        raise ValueError(f"neighbour_loss must be one of {NEIGHBOUR_VARIANTS}, got {neighbour_loss!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if int(bn_splits) < 1:
        raise ValueError(f"bn_splits must be at least 1, got {bn_splits}")
