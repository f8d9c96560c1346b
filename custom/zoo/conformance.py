"""MONAI Model Zoo conformance of a bundle folder, checked offline with MONAI's own bundle tools.

The Zoo reads ``configs/metadata.json`` (validated against a JSON schema, version listed in the changelog),
``LICENSE``, ``docs/README.md``, ``large_files.yml`` for weights kept out of git, runs ``verify_net_in_out`` on
``network_def`` and exports it to TorchScript with ``ckpt_export``. The Zoo's schema is downloaded from the URL in
the metadata's ``schema`` field, so the bundle carries an unchanged copy of it (``resources/schema/<that file
name>``) and a stricter schema of its own (``resources/schema/metadata_schema.json``); both paths are handed to
``monai.bundle.verify_metadata``, which reads an existing file instead of downloading. ``custom.zoo.verify`` runs
the Zoo's own sequence of checks on a bundle folder.

    python -m custom.zoo.conformance check --bundle_root bundle --config_file bundle/configs/inference.yaml
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from importlib import metadata as package_metadata
from pathlib import Path

import torch
import yaml
from monai.apps.utils import check_hash
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

import custom

SCHEMA_RELPATH = "resources/schema/metadata_schema.json"
SCHEMA_DIR = "resources/schema"
# sha256 of the vendored copies of the Model Zoo's schemas (file name -> hash): they must stay unchanged.
ZOO_SCHEMA_SHA256 = {"meta_schema_20240725.json": "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"}
METADATA_RELPATH = "configs/metadata.json"
LARGE_FILES_RELPATH = "large_files.yml"
REQUIRED_FILES = (
    METADATA_RELPATH,
    "LICENSE",
    "docs/README.md",
    "docs/data_license.txt",
    LARGE_FILES_RELPATH,
    SCHEMA_RELPATH,
)
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")


def _root(bundle_root: str | Path | None) -> Path:
    return Path(bundle_root if bundle_root is not None else custom.bundle_root())


def check_layout(bundle_root: str | Path | None = None) -> Path:
    """Raise ``FileNotFoundError`` listing every file the Zoo requires that ``bundle_root`` lacks."""
    root = _root(bundle_root)
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {root} lacks required files: {', '.join(missing)}")
    return root


def zoo_schema_path(bundle_root: str | Path | None = None, meta: dict | None = None) -> Path:
    """The offline copy of the Model Zoo schema that the metadata's ``schema`` URL names
    (``resources/schema/<file name of the URL>``); ``FileNotFoundError`` when the bundle does not carry it, and
    ``ValueError`` when a copy listed in ``ZOO_SCHEMA_SHA256`` was edited."""
    root = _root(bundle_root)
    if meta is None:
        meta = json.loads((root / METADATA_RELPATH).read_text())
    url = str(meta.get("schema") or "")
    name = url.rstrip("/").rsplit("/", 1)[-1]
    path = root / SCHEMA_DIR / name
    if not name or not path.is_file():
        raise FileNotFoundError(
            f"no offline copy of the Model Zoo schema {url!r}: expected {path} (see " f"{SCHEMA_DIR}/README.md)"
        )
    if name in ZOO_SCHEMA_SHA256 and not check_hash(path, ZOO_SCHEMA_SHA256[name], "sha256"):
        raise ValueError(
            f"{path} differs from the Model Zoo's schema (sha256 {ZOO_SCHEMA_SHA256[name]}); "
            "restore the unchanged file"
        )
    return path


def verify_bundle_metadata(bundle_root: str | Path | None = None, meta_file: str | Path | None = None) -> dict:
    """Validate the metadata against the Model Zoo's schema and the bundle's stricter one (both vendored, offline)
    and check its version is in the changelog."""
    root = _root(bundle_root)
    meta_file = Path(meta_file) if meta_file is not None else root / METADATA_RELPATH
    schema = root / SCHEMA_RELPATH
    for path in (meta_file, schema):
        if not path.is_file():
            raise FileNotFoundError(f"not found: {path}")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}: not valid JSON ({e})") from e
    schemas = [zoo_schema_path(root, meta), schema] if "schema" in meta else [schema]
    for path in schemas:
        try:
            with warnings.catch_warnings():
                # MONAI's download step warns that a present schema file has no hash: the Zoo's copy is checked by
                # zoo_schema_path (sha256), the bundle's own schema ships with it
                warnings.filterwarnings("ignore", message="No hash value provided for", category=UserWarning)
                verify_metadata(meta_file=str(meta_file), filepath=str(path))
        except ValueError as e:
            raise ValueError(f"{meta_file} does not satisfy {path}: {e}") from e
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"{meta_file}: version {meta['version']} is not a key of 'changelog'")
    return meta


def read_large_files(bundle_root: str | Path | None = None) -> list[dict]:
    """Entries of ``large_files.yml`` (``path``, ``url``, optional ``hash_val`` / ``hash_type``), checked. The list
    may be empty (an export that ships no weights)."""
    root = _root(bundle_root)
    path = root / LARGE_FILES_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    content = yaml.safe_load(path.read_text()) or {}
    entries = content.get("large_files")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list under 'large_files'")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry or "url" not in entry:
            raise ValueError(f"{path}: entry {i} needs 'path' and 'url', got {entry!r}")
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{path}: entry {i} path {entry['path']!r} must be relative and inside the bundle")
        if entry.get("hash_val") and entry.get("hash_type") not in HASH_TYPES:
            raise ValueError(f"{path}: entry {i} hash_type must be one of {HASH_TYPES}, got {entry.get('hash_type')!r}")
    return entries


def verify_large_files(bundle_root: str | Path | None = None, require_present: bool = False) -> list[Path]:
    """Check the hash of every listed file that is present and has a ``hash_val``; return the files checked.

    ``require_present``: every listed file must be there with a hash (an export): the Model Zoo's CI downloads
    each listed file that is absent or whose hash differs, and skips one that is present with its hash."""
    root = _root(bundle_root)
    checked = []
    for entry in read_large_files(root):
        target = root / entry["path"]
        if require_present and not (target.is_file() and entry.get("hash_val")):
            state = "has no hash_val" if target.is_file() else "is not there"
            raise ValueError(
                f"{root / LARGE_FILES_RELPATH} lists {entry['path']}, which {state}: the Model Zoo's "
                f"CI would download it from url {entry.get('url')!r}"
            )
        if target.is_file() and entry.get("hash_val"):
            if not check_hash(target, entry["hash_val"], entry["hash_type"]):
                raise ValueError(f"{target}: {entry['hash_type']} differs from {root / LARGE_FILES_RELPATH}")
            checked.append(target)
    return checked


def verify_network(
    config_file: str | Sequence[str], bundle_root: str | Path | None = None, net_id: str = "network_def"
) -> None:
    """``monai.bundle.verify_net_in_out`` on CPU: a random input of the metadata's shape and dtype must give the
    metadata's output channels and dtype."""
    root = _root(bundle_root)
    verify_net_in_out(
        net_id=net_id,
        meta_file=str(root / METADATA_RELPATH),
        config_file=_files(config_file),
        device="cpu",
        bundle_root=str(root),
    )


def export_torchscript(
    config_file: str | Sequence[str],
    bundle_root: str | Path | None = None,
    ckpt_file: str | Path | None = None,
    filepath: str | Path | None = None,
    net_id: str = "network_def",
) -> Path:
    """``monai.bundle.ckpt_export``: load ``models/model.pt`` into ``network_def`` and script it to
    ``models/model.ts`` (metadata and configs stored inside), written atomically."""
    from custom.atomic_io import atomic_path

    root = _root(bundle_root)
    ckpt_file = Path(ckpt_file) if ckpt_file is not None else root / "models" / "model.pt"
    filepath = Path(filepath) if filepath is not None else root / "models" / "model.ts"
    if not ckpt_file.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_file}")
    with atomic_path(filepath) as tmp:
        ckpt_export(
            net_id=net_id,
            filepath=str(tmp),
            ckpt_file=str(ckpt_file),
            meta_file=str(root / METADATA_RELPATH),
            config_file=_files(config_file),
            bundle_root=str(root),
        )
    return filepath


def load_torchscript(filepath: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """The scripted network and the metadata stored in it by ``ckpt_export``."""
    extra = {"metadata.json": ""}
    module = torch.jit.load(str(filepath), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra["metadata.json"] or "{}")


def installed_versions(packages: Iterable[str]) -> dict[str, str]:
    """Installed version of each distribution, without a local build tag (``2.13.0+cpu`` -> ``2.13.0``)."""
    return {name: package_metadata.version(name).split("+")[0] for name in packages}


def check(bundle_root: str | Path | None = None, config_file: str | Sequence[str] | None = None) -> dict:
    """All offline checks: layout, metadata, large files, and (given a config with ``network_def``) the network's
    input/output contract. Returns a short summary."""
    root = check_layout(bundle_root)
    meta = verify_bundle_metadata(root)
    hashed = verify_large_files(root)
    if config_file is not None:
        verify_network(config_file, root)
    return {
        "bundle_root": str(root),
        "version": meta["version"],
        "hash_checked": [str(p) for p in hashed],
        "network_verified": config_file is not None,
    }


def _files(config_file: str | Sequence[str]) -> str | list[str]:
    return str(config_file) if isinstance(config_file, (str, Path)) else [str(f) for f in config_file]


if __name__ == "__main__":
    from custom.flags import fire_cli

    fire_cli({"check": check, "export_torchscript": export_torchscript})
