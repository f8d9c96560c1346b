"""Encoder forward+backward time: batched Loc-CondConv against the per-sample definition, in one run.

    python bundle/scripts/benchmark_loc_condconv.py --batch_sizes "[32,128]" --repeats 3

Both models share the same weights; every repeat times each variant back to back (interleaved), and the median
is reported with the speed ratio per-sample / batched. Locations are all different within a batch (the
harder, "mixed" order); ``--same_landmark`` gives every sample one location (the reference's batch order).
"""

from __future__ import annotations

import copy
import platform
import statistics
import time

import torch

from custom.flags import fire_cli
from custom.model.encoder import DrasCLREncoder
from custom.model.loc_condconv import set_loc_condconv_mode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(encoder, x, location, device) -> float:
    encoder.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    h, z = encoder(x, location)
    z.pow(2).sum().backward()
    _sync(device)
    return time.perf_counter() - start


def run(
    batch_sizes=(32, 128),
    repeats: int = 3,
    modes=("grouped", "per_sample"),
    same_landmark: bool = False,
    device: str = "cpu",
    threads: int = 0,
    seed: int = 0,
):
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(seed)
    base = DrasCLREncoder().to(device)
    encoders = {mode: set_loc_condconv_mode(copy.deepcopy(base), mode) for mode in modes}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"locations: {'one per batch' if same_landmark else 'all different'}; repeats {repeats} (median)")
    results = {}
    for batch in batch_sizes:
        x = torch.randn(batch, 1, 32, 32, 32, device=device)
        if same_landmark:
            location = (torch.rand(1, 3, device=device) * 2 - 1).expand(batch, 3).contiguous()
        else:
            location = torch.rand(batch, 3, device=device) * 2 - 1
        for encoder in encoders.values():  # warm-up (allocator, oneDNN primitive cache)
            _step(encoder, x, location, device)
        times = {mode: [] for mode in modes}
        for _ in range(repeats):
            for mode, encoder in encoders.items():
                times[mode].append(_step(encoder, x, location, device))
        medians = {mode: statistics.median(t) for mode, t in times.items()}
        results[batch] = medians
        line = ", ".join(f"{mode} {medians[mode]:.3f} s ({batch / medians[mode]:.0f} patches/s)" for mode in modes)
        print(f"batch {batch}: {line}")
        if "per_sample" in medians:
            for mode in modes:
                if mode != "per_sample":
                    print(
                        f"batch {batch}: speed-up {mode} vs per_sample = {medians['per_sample'] / medians[mode]:.2f}x"
                    )
    return None


if __name__ == "__main__":
    fire_cli(run)
