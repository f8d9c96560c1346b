"""DrasCLR's two contrastive losses (paper eq. 6 and eq. 8) and their top-1 accuracies.

All inputs are L2-normalised embeddings. ``negatives_*`` are similarities with the query's own landmark queue
(``LandmarkQueue.similarities``), so each query is contrasted only with keys of the same anatomy.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

NEIGHBOUR_VARIANTS = ("paper", "reference")


def local_contrastive_loss(
    query: torch.Tensor, positive_key: torch.Tensor, negative_similarity: torch.Tensor, temperature: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6: -log exp(q.k+/t) / (exp(q.k+/t) + sum_K exp(q.k-/t)), averaged over the batch.

    query, positive_key: (B, D); negative_similarity: (B, K) = q . k-. Returns (loss, top-1 accuracy), the
    accuracy being the share of queries whose positive beats every negative.
    """
    positive = (query * positive_key).sum(-1, keepdim=True)
    logits = torch.cat([positive, negative_similarity], dim=1) / temperature
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, targets)
    accuracy = (logits.argmax(dim=1) == 0).float().mean()
    return loss, accuracy


def neighbour_contrastive_loss(
    neighbours: torch.Tensor,
    positive_key: torch.Tensor,
    negative_similarity: torch.Tensor,
    temperature: float,
    variant: str = "paper",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8 over the l neighbour embeddings r (B, L, D) of each patch, with its key k+ (B, D).

    ``variant="paper"``: -log sum_l exp(r_l.k+/t) / (sum_l exp(r_l.k+/t) + sum_l sum_K exp(r_l.k-/t)),
    with negative_similarity (B, L, K) = r_l . k-.
    ``variant="reference"``: the released code's form, which sums the l neighbour logits before one softmax,
    i.e. cross-entropy on [sum_l r_l.k+, sum_l r_l.k-] / t.
    Returns (loss, top-1 accuracy): for "paper", the share of (patch, neighbour) pairs whose positive beats
    every negative; for "reference", the share of patches whose summed positive wins.
    """
    if variant not in NEIGHBOUR_VARIANTS:
        raise ValueError(f"neighbour loss variant must be one of {NEIGHBOUR_VARIANTS}, got {variant!r}")
    positive = (neighbours * positive_key.unsqueeze(1)).sum(-1) / temperature  # (B, L)
    negative = negative_similarity / temperature  # (B, L, K)
    if variant == "reference":
        logits = torch.cat([positive.sum(1, keepdim=True), negative.sum(1)], dim=1)
        targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=1) == 0).float().mean()
        return loss, accuracy
    numerator = torch.logsumexp(positive, dim=1)
    denominator = torch.logsumexp(torch.cat([positive, negative.flatten(1)], dim=1), dim=1)
    loss = (denominator - numerator).mean()
    accuracy = (positive > negative.amax(dim=2)).float().mean()
    return loss, accuracy
