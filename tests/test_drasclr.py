import copy

import pytest
import torch

from custom.model.drasclr import DrasCLR


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


@pytest.mark.parametrize("bn_splits", [1, 2])
def test_step_enqueues_the_keys_of_each_landmark_in_their_slots(bn_splits):
    model = DrasCLR(num_landmarks=3, queue_size=8, bn_splits=bn_splits)
    model.encoder_k.eval()  # running statistics: the keys can be recomputed row by row after the step
    batch = _batch()
    before = model.queue.keys.clone()
    model(**batch)
    assert model.queue.ptr.tolist() == [1, 2, 1]
    with torch.no_grad():  # the key encoder after this step's EMA, i.e. the one that made the enqueued keys
        keys = torch.nn.functional.normalize(model.encoder_k(batch["key"], batch["location"])[1], dim=1)
    # Batch rows 0..3 have landmarks 0, 1, 1, 2: each goes to its landmark's next slot, in batch order (the
    # shuffle of the key batch for split BatchNorm is undone before the enqueue).
    assert torch.allclose(model.queue.keys[0, 0], keys[0], atol=1e-6)
    assert torch.allclose(model.queue.keys[1, :2], keys[1:3], atol=1e-6)
    assert torch.allclose(model.queue.keys[2, 0], keys[3], atol=1e-6)
    untouched = torch.ones(3, 8, dtype=torch.bool)
    untouched[0, 0] = untouched[1, :2] = untouched[2, 0] = False
    assert torch.equal(model.queue.keys[untouched], before[untouched])


def test_settings_are_validated_with_the_key_named():
    for bad, message in (
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(queue_size=0), "queue_size must be at least 1"),
        (dict(neighbour_loss="sum"), "neighbour_loss must be one of"),
        (dict(init="xavier"), "init must be one of"),
        (dict(bn_splits=0), "bn_splits must be at least 1"),
    ):
        with pytest.raises(ValueError, match=message):
            DrasCLR(**{"num_landmarks": 2, "queue_size": 4, **bad})


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
