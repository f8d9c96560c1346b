"""Emphysema maps: the grid inferer against the step-1 brute force, preprocessing against the prepared landmarks,
postprocessing on the input grid, report numbers against numpy, and the inference config end to end."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA
from torch import nn

from custom.emphysema.dense_input import probabilities_at, scan_channels
from custom.emphysema.network import MAP_LABELS, SUBTYPE_LABELS, EmphysemaDetectors, EmphysemaNetwork
from custom.emphysema.sliding_window import EmphysemaInferer, decide_labels, map_labels

CONFIG = REPO_ROOT / "bundle" / "configs" / "inference.yaml"
REAL_CT = SHARED_DATA / "real_ct" / "lung_pet_ct_dx_A0001" / "soft_kernel_B"


class LocationReadout(nn.Module):
    """A real (tiny) patch classifier whose logits are an affine function of the patch-centre location: its
    probability map is smooth, the case where interpolating a coarse grid must agree with the brute force."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(3, 3)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [60.0, 0.0, 0.0], [0.0, 0.0, 60.0]]))
            self.classifier.bias.copy_(torch.tensor([0.0, 7.8, 3.8]))  # borders inside the test lung

    def forward(self, x):
        c = x.shape[2] // 2
        return self.classifier(x[:, 1:4, c, c, c])


SMALL_LUNG_BOX = (slice(6, 9), slice(5, 8), slice(6, 9))


def _small_scan(shape=(22, 20, 18), lung_box=SMALL_LUNG_BOX, seed=0):
    rng = np.random.default_rng(seed)
    hu = rng.normal(-850, 60, shape).astype(np.float32)
    lung = np.zeros(shape, bool)
    lung[lung_box] = True
    transform = np.eye(4)
    transform[:3, 3] = (140, 150, 140)
    return scan_channels(hu, lung, transform), lung


def test_stride_one_is_the_brute_force():
    torch.manual_seed(0)
    network = EmphysemaNetwork(num_experts=2).eval()
    channels, lung = _small_scan()
    out = EmphysemaInferer(stride=1, batch_size=16)(channels[None], network)[0]
    voxels = torch.nonzero(torch.from_numpy(lung))
    expected = probabilities_at(network, channels, voxels)
    assert out.shape == (3, *lung.shape)
    torch.testing.assert_close(out[:, voxels[:, 0], voxels[:, 1], voxels[:, 2]].T, expected, rtol=0, atol=1e-6)
    outside = out[:, ~torch.from_numpy(lung)]
    assert torch.equal(outside[0], torch.ones_like(outside[0])) and not outside[1:].any()


def test_detector_maps_read_each_subtypes_own_detector():
    """The map model: a voxel's subtype probability is that subtype's binary detector (softmax of its 2 logits),
    "healthy" is 1 minus the larger one; folded or not, and with one shared encoder pass when the detectors'
    encoders are identical (linear readout), the numbers are the same."""
    from custom.emphysema.folded_classifier import fold
    from custom.emphysema.network import SUBTYPES

    torch.manual_seed(0)
    network = EmphysemaDetectors(num_experts=2).eval()
    channels, lung = _small_scan()
    voxels = torch.nonzero(torch.from_numpy(lung))

    def inside(out):
        return out[:, voxels[:, 0], voxels[:, 1], voxels[:, 2]].T

    def own(network):
        return torch.stack([probabilities_at(network.detectors[n], channels, voxels)[:, 1] for n in SUBTYPES], 1)

    expected = own(network)
    for folded in (True, False):
        out = inside(EmphysemaInferer(stride=1, batch_size=16, folded=folded)(channels[None], network)[0])
        torch.testing.assert_close(out[:, 1:], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[:, 0], 1 - expected.max(dim=1).values, rtol=0, atol=1e-5)
    assert not fold(network).shared
    network.detectors["paraseptal"].encoder.load_state_dict(network.detectors["centrilobular"].encoder.state_dict())
    assert fold(network).shared
    out = inside(EmphysemaInferer(stride=1, batch_size=16)(channels[None], network)[0])
    torch.testing.assert_close(out[:, 1:], own(network), rtol=0, atol=1e-5)
    # logits interpolation of detectors interpolates their log-odds: exact at the evaluated points (stride 1)
    logits = inside(EmphysemaInferer(stride=1, batch_size=16, interpolation="logits")(channels[None], network)[0])
    torch.testing.assert_close(logits, out, rtol=0, atol=1e-5)


def test_coarse_stride_agrees_on_a_smooth_map():
    network = LocationReadout()
    box = (slice(3, 19), slice(4, 12), slice(3, 17))
    channels, lung = _small_scan(lung_box=box)
    exact = EmphysemaInferer(stride=1, batch_size=256)(channels[None], network)[0]
    exact_labels = decide_labels(exact)[torch.from_numpy(lung)]
    assert len(exact_labels.unique()) == 3  # the smooth field crosses both subtype borders inside the lung
    coarse = EmphysemaInferer(stride=4, batch_size=256, interpolation="probabilities")
    approx = coarse(channels[None], network)[0]
    assert coarse.last_evaluations < lung.sum() / 8
    assert float((approx - exact).abs().max()) < 0.06
    # logits affine in the location: interpolating logits is exact, interpolating probabilities is not
    in_logits = EmphysemaInferer(stride=4, batch_size=256, interpolation="logits")
    torch.testing.assert_close(in_logits(channels[None], network)[0], exact, rtol=0, atol=2e-5)
    assert in_logits.last_evaluations == coarse.last_evaluations
    assert float((approx - exact).abs().max()) > 1e-3
    refined = EmphysemaInferer(stride=4, min_stride=1, batch_size=256, interpolation="probabilities")
    approx_refined = refined(channels[None], network)[0]
    refined_labels = decide_labels(approx_refined)[torch.from_numpy(lung)]
    assert refined.last_evaluations < lung.sum()
    assert float((refined_labels == exact_labels).float().mean()) >= 0.99


def test_map_labels_tell_background_from_healthy_lung():
    """The map convention (``MAP_LABELS``): 0 outside the lung, 1 healthy lung, 2 centrilobular, 3 paraseptal."""
    assert MAP_LABELS == ("background", "healthy", "centrilobular", "paraseptal")
    assert SUBTYPE_LABELS == {"centrilobular": 2, "paraseptal": 3}
    probabilities = torch.tensor([[0.9, 0.2, 0.3, 0.9], [0.05, 0.7, 0.1, 0.05], [0.05, 0.1, 0.6, 0.05]])
    lung = torch.tensor([True, True, True, False])
    assert map_labels(probabilities, lung).tolist() == [1, 2, 3, 0]
    assert map_labels(probabilities, lung, threshold=0.65).tolist() == [1, 2, 1, 0]


def test_report_numbers_match_numpy():
    from custom.emphysema.report import atlas_midline, emphysema_report

    rng = np.random.default_rng(1)
    shape = (40, 10, 30)
    hu = rng.uniform(-1024, -700, shape).round(1)
    lung = np.zeros(shape, bool)
    lung[2:18, 2:8, 3:27] = True  # one lung per side of the atlas midline below
    lung[22:38, 2:8, 6:24] = True
    # map labels (MAP_LABELS): 1 healthy, 2 centrilobular, 3 paraseptal inside the lung, 0 outside
    labels = np.where(lung, rng.choice([1, 2, 3], size=shape, p=[0.7, 0.2, 0.1]), 0).astype(np.uint8)
    assert MAP_LABELS == ("background", "healthy", "centrilobular", "paraseptal")
    midline, high_x_is_left = atlas_midline()
    atlas_x = np.broadcast_to((midline - 20 + np.arange(shape[0]) + 0.5)[:, None, None], shape)
    report = emphysema_report(hu, lung, labels, atlas_x, voxel_ml=0.001, subject_id="t")
    regions = report["regions"]
    lower_x = np.zeros(shape, bool)
    lower_x[:20] = True
    left = lung & (~lower_x if high_x_is_left else lower_x)
    right = lung & ~left
    for name, mask in (("lung", lung), ("left", left), ("right", right)):
        numbers = regions[name]
        assert numbers["volume_ml"] == pytest.approx(mask.sum() * 0.001)
        assert numbers["laa950_pct"] == pytest.approx(100 * (hu[mask] < -950).mean(), abs=1e-4)
        assert numbers["perc15_hu"] == pytest.approx(np.percentile(hu[mask], 15), abs=0.01)
        assert numbers["centrilobular_pct"] == pytest.approx(100 * (labels[mask] == 2).mean(), abs=1e-4)
        assert numbers["paraseptal_pct"] == pytest.approx(100 * (labels[mask] == 3).mean(), abs=1e-4)
        assert numbers["emphysema_pct"] == pytest.approx(100 * (labels[mask] >= 2).mean(), abs=1e-4)
    # zones: thirds of each lung's own z extent (z index grows towards the head on the LAS grid)
    zs = np.nonzero(right.any(axis=(0, 1)))[0]
    z0, z1 = zs[0], zs[-1] + 1
    z = np.arange(shape[2])
    upper = right & (z >= z0 + 2 * (z1 - z0) / 3)[None, None, :]
    middle = right & ((z >= z0 + (z1 - z0) / 3) & (z < z0 + 2 * (z1 - z0) / 3))[None, None, :]
    for name, mask in (("right_upper", upper), ("right_middle", middle)):
        assert regions[name]["volume_ml"] == pytest.approx(mask.sum() * 0.001)
        assert regions[name]["centrilobular_pct"] == pytest.approx(100 * (labels[mask] == 2).mean(), abs=1e-4)
        assert regions[name]["laa950_pct"] == pytest.approx(100 * (hu[mask] < -950).mean(), abs=1e-4)
    total = sum(regions[f"right_{zone}"]["volume_ml"] for zone in ("upper", "middle", "lower"))
    assert total == pytest.approx(regions["right"]["volume_ml"])


def _demo_subject(demo_cohort, index=0):
    cohort = pd.read_csv(demo_cohort / "synthetic" / "cohort.csv")
    row = cohort.iloc[index]
    folder = demo_cohort / "synthetic"
    return {"subject_id": row.subject_id, "image": str(folder / row.image), "lung_mask": str(folder / row.lung_mask)}


def test_preprocessing_locations_match_prepared_landmarks(demo_cohort):
    from custom.data.atlas import landmark_locations
    from custom.emphysema.scan_transforms import preprocessing_chain

    item = _demo_subject(demo_cohort)
    image = preprocessing_chain()(dict(item))["image"]
    assert image.shape[0] == 5
    prepared = demo_cohort / "prepared" / item["subject_id"]
    transform = json.loads((prepared / "transform.json").read_text())
    landmarks = np.load(prepared / "landmarks_vox.npy")
    world = np.c_[landmarks, np.ones(len(landmarks))] @ np.asarray(transform["subject_affine_ras"]).T
    voxels = np.rint((world @ np.linalg.inv(np.asarray(image.affine)).T)[:, :3]).astype(int)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(image.shape[1:])), axis=1)
    assert inside.mean() > 0.9
    p = image[1:4, voxels[inside, 0], voxels[inside, 1], voxels[inside, 2]].T.numpy()
    error_atlas_vox = np.abs(p - landmark_locations()[inside]) * np.asarray((312.0, 286.0, 286.0)) / 2
    # rounding to the nearest voxel moves a point by <= 0.87 voxel; the rest is registration run-to-run noise
    assert np.median(error_atlas_vox.max(axis=1)) < 2.0
    assert error_atlas_vox.max() < 6.0


def _write_model(path, seed=0):
    torch.manual_seed(seed)
    torch.save(EmphysemaDetectors().state_dict(), path)
    return path


def _run_config(tmp_path, data, model_path, stride=48, **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(CONFIG),
        workflow_type="infer",
        logging_file=None,
        meta_file=str(REPO_ROOT / "bundle" / "configs" / "metadata.json"),
        input=data,
        output_dir=str(tmp_path / "out"),
        model_path=str(model_path),
        stride=stride,
        min_stride=stride,
        progress=False,
        **overrides,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    return tmp_path / "out"


def _check_outputs(out, subject_id, input_affine, input_shape):
    folder = out / subject_id
    mask = nib.load(str(folder / "emphysema_mask.nii.gz"))
    probabilities = nib.load(str(folder / "emphysema_probabilities.nii.gz"))
    assert mask.shape == tuple(input_shape)
    assert probabilities.shape == (*input_shape, 3)
    np.testing.assert_allclose(mask.affine, input_affine, atol=1e-4)
    np.testing.assert_allclose(probabilities.affine, input_affine, atol=1e-4)
    p = np.asarray(probabilities.dataobj)
    # the detectors' probabilities: "healthy" is 1 minus the larger subtype probability on the 1 mm grid; resampled
    # linearly, the interpolated max is >= the max of the interpolated channels, so healthy <= 1 - max afterwards
    assert ((p >= -1e-6) & (p <= 1 + 1e-6)).all()
    assert (p[..., 0] <= 1 - np.maximum(p[..., 1], p[..., 2]) + 1e-4).all()
    labels = np.asarray(mask.dataobj)
    assert set(np.unique(labels)) <= set(range(len(MAP_LABELS)))
    # 0 outside the lung, 1 healthy lung, 2 / 3 the subtype whose probability reaches the threshold
    np.testing.assert_array_equal(labels >= 2, np.maximum(p[..., 1], p[..., 2]) >= 0.5)
    np.testing.assert_array_equal(labels[labels >= 2], np.where(p[..., 1] >= p[..., 2], 2, 3)[labels >= 2])
    report = json.loads((folder / "report.json").read_text())
    assert report["regions"]["lung"]["volume_ml"] > 300
    assert report["map_labels"] == {str(code): name for code, name in enumerate(MAP_LABELS)}
    # the lung of the map on the input grid is the report's lung (counted on the 1 mm grid) up to resampling
    voxel_ml = abs(np.linalg.det(np.asarray(mask.affine)[:3, :3])) / 1000.0
    assert (labels > 0).sum() * voxel_ml == pytest.approx(report["regions"]["lung"]["volume_ml"], rel=0.05)
    for name in ("emphysema_coronal.png", "emphysema_projection.png"):
        assert (folder / name).stat().st_size > 10_000
    return report


def test_inference_config_end_to_end_on_a_demo_subject(demo_cohort, tmp_path):
    item = _demo_subject(demo_cohort)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    out = _run_config(
        tmp_path, [item, {"subject_id": "broken", "image": str(bad)}], _write_model(tmp_path / "model.pt")
    )
    header = nib.load(item["image"])
    report = _check_outputs(out, item["subject_id"], header.affine, header.shape)
    table = pd.read_csv(out / "emphysema_report.csv")
    assert list(table.subject_id) == [item["subject_id"]]
    assert table.loc[0, "lung_volume_ml"] == pytest.approx(report["regions"]["lung"]["volume_ml"])
    assert {"left_upper_centrilobular_pct", "right_lower_laa950_pct", "lung_perc15_hu"} <= set(table.columns)
    assert table.loc[0, "qc_status"] == "ok" and report["qc_status"] == "ok"  # the scan pipeline's anatomy QC
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures.subject_id) == ["broken"] and "broken.nii.gz" in failures.loc[0, "error"]

    # Resume per subject: the same scan, model and settings are not mapped again; the report keeps its row.
    mask = out / item["subject_id"] / "emphysema_mask.nii.gz"
    written = mask.stat().st_mtime_ns
    _run_config(tmp_path, [item, {"subject_id": "broken", "image": str(bad)}], tmp_path / "model.pt")
    assert mask.stat().st_mtime_ns == written
    again = pd.read_csv(out / "emphysema_report.csv")
    pd.testing.assert_frame_equal(again, table)
    assert list(pd.read_csv(out / "failures.csv").subject_id) == ["broken"]  # failures are retried, and reported
    # Another model (or --resume false) maps it again: its row is replaced, not repeated; the earlier run's
    # failure row of a scan this run did not see is kept.
    _run_config(tmp_path, [item], _write_model(tmp_path / "other.pt", seed=5))
    assert mask.stat().st_mtime_ns != written
    merged = pd.read_csv(out / "emphysema_report.csv", dtype={"subject_id": str})
    assert list(merged.subject_id) == [item["subject_id"]]
    assert list(pd.read_csv(out / "failures.csv").subject_id) == ["broken"]
    # A run of other scans into the same folder keeps the rows of earlier runs (was: rewritten with its own only).
    _run_config(tmp_path, [{"subject_id": "0042", "image": str(bad)}], tmp_path / "other.pt")
    pd.testing.assert_frame_equal(pd.read_csv(out / "emphysema_report.csv", dtype={"subject_id": str}), merged)
    assert list(pd.read_csv(out / "failures.csv", dtype={"subject_id": str}).subject_id) == ["broken", "0042"]


@pytest.mark.slow
def test_inference_config_on_the_real_ct(tmp_path):
    if not REAL_CT.is_dir():
        pytest.skip(f"real CT not found at {REAL_CT} (TCIA Lung-PET-CT-Dx A0001, see ../shared/data/real_ct)")
    from custom.prepare.io import load_ct
    from custom.prepare.transforms import input_grid

    ct = load_ct(REAL_CT, axcodes="LAS")
    affine, shape = input_grid(REAL_CT, ct)
    out = _run_config(tmp_path, [{"subject_id": "A0001", "image": str(REAL_CT)}], _write_model(tmp_path / "m.pt"))
    assert shape == (512, 512, 64)
    _check_outputs(out, "A0001", affine, shape)


def _red_title_pixels(png) -> int:
    """Strongly red pixels in the top eighth of a picture (where the title and a warning banner go)."""
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    top = pixels[: max(1, pixels.shape[0] // 8)]
    return int(((top[..., 0] > 150) & (top[..., 1] < 70) & (top[..., 2] < 70)).sum())


@pytest.mark.slow
def test_a_model_trained_on_synthetic_data_warns_on_a_scan_that_is_not(demo_cohort, tmp_path):
    """The model card says the weights were trained on the SYNTHETIC cohort: a map of a scan that is not synthetic
    (the same voxels without the generator's mark) carries the warning in report.json, the CSV row and both
    pictures; the map of the synthetic scan itself does not."""
    from custom.emphysema.model_card import SYNTHETIC_WARNING, write_model_card
    from custom.synthetic.writer import is_synthetic_scan

    item = _demo_subject(demo_cohort)
    assert is_synthetic_scan(item["image"])
    model = _write_model(tmp_path / "model.pt")
    write_model_card(model, "annotations.csv", {item["subject_id"]: item["image"]}, boxes=12)
    image = nib.load(item["image"])
    unmarked = nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header.copy())
    unmarked.header["descrip"] = b"a scanner"
    nib.save(unmarked, str(tmp_path / "outside.nii.gz"))
    assert not is_synthetic_scan(tmp_path / "outside.nii.gz")
    outside = {"subject_id": "outside", "image": str(tmp_path / "outside.nii.gz"), "lung_mask": item["lung_mask"]}
    out = _run_config(tmp_path, [item, outside], model)
    rows = pd.read_csv(out / "emphysema_report.csv", dtype={"subject_id": str}).set_index("subject_id")
    for subject, warned in ((item["subject_id"], False), ("outside", True)):
        report = json.loads((out / subject / "report.json").read_text())
        assert report["model_trained_on"] == "SYNTHETIC demo cohort"
        assert report["warning"] == (SYNTHETIC_WARNING if warned else None)
        assert (rows.loc[subject, "warning"] == SYNTHETIC_WARNING) if warned else pd.isna(rows.loc[subject, "warning"])
        for name in ("emphysema_coronal.png", "emphysema_projection.png"):
            red = _red_title_pixels(out / subject / name)
            assert (red > 100) if warned else (red == 0), (subject, name, red)


def test_a_request_mapped_twice_gives_the_same_map_and_leaves_no_files(demo_cohort, tmp_path, monkeypatch):
    """What MONAI Label does per request (the inference config's preprocessing, inferer and postprocessing on
    ``{"image": path}``, no output folder named): the same scan twice gives the same map voxel for voxel (lung
    mask and registration are deterministic), the report comes back as the item's ``result``, and nothing is
    left on disk: not under ``output_dir``, not in the temporary folder the request wrote to."""
    import tempfile

    from monai.bundle import ConfigParser

    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    model = _write_model(tmp_path / "model.pt")
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update(
        {
            "output_dir": str(tmp_path / "out"),
            "model_path": str(model),
            "stride": 48,
            "min_stride": 48,
            "progress": False,
        }
    )
    preprocessing, inferer = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer")
    postprocessing = parser.get_parsed_content("postprocessing")
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(model))
    network.eval()
    item = _demo_subject(demo_cohort)
    maps, reports = [], []
    for _ in range(2):
        d = preprocessing({"image": item["image"]})
        d["pred"] = inferer(d["image"][None], network)[0]
        d = postprocessing(d)
        maps.append(np.asarray(d["pred"]))
        reports.append(d["result"]["report"])
        assert not any(temp_root.iterdir()), sorted(temp_root.rglob("*"))
    np.testing.assert_array_equal(maps[0], maps[1])
    assert reports[0]["regions"] == reports[1]["regions"]
    assert maps[0].shape == (1, *nib.load(item["image"]).shape)
    assert set(np.unique(maps[0])) <= set(range(len(MAP_LABELS))) and (maps[0] >= 1).any()
    assert reports[0]["regions"]["lung"]["volume_ml"] > 300
    assert not (tmp_path / "out").exists(), sorted((tmp_path / "out").rglob("*"))
