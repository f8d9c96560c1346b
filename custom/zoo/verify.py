"""The MONAI Model Zoo's verification of a bundle folder (the sequence of its CI's ``verify_bundle.py``), offline.

From any working directory, on an exported bundle (which carries its own ``custom``) or on ``bundle/``:

    PYTHONPATH=dist/drasclr_lung_ct python -m custom.zoo.verify --bundle_dir dist/drasclr_lung_ct --mode full

With the bundle folder on ``PYTHONPATH`` the configs' ``$import custom`` and this module load the bundle's own
copy of ``custom``. Started with another ``custom`` (this repository's, say), the command runs itself again in a
child process with the bundle folder first on ``PYTHONPATH``, so the code checked is the code shipped.

Steps, in the Zoo's order (``min`` stops after the metadata; ``full`` is what the Zoo runs on a GPU runner):

1. ``large_files``: ``monai.apps.utils.download_url`` for every entry of ``large_files.yml`` (``.yaml``,
   ``.json``), as the Zoo calls it: a file that is present with its hash is skipped; an absent one would be
   downloaded (an empty ``url`` fails with "unknown url type").
2. ``files``: the necessary files (``configs/metadata.json``, ``LICENSE``) and the preferred ones
   (``models/model.pt``, ``configs/inference.json|yaml|yml``).
3. ``version``: ``version`` is a key of ``changelog``; with ``model_info`` (the Zoo's ``models/model_info.json``),
   ``<bundle folder name>_v<version>`` is not published yet.
4. ``metadata``: ``monai.bundle.verify_metadata`` against the Zoo's schema, the file the metadata's ``schema``
   URL names (the bundle's unchanged copy in ``resources/schema/``; ``schema`` overrides it).
5. ``properties`` (full): ``create_workflow(workflow_type="inference", ...)`` and ``check_properties()`` with
   MONAI's inference and metadata properties, then once per app of the metadata's ``supported_apps`` with that
   app's properties (``APP_PROPERTIES``; an app not listed there is an error). The Zoo runs this only for the apps
   of ``supported_apps`` (an app's ``bundle_properties.py``; it holds none for MONAI Label); here MONAI's run always.
6. ``net_in_out`` (full): ``monai.bundle.verify_net_in_out`` on ``network_def`` of the inference config.
7. ``torchscript`` (full): ``monai.bundle.ckpt_export`` of ``models/model.pt`` into a temporary file, loaded back;
   a shipped ``models/model.ts`` must load too.

Like the Zoo's CI, it puts the bundle folder first on ``sys.path``. It refuses to check a bundle that carries its
own ``custom`` with another copy of ``custom`` already imported (that would test other code than the one shipped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from monai.apps.utils import download_url
from monai.bundle import ckpt_export, create_workflow, verify_metadata, verify_net_in_out
from monai.bundle.properties import InferProperties, MetaProperties
from monai.utils import BundleProperty

MODES = ("min", "full")
NECESSARY_FILES = ("configs/metadata.json", "LICENSE")
PREFERRED_FILES = ("models/model.pt", "configs/inference")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
NET_ID = "network_def"
CHILD_ENV = "DRASCLR_ZOO_VERIFY_CHILD"  # set in the child process started with the bundle's own code


def _required(properties: dict, *names: str) -> dict:
    return {name: {**properties[name], BundleProperty.REQUIRED: True} for name in names}


# The properties each app of ``supported_apps`` needs, in MONAI's property format (monai.bundle.properties).
# monai-label: what MONAI Label 0.8.5's BundleInferTask (monailabel/tasks/infer/bundle.py) reads from
# configs/inference.* and the metadata: network_def, preprocessing, inferer, postprocessing, device, bundle_root;
# the version, the description, the input's spatial_shape (its dimension) and the output's channel_def (its label
# names). MONAI's optional properties become required where MONAI Label reads them.
APP_PROPERTIES = {
    "monai-label": {
        **MetaProperties,
        **InferProperties,
        **_required(InferProperties, "preprocessing", "postprocessing"),
        **_required(MetaProperties, "description", "spatial_shape", "channel_def"),
    },
}


class ZooCheckError(ValueError):
    """A Model Zoo verification step failed; ``step`` names it."""

    def __init__(self, step: str, message: str):
        self.step, self.message = step, message
        super().__init__(step, message)

    def __str__(self) -> str:
        return f"{self.step}: {self.message}"


def find_config(folder: Path, stem: str) -> Path | None:
    """``<folder>/<stem>.json|yaml|yml``, the first that exists."""
    for suffix in CONFIG_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def foreign_custom(bundle_dir: Path) -> Path | None:
    """Where the imported ``custom`` comes from when the bundle carries its own copy and that is not it, else None."""
    own = bundle_dir / "custom" / "__init__.py"
    loaded = sys.modules.get("custom")
    if not own.is_file() or loaded is None:
        return None
    where = Path(getattr(loaded, "__file__", "") or "").resolve()
    return None if where == own.resolve() else where


def use_bundle_code(bundle_dir: Path) -> None:
    """Put ``bundle_dir`` first on ``sys.path`` (as the Zoo's CI does) and make sure an already imported ``custom``
    is the bundle's own copy when the bundle carries one."""
    where = foreign_custom(bundle_dir)
    if where is not None:
        raise RuntimeError(
            f"custom is imported from {where}, not from the bundle's own copy in {bundle_dir}: run with "
            f"the bundle folder on PYTHONPATH (PYTHONPATH={bundle_dir} python -m custom.zoo.verify ...)"
        )
    if str(bundle_dir) not in sys.path:
        sys.path.insert(0, str(bundle_dir))


def check_large_files(bundle_dir: Path) -> list[str]:
    """Step 1: MONAI's ``download_url`` on every entry of the bundle's large-file list; returns the paths listed."""
    listing = find_config(bundle_dir, "large_files")
    if listing is None:
        return []
    text = listing.read_text()
    content = (json.loads(text) if listing.suffix == ".json" else yaml.safe_load(text)) or {}
    paths = []
    for entry in content.get("large_files") or []:
        args = {key: value for key, value in entry.items() if key != "path"}
        for key in ("hash_val", "hash_type"):  # empty hash fields mean "no hash", as the Zoo reads them
            if key in args and not args[key]:
                del args[key]
        try:
            download_url(filepath=bundle_dir / entry["path"], **args)
        except Exception as e:  # noqa: BLE001 - any failure of the download step fails the Zoo's CI
            raise ZooCheckError(
                "large_files", f"{entry['path']} (url {entry.get('url')!r}): " f"{type(e).__name__}: {e}"
            ) from e
        paths.append(entry["path"])
    return paths


def check_files(bundle_dir: Path) -> list[str]:
    """Step 2: the necessary and preferred files; returns them."""
    found = []
    for rel in NECESSARY_FILES + PREFERRED_FILES:
        path = bundle_dir / rel
        if rel.startswith("configs/") and not Path(rel).suffix:
            path = find_config(bundle_dir / "configs", Path(rel).name)
        if path is None or not path.is_file():
            kind = "necessary" if rel in NECESSARY_FILES else "preferred"
            raise ZooCheckError("files", f"{kind} file {rel} is not in {bundle_dir}")
        found.append(path.relative_to(bundle_dir).as_posix())
    return found


def check_version(bundle_dir: Path, model_info: dict | None = None) -> str:
    """Step 3: the version is in the changelog and, given ``model_info``, not published already."""
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog"):
        if key not in meta:
            raise ZooCheckError("version", f"'{key}' is missing in configs/metadata.json")
    version = meta["version"]
    if version not in meta["changelog"]:
        raise ZooCheckError("version", f"version {version} is not a key of 'changelog' in configs/metadata.json")
    if model_info is not None and f"{bundle_dir.name}_v{version}" in model_info:
        raise ZooCheckError("version", f"{bundle_dir.name}_v{version} is published already: raise the version")
    return version


def zoo_schema(bundle_dir: Path) -> Path:
    """The bundle's copy of the schema its metadata's ``schema`` URL names."""
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    name = str(meta.get("schema", "")).rstrip("/").rsplit("/", 1)[-1]
    path = bundle_dir / "resources" / "schema" / name
    if not name or not path.is_file():
        raise ZooCheckError("metadata", f"no offline copy of the schema {meta.get('schema')!r} at {path}")
    return path


def check_metadata(bundle_dir: Path, schema: Path | None = None) -> str:
    """Step 4: ``verify_metadata`` against the Zoo's schema (an existing file: nothing is downloaded)."""
    schema = Path(schema) if schema is not None else zoo_schema(bundle_dir)
    try:
        verify_metadata(meta_file=str(bundle_dir / "configs" / "metadata.json"), filepath=str(schema))
    except Exception as e:  # noqa: BLE001
        raise ZooCheckError("metadata", f"{type(e).__name__}: {e}") from e
    return str(schema)


def supported_apps(bundle_dir: Path) -> dict:
    """The metadata's ``supported_apps`` (app -> version); an app without an entry in ``APP_PROPERTIES`` fails."""
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    apps = meta.get("supported_apps") or {}
    unknown = sorted(set(apps) - set(APP_PROPERTIES))
    if unknown:
        raise ZooCheckError(
            "properties",
            f"supported_apps names {unknown}, whose properties are unknown (known: {sorted(APP_PROPERTIES)})",
        )
    return dict(apps)


def check_properties(bundle_dir: Path, config: Path) -> dict:
    """Step 5: MONAI's inference and metadata properties of the inference config, with its default settings, then
    those of every app of ``supported_apps``. Returns the names checked: ``{"monai": [...], <app>: [...]}``."""
    wanted = {"monai": {**MetaProperties, **InferProperties}}
    wanted.update({app: APP_PROPERTIES[app] for app in supported_apps(bundle_dir)})
    checked = {}
    try:
        workflow = create_workflow(
            workflow_type="inference",
            config_file=str(config),
            bundle_root=str(bundle_dir),
            meta_file=str(bundle_dir / "configs" / "metadata.json"),
            logging_file=_logging_file(bundle_dir),
        )
    except Exception as e:  # noqa: BLE001
        raise ZooCheckError("properties", f"{type(e).__name__}: {e}") from e
    for app, properties in wanted.items():
        try:
            workflow.properties = dict(properties)
            missing = workflow.check_properties()
        except Exception as e:  # noqa: BLE001
            raise ZooCheckError("properties", f"{app}: {type(e).__name__}: {e}") from e
        if missing:
            raise ZooCheckError("properties", f"{app}: missing or wrong properties: {missing}")
        checked[app] = sorted(properties)
    return checked


def check_net_in_out(bundle_dir: Path, config: Path, device: str) -> None:
    """Step 6: ``verify_net_in_out`` on ``network_def``."""
    try:
        verify_net_in_out(
            net_id=NET_ID,
            meta_file=str(bundle_dir / "configs" / "metadata.json"),
            config_file=str(config),
            bundle_root=str(bundle_dir),
            device=device,
        )
    except Exception as e:  # noqa: BLE001
        raise ZooCheckError("net_in_out", f"{type(e).__name__}: {e}") from e


def check_torchscript(bundle_dir: Path, config: Path) -> list[str]:
    """Step 7: ``ckpt_export`` of ``models/model.pt`` (into a temporary folder, the bundle is left as it is), and
    the exported and shipped TorchScript files load."""
    loaded = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            exported = Path(tmp) / "verify_model.ts"
            ckpt_export(
                net_id=NET_ID,
                filepath=str(exported),
                ckpt_file=str(bundle_dir / "models" / "model.pt"),
                meta_file=str(bundle_dir / "configs" / "metadata.json"),
                config_file=str(config),
                bundle_root=str(bundle_dir),
            )
            torch.jit.load(str(exported), map_location="cpu")
            loaded.append("ckpt_export of models/model.pt")
        shipped = bundle_dir / "models" / "model.ts"
        if shipped.is_file():
            torch.jit.load(str(shipped), map_location="cpu")
            loaded.append("models/model.ts")
    except Exception as e:  # noqa: BLE001
        raise ZooCheckError("torchscript", f"{type(e).__name__}: {e}") from e
    return loaded


def _logging_file(bundle_dir: Path) -> str | None:
    path = bundle_dir / "configs" / "logging.conf"
    return str(path) if path.is_file() else None


def verify_bundle(
    bundle_dir: str | Path,
    mode: str = "full",
    model_info: dict | str | Path | None = None,
    schema: str | Path | None = None,
    device: str = "cpu",
) -> dict:
    """Run the Zoo's steps on ``bundle_dir`` (``mode`` ``min`` or ``full``); raise ``ZooCheckError`` at the first
    failing step. Returns what each step saw."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bundle_dir = Path(bundle_dir).resolve()
    if not bundle_dir.is_dir():
        raise FileNotFoundError(f"bundle folder not found: {bundle_dir}")
    if isinstance(model_info, (str, Path)):
        model_info = json.loads(Path(model_info).read_text())
    use_bundle_code(bundle_dir)
    report: dict = {"bundle_dir": str(bundle_dir), "mode": mode}
    report["large_files"] = check_large_files(bundle_dir)
    report["files"] = check_files(bundle_dir)
    report["version"] = check_version(bundle_dir, model_info)
    report["metadata"] = check_metadata(bundle_dir, Path(schema) if schema is not None else None)
    if mode == "min":
        return _with_package(report)
    config = find_config(bundle_dir / "configs", "inference")
    report["properties"] = check_properties(bundle_dir, config)
    check_net_in_out(bundle_dir, config, device)
    report["net_in_out"] = NET_ID
    report["torchscript"] = check_torchscript(bundle_dir, config)
    return _with_package(report)


def _with_package(report: dict) -> dict:
    """Add where the ``custom`` package that ran the checks lives (the bundle's own copy when it carries one)."""
    loaded = sys.modules.get("custom")
    if loaded is not None and getattr(loaded, "__file__", None):
        report["custom_package"] = str(Path(loaded.__file__).resolve().parent)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle_dir", required=True, help="the bundle folder (e.g. dist/drasclr_lung_ct)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="full",
        help="min: files and metadata; full: also the " "network checks (default)",
    )
    parser.add_argument("--model_info", default=None, help="the Zoo's models/model_info.json: the version must be new")
    parser.add_argument("--schema", default=None, help="schema file (default: the bundle's copy of the Zoo schema)")
    parser.add_argument("--device", default="cpu", help="device of the network checks (default cpu)")
    parser.add_argument("--report", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    bundle_dir = Path(args.bundle_dir).resolve()
    if foreign_custom(bundle_dir) is not None and not os.environ.get(CHILD_ENV):
        # Check the shipped code, not this one: the same command with the bundle folder first on the import path.
        env = dict(os.environ, **{CHILD_ENV: "1"})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(bundle_dir), env.get("PYTHONPATH")) if p)
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.run([sys.executable, "-m", "custom.zoo.verify", *argv], env=env, check=False).returncode
    try:
        report = verify_bundle(args.bundle_dir, args.mode, args.model_info, args.schema, args.device)
    except (ZooCheckError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
