"""Missing inputs end a workflow with ONE console line naming the file and the workflow that makes it (no
traceback unless DRASCLR_TRACEBACK=1); reading a scan does not print library noise; a symlinked series folder
is found; ``prepare.py picture --subject_id 00`` keeps the id as text.

The workflow checks run the real ``python -m monai.bundle run ...`` in a subprocess.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import custom
from custom.errors import InputError, MissingInputError, input_error_in, producer_of, require, workflow_command
from custom.prepare.phantom import make_phantom

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
ENV.pop("DRASCLR_TRACEBACK", None)


def console_lines(stderr: str) -> list:
    """The non-blank stderr lines, without MONAI's own trust warning about config files (printed by
    ``monai.bundle`` before any bundle code runs: the warning line and the source line Python adds)."""
    lines, skip = [], False
    for line in stderr.splitlines():
        if skip and line.startswith(" "):
            skip = False
            continue
        skip = "UserWarning: parsing config_file" in line
        if not skip and line.strip():
            lines.append(line)
    return lines


def run_bundle(*args, env=None, timeout=300):
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=REPO,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.perf_counter() - start


# ----------------------------------------------------------------------------------------- the real workflows
def test_inference_without_model_is_one_line(tmp_path):
    model = tmp_path / "none.pt"
    done, seconds = run_bundle(
        "inference",
        "--config_file",
        "bundle/configs/inference.yaml",
        "--model_path",
        str(model),
        "--output_dir",
        str(tmp_path / "maps"),
    )
    lines = console_lines(done.stderr)
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = lines[0]
    assert line.startswith("error: model weights not found: ") and str(model) in line
    assert "the finetune workflow" in line and "bundle/configs/emphysema_finetune.yaml" in line
    assert not (tmp_path / "maps").exists()  # nothing was mapped
    assert seconds < 120


def test_training_without_prepared_data_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done, _ = run_bundle(
        "training",
        "--config_file",
        "bundle/configs/train.yaml",
        "--dataset_dir",
        str(empty),
        "--output_dir",
        str(tmp_path / "train"),
    )
    lines = console_lines(done.stderr)
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith(f"error: prepared subjects not found: {empty}")
    assert "the prepare workflow" in lines[0] and f"--cache_dir {empty}" in lines[0]


# ----------------------------------------------------------------------------------------- the hook itself
def _python(code: str, **env):
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=dict(ENV, **env), capture_output=True, text=True, timeout=120
    )


def test_hook_walks_the_cause_chain_and_leaves_other_errors_alone():
    wrapped = (
        "import custom\nfrom custom.errors import MissingInputError\n"
        "try:\n    raise MissingInputError('/x/pretrained.pt', 'model weights', 'training')\n"
        "except FileNotFoundError as e:\n    raise RuntimeError('Failed to evaluate ConfigExpression') from e\n"
    )
    done = _python(wrapped)
    assert done.returncode == 1
    assert console_lines(done.stderr) == [
        "error: model weights not found: /x/pretrained.pt; made by the training workflow "
        "(python -m monai.bundle run training --config_file bundle/configs/train.yaml)"
    ]
    # an InputError met while handling another exception (implicit context) is one line too
    implicit = (
        "import custom\nfrom custom.prepare.io import InputError\n"
        "try:\n    raise InputError('scan.nii.gz: not a CT')\nexcept ValueError:\n    1 / 0\n"
    )
    assert console_lines(_python(implicit).stderr) == ["error: scan.nii.gz: not a CT"]
    shown = _python(wrapped, DRASCLR_TRACEBACK="1")  # asked for: Python's own report, whole chain
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "MissingInputError" in shown.stderr
    assert "Failed to evaluate ConfigExpression" in shown.stderr
    other = _python("import custom\nraise KeyError('something else')\n")
    assert other.returncode == 1 and "Traceback" in other.stderr and "KeyError" in other.stderr


def test_error_type():
    error = MissingInputError(
        "/data/prepared", "prepared subjects", "prepare", "no manifest.csv", cache_dir="/data/prepared"
    )
    assert isinstance(error, FileNotFoundError)  # callers catching FileNotFoundError keep working
    assert str(error) == (
        "prepared subjects not found: /data/prepared (no manifest.csv); made by the prepare "
        "workflow (python -m monai.bundle run prepare --config_file bundle/configs/prepare.yaml "
        "--cache_dir /data/prepared)"
    )
    again = pickle.loads(pickle.dumps(error))  # crosses a worker-process boundary unchanged
    assert type(again) is MissingInputError and str(again) == str(error) and again.path == "/data/prepared"
    chained = RuntimeError("outer")
    chained.__cause__ = ValueError("middle")
    chained.__cause__.__cause__ = error
    assert input_error_in(chained) is error
    assert input_error_in(RuntimeError("no input error")) is None
    assert require(None) is None and require(str(REPO)) == str(REPO)
    with pytest.raises(MissingInputError, match="clinical table not found: /nowhere.csv"):
        require("/nowhere.csv", "clinical table")
    assert workflow_command("embed").startswith("the embed workflow (python -m monai.bundle run embed")
    from custom.prepare.io import NotHounsfieldError

    assert issubclass(NotHounsfieldError, InputError)


def test_bundle_defaults_name_the_workflow_that_writes_them():
    root = Path(custom.bundle_root())
    assert producer_of(root / "models" / "pretrained.pt") == "training"
    assert producer_of(root / "models" / "model.pt") == "finetune"
    assert producer_of(root / "demo_data" / "synthetic" / "cohort.csv") == "generate"
    assert producer_of(root / "demo_data" / "prepared_covid") == "prepare"
    assert producer_of("/somewhere/else.csv") is None
    from custom.prepare.workflow import discover_inputs

    missing = root / "demo_data" / "synthetic" / f"no_cohort_{os.getpid()}.csv"
    with pytest.raises(MissingInputError) as raised:  # `prepare` before `generate`
        discover_inputs(missing)
    assert str(missing) in str(raised.value) and "the generate workflow" in str(raised.value)


def test_every_weights_reader_names_the_workflow(tmp_path):
    from custom.embed.workflow import embed
    from custom.model.weights import read_state

    with pytest.raises(MissingInputError, match="made by the training workflow"):
        read_state(tmp_path / "pretrained.pt")
    with pytest.raises(MissingInputError, match="made by the finetune workflow"):
        read_state(tmp_path / "model.pt")
    # embed checks before it prepares anything: nothing is written
    with pytest.raises(MissingInputError, match="model weights not found"):
        embed(tmp_path / "scans", tmp_path / "out", weights=tmp_path / "pretrained.pt")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- console noise
def _dicom_series(folder: Path, private_tag: bool = True) -> Path:
    """A small DICOM CT series; every slice carries a vendor private tag whose bytes do not fit its VR."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from custom.synthetic.writer import write_dicom_series

    hu = np.full((40, 40, 12), -1000.0)
    hu[8:32, 8:32, 2:10] = 40.0
    written = write_dicom_series(folder, hu, np.diag([2.0, 2.0, 3.0, 1.0]), "s1", 0)
    if private_tag:
        tag = Tag(0x01F11026)
        for path in sorted(written.iterdir()):
            ds = pydicom.dcmread(path)
            ds.add_new(0x01F10010, "LO", "ELSCINT1")  # private creator, as Philips writes
            ds._dict[tag] = RawDataElement(tag, "DS", 4, b"abc ", 0, False, True)
            ds.save_as(path)
    return written


def test_reading_a_valid_series_prints_no_library_noise(tmp_path, caplog):
    from monai.transforms import LoadImage

    from custom.prepare.io import load_oriented

    series = _dicom_series(tmp_path / "series")
    noise = ("Error while processing tag", "nvImageCodec is not available")
    with caplog.at_level(logging.DEBUG):
        LoadImage(image_only=True, reader="PydicomReader")(str(series))  # MONAI alone: the noise is there
    assert any(r.getMessage().startswith(noise[0]) for r in caplog.records), "the series no longer reproduces it"
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        array, _ = load_oriented(series, "LAS")
    assert array.shape == (40, 40, 12)
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in shown if m.startswith(noise)], shown
    assert logging.getLogger("pydicom").filters == []  # scoped to our reading
    assert logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").filters == []


def test_logging_conf_holds_nvimagecodec_notice_for_every_workflow():
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(REPO / "bundle" / "configs" / "logging.conf")
    sections = [s for s in conf.sections() if conf[s].get("qualname") == "monai.data.nvimgcodec_pydicom_plugin"]
    assert sections and conf[sections[0]]["level"] in ("ERROR", "CRITICAL")
    # every workflow config sits beside it, so `monai.bundle run` applies it to all of them
    assert (REPO / "bundle" / "configs" / "inference.yaml").is_file()


def test_symlinked_series_folder_is_a_subject(tmp_path, caplog):
    from custom.prepare.workflow import discover_inputs

    outside = _dicom_series(tmp_path / "elsewhere" / "series", private_tag=False)
    source = tmp_path / "cohort"
    (source / "real").mkdir(parents=True)
    make_phantom(source / "real" / "a.nii.gz", seed=3, spacing_mm=6.0)
    (source / "linked").symlink_to(outside, target_is_directory=True)
    (source / "real" / "loop").symlink_to(source, target_is_directory=True)  # must not recurse forever
    with caplog.at_level(logging.INFO, logger="drasclr.prepare"):
        items = discover_inputs(source)
    assert {i.subject_id: i.image for i in items} == {
        "linked": str(source / "linked"),
        "real_a": str(source / "real" / "a.nii.gz"),
    }
    skipped = [r.getMessage() for r in caplog.records if "symlink" in r.getMessage()]
    assert len(skipped) == 1 and str(source / "real" / "loop") in skipped[0]


# ----------------------------------------------------------------------------------------- prepare.py picture
@pytest.mark.slow  # about 40 s on the 2-core CPU VM (one real preparation, then the script)
def test_picture_keeps_a_numeric_looking_id_as_text(tmp_path):
    from custom.prepare.workflow import prepare_cohort

    make_phantom(tmp_path / "scan.nii.gz", seed=10, spacing_mm=2.5, scale_range=(1.15, 1.25))
    (tmp_path / "cohort.csv").write_text(f"subject_id,image\n00,{tmp_path / 'scan.nii.gz'}\n")
    manifest = prepare_cohort(tmp_path / "cohort.csv", tmp_path / "cache", progress=False)
    assert manifest.subject_id.tolist() == ["00"] and manifest.status.tolist() == ["ok"], manifest.to_dict("records")
    out = tmp_path / "00.png"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bundle" / "scripts" / "prepare.py"),
            "picture",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--subject_id",
            "00",
            "--out_file",
            str(out),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert json.loads((tmp_path / "cache" / "00" / "qc.json").read_text())["status"] == "ok"


def test_a_model_of_another_kind_is_refused_naming_the_file_and_the_override(tmp_path):
    """A 3-class model.pt of bundle <= 0.6 meets the 0.7 detectors: one InputError line with the file and the
    override that maps with it, before any scan is read; fitting weights pass."""
    import torch

    from custom.emphysema.network import EmphysemaDetectors, EmphysemaNetwork, require_fitting_model

    old = tmp_path / "model.pt"
    torch.save(EmphysemaNetwork(num_classes=3, num_experts=2).state_dict(), old)
    with pytest.raises(InputError, match=r"model\.pt: a single classifier with 3 outputs.*classifier_def#_target_"):
        require_fitting_model(EmphysemaDetectors(num_experts=2), old)
    fitting = tmp_path / "detectors.pt"
    torch.save(EmphysemaDetectors(num_experts=2).state_dict(), fitting)
    assert require_fitting_model(EmphysemaDetectors(num_experts=2), fitting) == fitting
    with pytest.raises(InputError, match="do not fit EmphysemaNetwork"):
        require_fitting_model(EmphysemaNetwork(num_experts=2), fitting)
