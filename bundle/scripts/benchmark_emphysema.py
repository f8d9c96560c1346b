"""Emphysema map: speed of the grid inferer against the paper's step-1 sliding window, and their agreement.

One scan is prepared once (the inference config's preprocessing). Then, in the same run:
- each grid setting (``--settings "32:8,32:8:logits"`` = stride:min_stride[:interpolation], interpolation
  ``probabilities`` when not given) maps the WHOLE scan, timed; the first setting is the reference of the
  speed-up column (put the old setting first to measure a change side by side on the same, maybe shared, machine);
- the step-1 brute force (``point_probabilities``: one network evaluation per lung voxel) runs on ``--cubes`` cubes of ``--cube``^3
  voxels inside the lung (half of them centred on emphysema of any setting's map, when there is any);
  its time per patch gives the extrapolated step-1 cost of the whole scan;
- per setting: seconds per scan, network evaluations, speed-up over the first setting and over the extrapolated
  step-1 cost, and on the cube voxels Dice of every map label inside the lung (``MAP_LABELS``: healthy,
  centrilobular, paraseptal), voxel label agreement and max |probability difference|.

    python bundle/scripts/benchmark_emphysema.py                         # SYNTHETIC demo subject SYN0000
    python bundle/scripts/benchmark_emphysema.py --image ../shared/data/real_ct/lung_pet_ct_dx_A0001/soft_kernel_B
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from custom import bundle_root  # noqa: E402
from custom.emphysema.dense_input import LUNG_CHANNEL  # noqa: E402
from custom.emphysema.finetune import load_emphysema_model  # noqa: E402
from custom.emphysema.network import MAP_LABELS  # noqa: E402
from custom.emphysema.scan_transforms import preprocessing_chain  # noqa: E402
from custom.emphysema.sliding_window import EmphysemaInferer, map_labels, point_probabilities  # noqa: E402

LUNG_LABELS = range(1, len(MAP_LABELS))  # every map label but background (the lung mask is the same in all maps)


def _settings(text: str) -> list:
    """ "stride:min_stride[:interpolation]" items, comma separated."""
    out = []
    for part in text.split(","):
        stride, min_stride, interpolation = (part.split(":") + ["", ""])[:3]
        out.append((int(stride), int(min_stride or stride), interpolation or "probabilities"))
    return out


def _cube_centres(lung: np.ndarray, labels: np.ndarray, count: int, size: int, seed: int) -> list:
    """Cube corners inside the volume whose centre voxel is lung; half centred on emphysema when present."""
    rng = np.random.default_rng(seed)
    half = size // 2
    inner = np.zeros_like(lung)
    inner[
        half : lung.shape[0] - size + half + 1,
        half : lung.shape[1] - size + half + 1,
        half : lung.shape[2] - size + half + 1,
    ] = True
    pools = [np.argwhere(lung & inner & (labels > 1)), np.argwhere(lung & inner)]
    corners = []
    for i in range(count):
        pool = pools[0] if (i % 2 == 0 and len(pools[0])) else pools[1]
        centre = pool[rng.integers(len(pool))]
        corners.append(tuple(int(c) - half for c in centre))
    return corners


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(bundle_root())
    parser.add_argument("--image", default=str(root / "demo_data/synthetic/images/SYN0000.nii.gz"))
    parser.add_argument("--lung_mask", default="")
    parser.add_argument("--model", default=str(root / "models/model.pt"))
    parser.add_argument(
        "--settings",
        default="32:8:probabilities,32:8:logits,32:16:logits",
        help="stride:min_stride[:logits|probabilities], comma separated; the first is the speed-up reference",
    )
    parser.add_argument("--cubes", type=int, default=3)
    parser.add_argument("--cube", type=int, default=12)
    parser.add_argument(
        "--threshold",
        default="0.5",
        help="a probability, or 'auto': the 95th percentile of the subtype probability over the lung "
        "in the first (unrefined) setting's map, so that emphysema borders exist to compare",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--speed_patches",
        type=int,
        default=512,
        help="lung patches timed through the network's forward and through the folded classifier",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if not Path(args.model).is_file():
        parser.error(
            f"{args.model}: no emphysema model (EmphysemaDetectors state dict); run the fine-tuning first "
            "or pass --model"
        )
    network = load_emphysema_model(args.model)

    start = time.perf_counter()
    data = {"image": args.image}
    if args.lung_mask:
        data["lung_mask"] = args.lung_mask
    channels = preprocessing_chain(atlas_dir=str(root / "resources/atlas"))(data)["image"].as_tensor()
    prepare_seconds = time.perf_counter() - start
    lung = channels[LUNG_CHANNEL].numpy() > 0.5
    num_lung = int(lung.sum())
    print(
        f"scan {args.image}: prepared grid {tuple(channels.shape[1:])}, {num_lung} lung voxels, "
        f"preprocessing {prepare_seconds:.1f} s"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )

    # the two exact evaluators on the same lung patches, side by side
    lung_voxels = torch.nonzero(torch.from_numpy(lung))
    sample = lung_voxels[
        torch.randperm(len(lung_voxels), generator=torch.Generator().manual_seed(args.seed))[: args.speed_patches]
    ]
    speeds = {}
    for name, evaluate in (
        ("network forward", lambda c: point_probabilities(network, channels, c, batch_size=args.batch_size)),
        (
            "folded classifier",
            lambda c: point_probabilities(network, channels, c, batch_size=args.batch_size, folded=True),
        ),
    ):
        evaluate(sample[: args.batch_size])  # warm-up
        start = time.perf_counter()
        speeds[name] = (evaluate(sample), time.perf_counter() - start)
    difference = float((speeds["network forward"][0] - speeds["folded classifier"][0]).abs().max())
    print(
        f"patch evaluation, {len(sample)} lung patches, batch {args.batch_size}: "
        + ", ".join(f"{n} {len(sample) / t:.0f} patches/s" for n, (_, t) in speeds.items())
        + f" ({speeds['network forward'][1] / speeds['folded classifier'][1]:.2f}x); "
        f"max |probability difference| {difference:.1e}"
    )

    maps = []
    settings = _settings(args.settings)
    auto = args.threshold == "auto"
    if auto and settings[0][0] != settings[0][1]:
        parser.error("--threshold auto needs a first setting without refinement (stride:stride)")
    threshold = 0.5 if auto else float(args.threshold)
    lung_t = torch.from_numpy(lung)
    for stride, min_stride, interpolation in settings:
        inferer = EmphysemaInferer(
            stride=stride,
            min_stride=min_stride,
            threshold=threshold,
            batch_size=args.batch_size,
            interpolation=interpolation,
        )
        start = time.perf_counter()
        probabilities = inferer(channels[None], network)[0]
        seconds = time.perf_counter() - start
        maps.append(
            {
                "setting": f"{stride} -> {min_stride}, {interpolation}",
                "seconds": seconds,
                "evaluations": inferer.last_evaluations,
                "probabilities": probabilities,
                "labels": map_labels(probabilities, lung_t, threshold).numpy(),
            }
        )
        if auto and len(maps) == 1:
            threshold = float(np.percentile(probabilities[1:].max(dim=0).values.numpy()[lung], 95))
            maps[0]["labels"] = map_labels(probabilities, lung_t, threshold).numpy()
            print(f"  threshold 'auto': {threshold:.4f} (95th percentile of the subtype probability in the lung)")
        print(
            f"  map stride {stride} refine to {min_stride}, {interpolation} interpolated: {seconds:.1f} s, "
            f"{inferer.last_evaluations} network evaluations, load average {os.getloadavg()[0]:.1f}"
        )

    any_emphysema = np.max(np.stack([m["labels"] for m in maps]), axis=0)
    corners = _cube_centres(lung, any_emphysema, args.cubes, args.cube, args.seed)
    cube_voxels = []
    for corner in corners:
        box = tuple(slice(c, c + args.cube) for c in corner)
        inside = np.argwhere(lung[box]) + np.asarray(corner)
        cube_voxels.append(inside)
    centres = torch.from_numpy(np.concatenate(cube_voxels))
    start = time.perf_counter()
    exact = point_probabilities(network, channels, centres, batch_size=args.batch_size)
    brute_seconds = time.perf_counter() - start
    per_patch = brute_seconds / max(len(centres), 1)
    step1_scan = per_patch * num_lung
    exact_labels = map_labels(exact.T, torch.ones(len(centres), dtype=torch.bool), threshold).numpy()
    idx = tuple(centres.T.numpy())
    folded_per_patch = speeds["folded classifier"][1] / len(sample)
    step1_folded = folded_per_patch * num_lung
    print(
        f"step-1 brute force (network forward) on {len(corners)} cubes of {args.cube}^3 ({len(centres)} lung "
        f"voxels): {brute_seconds:.1f} s = {1000 * per_patch:.1f} ms per voxel -> whole scan {step1_scan:.0f} s "
        f"({step1_scan / 3600:.1f} h) extrapolated; with the folded classifier {step1_folded:.0f} s "
        f"({step1_folded / 3600:.1f} h)"
    )
    print(
        "  exact label counts on the cubes: "
        + ", ".join(f"{c} {MAP_LABELS[c]} {int((exact_labels == c).sum())}" for c in LUNG_LABELS)
    )

    header = (
        ["setting (stride -> refined to, interpolation)", "s/scan", "evals"]
        + [f"speed-up over {maps[0]['setting']}", "over step 1", "over step 1 (same evaluator)"]
        + [f"Dice {MAP_LABELS[c]}" for c in LUNG_LABELS]
        + ["label agreement", "max |dp|"]
    )
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    reached = []
    for m in maps:
        fast = m["probabilities"][:, idx[0], idx[1], idx[2]]
        fast_labels = m["labels"][idx]
        dice = [_dice(fast_labels == c, exact_labels == c) for c in LUNG_LABELS]
        agreement = float((fast_labels == exact_labels).mean())
        max_dp = float((fast - exact.T).abs().max())
        row = (
            [
                m["setting"],
                f"{m['seconds']:.1f}",
                m["evaluations"],
                f"{maps[0]['seconds'] / m['seconds']:.2f}x",
                f"{step1_scan / m['seconds']:.0f}x",
                f"{step1_folded / m['seconds']:.0f}x",
            ]
            + [f"{d:.3f}" for d in dice]
            + [f"{agreement:.4f}", f"{max_dp:.3f}"]
        )
        print("| " + " | ".join(str(v) for v in row) + " |")
        if all(np.isnan(d) or d >= 0.95 for d in dice):
            reached.append(m)
    print()
    if not (exact_labels > 1).any():
        print(
            "no emphysema in the sampled cubes by the step-1 map: Dice is undefined here; use a scan with "
            "emphysema (e.g. the SYNTHETIC subject SYN0007) or more cubes"
        )
    elif reached:
        best = min(reached, key=lambda m: m["evaluations"])  # evaluations do not depend on the machine's load
        print(
            f"cheapest setting with Dice >= 0.95 for every label present: {best['setting']}, "
            f"{best['evaluations']} network evaluations ({num_lung / best['evaluations']:.0f}x fewer than step 1), "
            f"{best['seconds']:.1f} s per scan, {step1_scan / best['seconds']:.0f}x faster than step 1"
        )
    else:
        print("Dice >= 0.95 was NOT reached by any setting tried; try smaller strides (--settings)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
