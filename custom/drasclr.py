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

from custom.distributed import concat_all_gather, shuffle_across_ranks, unshuffle_across_ranks
from custom.encoder import DrasCLREncoder
from custom.landmark_queue import LandmarkQueue
from custom.losses import local_contrastive_loss, neighbour_contrastive_loss


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
    ):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.temperature = temperature
        self.neighbour_loss = neighbour_loss
        self.encoder_q = DrasCLREncoder(1, representation_dim, projection_dim, num_experts, conv_mode, conditioning)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for parameter in self.encoder_k.parameters():
            parameter.requires_grad_(False)
        self.global_queue = global_queue
        self.queue = LandmarkQueue(1 if global_queue else num_landmarks, queue_size, projection_dim, half_precision_queue)

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
        (patches, locations), unshuffle = shuffle_across_ranks(patches, locations)
        keys = F.normalize(self.encoder_k(patches, locations)[1], dim=1)
        return unshuffle_across_ranks(keys, unshuffle)

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
