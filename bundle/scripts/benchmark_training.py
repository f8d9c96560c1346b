"""Training-step throughput of the DrasCLR step, batched Loc-CondConv vs the per-sample definition, one run.

    python bundle/scripts/benchmark_training.py --batch_size 32 --repeats 3
    python bundle/scripts/benchmark_training.py --batch_size 128 --device cuda     # on a GPU
    python bundle/scripts/benchmark_training.py --peak_memory true                 # paper config, CPU RSS

Same model weights, same batch (query, key, 2 neighbours per patch, mixed landmarks) for both variants; each
repeat times one full step (forward of query/neighbours/keys, both losses, backward, SGD, EMA, enqueue) of
each variant back to back; medians are compared. ``--peak_memory`` runs one step of the paper configuration
(batch 128, 581 x 4096 x 128 queue) in a fresh process and reports its peak resident memory.
"""

from __future__ import annotations

import copy
import resource
import statistics
import subprocess
import sys
import time

import fire
import torch

from custom.drasclr import DrasCLR
from custom.loc_condconv import set_loc_condconv_mode


def _batch(batch_size: int, num_neighbours: int, num_landmarks: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "query": torch.rand(batch_size, 1, 32, 32, 32, generator=g).mul(2).sub(1).to(device),
        "key": torch.rand(batch_size, 1, 32, 32, 32, generator=g).mul(2).sub(1).to(device),
        "location": torch.rand(batch_size, 3, generator=g).mul(2).sub(1).to(device),
        "landmark_ids": torch.randint(0, num_landmarks, (batch_size,), generator=g).to(device),
        "neighbours": torch.rand(batch_size, num_neighbours, 1, 32, 32, 32, generator=g).mul(2).sub(1).to(device),
        "neighbour_locations": torch.rand(batch_size, num_neighbours, 3, generator=g).mul(2).sub(1).to(device),
    }


def _step(model, optimiser, batch, device, amp: bool) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    optimiser.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda"):
        out = model(**batch)
    out["loss"].backward()
    optimiser.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def throughput(batch_size=32, repeats=3, queue_size=4096, num_landmarks=581, num_neighbours=2, device="cpu",
               modes=("grouped", "per_sample"), amp=False):
    device = torch.device(device)
    torch.manual_seed(0)
    base = DrasCLR(num_landmarks=num_landmarks, queue_size=queue_size).to(device)
    models = {m: set_loc_condconv_mode(copy.deepcopy(base), m) for m in modes}
    optimisers = {m: torch.optim.SGD(models[m].encoder_q.parameters(), lr=0.01, momentum=0.9) for m in modes}
    batch = _batch(batch_size, num_neighbours, num_landmarks, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {batch_size} (+{num_neighbours} neighbours each), queue {num_landmarks}x{queue_size}, amp {amp}")
    for m in modes:  # warm-up
        _step(models[m], optimisers[m], batch, device, amp)
    times = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            times[m].append(_step(models[m], optimisers[m], batch, device, amp))
    medians = {m: statistics.median(t) for m, t in times.items()}
    for m in modes:
        print(f"{m}: {medians[m]:.3f} s/step, {batch_size / medians[m]:.1f} query patches/s")
    if "per_sample" in medians:
        for m in modes:
            if m != "per_sample":
                print(f"speed-up {m} vs per_sample: {medians['per_sample'] / medians[m]:.2f}x")
    return None


def _one_paper_step():
    torch.manual_seed(0)
    model = DrasCLR(num_landmarks=581, queue_size=4096)
    optimiser = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9)
    batch = _batch(128, 2, 581, torch.device("cpu"))
    seconds = _step(model, optimiser, batch, torch.device("cpu"), False)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"paper configuration (batch 128, 2 neighbours, queue 581x4096x128 float32) on CPU: "
          f"one step {seconds:.1f} s, peak resident memory {peak_gib:.2f} GiB")


def run(peak_memory: bool = False, **kwargs):
    if peak_memory:
        # A fresh process so the figure is this configuration's own peak.
        subprocess.run([sys.executable, __file__, "_paper_step"], check=True)
        return None
    return throughput(**kwargs)


if __name__ == "__main__":
    if sys.argv[1:] == ["_paper_step"]:
        _one_paper_step()
    else:
        fire.Fire(run)
