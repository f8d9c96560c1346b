"""The self-contained export: folder and zip with the ``custom`` package inside, caches and demo data left
behind, weight hashes recorded, and the exported bundle working from a clean directory with no access to this
repository (a fresh interpreter whose only import paths are the exported folder and the installed libraries)."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import custom
from custom.emphysema.network import EmphysemaDetectors
from custom.errors import MissingInputError
from custom.zoo.conformance import read_large_files, verify_large_files
from custom.zoo.export import bundle_name, export_bundle

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLE = REPO_ROOT / "bundle"
NAME = bundle_name(json.loads((BUNDLE / "configs" / "metadata.json").read_text()))
# The config holding network_def: inference.yaml, or a one-entry config placed in the test bundle until it exists.
NETWORK_CONFIG = (
    "configs/inference.yaml" if (BUNDLE / "configs" / "inference.yaml").is_file() else "configs/network_def.yaml"
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory) -> Path:
    """A copy of bundle/ with small real weights and the clutter an export must leave behind."""
    root = tmp_path_factory.mktemp("source") / "bundle"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("demo_data", "runs", "models", "__pycache__"))
    if not (root / NETWORK_CONFIG).is_file():
        (root / NETWORK_CONFIG).write_text(
            yaml.safe_dump(
                {
                    "imports": ["$import custom"],
                    "network_def": {"_target_": "custom.emphysema.network.EmphysemaDetectors"},
                }
            )
        )
    (root / "models" / "checkpoints").mkdir(parents=True)
    net = EmphysemaDetectors().eval()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    torch.save(
        {k: v for k, v in net.detectors["centrilobular"].state_dict().items() if k.startswith("encoder.")},
        root / "models" / "pretrained.pt",
    )
    (root / "models" / "checkpoints" / "checkpoint_10.pt").write_bytes(b"training state")
    for clutter in (
        "demo_data/synthetic/cohort.csv",
        "runs/train/log.txt",
        "configs/__pycache__/x.cpython-311.pyc",
        "scripts/stale.pyc",
        ".tmp-1-half-written",
    ):
        (root / clutter).parent.mkdir(parents=True, exist_ok=True)
        (root / clutter).write_text("not shipped")
    return root


@pytest.fixture(scope="module")
def exported(source_bundle, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    return export_bundle(
        out,
        bundle_root=source_bundle,
        zip=True,
        include_pretrained=True,
        torchscript=True,
        inference_config=NETWORK_CONFIG,
    )


def test_export_holds_everything_the_bundle_needs(exported, source_bundle):
    bundle_dir = Path(exported["bundle_dir"])
    assert bundle_dir.name == NAME == "drasclr_lung_ct"
    for rel in (
        "configs/metadata.json",
        NETWORK_CONFIG,
        "LICENSE",
        "large_files.yml",
        "docs/README.md",
        "docs/data_license.txt",
        "resources/atlas/atlas_lung_mask.nii.gz",
        "resources/atlas/atlas_patch_loc.npy",
        "resources/atlas/LICENSE",
        "resources/schema/metadata_schema.json",
        "scripts/export_bundle.py",
        "models/model.pt",
        "models/pretrained.pt",
        "models/model.ts",
    ):
        assert (bundle_dir / rel).is_file(), f"export lacks {rel}"
    package = Path(custom.__file__).resolve().parent
    expected = {p.relative_to(package) for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    assert {p.relative_to(bundle_dir / "custom") for p in (bundle_dir / "custom").rglob("*.py")} == expected
    assert (bundle_dir / "models" / "model.pt").read_bytes() == (source_bundle / "models" / "model.pt").read_bytes()
    assert sorted(exported["models"]) == ["models/model.pt", "models/model.ts", "models/pretrained.pt"]


def test_export_leaves_data_runs_checkpoints_and_caches_behind(exported):
    bundle_dir = Path(exported["bundle_dir"])
    names = {p.name for p in bundle_dir.rglob("*")}
    assert not names & {"demo_data", "runs", "checkpoints", "__pycache__"}
    assert not [p for p in bundle_dir.rglob("*") if p.suffix == ".pyc" or p.name.startswith(".tmp-")]
    assert not list(bundle_dir.parent.glob(".tmp-*")), "a staging folder or temporary zip was left behind"


def test_exported_large_files_record_the_shipped_hashes(exported):
    bundle_dir = Path(exported["bundle_dir"])
    entries = {e["path"]: e for e in read_large_files(bundle_dir)}
    assert sorted(entries) == sorted(exported["models"])  # exactly the files shipped, nothing to download
    for rel in ("models/model.pt", "models/pretrained.pt", "models/model.ts"):
        assert entries[rel]["hash_type"] == "sha256" and entries[rel]["hash_val"] == _sha256(bundle_dir / rel)
    assert len(verify_large_files(bundle_dir, require_present=True)) == 3


def test_large_files_of_an_export_list_only_what_it_ships(source_bundle, tmp_path):
    """The source list names model.pt, model.ts and pretrained.pt; the default export ships model.pt only, so its
    list holds model.pt only (the Model Zoo's CI downloads every listed file that is not there)."""
    assert {"models/model.ts", "models/pretrained.pt"} <= {e["path"] for e in read_large_files(source_bundle)}
    result = export_bundle(tmp_path, bundle_root=source_bundle)
    bundle_dir = Path(result["bundle_dir"])
    assert result["models"] == ["models/model.pt"]
    assert read_large_files(bundle_dir) == [
        {
            "path": "models/model.pt",
            "url": "",
            "hash_val": _sha256(bundle_dir / "models" / "model.pt"),
            "hash_type": "sha256",
        }
    ]
    assert not (bundle_dir / "models" / "pretrained.pt").exists()


def test_zip_holds_the_bundle_folder(exported):
    bundle_dir = Path(exported["bundle_dir"])
    zip_path = Path(exported["zip"])
    assert zip_path.name == f"{NAME}_v{exported['version']}.zip"
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.testzip() is None
        names = set(archive.namelist())
    assert all(n.startswith(f"{NAME}/") for n in names)
    on_disk = {f"{NAME}/{p.relative_to(bundle_dir).as_posix()}" for p in bundle_dir.rglob("*") if p.is_file()}
    assert on_disk <= names


def test_export_refuses_to_clobber_and_reports_missing_weights(source_bundle, tmp_path):
    first = export_bundle(tmp_path, bundle_root=source_bundle, include_model=False)
    assert not (Path(first["bundle_dir"]) / "models" / "model.pt").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_bundle(tmp_path, bundle_root=source_bundle)
    again = export_bundle(tmp_path, bundle_root=source_bundle, overwrite=True)
    assert (Path(again["bundle_dir"]) / "models" / "model.pt").is_file()

    bare = tmp_path / "bare"
    shutil.copytree(source_bundle, bare, ignore=shutil.ignore_patterns("models"))
    # No weights: the default export refuses, naming the file, the workflow that makes it and the opt-out.
    with pytest.raises(MissingInputError) as missing:
        export_bundle(tmp_path / "out", bundle_root=bare)
    message = str(missing.value)
    assert message.startswith(f"model weights not found: {bare / 'models' / 'model.pt'}")
    assert "the finetune workflow" in message and "--include_model false" in message
    with pytest.raises(FileNotFoundError, match="pretrained.pt"):
        export_bundle(tmp_path / "out", bundle_root=bare, include_model=False, include_pretrained=True)
    assert not list((tmp_path / "out").iterdir()), "a failed export left files behind"
    # Asked for explicitly: a development export without weights, whose large-file list is empty.
    dev = export_bundle(tmp_path / "out", bundle_root=bare, include_model=False)
    assert dev["models"] == [] and read_large_files(dev["bundle_dir"]) == []
    assert not list((Path(dev["bundle_dir"]) / "models").iterdir())


def test_export_script_without_weights_is_one_error_line(source_bundle, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(source_bundle, bare, ignore=shutil.ignore_patterns("models"))
    done = subprocess.run(
        [
            sys.executable,
            str(BUNDLE / "scripts" / "export_bundle.py"),
            "--out_dir",
            str(tmp_path / "dist"),
            "--bundle_root",
            str(bare),
            "--zip",
            "true",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "DRASCLR_TRACEBACK"},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "model weights not found" in lines[0] and "models/model.pt" in lines[0], done.stderr
    assert not (tmp_path / "dist" / NAME).exists() and not list((tmp_path / "dist").glob("*.zip"))


def test_export_cli(source_bundle, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("export_bundle_cli", BUNDLE / "scripts" / "export_bundle.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main(
        ["--out_dir", str(tmp_path), "--bundle_root", str(source_bundle), "--zip", "true", "--include_model", "false"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["models"] == [] and Path(summary["zip"]).is_file()
    assert (tmp_path / NAME / "custom" / "__init__.py").is_file() and not (
        tmp_path / NAME / "models" / "model.pt"
    ).exists()
    with pytest.raises(SystemExit):
        cli.main(["--out_dir", str(tmp_path), "--zip", "maybe"])
    assert "expected true or false" in capsys.readouterr().err


ISOLATED_CHECKS = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch
    import custom
    import custom.data.atlas
    from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out

    bundle, config = Path(sys.argv[1]), sys.argv[2]
    meta = str(bundle / "configs" / "metadata.json")
    verify_metadata(meta_file=meta, filepath=str(bundle / "resources" / "schema" / "metadata_schema.json"))
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=str(bundle / config), device="cpu")
    # The shipped TorchScript model and the config's network with the shipped weights agree.
    parser = ConfigParser()
    parser.read_config(str(bundle / config))
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu"))
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu").eval()
    x = torch.rand(2, 4, 32, 32, 32) * 2 - 1
    with torch.no_grad():
        ts_error = float((scripted(x) - net(x)).abs().max())
    properties = None
    if config.endswith("inference.yaml"):
        # The default settings, as MONAI's check does: the exported bundle has no demo scans, and its default
        # input is a data item that is read only when mapped.
        workflow = ConfigWorkflow(config_file=str(bundle / config), workflow_type="infer")
        workflow.initialize()
        properties = workflow.check_properties()
    print(json.dumps({
        "custom_file": custom.__file__, "bundle_root": custom.bundle_root(),
        "atlas_dir": str(custom.data.atlas.resources_dir()), "sys_path": sys.path, "ts_error": ts_error,
        "missing_properties": properties,
    }))
""")


def _isolated_env(bundle_dir: Path) -> dict:
    """Only the exported folder and the installed libraries on the import path; ``-S`` keeps the site hooks
    (among them the editable install of this repository's ``custom``) from loading."""
    libraries = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and not k.startswith("DRASCLR")}
    env["PYTHONPATH"] = os.pathsep.join([str(bundle_dir), *libraries])
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_exported_bundle_works_without_the_repository(exported, tmp_path):
    bundle_dir = Path(exported["bundle_dir"]).resolve()
    clean = tmp_path / "clean"
    clean.mkdir()
    result = subprocess.run(
        [sys.executable, "-S", "-c", ISOLATED_CHECKS, str(bundle_dir), NETWORK_CONFIG],
        check=False,
        cwd=clean,
        env=_isolated_env(bundle_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["custom_file"]).resolve().is_relative_to(bundle_dir)
    assert Path(report["bundle_root"]).resolve() == bundle_dir
    assert Path(report["atlas_dir"]).resolve() == bundle_dir / "resources" / "atlas"
    assert not [
        p
        for p in report["sys_path"]
        if p
        and Path(p).resolve().is_relative_to(REPO_ROOT)
        and not Path(p).resolve().is_relative_to(REPO_ROOT / ".venv")
    ], "the repository leaked onto sys.path"
    assert report["ts_error"] < 1e-4
    if NETWORK_CONFIG.endswith("inference.yaml"):
        assert report["missing_properties"] == []


# The one library warning a `monai.bundle run` prints by design: MONAI's notice that a config is code, emitted by
# its command line before the bundle's code is imported.
EXPECTED_WARNINGS = ("UserWarning: parsing config_file",)


@pytest.mark.slow
def test_exported_bundle_runs_inference_from_a_clean_directory(exported, tmp_path):
    """``python -m monai.bundle run inference`` of the exported bundle on a small CT phantom (random weights:
    the maps are not meaningful, the run and its outputs are what is checked). The run uses the bundle's
    configs/logging.conf and prints no library warning but MONAI's notice about configs (e.g. not MONAI's
    "Setting affine" UserWarning, filtered in custom/prepare/io.py)."""
    import nibabel as nib
    import pandas as pd

    from custom.prepare.phantom import make_phantom

    bundle_dir = Path(exported["bundle_dir"]).resolve()
    clean = tmp_path / "clean"
    scan = make_phantom(tmp_path / "scans" / "phantom.nii.gz", spacing_mm=3.0, scale_range=(1.5, 1.6), seed=3).path
    clean.mkdir()
    command = [
        sys.executable,
        "-S",
        "-m",
        "monai.bundle",
        "run",
        "inference",
        "--config_file",
        str(bundle_dir / "configs" / "inference.yaml"),
        "--input",
        str(scan),
        "--output_dir",
        str(clean / "out"),
        "--stride",
        "32",
        "--min_stride",
        "32",
        "--pictures",
        "False",
        "--progress",
        "False",
    ]
    result = subprocess.run(
        command, check=False, cwd=clean, env=_isolated_env(bundle_dir), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert "Default logging file" not in output and "logging.conf" in output, output[-3000:]
    warned = [
        line for line in output.splitlines() if "Warning: " in line and not any(e in line for e in EXPECTED_WARNINGS)
    ]
    assert not warned, "library warnings in the inference run:\n" + "\n".join(warned)
    subject = clean / "out" / "phantom"
    probabilities = nib.load(str(subject / "emphysema_probabilities.nii.gz"))
    assert probabilities.shape == nib.load(str(scan)).shape + (3,)
    assert np.allclose(probabilities.affine, nib.load(str(scan)).affine, atol=1e-4)
    assert (subject / "emphysema_mask.nii.gz").is_file() and (subject / "report.json").is_file()
    assert list(pd.read_csv(clean / "out" / "emphysema_report.csv")["subject_id"]) == ["phantom"]
    assert sorted(p.name for p in clean.iterdir()) == ["out"], "the run wrote outside its output_dir"
