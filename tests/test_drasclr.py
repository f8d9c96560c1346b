import copy

import pytest
import torch

from custom.drasclr import DrasCLR


def _batch(b=4, neighbours=2, size=32):
    return dict(
        query=torch.randn(b, 1, size, size, size),
        key=torch.randn(b, 1, size, size, size),
        location=torch.rand(b, 3) * 2 - 1,
        landmark_ids=torch.tensor([0, 1, 1, 2][:b]),
        neighbours=torch.randn(b, neighbours, 1, size, size, size),
        neighbour_locations=torch.rand(b, neighbours, 3) * 2 - 1,
    )


def test_key_encoder_gets_no_gradient_and_follows_ema():
    model = DrasCLR(num_landmarks=3, queue_size=8, momentum=0.9)
    # Make the encoders differ so the EMA is visible.
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before_q = copy.deepcopy(model.encoder_q.state_dict())
    before_k = {n: p.clone() for n, p in model.encoder_k.named_parameters()}
    out = model(**_batch())
    out["loss"].backward()
    for name, p in model.encoder_k.named_parameters():
        assert not p.requires_grad and p.grad is None, name
        expected = 0.9 * before_k[name] + 0.1 * before_q[name]
        assert torch.allclose(p, expected, atol=1e-6), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())


def test_step_enqueues_the_keys_of_each_landmark():
    model = DrasCLR(num_landmarks=3, queue_size=8)
    batch = _batch()
    model(**batch)
    assert model.queue.ptr.tolist() == [1, 2, 1]
    # The enqueued rows are unit vectors: the normalised keys of the second view.
    assert torch.allclose(model.queue.keys[1, :2].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_no_update_leaves_state_untouched():
    model = DrasCLR(num_landmarks=3, queue_size=8)
    queue, ptr = model.queue.keys.clone(), model.queue.ptr.clone()
    key_params = [p.clone() for p in model.encoder_k.parameters()]
    with torch.no_grad():
        out = model(**_batch(), update=False)
    assert set(out) == {"loss", "loss_local", "acc_local", "loss_neighbour", "acc_neighbour"}
    assert torch.equal(model.queue.keys, queue) and torch.equal(model.queue.ptr, ptr)
    assert all(torch.equal(a, b) for a, b in zip(key_params, model.encoder_k.parameters()))


def test_loss_is_sum_of_local_and_neighbour_terms():
    model = DrasCLR(num_landmarks=3, queue_size=8, neighbour_loss="reference")
    out = model(**_batch())
    assert out["loss"].item() == pytest.approx(out["loss_local"].item() + out["loss_neighbour"].item(), rel=1e-6)
    no_neighbours = _batch(neighbours=0)
    out = model(**no_neighbours)
    assert "loss_neighbour" not in out and out["loss"].item() == pytest.approx(out["loss_local"].item())


def test_invalid_momentum():
    with pytest.raises(ValueError, match="momentum"):
        DrasCLR(num_landmarks=2, queue_size=4, momentum=1.0)
