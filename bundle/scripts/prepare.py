"""Command line for the prepare workflow (the same function ``configs/prepare.yaml`` runs).

    python bundle/scripts/prepare.py run --source ../shared/data/real_ct --cache_dir prepared
    python bundle/scripts/prepare.py run --source cohort.csv --cache_dir prepared --num_workers 2
    python bundle/scripts/prepare.py landmarks --atlas_mask my_atlas_lung_mask.nii.gz --out_file my_patch_loc.npy
    python bundle/scripts/prepare.py picture --cache_dir prepared --subject_id s01 --out_file s01.png

``run`` resumes by default (finished subjects are skipped; ``--resume False`` redoes all), prints a summary and
the failure report, and exits 1 with ``--strict`` when any subject failed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for ``custom``

from fire.decorators import SetParseFn  # noqa: E402

from custom.flags import fire_cli  # noqa: E402  (--resume false / --strict true mean what they say)


@SetParseFn(str, "source", "cache_dir", "atlas_dir", "registration", "log_level")  # a folder named 2024 stays text
def run(
    source: str,
    cache_dir: str,
    atlas_dir: str | None = None,
    registration: str = "fast",
    num_workers: int = 1,
    resume: bool = True,
    progress: bool = True,
    min_dice: float = 0.5,
    strict: bool = False,
    log_level: str = "INFO",
) -> dict:
    """Prepare every scan of ``source`` (CSV, folder, or one scan) into ``cache_dir``."""
    from custom.prepare.workflow import prepare_cohort, summary

    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(asctime)s %(name)s %(message)s")
    manifest = prepare_cohort(
        source,
        cache_dir,
        atlas_dir=atlas_dir,
        registration=registration,
        num_workers=num_workers,
        resume=resume,
        progress=progress,
        min_dice=min_dice,
    )
    counts = summary(manifest)
    if strict and counts["failed"]:
        print(counts)
        sys.exit(1)
    return counts


@SetParseFn(str, "atlas_mask", "out_file")
def landmarks(
    atlas_mask: str, out_file: str, patch_size: int = 32, step: int = 26, min_lung_fraction: float = 0.1
) -> int:
    """Landmarks (patch corners, ``atlas_patch_loc.npy`` format) for your own atlas lung mask."""
    from custom.prepare.landmark_generator import generate_atlas_landmarks

    corners = generate_atlas_landmarks(atlas_mask, out_file, patch_size, step, min_lung_fraction)
    return int(len(corners))


@SetParseFn(str, "cache_dir", "subject_id", "out_file", "title")  # ids stay text: --subject_id 00 is '00', not 0
def picture(cache_dir: str, subject_id: str, out_file: str, title: str | None = None) -> str:
    """PNG of a prepared subject: coronal + axial slice with lung mask and landmarks."""
    from custom.prepare.qc_figure import plot_cache_entry

    return str(plot_cache_entry(cache_dir, subject_id, out_file, title))


if __name__ == "__main__":
    fire_cli({"run": run, "landmarks": landmarks, "picture": picture})
