"""One scan pipeline (custom/prepare/transforms.py) shared by every workflow that reads CT.

The configs prepare.yaml, embed.yaml and inference.yaml define the components `load`, `lung_mask`, `register`
identically, so overriding one of them on the command line changes prepare, embed and the emphysema maps alike.
The override used here, ``lung_mask#min_lung_ml``, needs no registration to show its effect: a scan whose lungs
are smaller than the minimum fails at the lung mask with a message that names the minimum.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.transforms import Compose

from custom.prepare.io import InputError
from custom.prepare.lung_mask import NoLungError
from custom.prepare.transforms import LoadCTd, LungMaskd, RegisterToAtlasd, load_scan, run_transforms

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SHARED_IDS = ("load", "lung_mask", "register")  # prepare, embed and inference
PREPARE_IDS = SHARED_IDS + ("patches", "write", "scan_pipeline")  # prepare and embed
OVERRIDE = {"lung_mask#min_lung_ml": 100000}
MINIMUM_WORDS = "a lung needs at least 100000 ml"


def _raw(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.fixture(scope="module")
def small_chest(tmp_path_factory):
    """A small chest-like HU volume (1 mm): a body at 40 HU holding two 182 ml "lungs" at -850 HU (364 ml of
    lung: enough for the default minimum of 300 ml)."""
    folder = tmp_path_factory.mktemp("scan")
    hu = np.full((120, 110, 90), -1000.0, dtype=np.float32)
    x, y = np.meshgrid(np.arange(120), np.arange(110), indexing="ij")
    body = ((x - 60) / 55.0) ** 2 + ((y - 55) / 50.0) ** 2 <= 1.0
    hu[body] = 40.0
    hu[20:58, 25:85, 5:85] = -850.0  # 38 x 60 x 80 mm
    hu[62:100, 25:85, 5:85] = -850.0
    hu += np.random.default_rng(0).normal(0, 5, hu.shape).astype(np.float32)
    path = folder / "small_chest.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))
    return path


def test_the_three_configs_define_the_shared_components_identically():
    prepare, embed, inference = _raw("prepare.yaml"), _raw("embed.yaml"), _raw("inference.yaml")
    for key in SHARED_IDS:
        assert prepare[key] == embed[key] == inference[key], key
    for key in PREPARE_IDS:
        assert prepare[key] == embed[key], key
    assert prepare["scan_pipeline"]["transforms"] == ["@load", "@lung_mask", "@register", "@patches", "@write"]
    assert inference["preprocessing"]["transforms"][:3] == ["@load", "@lung_mask", "@register"]
    assert prepare["preparation"]["transforms"] == embed["embedding"]["transforms"] == "@scan_pipeline"


def _parsed(name: str, override: dict | None = None) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / name))
    parser.update(dict(override or {}))
    parser.parse()
    return parser


@pytest.mark.parametrize(
    "name, chain_id",
    [("prepare.yaml", "scan_pipeline"), ("embed.yaml", "scan_pipeline"), ("inference.yaml", "preprocessing")],
)
def test_one_override_reaches_every_workflow_pipeline(name, chain_id, small_chest):
    default = _parsed(name).get_parsed_content(chain_id)
    assert [type(t) for t in default.transforms[:3]] == [LoadCTd, LungMaskd, RegisterToAtlasd]
    assert default.transforms[1].min_lung_ml == 300

    parser = _parsed(name, OVERRIDE)
    chain = parser.get_parsed_content(chain_id)
    assert chain.transforms[1] is parser.get_parsed_content("lung_mask")
    assert chain.transforms[1].min_lung_ml == 100000
    with pytest.raises(NoLungError, match=MINIMUM_WORDS) as info:
        run_transforms(chain, {"subject_id": "small", "image": str(small_chest), "cache_dir": "unused"})
    assert "small_chest.nii.gz" in str(info.value)  # names the file


def test_the_python_chains_are_the_configs():
    """``prepare_transforms`` / ``preprocessing_chain`` (Python) are read from prepare.yaml / inference.yaml."""
    from custom.emphysema.scan_transforms import preprocessing_chain
    from custom.prepare.pipeline import prepare_transforms

    def described(chain):
        return [(type(t).__name__, {k: v for k, v in vars(t).items() if k not in {"R"}}) for t in chain.transforms]

    atlas_dir = str(REPO / "bundle" / "resources" / "atlas")
    assert described(prepare_transforms(atlas_dir)) == described(
        _parsed("prepare.yaml").get_parsed_content("scan_pipeline")
    )
    python, config = preprocessing_chain(atlas_dir), _parsed("inference.yaml").get_parsed_content("preprocessing")
    assert [type(t).__name__ for t in python.transforms] == [type(t).__name__ for t in config.transforms]
    assert described(python)[:3] == described(config)[:3]


def test_errors_keep_the_message_that_names_the_file(tmp_path, small_chest):
    chain = Compose([LoadCTd("image"), LungMaskd("image")])
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a NIfTI file")
    with pytest.raises(InputError, match="broken.nii.gz: could not read the image"):
        run_transforms(chain, {"image": str(broken)})
    with pytest.raises(InputError, match="no image path given"):
        run_transforms(chain, {"subject_id": "empty", "image": ""})
    image, lung = load_scan(small_chest)  # the default minimum (300 ml) accepts this scan
    assert lung.dtype == bool and lung.shape == tuple(image.shape[1:]) and lung.sum() > 300_000


def test_not_hounsfield_input_is_refused_naming_the_file(tmp_path):
    from custom.prepare.io import NotHounsfieldError

    path = tmp_path / "normalised.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4)), path)
    with pytest.raises(NotHounsfieldError, match="normalised.nii.gz"):
        LoadCTd()({"image": str(path)})


def _bundle_run(run_id: str, config: str, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        str(CONFIGS / config),
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        *args,
        *[item for key, value in OVERRIDE.items() for item in (f"--{key}", str(value))],
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # three `python -m monai.bundle run` processes (~25 CPU s); the parser test above is the fast twin
def test_command_line_override_changes_prepare_embed_and_inference_alike(small_chest, tmp_path):
    from custom.emphysema.network import EmphysemaDetectors
    from custom.model.network import DrasCLRNetwork

    # prepare: the subject fails at the lung mask, with the overridden minimum in its failure report
    cache_dir = tmp_path / "prepared"
    done = _bundle_run(
        "prepare", "prepare.yaml", "--source", str(small_chest), "--cache_dir", str(cache_dir), "--progress", "false"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failures = pd.read_csv(cache_dir / "failures.csv")
    assert list(failures.subject_id) == ["small_chest"] and failures.error_type[0] == "NoLungError"
    assert MINIMUM_WORDS in failures.error[0] and "small_chest.nii.gz" in failures.error[0]

    # embed from the raw scan: the same failure, in the cache it prepares on the fly
    torch.save(DrasCLRNetwork().state_dict(), tmp_path / "pretrained.pt")
    done = _bundle_run(
        "embed",
        "embed.yaml",
        "--source",
        str(small_chest),
        "--out_dir",
        str(tmp_path / "embed"),
        "--weights",
        str(tmp_path / "pretrained.pt"),
        "--progress",
        "false",
    )
    assert done.returncode != 0 and "no subject of" in done.stderr
    failures = pd.read_csv(tmp_path / "embed" / "prepared" / "failures.csv")
    assert failures.error_type[0] == "NoLungError" and MINIMUM_WORDS in failures.error[0]

    # emphysema maps: the scan is refused by the same component (recorded in failures.csv, nothing mapped)
    torch.save(EmphysemaDetectors().state_dict(), tmp_path / "model.pt")
    out = tmp_path / "maps"
    done = _bundle_run(
        "inference",
        "inference.yaml",
        "--input",
        str(small_chest),
        "--output_dir",
        str(out),
        "--model_path",
        str(tmp_path / "model.pt"),
        "--progress",
        "false",
        "--pictures",
        "false",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures.subject_id) == ["small_chest"] and "small_chest.nii.gz" in failures.error[0]
    assert not (out / "small_chest" / "emphysema_mask.nii.gz").exists()
