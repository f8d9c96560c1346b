"""Real 2-process gloo runs: keys gathered from both ranks before enqueue, identical queues on both ranks."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from custom.engine.distributed import concat_all_gather, shuffle_batch, unshuffle_batch
    from custom.model.drasclr import DrasCLR

    torch.manual_seed(0)  # same initial weights and queues on every rank, as DDP broadcast would give
    model = DrasCLR(num_landmarks=3, queue_size=8)
    torch.manual_seed(100 + rank)  # different data per rank
    b = 2
    batch = dict(
        query=torch.randn(b, 1, 32, 32, 32),
        key=torch.randn(b, 1, 32, 32, 32),
        location=torch.rand(b, 3) * 2 - 1,
        landmark_ids=torch.tensor([rank, 2]),
        neighbours=torch.randn(b, 1, 1, 32, 32, 32),
        neighbour_locations=torch.rand(b, 1, 3),
    )
    rows = torch.arange(4, dtype=torch.float32).view(2, 2) + 10 * rank
    (shuffled,), undo = shuffle_batch(rows)
    restored = unshuffle_batch(shuffled * 1, undo)
    model.encoder_k.eval()  # running-stat BN: keys no longer depend on the random cross-rank shuffle
    with torch.no_grad():
        local_keys = model.embed_keys(batch["key"], batch["location"])
        model(**batch)
    torch.save(
        dict(
            queue=model.queue.keys,
            ptr=model.queue.ptr,
            keys=concat_all_gather(local_keys),
            restored=restored,
            rows=rows,
            gathered=concat_all_gather(rows),
        ),
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_two_rank_gloo_step(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["gathered"], torch.cat([r0["rows"], r1["rows"]]))
    assert torch.equal(r0["restored"], r0["rows"]) and torch.equal(r1["restored"], r1["rows"])
    # Both ranks hold the same queues, and they hold keys from both ranks.
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["ptr"], r1["ptr"])
    assert r0["ptr"].tolist() == [1, 1, 2]  # landmark 0 from rank 0, landmark 1 from rank 1, landmark 2 from both
    keys = r0["keys"]  # rank order: [rank0 row0, rank0 row1, rank1 row0, rank1 row1]
    assert torch.allclose(r0["queue"][0, 0], keys[0], atol=1e-5)
    assert torch.allclose(r0["queue"][1, 0], keys[2], atol=1e-5)
    assert torch.allclose(r0["queue"][2, :2], keys[[1, 3]], atol=1e-5)
