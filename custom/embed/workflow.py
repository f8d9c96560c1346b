"""The ``embed`` workflow: from prepared subjects or raw CTs to patch and subject embeddings in one call.

A raw CT (NIfTI file, DICOM folder, folder of scans or a cohort CSV) is first prepared on the fly into a cache
(resumable, failures recorded, as ``configs/prepare.yaml`` does); a prepared cache is used as it is. Weights
are the bundle's ``models/pretrained.pt``, a fine-tuned ``models/model.pt`` (its encoder), or the released
official checkpoint (imported on the fly, DESIGN.md "Official checkpoint format").
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from custom.embed.cohort import embed_cohort
from custom.errors import producer_of, require
from custom.model.official_checkpoint import import_to_network
from custom.model.weights import require_weights


def is_prepared_cache(path: str | Path) -> bool:
    """A prepared cache is a folder with the prepare workflow's ``manifest.csv``."""
    return Path(path).is_dir() and (Path(path) / "manifest.csv").is_file()


def embed(
    source: str | Path,
    out_dir: str | Path,
    weights: str | Path | None = None,
    official_checkpoint: str | Path | None = None,
    cache_dir: str | Path | None = None,
    atlas_dir: str | None = None,
    num_workers: int = 1,
    device: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    registration: str = "fast",
    min_dice: float | None = None,
    transforms=None,
    network=None,
) -> pd.DataFrame:
    """Embed ``source`` (prepared cache, or anything the prepare workflow accepts) into ``out_dir``.

    Exactly one of ``weights`` / ``official_checkpoint`` is used; ``official_checkpoint`` wins when given.
    Raw inputs are prepared into ``cache_dir`` (default ``out_dir/prepared``) by the scan pipeline
    ``transforms`` (``configs/embed.yaml``'s ``scan_pipeline``, the components of ``configs/prepare.yaml``; by
    default the one built from ``atlas_dir``, ``registration``, ``min_dice``); subjects that fail preparation
    are listed in its ``failures.csv`` and left out of the table, the others are embedded. ``network``: the
    representation network to load the weights into (``configs/embed.yaml``'s ``representation_def``, sized by
    ``encoder_def``); default: the standard sizes.
    """
    out_dir = Path(out_dir)
    if official_checkpoint:
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = import_to_network(official_checkpoint, out_dir / "imported_official_encoder.pt")
    if not weights:
        raise ValueError("embed needs `weights` (models/pretrained.pt or models/model.pt) or `official_checkpoint`")
    require_weights(weights)  # before preparing anything
    if is_prepared_cache(source):
        cache = Path(source)
    else:
        require(source, "embed source", producer_of(source), "a prepared cache, a CT, a folder or a CSV")
        from custom.prepare.workflow import DEFAULT_MIN_DICE, prepare_cohort

        cache = Path(cache_dir) if cache_dir else out_dir / "prepared"
        manifest = prepare_cohort(
            source,
            cache,
            atlas_dir=atlas_dir,
            registration=registration,
            num_workers=num_workers,
            progress=progress,
            min_dice=DEFAULT_MIN_DICE if min_dice is None else min_dice,
            transforms=transforms,
        )
        if not (manifest["status"] == "ok").any():
            raise RuntimeError(f"no subject of {source} could be prepared; see {cache / 'failures.csv'}")
    return embed_cohort(
        cache, weights, out_dir, device=device, batch_size=batch_size, progress=progress, network=network
    )
