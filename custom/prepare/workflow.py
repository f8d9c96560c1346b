"""Prepare a cohort: find the scans, run each through load -> lung mask -> registration -> landmarks -> patches,
write the cache, and report. Parallel workers, a progress bar, resume, and a failure report naming each bad
input and why; one bad scan never stops the others.

Inputs (``source``):
- a CSV with columns ``subject_id,image[,lung_mask]`` (relative paths are relative to the CSV's folder);
- a folder: every ``*.nii`` / ``*.nii.gz`` is a subject (id = its path below the folder, without suffix, with
  ``/`` turned into ``_``), and every folder holding DICOM files is one series = one subject. A file
  ``<name>_lung_mask.nii.gz`` beside ``<name>.nii.gz`` is that scan's lung mask (a user mask wins over the
  built-in segmentation);
- a single NIfTI file or DICOM series folder.
"""

from __future__ import annotations

import logging
import os
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from custom.data.atlas import landmark_centres, resources_dir
from custom.engine import subject_shards
from custom.errors import MissingInputError, producer_of
from custom.prepare import anatomy_qc, cache
from custom.prepare.io import is_dicom_file, is_nifti
from custom.prepare.pipeline import _failed_row, _ok_row, prepare_subject
from custom.prepare.registration import get_recipe
from custom.prepare.transforms import DEFAULT_MIN_DICE, RegisterToAtlasd, load_atlas  # noqa: F401 - re-exported
from custom.processes import die_with_parent

logger = logging.getLogger("drasclr.prepare")
MASK_SUFFIX = "_lung_mask"


@dataclass(frozen=True)
class SubjectInput:
    subject_id: str
    image: str
    lung_mask: str | None = None


# ----------------------------------------------------------------------------------------------- inputs
def _strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _looks_like_dicom_dir(folder: Path, files: list) -> bool:
    return any(f.lower().endswith(".dcm") or is_dicom_file(folder / f) for f in files)


def discover_inputs(source: str | Path) -> list:
    """The subjects a CSV, a folder, or a single scan names (see the module docstring)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _inputs_from_csv(source)
    if is_nifti(source):
        return [SubjectInput(cache.safe_subject_id(_strip_nifti_suffix(source.name)), str(source))]
    if not source.is_dir():
        raise MissingInputError(source, "scan source", producer_of(source), "no such CSV, NIfTI file or folder")
    items = []
    root, searched = os.path.realpath(source), set()
    for folder, dirs, files in os.walk(source, followlinks=True):  # a symlinked series folder is a subject too
        dirs.sort()
        folder = Path(folder)
        searched.add(os.path.realpath(folder))
        for name in [d for d in dirs if os.path.islink(folder / d)]:
            target = os.path.realpath(folder / name)
            if target in searched or target == root or target.startswith(root + os.sep):  # a loop or a duplicate
                logger.info("%s: symlink to %s, which this search reaches anyway; skipped", folder / name, target)
                dirs.remove(name)
        relative = folder.relative_to(source)
        if _looks_like_dicom_dir(folder, files):
            name = source.name if str(relative) == "." else str(relative)
            items.append(SubjectInput(cache.safe_subject_id(name.replace(os.sep, "_")), str(folder)))
        for name in sorted(files):
            stem = _strip_nifti_suffix(name)
            if stem == name or stem.endswith(MASK_SUFFIX):
                continue
            mask = next(
                (
                    folder / f"{stem}{MASK_SUFFIX}{s}"
                    for s in (".nii.gz", ".nii")
                    if (folder / f"{stem}{MASK_SUFFIX}{s}").is_file()
                ),
                None,
            )
            subject_id = str(relative / stem) if str(relative) != "." else stem
            items.append(
                SubjectInput(
                    cache.safe_subject_id(subject_id.replace(os.sep, "_")),
                    str(folder / name),
                    str(mask) if mask else None,
                )
            )
    if not items:
        raise MissingInputError(source, "scans", producer_of(source), "no NIfTI files or DICOM series in the folder")
    return _check_unique(items, source)


def _inputs_from_csv(path: Path) -> list:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"subject_id", "image"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected subject_id,image[,lung_mask]")

    def resolve(value: str) -> str | None:
        if not value.strip():
            return None
        candidate = Path(value.strip())
        return str(candidate if candidate.is_absolute() else path.parent / candidate)

    items = [
        SubjectInput(
            cache.safe_subject_id(row["subject_id"]),
            resolve(row["image"]) or "",
            resolve(row.get("lung_mask", "") or ""),
        )
        for _, row in table.iterrows()
    ]
    return _check_unique(items, path)


def _check_unique(items: list, source: Path) -> list:
    seen, duplicates = set(), set()
    for item in items:
        (duplicates if item.subject_id in seen else seen).add(item.subject_id)
    if duplicates:
        raise ValueError(f"{source}: duplicate subject ids {sorted(duplicates)}; subject ids must be unique")
    return items


def _prepare_safely(item: SubjectInput, cache_dir: str, options: dict) -> dict:
    """Worker body: a failure becomes a manifest row, never an exception that stops the cohort."""
    try:
        return prepare_subject(item, cache_dir, **options)
    except Exception as err:  # noqa: BLE001 - every failure is reported per subject
        logger.debug("subject %s failed:\n%s", item.subject_id, traceback.format_exc())
        return _failed_row(item, err)


def _init_worker(threads: int, parent_pid: int | None = None) -> None:
    # A worker ends with the run that started it (kill -9 of the run included): custom.processes.
    die_with_parent(parent_pid)
    # ITK stays in one thread (custom.prepare.registration: reproducible registration).
    import torch

    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- cohort
def prepare_cohort(
    source: str | Path,
    cache_dir: str | Path,
    atlas_dir: str | None = None,
    registration: str = "fast",
    num_workers: int = 1,
    resume: bool = True,
    progress: bool = True,
    min_dice: float = DEFAULT_MIN_DICE,
    transforms=None,
    qc_sheet: bool = True,
) -> pd.DataFrame:
    """Prepare every subject of ``source`` into ``cache_dir``; returns the manifest (also written to disk).

    Every subject passes the anatomy QC of the scan pipeline (``custom.prepare.anatomy_qc``): ``qc_status`` ok /
    warning / failed and ``qc_reason`` in the manifest. ``qc_sheet``: at the end, the cohort QC sheet
    (``custom.prepare.qc_sheet``: qc_sheet.html, qc_sheet.png, qc.csv in ``cache_dir``, flagged subjects first).

    ``resume``: subjects whose cache folder is complete and valid are not redone (``reused`` is True in the
    returned manifest); failed subjects are retried. An entry that passed only because a QC failure was accepted
    (``register#accept``; ``qc_accepted`` in its qc.json) is reused only by a run that accepts it too; any other
    run prepares it again and so fails it with the real reason (the old entry stays on disk, out of the manifest's
    ok rows, until a run prepares the subject successfully). ``num_workers`` > 1 runs subjects in separate processes.
    ``transforms``: the scan pipeline each subject runs (a config's ``scan_pipeline``; see
    ``custom.prepare.pipeline.prepare_subject``); by default the one built from atlas_dir, registration, min_dice.
    Under torchrun (``custom.engine.subject_shards``) each rank prepares its share of the subjects and rank 0
    writes the merged manifest, equal to a single-process run's.
    """
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atlas_dir = str(atlas_dir) if atlas_dir else str(resources_dir())
    get_recipe(registration)  # fail early on a typo
    items = discover_inputs(source)
    subject_shards.init_subject_group()
    if subject_shards.is_main():  # before any rank starts: a temporary entry of a running rank is not stale
        removed = cache.remove_stale_temporaries(cache_dir)
        if removed:
            logger.info("removed %d unfinished entries left by an interrupted run", len(removed))
    subject_shards.barrier()
    num_landmarks = len(landmark_centres(atlas_dir))
    several = subject_shards.world() > 1
    mine = subject_shards.shard(items)  # under torchrun: this rank's subjects; else all of them

    rows = {}
    todo = []
    accept = _accept_of(transforms)
    for item in mine:
        if resume and cache.is_complete(cache_dir, item.subject_id, num_landmarks):
            qc = cache.read_qc(cache_dir / item.subject_id)
            beyond = sorted(set(anatomy_qc.accepted_checks(qc)) - set(accept))
            if not beyond:
                rows[item.subject_id] = _ok_row(item.subject_id, qc, reused=True)
                continue
            logger.info(
                "%s: its cache entry was prepared accepting QC failure(s) %s, which this run does not accept: "
                "deciding it again",
                item.subject_id,
                beyond,
            )
        todo.append(item)
    order = [item.subject_id for item in mine]

    def flush() -> pd.DataFrame | None:
        """One process: rewrite the manifest after every subject. Several ranks: rank 0 writes it once, merged."""
        return None if several else cache.write_manifest(cache_dir, [rows[s] for s in order if s in rows])

    flush()
    options = dict(atlas_dir=atlas_dir, registration=registration, min_dice=min_dice, transforms=transforms)
    where = f" (rank {subject_shards.rank()}/{subject_shards.world()})" if several else ""
    bar = tqdm(total=len(todo), desc=f"prepare{where}", unit="subject", disable=not progress or not todo)
    if num_workers <= 1 or len(todo) <= 1:
        for item in todo:
            rows[item.subject_id] = _prepare_safely(item, str(cache_dir), options)
            flush()
            bar.update()
    else:
        workers = min(num_workers, len(todo))
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads, os.getpid()),
        ) as pool:
            futures = {pool.submit(_prepare_safely, item, str(cache_dir), options): item for item in todo}
            for future in as_completed(futures):
                item = futures[future]
                try:
                    rows[item.subject_id] = future.result()
                except Exception as err:  # noqa: BLE001 - a crashed worker process is one subject's failure
                    rows[item.subject_id] = _failed_row(item, err)
                flush()
                bar.update()
    bar.close()
    for row in rows.values():
        row["rank"] = subject_shards.rank()  # which process prepared (or found) the subject
    if several:
        merged = subject_shards.gather_in_order(zip(subject_shards.positions(len(order)), [rows[s] for s in order]))
        manifest = (
            cache.write_manifest(cache_dir, merged)
            if subject_shards.is_main()
            else cache.manifest_table(merged, cache_dir)
        )
        subject_shards.barrier()  # every rank returns once the merged manifest is on disk
    else:
        manifest = flush()
    if subject_shards.is_main():
        failed = manifest[manifest.status == "failed"]
        for _, row in failed.iterrows():
            logger.warning("FAILED %s: %s", row.subject_id, row.error)
        warned = manifest[manifest.qc_status == "warning"]
        for _, row in warned.iterrows():
            logger.warning("QC warning %s: %s", row.subject_id, row.qc_reason)
        logger.info(
            "prepared %d of %d subjects (%d with QC warnings, %d reused from the cache, %d failed) into %s",
            int((manifest.status == "ok").sum()),
            len(manifest),
            len(warned),
            int(manifest.reused.sum()),
            len(failed),
            cache_dir,
        )
        if qc_sheet and len(manifest):
            _write_qc_sheet(cache_dir)
    return manifest


def _accept_of(transforms) -> tuple:
    """The QC failures the run's registration step accepts (``RegisterToAtlasd.accept``; the default chain of
    configs/prepare.yaml accepts none). A chain without that step counts as accepting none."""
    steps = list(getattr(transforms, "transforms", transforms) or ())
    while steps:
        step = steps.pop(0)
        if isinstance(step, RegisterToAtlasd):
            return tuple(step.accept)
        steps[:0] = list(getattr(step, "transforms", ()) or ())  # a nested Compose
    return ()


def _write_qc_sheet(cache_dir: Path) -> None:
    """The cohort QC sheet; a problem drawing it is logged, never a failed run."""
    from custom.prepare.qc_sheet import write_qc_sheet

    try:
        paths = write_qc_sheet(cache_dir)
        logger.info("QC sheet: %s", paths["html"])
    except Exception as err:  # noqa: BLE001
        logger.warning("could not write the QC sheet of %s: %s", cache_dir, err)


def summary(manifest: pd.DataFrame) -> dict:
    """Counts for a log line or a CLI exit code."""
    qc_status = manifest["qc_status"] if "qc_status" in manifest else pd.Series("ok", index=manifest.index)
    return {
        "subjects": len(manifest),
        "ok": int((manifest.status == "ok").sum()),
        "failed": int((manifest.status == "failed").sum()),
        "reused": int(manifest.reused.sum()),
        "qc_warning": int((qc_status == "warning").sum()),
    }


__all__ = ["SubjectInput", "discover_inputs", "prepare_subject", "prepare_cohort", "summary", "load_atlas"]
