"""The MONAI Model Zoo's verification of the default export (``custom.zoo.verify``: the steps of the Zoo's
ci/verify_bundle.py, min and full) on a bundle holding small real weights: an EmphysemaNetwork state dict saved
into a copy of bundle/. The export is unpacked from its zip, as a Zoo submission would be, and checked in a fresh
interpreter started in a working directory outside the repository, whose only import paths are the exported folder
and the installed libraries. The negative cases show that each step catches what the Zoo's CI catches."""

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from custom.emphysema.network import EmphysemaDetectors
from custom.zoo import verify
from custom.zoo.export import bundle_name, export_bundle

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLE = REPO_ROOT / "bundle"
METADATA = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
NAME = bundle_name(METADATA)


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory) -> Path:
    """bundle/ without its data, runs and weights, plus model.pt (the network of network_def) and pretrained.pt."""
    root = tmp_path_factory.mktemp("source") / "bundle"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("demo_data", "runs", "models", "__pycache__"))
    (root / "models").mkdir()
    torch.manual_seed(1)
    net = EmphysemaDetectors().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    torch.save(
        {k: v for k, v in net.detectors["centrilobular"].state_dict().items() if k.startswith("encoder.")},
        root / "models" / "pretrained.pt",
    )
    return root


@pytest.fixture(scope="module")
def zoo(source_bundle, tmp_path_factory) -> dict:
    """The default export (the documented command's settings), unpacked from its zip into a Zoo-like ``models/``
    folder beside a ``model_info.json`` that lists an earlier version only."""
    result = export_bundle(tmp_path_factory.mktemp("dist"), bundle_root=source_bundle, zip=True)
    models = tmp_path_factory.mktemp("zoo") / "models"
    models.mkdir()
    with zipfile.ZipFile(result["zip"]) as archive:
        archive.extractall(models)
    model_info = models / "model_info.json"
    model_info.write_text(json.dumps({f"{NAME}_v0.3.0": {"checksum": "0" * 64}}))
    return {"export": result, "bundle_dir": models / NAME, "model_info": model_info}


def _isolated_env(bundle_dir: Path) -> dict:
    """Only the bundle folder and the installed libraries on the import path (``-S`` keeps this repository's
    editable install of ``custom`` from loading)."""
    libraries = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and not k.startswith("DRASCLR")}
    env.update(PYTHONPATH=os.pathsep.join([str(bundle_dir), *libraries]), PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    return env


def _files(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def _verify(zoo: dict, cwd: Path, mode: str, isolated: bool = True) -> dict:
    cwd.mkdir(parents=True, exist_ok=True)
    report = cwd / "report.json"
    command = [
        sys.executable,
        *(["-S"] if isolated else []),
        "-m",
        "custom.zoo.verify",
        "--bundle_dir",
        str(zoo["bundle_dir"]),
        "--mode",
        mode,
        "--model_info",
        str(zoo["model_info"]),
        "--report",
        str(report),
    ]
    env = _isolated_env(zoo["bundle_dir"]) if isolated else dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(report.read_text())


def test_default_export_ships_model_pt_and_lists_only_it(zoo, source_bundle):
    bundle_dir = zoo["bundle_dir"]
    assert zoo["export"]["models"] == ["models/model.pt"]
    listed = yaml.safe_load((bundle_dir / "large_files.yml").read_text())["large_files"]
    assert listed == [
        {
            "path": "models/model.pt",
            "url": "",
            "hash_type": "sha256",
            "hash_val": hashlib.sha256((bundle_dir / "models" / "model.pt").read_bytes()).hexdigest(),
        }
    ]
    assert (bundle_dir / "models" / "model.pt").read_bytes() == (source_bundle / "models" / "model.pt").read_bytes()
    assert sorted(p.name for p in (bundle_dir / "models").iterdir()) == ["model.pt"]


@pytest.mark.parametrize("mode", ["min", "full"])
def test_zoo_verification_passes_from_outside_the_repository(zoo, tmp_path, mode):
    before = _files(zoo["bundle_dir"])
    report = _verify(zoo, tmp_path / "elsewhere", mode)
    assert report["mode"] == mode and report["version"] == METADATA["version"]
    assert report["large_files"] == ["models/model.pt"]
    assert report["files"] == ["configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.yaml"]
    assert Path(report["metadata"]).name == "meta_schema_20240725.json"
    assert Path(report["custom_package"]).resolve() == (zoo["bundle_dir"] / "custom").resolve()
    if mode == "min":
        assert "properties" not in report and "torchscript" not in report
    else:
        assert {"bundle_root", "dataset", "dataset_dir", "evaluator", "network_def", "inferer", "version"} <= set(
            report["properties"]["monai"]
        )
        # supported_apps declares MONAI Label: what it reads was checked too
        assert set(report["properties"]) == {"monai", "monai-label"}
        assert {"preprocessing", "postprocessing", "inferer", "device", "channel_def", "spatial_shape"} <= set(
            report["properties"]["monai-label"]
        )
        assert report["net_in_out"] == "network_def"
        assert report["torchscript"] == ["ckpt_export of models/model.pt"]
    assert _files(zoo["bundle_dir"]) == before, "the verification changed the bundle"
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["report.json"]


def test_verify_started_with_another_custom_checks_the_shipped_code(zoo, tmp_path):
    """From this repository's venv (its editable ``custom`` importable everywhere) the command runs itself again
    with the bundle's own ``custom`` first on the import path."""
    report = _verify(zoo, tmp_path / "elsewhere", "min", isolated=False)
    assert Path(report["custom_package"]).resolve() == (zoo["bundle_dir"] / "custom").resolve()


def test_monai_verify_net_in_out_from_another_directory(zoo, tmp_path):
    """The documented direct MONAI command: the bundle folder on PYTHONPATH makes ``$import custom`` resolve."""
    bundle_dir = zoo["bundle_dir"]
    command = [
        sys.executable,
        "-S",
        "-m",
        "monai.bundle",
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        str(bundle_dir / "configs" / "metadata.json"),
        "--config_file",
        str(bundle_dir / "configs" / "inference.yaml"),
        "--bundle_root",
        str(bundle_dir),
        "--device",
        "cpu",
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=_isolated_env(bundle_dir), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "data shape of network is verified with no error" in done.stdout + done.stderr


# ------------------------------------------------------------------------------ what each step catches
def _copy(zoo: dict, tmp_path: Path) -> Path:
    bundle_dir = tmp_path / NAME
    shutil.copytree(zoo["bundle_dir"], bundle_dir)
    return bundle_dir


def test_large_file_step_downloads_what_is_listed_but_absent(zoo, tmp_path, source_bundle):
    bundle_dir = _copy(zoo, tmp_path)
    assert verify.check_large_files(bundle_dir) == ["models/model.pt"]
    # The repository's list names model.ts and pretrained.pt with no url: the reviewer's "unknown url type".
    shutil.copy2(source_bundle / "large_files.yml", bundle_dir / "large_files.yml")
    with pytest.raises(verify.ZooCheckError, match="large_files: models/model.ts .*unknown url type"):
        verify.check_large_files(bundle_dir)
    # A shipped file whose hash differs from the list is refused too.
    listed = yaml.safe_load((zoo["bundle_dir"] / "large_files.yml").read_text())
    (bundle_dir / "large_files.yml").write_text(yaml.safe_dump(listed))
    with open(bundle_dir / "models" / "model.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(verify.ZooCheckError, match="large_files: models/model.pt .*hash check of existing file"):
        verify.check_large_files(bundle_dir)


def test_file_version_and_metadata_steps_refuse_what_the_zoo_refuses(zoo, tmp_path):
    bundle_dir = _copy(zoo, tmp_path)
    assert verify.check_version(bundle_dir, json.loads(zoo["model_info"].read_text())) == METADATA["version"]
    with pytest.raises(verify.ZooCheckError, match=f"{NAME}_v{METADATA['version']} is published already"):
        verify.check_version(bundle_dir, {f"{NAME}_v{METADATA['version']}": {}})

    meta_file = bundle_dir / "configs" / "metadata.json"
    meta = copy.deepcopy(METADATA)
    meta["version"] = "9.9.9"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(verify.ZooCheckError, match="version 9.9.9 is not a key of 'changelog'"):
        verify.check_version(bundle_dir)
    meta = {k: v for k, v in METADATA.items() if k != "task"}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(verify.ZooCheckError, match="metadata: .*'task' is a required property"):
        verify.check_metadata(bundle_dir)
    meta_file.write_text(json.dumps(METADATA))
    assert Path(verify.check_metadata(bundle_dir)).name == "meta_schema_20240725.json"

    (bundle_dir / "models" / "model.pt").unlink()  # a development export (include_model=False)
    with pytest.raises(verify.ZooCheckError, match="preferred file models/model.pt"):
        verify.check_files(bundle_dir)
    (bundle_dir / "LICENSE").unlink()
    with pytest.raises(verify.ZooCheckError, match="necessary file LICENSE"):
        verify.check_files(bundle_dir)


def test_metadata_declares_the_monai_label_version_the_tests_serve_with():
    """supported_apps names MONAI Label at the version tools/monailabel_env.sh installs (the one
    tests/test_monailabel.py serves the bundle with)."""
    pins = re.findall(r"\bmonailabel==([0-9.]+)", (REPO_ROOT / "tools" / "monailabel_env.sh").read_text())
    assert pins and set(pins) == {METADATA["supported_apps"]["monai-label"]}, pins
    assert set(METADATA["supported_apps"]) <= set(verify.APP_PROPERTIES)


def test_properties_step_checks_what_each_supported_app_reads(zoo, tmp_path):
    """With MONAI Label declared, a metadata without the output's channel_def (MONAI Label's label names) or an
    inference config without postprocessing fails the step; without supported_apps MONAI's own properties pass
    (those are optional there); an app whose properties are unknown is refused."""
    bundle_dir = _copy(zoo, tmp_path)
    config = bundle_dir / "configs" / "inference.yaml"
    meta_file = bundle_dir / "configs" / "metadata.json"
    assert set(verify.check_properties(bundle_dir, config)) == {"monai", "monai-label"}

    meta = copy.deepcopy(METADATA)
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(verify.ZooCheckError, match="properties: monai-label: .*channel_def"):
        verify.check_properties(bundle_dir, config)
    meta["supported_apps"] = {}
    meta_file.write_text(json.dumps(meta))
    assert set(verify.check_properties(bundle_dir, config)) == {"monai"}

    meta_file.write_text(json.dumps(METADATA))
    content = yaml.safe_load(config.read_text())
    content["evaluator"]["postprocessing"] = None
    del content["postprocessing"]
    config.write_text(yaml.safe_dump(content, sort_keys=False))
    with pytest.raises(verify.ZooCheckError, match="properties: monai-label: .*postprocessing"):
        verify.check_properties(bundle_dir, config)

    meta_file.write_text(json.dumps(dict(METADATA, supported_apps={"monailabel": "0.8.5"})))
    with pytest.raises(verify.ZooCheckError, match=r"supported_apps names \['monailabel'\], whose properties"):
        verify.check_properties(bundle_dir, config)


def test_verify_refuses_to_check_a_bundle_with_another_custom(zoo):
    """In this process ``custom`` is the repository's: checking the export with it would test other code."""
    with pytest.raises(RuntimeError, match="not from the bundle's own copy"):
        verify.verify_bundle(zoo["bundle_dir"], mode="min")
