"""MONAI Label serves the exported bundle offline and answers ``/infer`` on a CT with the emphysema map.

MONAI Label 0.8.5 needs numpy<2 and pydicom<3, so it runs from its own venv (``tools/monailabel_env.sh``), as a
real server: the ``monaibundle`` sample app shipped inside the monailabel package, the exported bundle under
``<app>/model/drasclr_lung_ct``, ``--conf zoo_source github`` (no Model Zoo download), a SYNTHETIC demo CT as the
study, and the real chest CT (a DICOM series folder, sent by path). The model is real EmphysemaDetectors whose
centrilobular detector always fires and paraseptal never does (zero weights, biases): the returned map must then be
the centrilobular label (2 of ``MAP_LABELS``) exactly on the lung the bundle found and 0 (background) elsewhere,
on the input's grid, which the test checks against the generator's lung mask without needing a trained model.
Two identical requests must return the same map voxel for voxel, and a request must leave no files behind (its
outputs go to a temporary folder that the bundle's postprocessing removes; the report comes back in the JSON).
Slow (minutes on 2 CPU cores): preparation (lung mask, registration) and the sliding window run on full-size CTs.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from custom.emphysema.network import MAP_LABELS, SUBTYPE_LABELS

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DRASCLR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
BUNDLE_NAME = "drasclr_lung_ct"
STARTUP_TIMEOUT_S = 300
INFER_TIMEOUT_S = 900
# A coarse evaluation grid and no pictures keep the round trip short on a CPU; the rest is the shipped config.
TEST_OVERRIDES = {"stride": 32, "min_stride": 32, "progress": False, "pictures": False}
pytestmark = pytest.mark.slow


# monailabel_python: the MONAI Label venv, a session fixture of conftest.py (shared with other tests).


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synthetic_ct(out_dir: Path) -> dict:
    """One SYNTHETIC demo subject: CT and its true lung mask (NIfTI)."""
    from custom.synthetic import generate_cohort

    row = generate_cohort(out_dir, num_subjects=1, seed=0, dicom_every=0, progress=False).iloc[0]
    return {"subject_id": row["subject_id"], "image": Path(row["image"]), "lung_mask": Path(row["lung_mask"])}


def _export_bundle(out_dir: Path) -> Path:
    """The self-contained bundle folder, written by the bundle's own export command (weights added below)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bundle" / "scripts" / "export_bundle.py"),
            "--out_dir",
            str(out_dir),
            "--include_model",
            "false",
        ],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(json.loads(proc.stdout[proc.stdout.index("{") :])["bundle_dir"])


def _write_centrilobular_model(path: Path) -> None:
    """models/model.pt: EmphysemaDetectors whose centrilobular detector fires on every patch and whose paraseptal
    detector never does (zero weights, bias on one output)."""
    from custom.emphysema.network import EmphysemaDetectors

    network = EmphysemaDetectors()
    with torch.no_grad():
        for name, fires in (("centrilobular", 1), ("paraseptal", 0)):
            head = network.detectors[name].classifier
            head.weight.zero_()
            head.bias.zero_()
            head.bias[fires] = 40.0  # sigmoid of +-40: 1.0 / 0.0 in float32
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)


def _override_inference_config(bundle_dir: Path, overrides: dict) -> None:
    import yaml

    path = bundle_dir / "configs" / "inference.yaml"
    config = yaml.safe_load(path.read_text())
    missing = sorted(set(overrides) - set(config))
    assert not missing, f"{path} has no {missing}"
    config.update(overrides)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _monaibundle_app(python: Path, app_dir: Path) -> None:
    """Copy the monaibundle sample app shipped inside the monailabel package (what ``monailabel apps --download
    --name monaibundle`` copies; offline)."""
    prefix = subprocess.run(
        [str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    sample = Path(prefix) / "monailabel" / "sample-apps" / "monaibundle"
    assert (sample / "main.py").is_file(), f"monaibundle sample app not found in {sample}"
    shutil.copytree(sample, app_dir, ignore=shutil.ignore_patterns("logs", "model", "__pycache__"))


@contextmanager
def _server(python: Path, app_dir: Path, studies: Path, port: int, log_path: Path, temp_dir: Path):
    # No PYTHONPATH from this process: `custom` must come from the served bundle folder, nothing else.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        TMPDIR=str(temp_dir),  # the server's temporary files, watched by the tests
        OMP_NUM_THREADS="2",
        MONAI_LABEL_DATASTORE_AUTO_RELOAD="false",
        MONAI_LABEL_SESSION_PATH=str(log_path.parent / "sessions"),
    )
    command = [
        str(python),
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app_dir),
        "--studies",
        str(studies),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--conf",
        "models",
        BUNDLE_NAME,
        "--conf",
        "zoo_source",
        "github",
        "--conf",
        "sam2",
        "false",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def _log_tail(log_path: Path, chars: int = 6000) -> str:
    return log_path.read_text(errors="replace")[-chars:]


def _wait_for_info(proc, url: str, log_path: Path) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"MONAI Label exited with {proc.returncode} during start-up:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/info/", timeout=10) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    pytest.fail(f"MONAI Label did not answer /info within {STARTUP_TIMEOUT_S} s:\n{_log_tail(log_path)}")


def _infer(url: str, query: str, log_path: Path, params: dict | None = None) -> tuple[dict, bytes]:
    """POST /infer/<model>?<query>&output=all (``params`` as the form field) -> (result params, label image)."""
    body = urllib.parse.urlencode({"params": json.dumps(params or {})}).encode()
    request = urllib.request.Request(f"{url}/infer/{BUNDLE_NAME}?{query}&output=all", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=INFER_TIMEOUT_S) as response:
            content_type, body = response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        pytest.fail(f"/infer answered {err.code}: {err.read()[:500]!r}\n{_log_tail(log_path)}")
    message = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.get_payload()
    }
    assert set(parts) == {"params", "image"}, f"unexpected multipart fields {sorted(parts)}"
    return json.loads(parts["params"]), parts["image"]


@pytest.fixture(scope="module")
def served(monailabel_python, tmp_path_factory):
    """A running MONAI Label server: the monaibundle app with the exported bundle, a SYNTHETIC CT as its study."""
    root = tmp_path_factory.mktemp("monailabel")
    start = time.perf_counter()
    subject = _synthetic_ct(root / "synthetic")
    bundle_dir = _export_bundle(root / "export")
    print(f"\nSYNTHETIC CT + bundle export: {time.perf_counter() - start:.1f} s")

    app_dir = root / "apps" / "drasclr_app"
    _monaibundle_app(monailabel_python, app_dir)
    bundle = app_dir / "model" / BUNDLE_NAME
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle_dir.rename(bundle)
    _write_centrilobular_model(bundle / "models" / "model.pt")
    _override_inference_config(bundle, TEST_OVERRIDES)
    studies = root / "studies"
    studies.mkdir()
    study_image = studies / subject["image"].name
    study_image.write_bytes(subject["image"].read_bytes())

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "monailabel.log"
    temp_dir = root / "server_tmp"
    temp_dir.mkdir()
    start = time.perf_counter()
    with _server(monailabel_python, app_dir, studies, port, log_path, temp_dir) as proc:
        info = _wait_for_info(proc, url, log_path)
        print(f"MONAI Label server up: {time.perf_counter() - start:.1f} s")
        yield {
            "url": url,
            "info": info,
            "bundle": bundle,
            "log": log_path,
            "subject": subject,
            "study_image": study_image,
            "root": root,
            "temp_dir": temp_dir,
        }


def _load_result(data: bytes, path: Path):
    import nibabel as nib

    path.write_bytes(data)
    result = nib.load(str(path))
    return result, np.asarray(result.dataobj)


def _assert_centrilobular_lung(labels: np.ndarray) -> None:
    """A head that always says centrilobular: label 2 on the lung, 0 (background) elsewhere. On the input grid
    the lung is the resampled lung mask >= 0.5 and centrilobular its resampled probability >= 0.5: the two can
    part on the rim where both are 0.5 up to float rounding, which may leave a few healthy (1) voxels there."""
    values, counts = np.unique(labels, return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist()))
    assert set(found) <= {0, 1, SUBTYPE_LABELS["centrilobular"]} and SUBTYPE_LABELS["centrilobular"] in found, found
    assert found.get(1, 0) <= 1e-3 * (labels > 0).sum(), f"healthy voxels beyond a rounding rim: {found}"


def _assert_report_and_no_files_left(served: dict, params: dict, result, labels: np.ndarray) -> None:
    """The bundle's report comes back in the result JSON and agrees with the returned map; the request left
    nothing on disk: no per-request folder under the served bundle, no temporary folder of the bundle's."""
    report = params["report"]
    assert report["map_labels"] == {str(code): name for code, name in enumerate(MAP_LABELS)}, report
    voxel_ml = abs(np.linalg.det(result.affine[:3, :3])) / 1000.0
    lung_ml = report["regions"]["lung"]["volume_ml"]
    assert (labels > 0).sum() * voxel_ml == pytest.approx(lung_ml, rel=0.05), (lung_ml, (labels > 0).sum())
    assert report["regions"]["lung"]["centrilobular_pct"] == pytest.approx(100.0), report["regions"]["lung"]
    assert not (served["bundle"] / "runs").exists(), sorted((served["bundle"] / "runs").rglob("*"))[:20]
    left = sorted(p.name for p in served["temp_dir"].glob("drasclr_emphysema_*"))
    assert not left, f"temporary request folders left behind: {left}"


def test_info_lists_the_bundle_model(served):
    model_info = served["info"]["models"][BUNDLE_NAME]
    assert model_info["type"] == "segmentation" and model_info["dimension"] == 3, model_info
    # the map's label table (MONAI Label leaves out "background", label 0)
    expected = {name: code for code, name in enumerate(MAP_LABELS) if name != "background"}
    assert model_info["labels"] == expected, model_info["labels"]
    assert model_info["version"] == json.loads((served["bundle"] / "configs" / "metadata.json").read_text())["version"]


def test_infer_synthetic_ct_returns_map_on_input_grid(served, tmp_path):
    import nibabel as nib
    from scipy import ndimage

    subject = served["subject"]
    start = time.perf_counter()
    params, data = _infer(served["url"], f"image={subject['subject_id']}", served["log"])
    print(f"\n/infer on the SYNTHETIC CT (datastore id): {time.perf_counter() - start:.1f} s")
    assert "latencies" in params and params["label_names"] == served["info"]["models"][BUNDLE_NAME]["labels"]
    # the same request again: the same map, voxel for voxel (lung mask and registration are deterministic)
    _, again = _infer(served["url"], f"image={subject['subject_id']}", served["log"])
    _, labels_again = _load_result(again, tmp_path / "again.nii.gz")

    result, labels = _load_result(data, tmp_path / "result.nii.gz")
    source = nib.load(str(served["study_image"]))
    # The map lies on the input's voxel grid: same shape, same world coordinates.
    assert labels.shape == source.shape, (labels.shape, source.shape)
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-3)
    assert np.issubdtype(labels.dtype, np.integer), labels.dtype
    np.testing.assert_array_equal(labels_again, labels)
    # A head that always says centrilobular: label 2 on the lung the bundle found, 0 (background) elsewhere.
    _assert_centrilobular_lung(labels)
    true_lung = np.asarray(nib.load(str(subject["lung_mask"])).dataobj) > 0
    assert not labels[~ndimage.binary_dilation(true_lung, iterations=3)].any(), "emphysema labelled outside the lung"
    found = labels > 0
    dice = 2.0 * (found & true_lung).sum() / (found.sum() + true_lung.sum())
    assert dice > 0.95, f"labelled region overlaps the true lung with Dice {dice:.3f}"
    _assert_report_and_no_files_left(served, params, result, labels)


def test_infer_real_dicom_ct(served, tmp_path):
    """The real chest CT (TCIA Lung-PET-CT-Dx A0001, CC BY 4.0), a DICOM series folder, sent by path."""
    from monai.transforms import LoadImage

    series = SHARED_DATA / "real_ct" / "lung_pet_ct_dx_A0001" / "soft_kernel_B"
    if not series.is_dir():
        pytest.skip(f"real CT not found at {series} (set DRASCLR_SHARED_DATA)")
    start = time.perf_counter()
    # A folder has no file extension: ask for NIfTI explicitly.
    params, data = _infer(
        served["url"], f"image={urllib.parse.quote(str(series))}", served["log"], {"result_extension": ".nii.gz"}
    )
    print(f"\n/infer on the real DICOM CT: {time.perf_counter() - start:.1f} s")
    assert params["label_names"] == served["info"]["models"][BUNDLE_NAME]["labels"], params

    result, labels = _load_result(data, tmp_path / "real_ct.nii.gz")
    dicom = LoadImage(image_only=True, reader="PydicomReader")(str(series))
    # The series' own lattice (in the atlas's axis order): its size and voxel spacing.
    assert labels.shape == tuple(dicom.shape), (labels.shape, dicom.shape)
    np.testing.assert_allclose(
        np.linalg.norm(result.affine[:3, :3], axis=0),
        np.linalg.norm(np.asarray(dicom.affine)[:3, :3], axis=0),
        atol=1e-3,
    )
    _assert_centrilobular_lung(labels)
    lung_ml = (labels > 0).sum() * abs(np.linalg.det(result.affine[:3, :3])) / 1000.0
    assert 2000 < lung_ml < 9000, f"labelled lung volume {lung_ml:.0f} ml is not an adult lung"
    _assert_report_and_no_files_left(served, params, result, labels)
