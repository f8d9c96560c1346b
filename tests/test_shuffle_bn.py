"""Shuffle-BN and landmark-synchronous DDP, with real 2-process gloo runs.

- One process with split BatchNorm (bn_splits = 2) trains exactly what 2 DDP ranks train on the same global
  batch with the same key permutation: same losses, same updated weights and queues. Without the split, the
  one-process run differs (the control that shows the comparison can fail).
- Under DDP with ``order: landmark`` every step is one landmark on both ranks, and the step's queue slots hold
  exactly the keys of both ranks, in rank order.
"""

import itertools
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from custom.model.split_batchnorm import SplitBatchNorm3d, use_split_batchnorm

STEPS, GLOBAL_BATCH, NUM_LANDMARKS, QUEUE = 3, 4, 3, 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batches():
    """Deterministic global batches (one landmark per step, as the reference trains)."""
    g = torch.Generator().manual_seed(123)
    batches = []
    for step in range(STEPS):
        landmark = step % NUM_LANDMARKS
        batches.append(
            dict(
                query=torch.randn(GLOBAL_BATCH, 1, 32, 32, 32, generator=g),
                key=torch.randn(GLOBAL_BATCH, 1, 32, 32, 32, generator=g),
                location=(torch.rand(1, 3, generator=g) * 2 - 1).expand(GLOBAL_BATCH, 3).clone(),
                landmark_ids=torch.full((GLOBAL_BATCH,), landmark),
                neighbours=torch.randn(GLOBAL_BATCH, 2, 1, 32, 32, 32, generator=g),
                neighbour_locations=torch.rand(GLOBAL_BATCH, 2, 3, generator=g) * 2 - 1,
            )
        )
    return batches


ALL_ROWS = slice(None)


def _train(model, optimiser, batches, rows=ALL_ROWS, reduce=lambda x: x):
    """STEPS steps; the key permutation is drawn from the default generator, seeded alike in every run."""
    losses = []
    for step, batch in enumerate(batches):
        torch.manual_seed(1000 + step)
        optimiser.zero_grad()
        out = model(**{k: (v.double() if v.is_floating_point() else v)[rows] for k, v in batch.items()})
        out["loss"].backward()
        optimiser.step()
        losses.append(reduce(out["loss"].detach().clone()))
    return torch.stack(losses)


def _model(bn_splits):
    from custom.model.drasclr import DrasCLR

    torch.manual_seed(0)
    # float64: the comparison is then about what is computed, not float32 round-off amplified by training.
    return DrasCLR(num_landmarks=NUM_LANDMARKS, queue_size=QUEUE, bn_splits=bn_splits).double()


def _weights(model):
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if "running_" not in k and "num_batches" not in k
    }


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model(bn_splits=1)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimiser = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5, momentum=0.9)
    per_rank = GLOBAL_BATCH // world

    def mean_over_ranks(loss):
        dist.all_reduce(loss)
        return loss / world

    losses = _train(ddp, optimiser, _global_batches(), slice(rank * per_rank, (rank + 1) * per_rank), mean_over_ranks)
    torch.save(dict(losses=losses, weights=_weights(model)), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _one_process(bn_splits):
    torch.set_num_threads(1)
    model = _model(bn_splits)
    optimiser = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5, momentum=0.9)
    return _train(model, optimiser, _global_batches()), _weights(model)


def test_split_batchnorm_in_one_process_equals_two_ddp_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "rank0.pt")
    losses, weights = _one_process(bn_splits=2)
    assert torch.allclose(losses, ddp["losses"], atol=1e-10, rtol=0), (losses, ddp["losses"])
    for name, value in ddp["weights"].items():
        assert torch.allclose(weights[name], value, atol=1e-9, rtol=0), name
    moved = (weights["encoder_q.conv1.weight"] - _weights(_model(1))["encoder_q.conv1.weight"]).abs().max()
    assert moved > 1e-3  # the steps changed the weights, so agreement is not the trivial one

    # Control: one BatchNorm over the whole global batch (no split) trains something else.
    plain_losses, plain_weights = _one_process(bn_splits=1)
    assert not torch.allclose(plain_losses, ddp["losses"], atol=1e-4)
    assert not torch.allclose(
        plain_weights["encoder_q.conv1.weight"], ddp["weights"]["encoder_q.conv1.weight"], atol=1e-4
    )


def test_split_batchnorm_normalises_each_sub_batch_and_keeps_batchnorm_keys():
    plain = torch.nn.Sequential(torch.nn.BatchNorm3d(3))
    split = use_split_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm3d(3)), 2)
    assert isinstance(split[0], SplitBatchNorm3d) and split.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 3, 2, 2, 2) * 3 + 1
    y = split(x)
    for half in (y[:2], y[2:]):  # each sub-batch has zero mean and unit variance on its own
        assert torch.allclose(half.mean(dim=(0, 2, 3, 4)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(half.var(dim=(0, 2, 3, 4), unbiased=False), torch.ones(3), atol=1e-3)
    expected = 0.9 * torch.zeros(3) + 0.1 * (x[:2].mean(dim=(0, 2, 3, 4)) + x[2:].mean(dim=(0, 2, 3, 4))) / 2
    assert torch.allclose(split[0].running_mean, expected, atol=1e-6)
    split.eval()
    plain.load_state_dict(split.state_dict())
    plain.eval()
    assert torch.equal(split(x), plain(x))  # eval mode is plain BatchNorm with the running statistics
    split.train()
    try:
        split(torch.randn(3, 3, 2, 2, 2))
    except ValueError as error:
        assert "multiple of bn_splits" in str(error)
    else:
        raise AssertionError("an odd batch must be refused")


def _landmark_sync_worker(rank, world, port, cache, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import torch.nn.functional as F

    from custom.data.patch_dataset import LandmarkPatchDataset, PassSampler, prepared_patch_files
    from custom.engine.distributed import concat_all_gather
    from custom.model.drasclr import DrasCLR

    dataset = LandmarkPatchDataset(prepared_patch_files(cache), num_neighbours=1, augment=False)
    sampler = PassSampler(
        len(dataset.patch_files), dataset.num_landmarks, 2, "landmark", seed=3, num_replicas=world, rank=rank
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, drop_last=True)
    torch.manual_seed(0)
    model = DrasCLR(num_landmarks=dataset.num_landmarks, queue_size=8)
    # Key encoder on running statistics: its keys then do not depend on the batch, so the keys it enqueued
    # (computed on the cross-rank shuffled batch, then unshuffled) can be recomputed here row by row.
    model.encoder_k.eval()
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    records = []
    for batch in itertools.islice(loader, 3):
        before, ptr = model.queue.keys.clone(), model.queue.ptr.clone()
        out = ddp(
            **{k: batch[k] for k in ("query", "key", "location", "landmark_ids", "neighbours", "neighbour_locations")}
        )
        out["loss"].backward()
        with torch.no_grad():
            keys = F.normalize(model.encoder_k(batch["key"], batch["location"])[1], dim=1)
        records.append(
            dict(
                landmarks=batch["landmark_ids"].clone(),
                subjects=batch["subject"].clone(),
                before=before,
                after=model.queue.keys.clone(),
                ptr_before=ptr,
                ptr_after=model.queue.ptr.clone(),
                keys=concat_all_gather(keys),
            )
        )
    torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_landmark_order_under_ddp_trains_one_landmark_per_step(tmp_path):
    from conftest import write_patch_cache

    cache = write_patch_cache(tmp_path / "cache", num_subjects=4)
    mp.spawn(_landmark_sync_worker, args=(2, _free_port(), str(cache), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(r0, r1):
        landmark = int(a["landmarks"][0])
        assert (a["landmarks"] == landmark).all() and (b["landmarks"] == landmark).all()  # same landmark, both ranks
        assert set(a["subjects"].tolist()).isdisjoint(b["subjects"].tolist())  # different subjects
        # The 4 keys of the global batch (rank 0's, then rank 1's) went to that landmark's queue, at the 4 slots
        # after its pointer; every other landmark's queue is untouched, and both ranks hold the same queues.
        slots = (a["ptr_before"][landmark] + torch.arange(4)) % 8
        assert torch.allclose(a["after"][landmark, slots], a["keys"], atol=1e-5)
        changed = (a["after"] != a["before"]).any(dim=-1)
        assert changed.nonzero().tolist() == [[landmark, int(s)] for s in sorted(slots.tolist())]
        assert int(a["ptr_after"][landmark]) == (int(a["ptr_before"][landmark]) + 4) % 8
        assert torch.equal(a["after"], b["after"])
