"""The landmark-conditioned memory bank: one ring buffer of K L2-normalised keys per anatomical landmark.

Negatives for a query at landmark j come only from landmark j's buffer (paper §2.3, §3: hard negatives of the
same anatomy from other subjects). Layout (J, K, D) with one write pointer per landmark; the released
checkpoint stores (D, K, J), which ``custom.model.official_checkpoint`` permutes. Keys may be stored in float16 to
halve the 581 x 4096 x 128 buffer (1.2 GB in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LandmarkQueue(nn.Module):
    def __init__(self, num_landmarks: int = 581, size: int = 4096, dim: int = 128, half_precision: bool = False):
        super().__init__()
        self.num_landmarks = num_landmarks
        self.size = size
        self.dim = dim
        dtype = torch.float16 if half_precision else torch.float32
        keys = F.normalize(torch.randn(num_landmarks, size, dim), dim=-1).to(dtype)
        self.register_buffer("keys", keys)
        self.register_buffer("ptr", torch.zeros(num_landmarks, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, landmark_ids: torch.Tensor) -> None:
        """Write ``keys`` (B, D) into the buffers of ``landmark_ids`` (B,), as if one at a time in batch order.

        A batch may mix landmarks and repeat one; each landmark's rows go to consecutive slots from its pointer
        (wrapping at K), and the pointer advances by that landmark's count. If one landmark receives more than K
        keys, the last K win, exactly as sequential writes would leave it.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (B, {self.dim}), got {tuple(keys.shape)}")
        landmark_ids = landmark_ids.to(device=self.ptr.device, dtype=torch.long).view(-1)
        if landmark_ids.numel() != keys.shape[0]:
            raise ValueError("one landmark id per key is required")
        if landmark_ids.numel() == 0:
            return
        if int(landmark_ids.min()) < 0 or int(landmark_ids.max()) >= self.num_landmarks:
            raise ValueError(f"landmark ids must lie in [0, {self.num_landmarks})")
        order = torch.argsort(landmark_ids, stable=True)
        ids = landmark_ids[order]
        counts = torch.bincount(ids, minlength=self.num_landmarks)
        group_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(ids.numel(), device=ids.device) - group_start[ids]
        keep = rank >= counts[ids] - self.size
        slots = (self.ptr[ids] + rank) % self.size
        self.keys[ids[keep], slots[keep]] = keys[order][keep].detach().to(self.keys.dtype)
        self.ptr.copy_((self.ptr + counts) % self.size)

    def similarities(self, queries: torch.Tensor, landmark_ids: torch.Tensor) -> torch.Tensor:
        """Dot products of queries (B, M, D) with the keys of each row's landmark: (B, M, K).

        When the batch holds one landmark (the reference's batch order) the bank is read once, not B times. It is
        copied, not viewed: the enqueue later in the step writes the buffer in place, which would invalidate a
        view that autograd saved for the backward pass.
        """
        bank_dtype = queries.dtype
        landmark_ids = landmark_ids.to(self.keys.device).view(-1)
        first = landmark_ids[0]
        if bool((landmark_ids == first).all()):
            bank = self.keys[first].to(bank_dtype, copy=True).detach()  # (K, D)
            return torch.matmul(queries, bank.t())
        bank = self.keys[landmark_ids].to(bank_dtype).detach()  # (B, K, D)
        return torch.bmm(queries, bank.transpose(1, 2))

    def memory_bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.ptr.numel() * self.ptr.element_size()
