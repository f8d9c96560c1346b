"""Export the bundle as a self-contained folder (and zip) that runs without this repository.

The exported ``<out_dir>/<name>/`` holds ``configs/``, ``scripts/``, ``resources/`` (atlas, schema), ``docs/``,
``LICENSE``, ``large_files.yml``, ``models/`` (the weights asked for) and a copy of the ``custom`` package, so
``$import custom`` resolves with the bundle folder on ``PYTHONPATH`` and ``custom.bundle_root()`` is that folder.
Demo data, training runs, checkpoints and caches stay behind.

Weights: ``models/model.pt`` (the emphysema classifier, ``network_def``) is required: an export without it fails
with ``MissingInputError`` naming the file and the finetune workflow, unless ``include_model=False`` asks for a
development export without it. ``large_files.yml`` in the copy lists exactly the weight files shipped, each with
its sha256, so the Model Zoo's CI (which downloads every listed file that is absent or whose hash differs, and
skips one present with its hash) has nothing to download. The folder is built under a temporary name and moved
into place, and the export is checked (layout, metadata against the vendored schemas, every listed file present
with its hash) before it is published.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

import yaml

import custom
from custom.atomic_io import atomic_path
from custom.errors import MissingInputError
from custom.zoo.conformance import (
    LARGE_FILES_RELPATH,
    check_layout,
    export_torchscript,
    read_large_files,
    verify_bundle_metadata,
    verify_large_files,
)

COPIED_FOLDERS = ("configs", "scripts", "resources", "docs")
COPIED_FILES = ("LICENSE", LARGE_FILES_RELPATH)
# Never shipped: generated data, run outputs, caches, half-written files.
EXCLUDED_NAMES = {
    "demo_data",
    "runs",
    "checkpoints",
    "mlruns",
    "eval",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".ipynb_checkpoints",
    ".DS_Store",
}
EXCLUDED_SUFFIXES = (".pyc", ".pyo")


def bundle_name(metadata: dict) -> str:
    """Folder name from the metadata ``name`` ("DrasCLR lung CT" -> "drasclr_lung_ct"), as Model Zoo names go."""
    name = re.sub(r"[^0-9a-zA-Z]+", "_", metadata["name"]).strip("_").lower()
    if not name:
        raise ValueError(f"metadata name {metadata['name']!r} gives an empty bundle folder name")
    return name


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n in EXCLUDED_NAMES or n.endswith(EXCLUDED_SUFFIXES) or n.startswith(".tmp-")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_large_files(bundle_dir: Path, shipped: list[str]) -> None:
    """Rewrite the exported ``large_files.yml`` to list exactly the ``shipped`` files, each with its sha256 (the
    ``url`` of the source list is kept; a file the source list lacks gets an empty one)."""
    path = bundle_dir / LARGE_FILES_RELPATH
    source = {entry["path"]: entry for entry in read_large_files(bundle_dir)}
    entries = []
    for rel in shipped:
        entry = {"path": rel, "url": source.get(rel, {}).get("url") or ""}
        entry.update(hash_val=_sha256(bundle_dir / rel), hash_type="sha256")
        entries.append(entry)
    header = (
        "# The weight files shipped in this export, each with its sha256. MONAI's download_url, which the\n"
        "# Model Zoo's CI runs for every entry, skips a file that is present with this hash. `url` is empty\n"
        "# until the weights are published (see docs/README.md).\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump({"large_files": entries}, sort_keys=False))


def _copy_models(bundle_root: Path, bundle_dir: Path, include_model: bool, include_pretrained: bool) -> list[str]:
    models = bundle_dir / "models"
    models.mkdir()
    wanted = []
    if include_model:
        model = bundle_root / "models" / "model.pt"
        if not model.is_file():
            raise MissingInputError(
                model,
                "model weights",
                "finetune",
                "the export ships them; include_model=False (--include_model false) makes a "
                "development export without them",
            )
        wanted += ["model.pt", "model.ts"]  # model.ts: shipped when there
    if include_pretrained:
        pretrained = bundle_root / "models" / "pretrained.pt"
        if not pretrained.is_file():
            raise MissingInputError(pretrained, "pre-trained weights", "training", "include_pretrained was asked for")
        wanted.append("pretrained.pt")
    shipped = []
    for name in wanted:
        source = bundle_root / "models" / name
        if source.is_file():
            shutil.copy2(source, models / name)
            shipped.append(f"models/{name}")
    card = bundle_root / "models" / "model.json"  # what model.pt was trained on: small, travels in the bundle itself
    if "models/model.pt" in shipped and card.is_file():
        shutil.copy2(card, models / card.name)
    return shipped


def export_bundle(
    out_dir: str | Path,
    bundle_root: str | Path | None = None,
    name: str | None = None,
    zip: bool = False,
    include_model: bool = True,
    include_pretrained: bool = False,
    torchscript: bool = False,
    inference_config: str = "configs/inference.yaml",
    overwrite: bool = False,
) -> dict:
    """Write ``<out_dir>/<name>/`` (and ``<out_dir>/<name>_v<version>.zip`` with ``zip=True``).

    ``include_model`` ships ``models/model.pt`` (``MissingInputError`` when absent; ``False``: a development export
    without it, which the Model Zoo's preferred-file check refuses) and ``models/model.ts`` when there;
    ``include_pretrained`` ships ``models/pretrained.pt`` (an error when absent); ``torchscript`` scripts the
    shipped ``model.pt`` into ``models/model.ts`` with ``inference_config``'s ``network_def``. Returns the paths
    written and ``models``, the weight files shipped (those ``large_files.yml`` lists).
    """
    bundle_root = check_layout(bundle_root)
    metadata = verify_bundle_metadata(bundle_root)
    name = name or bundle_name(metadata)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")

    staging = out_dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"
    try:
        staging.mkdir()
        for folder in COPIED_FOLDERS:
            if (bundle_root / folder).is_dir():
                shutil.copytree(bundle_root / folder, staging / folder, ignore=_ignore)
        for file in COPIED_FILES:
            shutil.copy2(bundle_root / file, staging / file)
        shutil.copytree(Path(custom.__file__).resolve().parent, staging / "custom", ignore=_ignore)
        shipped = _copy_models(bundle_root, staging, include_model, include_pretrained)
        if torchscript:
            if "models/model.pt" not in shipped:
                raise MissingInputError(
                    bundle_root / "models" / "model.pt", "model weights", "finetune", "torchscript needs them"
                )
            export_torchscript(staging / inference_config, bundle_root=staging)
            shipped = sorted(set(shipped) | {"models/model.ts"})
        _write_large_files(staging, shipped)
        check_layout(staging)
        verify_bundle_metadata(staging)
        verify_large_files(staging, require_present=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)

    result = {"bundle_dir": str(target), "name": name, "version": metadata["version"], "models": shipped}
    if zip:
        zip_path = out_dir / f"{name}_v{metadata['version']}.zip"
        with atomic_path(zip_path) as tmp:
            # make_archive appends ".zip": hand it the temporary name without that suffix.
            shutil.make_archive(str(tmp.with_suffix("")), "zip", root_dir=out_dir, base_dir=name)
        result["zip"] = str(zip_path)
    return result
