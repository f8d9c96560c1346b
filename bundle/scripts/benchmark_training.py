"""Training-step time of DrasCLR: batched Loc-CondConv ("grouped") vs the per-sample reference, in one run.

    python bundle/scripts/benchmark_training.py                              # the paper configuration, CPU
    python bundle/scripts/benchmark_training.py --device cuda --amp both     # on a GPU, AMP on and off
    python bundle/scripts/benchmark_training.py --order mixed --bn_splits 1 --batch_size 32
    python bundle/scripts/benchmark_training.py --peak_memory true           # one paper step in a fresh process

Defaults are the paper configuration (``paper.yaml``): batch 128, 2 neighbours per patch, queues 581 x 4096 x
128, ``order landmark`` (every sample of the batch has the same landmark id and the same atlas location, as the
landmark order gives), split BatchNorm over 4 sub-batches with the key batch permuted (shuffle-BN of 4 ranks in
one process), the authors' initialisation. The variants share the same initial weights, queues and batch (and
the same shuffle-BN permutation at every step); each repeat times one full training step of each variant back
to back: forward of query, neighbours and keys, both losses, backward, SGD step, EMA of the key encoder and the
enqueue (AMP: with a GradScaler, as the trainer). Medians are compared. The first (warm-up, untimed) step of
every variant starts from identical states, so its losses must agree: that is printed as a sanity check.

Peak memory: on CPU the process's peak resident set (``getrusage``; it covers every variant's model, all held
at once), on GPU ``torch.cuda.max_memory_allocated`` over each variant's steps. The machine, its threads and
its load average (before and after) are printed so a reader can judge whether it was idle.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``custom`` importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from custom.flags import as_bool, fire_cli
from custom.model.drasclr import DrasCLR
from custom.model.loc_condconv import MODES, set_loc_condconv_mode

GIB = 1024**3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def machine_report(device: torch.device) -> dict:
    """Where and under what load the benchmark runs (printed and put in the JSON)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "loadavg_before": _load(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / GIB, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _location_tables(num_landmarks: int, num_neighbours: int, seed: int):
    """Atlas locations and neighbour table of the shipped landmarks (seeded random ones for another count)."""
    from custom.data.atlas import landmark_locations, landmark_neighbours

    locations = torch.from_numpy(landmark_locations())
    if len(locations) == num_landmarks:
        return locations, torch.from_numpy(landmark_neighbours(num_neighbours).copy())
    g = torch.Generator().manual_seed(seed)
    locations = torch.rand(num_landmarks, 3, generator=g) * 2 - 1
    return locations, torch.randint(0, num_landmarks, (num_landmarks, num_neighbours), generator=g)


def make_batch(batch_size: int, num_neighbours: int, num_landmarks: int, order: str, device, seed: int = 0) -> dict:
    """One training batch of random patches in [-1, 1]. ``landmark``: one landmark id for the whole batch (as
    the landmark order gives), so every query shares one location and every neighbour slot one landmark;
    ``mixed``: an independent landmark per sample."""
    g = torch.Generator().manual_seed(seed)
    locations, neighbours = _location_tables(num_landmarks, num_neighbours, seed)
    if order == "landmark":
        ids = torch.full((batch_size,), int(torch.randint(0, num_landmarks, (1,), generator=g)))
    elif order == "mixed":
        ids = torch.randint(0, num_landmarks, (batch_size,), generator=g)
    else:
        raise ValueError(f"order must be 'landmark' or 'mixed', got {order!r}")

    def patches(*shape):
        return torch.rand(*shape, 1, 32, 32, 32, generator=g).mul(2).sub(1)

    batch = {
        "query": patches(batch_size),
        "key": patches(batch_size),
        "location": locations[ids],
        "landmark_ids": ids,
        "neighbours": patches(batch_size, num_neighbours),
        "neighbour_locations": locations[neighbours[ids]],
    }
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, optimiser, scaler, batch, device, amp: bool) -> tuple[float, float]:
    """One full training step as ``custom.engine.trainer.DrasCLRTrainer`` runs it; returns (seconds, loss)."""
    _sync(device)
    start = time.perf_counter()
    optimiser.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, enabled=amp):
        out = model(**batch)
    loss = out["loss"]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
    else:
        loss.backward()
        optimiser.step()
    _sync(device)
    return time.perf_counter() - start, float(loss.detach())


def _model_gib(model: torch.nn.Module) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / GIB


def compare(build, modes: list, batch: dict, device: torch.device, amp: bool, repeats: int, seed: int) -> dict:
    """Warm-up step (the loss check) then ``repeats`` timed steps of every variant, interleaved. ``build(mode)``
    returns a fresh model, the same weights and queues for every call."""
    state = {m: build(m) for m in modes}
    optimisers = {
        m: torch.optim.SGD(state[m].encoder_q.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4) for m in modes
    }
    scalers = {m: torch.amp.GradScaler("cuda") if amp else None for m in modes}
    results = {m: {"times": [], **({"peak_gib": 0.0} if device.type == "cuda" else {})} for m in modes}

    def one(m: str, step: int) -> float:
        torch.manual_seed(seed + step)  # the same shuffle-BN permutation for every variant at this step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, loss = train_step(state[m], optimisers[m], scalers[m], batch, device, amp)
        if device.type == "cuda":
            results[m]["peak_gib"] = max(results[m]["peak_gib"], torch.cuda.max_memory_allocated(device) / GIB)
        if step == 0:
            results[m]["first_loss"] = loss
            results[m]["warmup_s"] = seconds
        return seconds

    for m in modes:
        one(m, 0)
    for r in range(repeats):
        for m in modes:
            results[m]["times"].append(one(m, r + 1))
    results["_model_gib"] = _model_gib(state[modes[0]])
    for table in (state, optimisers, scalers):  # free the models before the next comparison
        table.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _report(results: dict, batch_size: int, num_neighbours: int, device: torch.device, label: str) -> None:
    per_step = batch_size * (2 + num_neighbours)
    for m, r in results.items():
        r["median_s"] = statistics.median(r["times"])
        r["query_patches_per_s"] = batch_size / r["median_s"]
        times = ", ".join(f"{t:.3f}" for t in r["times"])
        print(
            f"{label}{m}: {r['median_s']:.3f} s/step (median of [{times}]; warm-up {r['warmup_s']:.3f} s), "
            f"{r['query_patches_per_s']:.1f} query patches/s ({per_step / r['median_s']:.1f} patches encoded/s)"
        )
        if device.type == "cuda":
            print(f"{label}{m}: peak GPU memory allocated {r['peak_gib']:.2f} GiB (torch.cuda.max_memory_allocated)")
    if "per_sample" in results:
        reference = results["per_sample"]
        for m, r in results.items():
            if m == "per_sample":
                continue
            r["speedup_vs_per_sample"] = reference["median_s"] / r["median_s"]
            diff = abs(r["first_loss"] - reference["first_loss"]) / max(abs(reference["first_loss"]), 1e-30)
            r["first_loss_rel_diff_vs_per_sample"] = diff
            print(f"{label}speed-up {m} vs per_sample: {r['speedup_vs_per_sample']:.2f}x")
            print(
                f"{label}first-step loss {m} {r['first_loss']:.6f} vs per_sample {reference['first_loss']:.6f} "
                f"(relative difference {diff:.1e}; same weights, batch and permutation)"
            )


def _amp_settings(amp, device: torch.device) -> list[bool]:
    if isinstance(amp, str) and amp.strip().lower() == "both":
        wanted = [False, True]
    else:
        wanted = [as_bool(amp)]
    if device.type != "cuda" and True in wanted:
        print("note: AMP is used on GPU only (as in training); timing float32 on this device")
        return [False]
    return wanted


def run(
    batch_size: int = 128,
    repeats: int = 3,
    queue_size: int = 4096,
    num_landmarks: int = 581,
    num_neighbours: int = 2,
    order: str = "landmark",
    bn_splits: int = 4,
    init: str = "reference",
    device: str = "cpu",
    amp: str | bool = False,
    modes=("grouped", "per_sample"),
    threads: int = 0,
    seed: int = 0,
    json_out: str = "",
    peak_memory: bool = False,
):
    """Time the training step of each Loc-CondConv ``modes`` (see the module docstring). ``amp``: true, false or
    both (GPU only). ``threads``: torch CPU threads (0: torch's default). ``json_out``: also write the results
    there. ``peak_memory``: instead, one step of the paper configuration in a fresh process, its peak RSS."""
    if peak_memory:
        # A fresh process, so the figure is this configuration's own peak.
        subprocess.run([sys.executable, __file__, "_paper_step"], check=True)
        return None
    if threads:
        torch.set_num_threads(int(threads))
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be taken from {MODES}, got {modes}")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if batch_size % bn_splits or batch_size // bn_splits < 2:
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of bn_splits {bn_splits} with at least 2 "
            f"samples per split (the last BatchNorm sees 1 voxel per sample)"
        )
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark_training: --device cuda but torch.cuda.is_available() is False")
    amps = _amp_settings(amp, device)
    info = machine_report(device)
    where = (
        f"{info['gpu']} ({info['gpu_memory_gib']} GiB), CUDA {info['cuda']}, cuDNN {info['cudnn']}"
        if device.type == "cuda"
        else info["cpu"]
    )
    print(f"machine: {info['host']}, {info['platform']}, {where}")
    print(
        f"cpus: {info['cpu_count']} ({info['cpus_usable']} usable), torch threads {info['torch_threads']}, "
        f"OMP_NUM_THREADS {info['omp_num_threads']}, python {info['python']}, torch {info['torch']}"
    )
    print(
        f"load average before (1/5/15 min): {info['loadavg_before']} "
        f"(an idle machine reads well under its usable cpus)"
    )
    print(
        f"configuration: device {device}, batch {batch_size} (+{num_neighbours} neighbours each), order {order}, "
        f"bn_splits {bn_splits}, init {init}, queue {num_landmarks} x {queue_size} x 128 float32, "
        f"modes {', '.join(modes)}, amp {'/'.join('on' if a else 'off' for a in amps)}, repeats {repeats} "
        f"(+1 warm-up), seed {seed}"
    )

    def build(mode: str) -> DrasCLR:
        torch.manual_seed(seed)  # identical weights and queues for every variant
        model = DrasCLR(num_landmarks=num_landmarks, queue_size=queue_size, init=init, bn_splits=bn_splits)
        return set_loc_condconv_mode(model, mode).to(device)

    batch = make_batch(batch_size, num_neighbours, num_landmarks, order, device, seed)
    if order == "landmark":
        assert bool((batch["location"] == batch["location"][0:1]).all())

    results = {}
    started = time.perf_counter()
    for use_amp in amps:
        label = f"[amp {'on' if use_amp else 'off'}] " if len(amps) > 1 or use_amp else ""
        outcome = compare(build, modes, batch, device, use_amp, repeats, seed)
        model_gib = outcome.pop("_model_gib")
        results["amp_on" if use_amp else "amp_off"] = outcome
        _report(outcome, batch_size, num_neighbours, device, label)
    if device.type == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
        info["peak_rss_gib"] = peak
        print(
            f"peak resident memory {peak:.2f} GiB (getrusage: the whole process, the {len(modes)} variants' models held "
            f"at once, {model_gib:.2f} GiB of weights and queues each)"
        )
    else:
        peaks = ", ".join(f"{k} {m} {r['peak_gib']:.2f} GiB" for k, res in results.items() for m, r in res.items())
        print(f"peak GPU memory allocated per step: {peaks}")
    info["loadavg_after"] = _load()
    info["seconds"] = time.perf_counter() - started
    print(f"load average after (1/5/15 min): {info['loadavg_after']}; benchmark took {info['seconds']:.0f} s")
    if json_out:
        config = dict(
            batch_size=batch_size,
            repeats=repeats,
            queue_size=queue_size,
            num_landmarks=num_landmarks,
            num_neighbours=num_neighbours,
            order=order,
            bn_splits=bn_splits,
            init=init,
            device=str(device),
            modes=modes,
        )
        Path(json_out).write_text(json.dumps({"machine": info, "config": config, "results": results}, indent=2))
    return None


def _one_paper_step():
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = DrasCLR(num_landmarks=581, queue_size=4096, init="reference", bn_splits=4)
    optimiser = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9)
    batch = make_batch(128, 2, 581, "landmark", device)
    seconds, _ = train_step(model, optimiser, None, batch, device, False)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"paper configuration (batch 128 of one landmark, 2 neighbours, bn_splits 4, queue 581x4096x128 "
        f"float32, grouped) on CPU: one step {seconds:.1f} s, peak resident memory {peak_gib:.2f} GiB"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["_paper_step"]:
        _one_paper_step()
    else:
        fire_cli(run)
