"""The Python steps of ``gpu_check.sh`` (one command each; the shell script runs them in order).

    python bundle/scripts/gpu_check.py info --json_out info.json
    python bundle/scripts/gpu_check.py amp_parity --json_out amp.json
    python bundle/scripts/gpu_check.py make_cache --cache_dir /tmp/cache --num_subjects 4
    python bundle/scripts/gpu_check.py check_training --output_dir out --model_path out/model.pt --json_out t.json
    python bundle/scripts/gpu_check.py summary --work_dir W --json_out gpu_check.json

``cuda_ready`` (first of all) and ``missing_modules`` need nothing but the standard library and torch; ``summary``
(after every step) imports no torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:  # make ``custom`` importable from a checkout
    sys.path.insert(0, str(HERE.parents[1]))

REQUIRED_MODULES = ("torch", "numpy", "pandas", "yaml", "tqdm", "monai", "ignite", "fire", "termcolor")

# AMP against float32, relative difference of each loss term. Under autocast the convolutions, linear layers
# and the query-queue products run in float16 (unit roundoff 2^-11 = 4.9e-4, accumulation in float32); BatchNorm,
# the normalisation and the cross-entropy stay in float32. The embeddings then carry a relative error of order
# 1e-3, a logit (cosine / temperature 0.2) moves by about 5e-3, and a cross-entropy moves by at most twice its
# largest logit change: about 1e-2 absolute on losses of 8 to 12 (log 4097 = 8.3 per term at start), i.e.
# ~1e-3 relative. 2e-2 leaves a margin of 10x over that estimate; what it is there to catch is broken mixed
# precision (an overflow, a NaN, a term cast to the wrong type), not to measure precision (the measured value
# is reported). float32 itself (TF32 off) is checked against float64 at 1e-4.
AMP_TOLERANCE = 2e-2
FP32_TOLERANCE = 1e-4
LOSS_TERMS = ("loss", "loss_local", "loss_neighbour")


def _write(json_out: str, payload: dict) -> None:
    if json_out:
        Path(json_out).write_text(json.dumps(payload, indent=2, default=str))


def cuda_ready() -> None:
    """Exit 0 when torch imports and sees a CUDA device; otherwise print why on one line and exit 3."""
    try:
        import torch
    except Exception as error:  # noqa: BLE001
        print(f"gpu_check: needs a CUDA GPU with PyTorch: torch does not import here ({error}); nothing was run")
        sys.exit(3)
    if not torch.cuda.is_available():
        print(
            f"gpu_check: needs a CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is "
            f"False) on this machine; nothing was run"
        )
        sys.exit(3)


def missing_modules() -> None:
    """Print the required modules that do not import (space separated; nothing when all do)."""
    import importlib.util

    print(" ".join(m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None))


def _nccl_version(torch) -> str:
    try:
        version = torch.cuda.nccl.version()
    except Exception as error:  # noqa: BLE001
        return f"unknown ({error})"
    return ".".join(map(str, version)) if isinstance(version, (tuple, list)) else str(version)


def info(json_out: str = "") -> None:
    import os
    import platform

    import torch

    payload = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl_available": torch.distributed.is_nccl_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        payload.update(
            {
                "nccl": _nccl_version(torch),
                "gpu": props.name,
                "gpu_count": torch.cuda.device_count(),
                "capability": f"{props.major}.{props.minor}",
                "gpu_memory_gib": round(props.total_memory / 1024**3, 1),
                "multiprocessors": props.multi_processor_count,
                "bf16": torch.cuda.is_bf16_supported(),
            }
        )
    for module in ("monai", "ignite", "numpy"):
        try:
            payload[module] = __import__(module).__version__
        except Exception as error:  # noqa: BLE001
            payload[module] = f"not importable: {error}"
    for key, value in payload.items():
        print(f"{key}: {value}")
    _write(json_out, payload)


def amp_parity(
    batch_size: int = 128,
    queue_size: int = 4096,
    num_landmarks: int = 581,
    num_neighbours: int = 2,
    bn_splits: int = 4,
    order: str = "landmark",
    seed: int = 0,
    tolerance: float = AMP_TOLERANCE,
    json_out: str = "",
    device: str = "cuda",
    amp_dtype: str = "float16",
) -> None:
    """One forward + backward of the paper configuration in float64, float32 (TF32 off) and under autocast
    (float16), same weights, batch and shuffle-BN permutation, no EMA or enqueue (``update=False``). Asserts the
    loss terms agree (AMP vs float32 within ``tolerance``, float32 vs float64 within 1e-4); gradients are
    reported (AMP's with a fixed loss scale of 2^10, as the GradScaler would scale). ``device``/``amp_dtype``:
    for a dry run of this code off the GPU (``--device cpu --amp_dtype bfloat16``)."""
    import copy

    import torch
    from benchmark_training import make_batch

    from custom.model.drasclr import DrasCLR

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(device)
    dtype = getattr(torch, amp_dtype)
    torch.manual_seed(seed)
    model = DrasCLR(num_landmarks=num_landmarks, queue_size=queue_size, init="reference", bn_splits=bn_splits)
    model = model.to(device).train()
    batch = make_batch(batch_size, num_neighbours, num_landmarks, order, device, seed)

    def run(precision: str) -> tuple[dict, torch.Tensor]:
        net = copy.deepcopy(model)
        inputs = batch
        if precision == "float64":
            net = net.double()
            inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        scale = 2.0**10 if precision == "amp" else 1.0
        torch.manual_seed(seed + 1)  # the same shuffle-BN permutation for all three
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=precision == "amp"):
            out = net(**inputs, update=False)
        (out["loss"] * scale).backward()
        grads = {n: p.grad.detach().double().cpu() / scale for n, p in net.encoder_q.named_parameters()}
        values = {k: float(v.detach()) for k, v in out.items()}
        del net
        return values, grads

    results, grads = {}, {}
    for precision in ("float64", "float32", "amp"):
        results[precision], grads[precision] = run(precision)
        print(f"{precision}: " + ", ".join(f"{k} {v:.6f}" for k, v in results[precision].items()))

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-30)

    def grad_rel(a: dict, b: dict) -> float:
        a, b = torch.cat([t.flatten() for t in a.values()]), torch.cat([t.flatten() for t in b.values()])
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    def worst_layers(a: dict, b: dict, count: int = 3) -> dict:
        """The weights (biases before BatchNorm have no true gradient) whose gradients differ most."""
        errors = {n: float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in b if n.endswith("weight")}
        return dict(sorted(errors.items(), key=lambda item: -item[1])[:count])

    report = {
        "config": dict(
            batch_size=batch_size,
            queue_size=queue_size,
            num_landmarks=num_landmarks,
            num_neighbours=num_neighbours,
            bn_splits=bn_splits,
            order=order,
            amp_dtype=amp_dtype,
            device=str(device),
        ),
        "losses": results,
        "amp_vs_fp32": {k: rel(results["amp"][k], results["float32"][k]) for k in LOSS_TERMS if k in results["amp"]},
        "fp32_vs_fp64": {
            k: rel(results["float32"][k], results["float64"][k]) for k in LOSS_TERMS if k in results["float32"]
        },
        "grad_amp_vs_fp32": grad_rel(grads["amp"], grads["float32"]),
        "grad_fp32_vs_fp64": grad_rel(grads["float32"], grads["float64"]),
        "grad_amp_worst_weights": worst_layers(grads["amp"], grads["float32"]),
        "grad_amp_finite": all(bool(torch.isfinite(g).all()) for g in grads["amp"].values()),
        "tolerance_amp": tolerance,
        "tolerance_fp32": FP32_TOLERANCE,
    }
    for key in ("amp_vs_fp32", "fp32_vs_fp64"):
        print(
            f"relative difference of the losses, {key.replace('_', ' ')}: "
            + ", ".join(f"{k} {v:.2e}" for k, v in report[key].items())
        )
    print(
        f"relative difference of the query-encoder gradients: amp vs fp32 {report['grad_amp_vs_fp32']:.2e}, "
        f"fp32 vs fp64 {report['grad_fp32_vs_fp64']:.2e}; AMP gradients finite: {report['grad_amp_finite']}; worst "
        f"AMP weights: "
        + ", ".join(f"{n} {v:.2e}" for n, v in report["grad_amp_worst_weights"].items())
        + " (reported, not asserted)"
    )
    failures = [
        f"amp vs fp32 {k} {v:.2e} >= {tolerance:g}" for k, v in report["amp_vs_fp32"].items() if not v < tolerance
    ]
    failures += [
        f"fp32 vs fp64 {k} {v:.2e} >= {FP32_TOLERANCE:g}"
        for k, v in report["fp32_vs_fp64"].items()
        if not v < FP32_TOLERANCE
    ]
    report["ok"] = not failures
    report["failures"] = failures
    _write(json_out, report)
    if failures:
        print("AMP PARITY FAILED: " + "; ".join(failures))
        sys.exit(1)
    print(
        f"AMP parity ok: every loss term within {tolerance:g} of float32 (float32 within {FP32_TOLERANCE:g} of "
        f"float64)"
    )


def make_cache(cache_dir: str, num_subjects: int = 4, num_landmarks: int = 581, seed: int = 0) -> None:
    """A small SYNTHETIC prepared cache in the documented format: ``<id>/patches.npy`` int16 (J, 32, 32, 32) in
    HU (lung-like noise around -850) and ``manifest.csv`` (subject_id, status=ok)."""
    import numpy as np
    import pandas as pd

    root = Path(cache_dir)
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(num_subjects):
        sid = f"gpucheck{s:03d}"
        hu = rng.normal(-850, 60 + 10 * s, (num_landmarks, 32, 32, 32)).clip(-1024, 3071)
        (root / sid).mkdir(parents=True, exist_ok=True)
        np.save(root / sid / "patches.npy", hu.astype(np.int16))
        rows.append({"subject_id": sid, "status": "ok"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    print(f"synthetic cache: {num_subjects} subjects x {num_landmarks} patches of 32^3 int16 in {root}")


def check_training(output_dir: str, model_path: str, json_out: str = "") -> None:
    """After the torchrun step: the exported encoder and a checkpoint exist and hold finite numbers."""
    import torch

    checkpoints = sorted(Path(output_dir, "checkpoints").glob("checkpoint_iteration=*.pt"))
    problems = []
    if not Path(model_path).is_file():
        problems.append(f"no exported encoder at {model_path}")
    if not checkpoints:
        problems.append(f"no checkpoint under {output_dir}/checkpoints")
    payload = {"checkpoints": [c.name for c in checkpoints]}
    if Path(model_path).is_file():
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        payload["encoder_tensors"] = len(state)
        if bad:
            problems.append(f"non-finite tensors in the exported encoder: {bad[:5]}")
    if checkpoints:
        checkpoint = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
        payload["iteration"] = int(checkpoint["trainer"]["iteration"])
        queue = checkpoint["network"].get("queue.keys")
        if queue is not None and not torch.isfinite(queue).all():
            problems.append("non-finite keys in the checkpoint's queue")
    payload["ok"] = not problems
    payload["problems"] = problems
    print(f"training outputs: {payload}")
    _write(json_out, payload)
    if problems:
        sys.exit(1)


def summary(work_dir: str, json_out: str, log: str = "") -> None:
    """Merge the steps' status (``steps.tsv``) and their JSON outputs into one summary file (no torch)."""
    work = Path(work_dir)
    steps = {}
    table = work / "steps.tsv"
    if table.is_file():
        for line in table.read_text().splitlines():
            name, rc, seconds = line.split("\t")
            steps[name] = {"rc": int(rc), "seconds": int(seconds), "ok": rc == "0"}
    payload = {"ok": bool(steps) and all(s["ok"] for s in steps.values()), "log": log, "steps": steps}
    for name in ("info", "amp_parity", "training", "benchmark"):
        path = work / f"{name}.json"
        if path.is_file():
            payload[name] = json.loads(path.read_text())
    bench = payload.get("benchmark", {}).get("results", {})
    payload["headline"] = {
        f"{amp}_{mode}": {
            k: r.get(k) for k in ("median_s", "query_patches_per_s", "speedup_vs_per_sample", "peak_gib") if k in r
        }
        for amp, res in bench.items()
        for mode, r in res.items()
    }
    Path(json_out).write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    if sys.argv[1:] == ["cuda_ready"]:  # before anything else is known to import (no fire needed)
        cuda_ready()
        sys.exit(0)
    if sys.argv[1:] == ["missing_modules"]:
        missing_modules()
        sys.exit(0)
    sys.path.insert(0, str(HERE))  # benchmark_training beside this file
    from custom.flags import fire_cli

    fire_cli(
        {
            "cuda_ready": cuda_ready,
            "missing_modules": missing_modules,
            "info": info,
            "amp_parity": amp_parity,
            "make_cache": make_cache,
            "check_training": check_training,
            "summary": summary,
        }
    )
