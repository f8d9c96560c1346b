"""Direction histogram of the neighbour table (docs/neighbours.md): which way each landmark's neighbours lie.

Counts, over all J x l neighbour slots, the dominant axis and sign (+x -x +y -y +z -z) of the offset from a
landmark to its neighbour, for the reference's lowest-index tie-break and for the seeded random one, and prints
a Markdown table.

    python bundle/scripts/neighbour_directions.py --num_neighbours 1,2,3 --seed 0
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for ``custom``

import numpy as np  # noqa: E402

from custom.data.atlas import (  # noqa: E402
    DIRECTIONS,
    landmark_centres,
    nearest_neighbours,
    neighbour_direction_histogram,
)
from custom.flags import fire_cli  # noqa: E402


def main(num_neighbours=(1, 2, 3), seed: int = 0, atlas_dir: str | None = None) -> None:
    nums = [int(n) for n in (num_neighbours if isinstance(num_neighbours, (list, tuple)) else [num_neighbours])]
    centres = landmark_centres(atlas_dir)
    dist = np.linalg.norm(centres[:, None].astype(np.float64) - centres[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    ordered = np.sort(dist, axis=1)
    lines = [
        f"{len(centres)} landmarks; rows whose 2nd and 3rd nearest tie (1e-6 mm): "
        f"{int(np.sum(np.abs(ordered[:, 1] - ordered[:, 2]) <= 1e-6))}",
        "",
        "| l | ties | " + " | ".join(DIRECTIONS) + " | min / mean |",
        "|---|---|" + "---:|" * (len(DIRECTIONS) + 1),
    ]
    for num in nums:
        for ties in ("index", "random"):
            counts = neighbour_direction_histogram(centres, nearest_neighbours(centres, num, seed=seed, ties=ties))
            mean = num * len(centres) / len(DIRECTIONS)
            label = "index (reference)" if ties == "index" else f"random (seed {seed})"
            values = " | ".join(str(counts[d]) for d in DIRECTIONS)
            lines.append(f"| {num} | {label} | {values} | {min(counts.values()) / mean:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    fire_cli(main)
