"""Both losses against a direct NumPy evaluation of paper eq. 6 and eq. 8."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from custom.model.losses import local_contrastive_loss, neighbour_contrastive_loss

TAU = 0.2


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_local_loss_equals_equation_6():
    b, k, d = 6, 10, 16
    q, k_pos, queue = _unit(b, d), _unit(b, d), _unit(b, k, d)
    negatives = torch.einsum("bd,bkd->bk", q, queue)
    loss, accuracy = local_contrastive_loss(q, k_pos, negatives, TAU)
    qn, kn, q_neg = q.numpy(), k_pos.numpy(), queue.numpy()
    per_sample = []
    hits = 0
    for i in range(b):
        pos = np.exp(qn[i] @ kn[i] / TAU)
        neg = sum(np.exp(qn[i] @ q_neg[i, j] / TAU) for j in range(k))
        per_sample.append(-np.log(pos / (pos + neg)))
        hits += all(qn[i] @ kn[i] > qn[i] @ q_neg[i, j] for j in range(k))
    assert loss.item() == pytest.approx(np.mean(per_sample), rel=1e-10)
    assert accuracy.item() == pytest.approx(hits / b)


def test_neighbour_loss_equals_equation_8():
    b, l, k, d = 5, 3, 7, 16
    r, k_pos, queue = _unit(b, l, d), _unit(b, d), _unit(b, k, d)
    negatives = torch.einsum("bld,bkd->blk", r, queue)
    loss, accuracy = neighbour_contrastive_loss(r, k_pos, negatives, TAU, "paper")
    rn, kn, q_neg = r.numpy(), k_pos.numpy(), queue.numpy()
    per_sample, hits = [], 0
    for i in range(b):
        pos = sum(np.exp(rn[i, n] @ kn[i] / TAU) for n in range(l))
        neg = sum(np.exp(rn[i, n] @ q_neg[i, j] / TAU) for n in range(l) for j in range(k))
        per_sample.append(-np.log(pos / (pos + neg)))
        hits += sum(all(rn[i, n] @ kn[i] > rn[i, n] @ q_neg[i, j] for j in range(k)) for n in range(l))
    assert loss.item() == pytest.approx(np.mean(per_sample), rel=1e-10)
    assert accuracy.item() == pytest.approx(hits / (b * l))


def test_neighbour_loss_reference_variant_sums_logits_before_softmax():
    b, l, k, d = 4, 2, 9, 8
    r, k_pos, queue = _unit(b, l, d), _unit(b, d), _unit(b, k, d)
    negatives = torch.einsum("bld,bkd->blk", r, queue)
    loss, _ = neighbour_contrastive_loss(r, k_pos, negatives, TAU, "reference")
    rn, kn, q_neg = r.numpy(), k_pos.numpy(), queue.numpy()
    per_sample = []
    for i in range(b):
        pos = sum(rn[i, n] @ kn[i] for n in range(l)) / TAU
        negs = [sum(rn[i, n] @ q_neg[i, j] for n in range(l)) / TAU for j in range(k)]
        logits = np.array([pos] + negs)
        per_sample.append(-(pos - np.log(np.exp(logits).sum())))
    assert loss.item() == pytest.approx(np.mean(per_sample), rel=1e-10)
    paper, _ = neighbour_contrastive_loss(r, k_pos, negatives, TAU, "paper")
    assert abs(paper.item() - loss.item()) > 1e-6  # the two variants are different objectives


def test_gradient_flows_to_queries_only_through_loss():
    q = _unit(3, 8).requires_grad_()
    loss, _ = local_contrastive_loss(q, _unit(3, 8), torch.zeros(3, 4, dtype=torch.float64), TAU)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_unknown_variant_rejected():
    with pytest.raises(ValueError, match="variant"):
        neighbour_contrastive_loss(_unit(1, 1, 4), _unit(1, 4), torch.zeros(1, 1, 2), TAU, "sum")
