import pytest
import torch
import torch.nn.functional as F

from custom.model.landmark_queue import LandmarkQueue


def _sequential(queue: LandmarkQueue, keys, ids):
    """The definition: write one key at a time at its landmark's pointer, then advance that pointer."""
    keys_buf, ptr = queue.keys.clone(), queue.ptr.clone()
    for key, j in zip(keys, ids.tolist()):
        keys_buf[j, ptr[j]] = key.to(keys_buf.dtype)
        ptr[j] = (ptr[j] + 1) % queue.size
    return keys_buf, ptr


def test_initial_keys_are_unit_vectors():
    queue = LandmarkQueue(num_landmarks=3, size=8, dim=4)
    assert torch.allclose(queue.keys.norm(dim=-1), torch.ones(3, 8), atol=1e-6)
    assert queue.ptr.tolist() == [0, 0, 0]


def test_mixed_batch_with_repeats_equals_sequential_writes():
    queue = LandmarkQueue(num_landmarks=4, size=5, dim=3)
    ids = torch.tensor([2, 0, 2, 2, 3, 0, 2, 2, 2])  # landmark 2 seen 6 times (> K = 5): wraps and overwrites
    keys = F.normalize(torch.randn(len(ids), 3), dim=1)
    expected_keys, expected_ptr = _sequential(queue, keys, ids)
    queue.enqueue(keys, ids)
    assert torch.equal(queue.keys, expected_keys)
    assert torch.equal(queue.ptr, expected_ptr)
    assert queue.ptr.tolist() == [2, 0, 1, 1]


def test_wrap_around_over_many_batches():
    queue = LandmarkQueue(num_landmarks=2, size=4, dim=2)
    for step in range(7):
        ids = torch.tensor([1, 1, 1])
        keys = torch.full((3, 2), float(step))
        expected_keys, expected_ptr = _sequential(queue, keys, ids)
        queue.enqueue(keys, ids)
        assert torch.equal(queue.keys, expected_keys) and torch.equal(queue.ptr, expected_ptr)
    assert queue.ptr[1].item() == (7 * 3) % 4
    # Newest four writes survive: steps 6, 6, 6 and the last of step 5.
    assert sorted(queue.keys[1, :, 0].tolist()) == [5.0, 6.0, 6.0, 6.0]


def test_landmarks_are_isolated():
    queue = LandmarkQueue(num_landmarks=3, size=4, dim=2)
    before = queue.keys.clone()
    queue.enqueue(torch.ones(4, 2), torch.tensor([1, 1, 1, 1]))
    assert torch.equal(queue.keys[0], before[0]) and torch.equal(queue.keys[2], before[2])
    assert torch.equal(queue.keys[1], torch.ones(4, 2))
    q = F.normalize(torch.randn(2, 1, 2), dim=-1)
    sims = queue.similarities(q, torch.tensor([0, 1]))  # each row scored against its own landmark only
    assert torch.allclose(sims[0, 0], q[0, 0] @ queue.keys[0].t())
    assert torch.allclose(sims[1, 0], q[1, 0] @ queue.keys[1].t())
    single = queue.similarities(q, torch.tensor([2, 2]))  # one-landmark batch takes the shared-bank path
    assert torch.allclose(single[:, 0], q[:, 0] @ queue.keys[2].t())


def test_state_round_trip_through_a_file(tmp_path):
    queue = LandmarkQueue(num_landmarks=3, size=6, dim=4)
    queue.enqueue(F.normalize(torch.randn(5, 4), dim=1), torch.tensor([0, 2, 2, 1, 2]))
    torch.save(queue.state_dict(), tmp_path / "queue.pt")
    restored = LandmarkQueue(num_landmarks=3, size=6, dim=4)
    restored.load_state_dict(torch.load(tmp_path / "queue.pt"))
    assert torch.equal(restored.keys, queue.keys) and torch.equal(restored.ptr, queue.ptr)
    keys = F.normalize(torch.randn(3, 4), dim=1)
    queue.enqueue(keys, torch.tensor([2, 2, 0]))
    restored.enqueue(keys, torch.tensor([2, 2, 0]))
    assert torch.equal(restored.keys, queue.keys) and torch.equal(restored.ptr, queue.ptr)


def test_half_precision_halves_memory():
    full = LandmarkQueue(num_landmarks=5, size=64, dim=16)
    half = LandmarkQueue(num_landmarks=5, size=64, dim=16, half_precision=True)
    assert half.keys.dtype == torch.float16
    assert half.keys.numel() * half.keys.element_size() * 2 == full.keys.numel() * full.keys.element_size()
    keys = F.normalize(torch.randn(3, 16), dim=1)
    half.enqueue(keys, torch.tensor([4, 4, 4]))
    assert torch.allclose(half.keys[4, :3].float(), keys, atol=1e-3)
    sims = half.similarities(keys.unsqueeze(1), torch.tensor([4, 4, 4]))
    assert sims.dtype == torch.float32


def test_bad_input_is_rejected():
    queue = LandmarkQueue(num_landmarks=2, size=4, dim=3)
    with pytest.raises(ValueError, match="landmark ids"):
        queue.enqueue(torch.ones(1, 3), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        queue.enqueue(torch.ones(1, 4), torch.tensor([0]))
