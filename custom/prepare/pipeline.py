"""One subject through the scan pipeline (``custom.prepare.transforms``): load -> lung mask -> registration ->
landmark patches -> cache entry, and its manifest row.

``prepare_transforms`` is the chain ``configs/prepare.yaml`` declares as ``scan_pipeline``, built in Python;
``prepare_subject`` runs it (or the chain a config passes as ``transforms``) on one ``SubjectInput`` and raises
with a message naming the file on any problem; ``custom.prepare.workflow.prepare_cohort`` turns that into a
failed manifest row (``_failed_row``) and carries on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from monai.transforms import Compose

from custom.prepare.transforms import DEFAULT_MIN_DICE, run_transforms


def chain_from_config(
    config: str,
    chain_id: str,
    atlas_dir: str | None = None,
    registration: str = "fast",
    min_dice: float = DEFAULT_MIN_DICE,
):
    """The transform chain ``chain_id`` of ``bundle/configs/<config>`` with these settings: Python callers get
    exactly the components the config defines (one definition of the scan pipeline)."""
    from monai.bundle import ConfigParser

    import custom

    parser = ConfigParser()
    parser.read_config(str(Path(custom.bundle_root()) / "configs" / config))
    parser.update(
        {"atlas_dir": None if atlas_dir is None else str(atlas_dir), "registration": registration, "min_dice": min_dice}
    )
    return parser.get_parsed_content(chain_id)


def prepare_transforms(
    atlas_dir: str | None = None, registration: str = "fast", min_dice: float = DEFAULT_MIN_DICE
) -> Compose:
    """The scan pipeline of ``configs/prepare.yaml`` (ids ``load``, ``lung_mask``, ``register``, ``patches``,
    ``write``) with these settings; the cache folder comes from each item's ``cache_dir``."""
    return chain_from_config("prepare.yaml", "scan_pipeline", atlas_dir, registration, min_dice)


def prepare_subject(
    item,
    cache_dir: str | Path,
    atlas_dir: str | None = None,
    registration: str = "fast",
    min_dice: float = DEFAULT_MIN_DICE,
    transforms=None,
) -> dict:
    """Prepare one scan (``SubjectInput``) and write its cache entry under ``cache_dir``; returns its manifest row.

    ``transforms``: the scan pipeline to run (a ``Compose`` or a list of transforms, e.g. a config's
    ``scan_pipeline``); by default ``prepare_transforms(atlas_dir, registration, min_dice)``. Its last transform
    must write the entry (``WritePreparedSubjectd``) and leave the QC under ``qc``. Raises with a message naming
    the file on any problem.
    """
    started = time.perf_counter()
    if transforms is None:
        transforms = prepare_transforms(atlas_dir, registration, min_dice)
    elif isinstance(transforms, Sequence):
        transforms = Compose(list(transforms))
    data = {
        "subject_id": item.subject_id,
        "image": item.image,
        "lung_mask": item.lung_mask,
        "cache_dir": str(cache_dir),
        "started": started,
    }
    out = run_transforms(transforms, data)
    return _ok_row(item.subject_id, out["qc"], reused=False)


def _ok_row(subject_id: str, qc: dict, reused: bool) -> dict:
    return {
        "subject_id": subject_id,
        "status": "ok",
        "error": "",
        "error_type": "",
        "dice": qc.get("dice"),
        "share_inside_lung": qc.get("share_inside_lung"),
        "seconds": qc.get("seconds"),
        "registration_seconds": qc.get("registration_seconds"),
        "source": qc.get("source"),
        "lung_mask": qc.get("lung_mask"),
        "path": subject_id,
        "reused": reused,
    }


def _failed_row(item, err: BaseException) -> dict:
    message = " ".join((str(err) or type(err).__name__).split())[:1000]  # one line in the report
    if item.image and item.image not in message:
        message = f"{item.image}: {message}"
    return {
        "subject_id": item.subject_id,
        "status": "failed",
        "error": message,
        "error_type": type(err).__name__,
        "source": item.image,
        "lung_mask": item.lung_mask or "auto",
        "path": "",
        "reused": False,
    }


__all__ = ["prepare_subject", "prepare_transforms"]
