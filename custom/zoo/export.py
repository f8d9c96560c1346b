"""Export the bundle as a self-contained folder (and zip) that runs without this repository.

The exported ``<out_dir>/<name>/`` holds ``configs/``, ``scripts/``, ``resources/`` (atlas, schema), ``docs/``,
``LICENSE``, ``large_files.yml``, ``models/`` (the weights asked for) and a copy of the ``custom`` package, so
``$import custom`` resolves with the bundle folder on ``PYTHONPATH`` and ``custom.bundle_root()`` is that folder.
Demo data, training runs, checkpoints and caches stay behind. ``large_files.yml`` in the copy records the sha256
of every weight file shipped. The folder is built under a temporary name and moved into place, and the export
is checked (layout, metadata against the vendored schema, hashes) before it is published.
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
from custom.zoo.conformance import (
    LARGE_FILES_RELPATH,
    check_layout,
    export_torchscript,
    verify_bundle_metadata,
    verify_large_files,
)

COPIED_FOLDERS = ("configs", "scripts", "resources", "docs")
COPIED_FILES = ("LICENSE", LARGE_FILES_RELPATH)
# Never shipped: generated data, run outputs, caches, half-written files.
EXCLUDED_NAMES = {"demo_data", "runs", "checkpoints", "mlruns", "eval", "__pycache__", ".pytest_cache", ".ruff_cache",
                  ".ipynb_checkpoints", ".DS_Store"}
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


def _record_hashes(bundle_dir: Path) -> None:
    """Write the sha256 of each shipped large file into the exported ``large_files.yml``."""
    path = bundle_dir / LARGE_FILES_RELPATH
    content = yaml.safe_load(path.read_text()) or {}
    for entry in content.get("large_files", []):
        target = bundle_dir / entry["path"]
        if target.is_file():
            entry["hash_val"] = _sha256(target)
            entry["hash_type"] = "sha256"
        else:
            entry.pop("hash_val", None)
            entry.pop("hash_type", None)
    header = ("# Weights kept out of git. Hashes are those of the files shipped in this export; `url` is empty\n"
              "# until weights are published (see docs/README.md).\n")
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(content, sort_keys=False))


def _copy_models(bundle_root: Path, bundle_dir: Path, include_model: bool, include_pretrained: bool) -> list[str]:
    models = bundle_dir / "models"
    models.mkdir()
    wanted = []
    if include_model:
        wanted += ["model.pt", "model.ts"]
    if include_pretrained:
        pretrained = bundle_root / "models" / "pretrained.pt"
        if not pretrained.is_file():
            raise FileNotFoundError(f"include_pretrained was asked for but {pretrained} does not exist")
        wanted.append("pretrained.pt")
    shipped = []
    for name in wanted:
        source = bundle_root / "models" / name
        if source.is_file():
            shutil.copy2(source, models / name)
            shipped.append(f"models/{name}")
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

    ``include_model`` ships ``models/model.pt`` (and ``model.ts``) when they exist; ``include_pretrained`` ships
    ``models/pretrained.pt`` (an error when absent); ``torchscript`` scripts the shipped ``model.pt`` into
    ``models/model.ts`` with ``inference_config``'s ``network_def``. Returns the paths written.
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
                raise FileNotFoundError(f"torchscript needs {bundle_root / 'models' / 'model.pt'}; it is not there")
            export_torchscript(staging / inference_config, bundle_root=staging)
            shipped = sorted(set(shipped) | {"models/model.ts"})
        _record_hashes(staging)
        check_layout(staging)
        verify_bundle_metadata(staging)
        verify_large_files(staging)
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
