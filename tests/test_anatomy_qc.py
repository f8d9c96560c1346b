"""Anatomy QC (custom/prepare/anatomy_qc.py) on the shared real chest CT and on damaged versions of it.

Damaged versions are made on the scan's own grid (``custom.prepare.qc_damage``) and written as NIfTI: the field of
view cut 40 mm above the lung base, the voxel data flipped along each axis with the header kept, 10 mm slices.
Each goes through the real scan pipeline (LoadCTd -> LungMaskd -> RegisterToAtlasd: NIfTI I/O, antspyx). To keep
the module short the built-in lung segmentation runs once, on the unmodified DICOM series (the first test), and
the damaged versions carry that mask, damaged the same way, as a user lung mask.

Data: TCIA Lung-PET-CT-Dx, subject Lung_Dx-A0001 (CC BY 4.0). Li, P., et al. (2020). A Large-Scale CT and
PET/CT Dataset for Lung Cancer Diagnosis (Lung-PET-CT-Dx). The Cancer Imaging Archive.
https://doi.org/10.7937/TCIA.2020.NNC20461
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REAL_CT_SERIES as SERIES
from conftest import REPO_ROOT as REPO
from monai.bundle import ConfigParser
from monai.transforms import Compose

from custom.prepare import anatomy_qc, qc_damage
from custom.prepare.anatomy_qc import AnatomyQCError, assess, edge_shares
from custom.prepare.landmarks import RegistrationQCError
from custom.prepare.transforms import LoadCTd, LungMaskd, RegisterToAtlasd, run_transforms

needs_real_ct = pytest.mark.skipif(not SERIES.is_dir(), reason=f"real CT not found at {SERIES} (set DRASCLR_REAL_CT)")


# ----------------------------------------------------------------------------------------------- fast units
def test_edge_shares_see_a_cut_base_but_not_the_trachea():
    lung = np.zeros((60, 50, 80), dtype=bool)
    lung[10:25, 10:40, 0:70] = True  # right lung reaching the bottom face: cut off at the base
    lung[35:50, 10:40, 5:70] = True  # left lung, whole
    lung[28:32, 20:24, 70:80] = True  # a 16 mm^2 "trachea" leaving through the top face
    shares = edge_shares(lung, (1.0, 1.0, 1.0), "LAS", edge_mm=3.0, airway_mm2=500.0)
    assert shares["inferior"] == pytest.approx(15 * 30 / (2 * 15 * 30), abs=1e-3)  # one of two lungs' section
    assert shares["superior"] == 0.0  # the trachea is not lung cut off
    assert shares["left"] == shares["right"] == shares["anterior"] == shares["posterior"] == 0.0
    # without the airway allowance the trachea would count
    assert edge_shares(lung, (1.0, 1.0, 1.0), "LAS", airway_mm2=0.0)["superior"] > 0


def test_assess_fails_cut_off_and_flipped_unless_accepted_and_warns_on_thick_slices():
    good = {
        "dice": 0.9,
        "share_inside_lung": 0.58,
        "atlas_share_inside_lung": 0.64,
        "edge_share": {"inferior": 0.0, "superior": 0.0},
        "orientation_dice": {"none": 0.89, "left-right": 0.82, "anterior-posterior": 0.75, "head-feet": 0.65},
        "slice_mm": 1.0,
    }
    assert assess(good).status == "ok" and assess(good).reasons == []
    cut = {**good, "edge_share": {"inferior": 0.3, "superior": 0.0}}
    verdict = assess(cut)
    assert verdict.status == "failed" and "cut off at the inferior edge" in verdict.reasons[0]
    accepted = assess(cut, accept="cut_off")
    assert accepted.status == "warning" and accepted.reasons[0].endswith("(accepted)")
    # what the record says was let through only by ``accept`` (a later run must not reuse it without it)
    assert accepted.as_qc()["qc_accepted"] == ["cut_off"] and anatomy_qc.accepted_checks(accepted.as_qc()) == (
        "cut_off",
    )
    assert anatomy_qc.accepted_checks(assess(good, accept="cut_off,flipped").as_qc()) == ()
    older = {k: v for k, v in accepted.as_qc().items() if k != "qc_accepted"}  # an entry of an earlier version
    assert anatomy_qc.accepted_checks(older) == ("cut_off",)
    flipped = {
        **good,
        "orientation_dice": {"none": 0.70, "left-right": 0.68, "anterior-posterior": 0.66, "head-feet": 0.89},
    }
    assert "head-feet axis looks flipped" in assess(flipped).reasons[0]
    assert assess(flipped, accept=["flipped"]).status == "warning"
    assert assess(flipped, accept=["cut_off"]).status == "failed"
    thick = assess({**good, "slice_mm": 10.0})
    assert thick.status == "warning" and "slices 10 mm apart" in thick.reasons[0]
    assert assess({**good, "slice_mm": 5.0}).status == "ok"  # 5 mm is within what the method supports
    assert assess({**good, "dice": 0.4}, accept=anatomy_qc.ACCEPTABLE).status == "failed"  # never acceptable
    with pytest.raises(ValueError, match="unknown QC failure"):
        anatomy_qc.parse_accept(["thick"])


@pytest.mark.parametrize("name", ["prepare.yaml", "embed.yaml", "inference.yaml"])
def test_accept_is_one_override_for_every_workflow(name):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / name))
    assert parser.get_parsed_content("register").accept == ()
    parser.update({"register#accept": "['cut_off']", "register#max_slice_mm": 3})
    register = parser.get_parsed_content("register")
    assert isinstance(register, RegisterToAtlasd)
    assert register.accept == ("cut_off",) and register.limits.max_slice_mm == 3.0


# ----------------------------------------------------------------------------------------------- real CT
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The unmodified DICOM series through the default chain (built-in segmentation), and the damaged versions
    written as NIfTI with that lung mask damaged alike."""
    folder = tmp_path_factory.mktemp("real_ct_qc")
    chain = Compose([LoadCTd("image"), LungMaskd("image"), RegisterToAtlasd("image")])
    original = run_transforms(chain, {"image": str(SERIES)})
    lung = original["lung_mask"][0].numpy() > 0
    lung_affine = np.asarray(original["image"].affine, dtype=np.float64)
    array, affine = qc_damage.read_scan(SERIES)
    base, apex = qc_damage.lung_heights(lung, lung_affine)

    def write(case, image, image_affine, mask, mask_affine):
        return (
            qc_damage.write_nifti(image, image_affine, folder / f"{case}.nii"),  # uncompressed: quicker
            qc_damage.write_nifti(mask, mask_affine, folder / f"{case}_lung_mask.nii", mask=True),
        )

    versions = {
        "cut_inferior_40mm": write(
            "cut_inferior_40mm",
            *qc_damage.cut(array, affine, below_mm=base + 40),
            *qc_damage.cut(lung, lung_affine, below_mm=base + 40),
        ),
        "thick_10mm": write("thick_10mm", *qc_damage.thicken(array, affine, 10), lung, lung_affine),
    }
    for axis in range(3):
        versions[f"flip_{'xyz'[axis]}"] = write(
            f"flip_{'xyz'[axis]}", qc_damage.flip(array, axis), affine, qc_damage.flip(lung, axis), lung_affine
        )
    return {"original": original, "versions": versions, "loaded": {}}


def _loaded(real, case):
    """LoadCTd + LungMaskd of a damaged version (once per case)."""
    if case not in real["loaded"]:
        image, mask = real["versions"][case]
        chain = Compose([LoadCTd("image"), LungMaskd("image")])
        real["loaded"][case] = run_transforms(chain, {"image": str(image), "lung_mask": str(mask)})
    return real["loaded"][case]


@needs_real_ct
def test_the_unmodified_real_ct_is_ok(real):
    out = real["original"]
    qc = out["registration"]["qc"]
    assert qc["qc_status"] == "ok" and qc["qc_reasons"] == [], qc["qc_reasons"]
    assert out["image"].meta["qc_status"] == "ok"
    assert qc["dice"] > 0.85 and qc["share_ratio"] > 0.85
    assert max(qc["edge_share"].values()) < 0.01  # the trachea leaves through the top, the lungs do not
    assert qc["slice_mm"] == 5.0
    assert qc["flip_gain"] < -0.03  # every mirrored copy fits the atlas worse than the scan as given
    assert qc["qc_seconds"] < 15


@needs_real_ct
def test_lungs_cut_off_at_the_base_fail_naming_the_file_unless_accepted(real):
    data = _loaded(real, "cut_inferior_40mm")
    with pytest.raises(AnatomyQCError, match="lungs cut off at the inferior edge") as info:
        RegisterToAtlasd("image")(data)
    assert isinstance(info.value, RegistrationQCError)  # batch jobs record it as before
    assert "cut_inferior_40mm.nii: failed QC" in str(info.value) and "accept ['cut_off']" in str(info.value)
    assert info.value.qc["edge_share"]["inferior"] > 0.2
    accepted = RegisterToAtlasd("image", accept="cut_off", check_orientation=False)(data)
    assert accepted["image"].meta["qc_status"] == "warning"
    assert "(accepted)" in accepted["image"].meta["qc_reasons"]


@needs_real_ct
@pytest.mark.parametrize(
    "case, axis", [("flip_z", "head-feet"), ("flip_y", "anterior-posterior"), ("flip_x", "left-right")]
)
def test_flipped_voxel_data_fails_saying_which_axis(real, case, axis):
    with pytest.raises(AnatomyQCError, match=f"{axis} axis looks flipped") as info:
        RegisterToAtlasd("image")(_loaded(real, case))
    orientation = info.value.qc["orientation_dice"]
    assert orientation[axis] > orientation["none"] + 0.03
    assert f"{case}.nii" in str(info.value)


@needs_real_ct
def test_thick_slices_warn(real):
    out = RegisterToAtlasd("image", check_orientation=False)(_loaded(real, "thick_10mm"))
    qc = out["registration"]["qc"]
    assert qc["qc_status"] == "warning" and qc["slice_mm"] == 10.0
    assert any("slices 10 mm apart" in r for r in qc["qc_reasons"])
    assert out["image"].meta["qc_status"] == "warning"


# ----------------------------------------------------------------------------------------------- cohort sheet
def test_qc_sheet_orders_failed_then_warning_then_ok(tmp_path):
    """The sheet of a cache written by ``cache.write_subject_entry`` (two entries with pictures) plus a failed
    manifest row: qc.csv and the HTML list failed, warning, ok; the contact sheet is drawn."""
    from PIL import Image

    from custom.prepare import cache
    from custom.prepare.qc_figure import subject_png
    from custom.prepare.qc_sheet import write_qc_sheet

    hu = np.full((40, 40, 40), -1000.0, dtype=np.float32)
    lung = np.zeros(hu.shape, dtype=bool)
    lung[8:32, 8:32, 8:32] = True
    hu[lung] = -850.0
    landmarks = np.array([[20.0, 20.0, 20.0], [2.0, 2.0, 2.0]])
    rows = []
    for subject, status, reasons in (("a_fine", "ok", []), ("b_thick", "warning", ["slices 8 mm apart (> 5 mm)"])):
        qc = {
            "subject_id": subject,
            "source": f"{subject}.nii.gz",
            "dice": 0.9,
            "share_inside_lung": 0.6,
            "atlas_share_inside_lung": 0.64,
            "qc_status": status,
            "qc_reasons": reasons,
            "slice_mm": 2.0,
            "edge_share": {"inferior": 0.0, "superior": 0.0},
            "orientation_dice": {"none": 0.9, "head-feet": 0.7},
        }
        cache.write_subject_entry(
            tmp_path,
            subject,
            np.zeros((2, 32, 32, 32), np.int16),
            landmarks,
            b"mat",
            {},
            qc,
            extra_files={"qc.png": subject_png(hu, lung, landmarks, subject, qc=qc)},
        )
        rows.append({"subject_id": subject, "status": "ok", "path": subject, "source": qc["source"]})
    rows.append(
        {
            "subject_id": "c_cut",
            "status": "failed",
            "source": "c_cut.nii.gz",
            "path": "",
            "error": "c_cut.nii.gz: failed QC: lungs cut off at the inferior edge (42% ...) (to prepare it "
            "anyway: register accept ['cut_off'])",
        }
    )
    manifest = cache.write_manifest(tmp_path, rows)
    assert manifest.qc_status.tolist() == ["ok", "warning", "failed"]
    assert manifest.qc_reason.tolist()[2] == "lungs cut off at the inferior edge (42% ...)"

    paths = write_qc_sheet(tmp_path)
    sheet = pd.read_csv(paths["csv"], keep_default_na=False)
    assert sheet.subject_id.tolist() == ["c_cut", "b_thick", "a_fine"]
    assert sheet.picture.tolist() == ["", "b_thick/qc.png", "a_fine/qc.png"]
    assert [float(v) for v in sheet.flip_gain[1:]] == [pytest.approx(-0.2)] * 2 and sheet.flip_gain[0] == ""
    page = paths["html"].read_text()
    assert page.index("c_cut") < page.index("b_thick") < page.index("a_fine") and "1 failed, 1 warning, 1 ok" in page
    with Image.open(paths["png"]) as image:
        assert image.size[0] > 600


@pytest.mark.slow  # three phantoms prepared end to end (~30 s on 2 cores)
def test_cohort_qc_sheet_lists_flagged_subjects_first(tmp_path):
    """Three phantoms (affine images of the atlas lung, custom.prepare.phantom) through prepare_cohort: one as
    made, one with its voxel data flipped head-feet, one resampled to 8 mm slices."""
    from PIL import Image

    from custom.prepare.phantom import make_phantom
    from custom.prepare.workflow import prepare_cohort

    scans = tmp_path / "scans"
    small = dict(spacing_mm=4.0, scale_range=(1.45, 1.55))  # about 2/3 of the atlas lung size: quick
    make_phantom(scans / "a_good.nii.gz", seed=10, **small)
    make_phantom(scans / "source.nii.gz", seed=11, **small)
    array, affine = qc_damage.read_scan(scans / "source.nii.gz")
    qc_damage.write_nifti(qc_damage.flip(array, 2), affine, scans / "b_flipped.nii.gz")
    qc_damage.write_nifti(*qc_damage.thicken(array, affine, 8), scans / "c_thick.nii.gz")
    (scans / "source.nii.gz").unlink()

    cache_dir = tmp_path / "cache"
    manifest = prepare_cohort(scans, cache_dir, progress=False).set_index("subject_id")
    assert manifest.loc["a_good", "qc_status"] == "ok" and manifest.loc["a_good", "status"] == "ok"
    assert manifest.loc["b_flipped", "status"] == "failed" and manifest.loc["b_flipped", "qc_status"] == "failed"
    assert "head-feet axis looks flipped" in manifest.loc["b_flipped", "error"]
    assert manifest.loc["c_thick", "status"] == "ok" and manifest.loc["c_thick", "qc_status"] == "warning"
    assert "slices 8 mm apart" in manifest.loc["c_thick", "qc_reason"]

    sheet = pd.read_csv(cache_dir / "qc.csv", keep_default_na=False)
    assert list(sheet.subject_id) == ["b_flipped", "c_thick", "a_good"]  # failed, warning, ok
    assert list(sheet.qc_status) == ["failed", "warning", "ok"]
    assert sheet.picture.tolist() == [".qc_failed/b_flipped.png", "c_thick/qc.png", "a_good/qc.png"]
    for picture in sheet.picture:
        with Image.open(cache_dir / picture) as image:
            assert image.size[0] > 300
    assert json.loads((cache_dir / "c_thick" / "qc.json").read_text())["qc_status"] == "warning"
    page = (cache_dir / "qc_sheet.html").read_text()
    assert page.index("b_flipped") < page.index("c_thick") < page.index("a_good")
    with Image.open(cache_dir / "qc_sheet.png") as image:
        assert image.size[0] > 600 and image.size[1] > 200


@pytest.mark.slow  # one phantom prepared twice, decided three times (~30 s on 2 cores)
def test_an_entry_prepared_by_accepting_a_cut_off_is_not_reused_by_a_run_that_does_not_accept_it(tmp_path):
    """``--register#accept "['cut_off']"`` lets a cut-off scan into the cache as a warning; a later run without
    that accept must fail it with the real reason instead of reusing the entry, and a run accepting it again
    reuses the entry."""
    from custom.prepare import cache
    from custom.prepare.phantom import make_phantom
    from custom.prepare.workflow import prepare_cohort

    scans, cache_dir = tmp_path / "scans", tmp_path / "cache"
    make_phantom(
        tmp_path / "source.nii.gz", seed=12, spacing_mm=4.0, scale_range=(1.45, 1.55), lung_mask_path=tmp_path / "m.nii"
    )
    array, affine = qc_damage.read_scan(tmp_path / "source.nii.gz")
    lung, lung_affine = qc_damage.read_scan(tmp_path / "m.nii")
    base, _ = qc_damage.lung_heights(lung > 0, lung_affine)
    qc_damage.write_nifti(*qc_damage.cut(array, affine, below_mm=base + 30), scans / "cut.nii.gz")
    cut_lung, cut_affine = qc_damage.cut(lung, lung_affine, below_mm=base + 30)  # the built-in segmentation drops
    qc_damage.write_nifti(cut_lung, cut_affine, scans / "cut_lung_mask.nii.gz", mask=True)  # air at the border

    def chain(accept):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundle" / "configs" / "prepare.yaml"))
        parser["register#accept"] = accept
        return parser.get_parsed_content("scan_pipeline")

    first = prepare_cohort(scans, cache_dir, transforms=chain(["cut_off"]), progress=False).iloc[0]
    assert first.status == "ok" and first.qc_status == "warning" and "(accepted)" in first.qc_reason
    assert cache.read_qc(cache_dir / "cut")["qc_accepted"] == ["cut_off"]

    second = prepare_cohort(scans, cache_dir, progress=False).iloc[0]  # the default: nothing accepted
    assert second.status == "failed" and not second.reused, second.to_dict()
    assert "lungs cut off at the inferior edge" in second.error and second.qc_status == "failed"
    assert pd.read_csv(cache_dir / "failures.csv", dtype=str).subject_id.tolist() == ["cut"]

    third = prepare_cohort(scans, cache_dir, transforms=chain("cut_off,flipped"), progress=False).iloc[0]
    assert third.status == "ok" and third.reused and third.qc_status == "warning"


@pytest.mark.slow  # two phantoms through the emphysema inference, in two runs (~1 min on 2 cores)
def test_emphysema_inference_writes_the_cohort_qc_sheet_merged_over_runs(tmp_path):
    """The inference config maps a small phantom, then (a second run into the same output_dir) fails its copy
    with the voxel data flipped head-feet: the QC sheet there lists both, the failure first with its reason and
    picture, the first run's subject kept."""
    import torch
    from monai.bundle import ConfigWorkflow
    from PIL import Image

    from custom.emphysema.network import EmphysemaDetectors
    from custom.prepare.phantom import make_phantom

    small = dict(spacing_mm=4.0, scale_range=(1.45, 1.55))
    make_phantom(tmp_path / "good.nii.gz", seed=10, **small)
    array, affine = qc_damage.read_scan(tmp_path / "good.nii.gz")
    qc_damage.write_nifti(qc_damage.flip(array, 2), affine, tmp_path / "flipped.nii.gz")
    torch.manual_seed(0)
    torch.save(EmphysemaDetectors().state_dict(), tmp_path / "model.pt")
    out = tmp_path / "maps"

    def infer(subject_id, image):
        workflow = ConfigWorkflow(
            config_file=str(REPO / "bundle" / "configs" / "inference.yaml"),
            workflow_type="infer",
            logging_file=None,
            input=[{"subject_id": subject_id, "image": str(image)}],
            output_dir=str(out),
            model_path=str(tmp_path / "model.pt"),
            stride=48,
            min_stride=48,
            progress=False,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        return pd.read_csv(out / "qc.csv", dtype={"subject_id": str}, keep_default_na=False)

    first = infer("a_good", tmp_path / "good.nii.gz")
    assert first.subject_id.tolist() == ["a_good"] and first.qc_status.tolist() == ["ok"]
    assert first.picture.tolist() == ["a_good/qc.png"] and float(first.dice[0]) > 0.8
    assert json.loads((out / "a_good" / "qc.json").read_text())["qc_status"] == "ok"

    sheet = infer("b_flipped", tmp_path / "flipped.nii.gz")
    assert sheet.subject_id.tolist() == ["b_flipped", "a_good"]  # failed first; the earlier run's row kept
    assert sheet.qc_status.tolist() == ["failed", "ok"]
    assert sheet.qc_reason[0].startswith("head-feet axis looks flipped"), sheet.qc_reason[0]
    assert sheet.picture.tolist() == [".qc_failed/b_flipped.png", "a_good/qc.png"]
    for picture in sheet.picture:
        with Image.open(out / picture) as image:
            assert image.size[0] > 300
    page = (out / "qc_sheet.html").read_text()
    assert "Emphysema inference QC" in page and page.index("b_flipped") < page.index("a_good")
    with Image.open(out / "qc_sheet.png") as image:
        assert image.size[0] > 600


@needs_real_ct
@pytest.mark.slow  # two damaged real CTs through prepare and through emphysema inference (~1 min on 2 cores)
def test_inference_fails_damaged_scans_with_the_reason_prepare_gives(real, tmp_path):
    """A flipped and a cut-off real CT fail in the emphysema inference too (the same scan pipeline), and each
    failure row carries the reason prepare records for the same file, not a transform's repr."""
    import torch
    from monai.bundle import ConfigWorkflow

    from custom.emphysema.network import EmphysemaDetectors
    from custom.prepare.workflow import prepare_cohort

    items = [
        {"subject_id": case, "image": str(real["versions"][case][0]), "lung_mask": str(real["versions"][case][1])}
        for case in ("flip_z", "cut_inferior_40mm")
    ]
    cohort = tmp_path / "cohort.csv"
    pd.DataFrame(items).to_csv(cohort, index=False)
    prepare_cohort(cohort, tmp_path / "prepared", progress=False)
    prepared = pd.read_csv(tmp_path / "prepared" / "failures.csv", dtype=str).set_index("subject_id")

    torch.save(EmphysemaDetectors().state_dict(), tmp_path / "model.pt")
    workflow = ConfigWorkflow(
        config_file=str(REPO / "bundle" / "configs" / "inference.yaml"),
        workflow_type="infer",
        logging_file=None,
        input=items,
        output_dir=str(tmp_path / "maps"),
        model_path=str(tmp_path / "model.pt"),
        progress=False,
        pictures=False,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    mapped = pd.read_csv(tmp_path / "maps" / "failures.csv", dtype=str).set_index("subject_id")
    assert sorted(mapped.index) == sorted(prepared.index) == ["cut_inferior_40mm", "flip_z"]
    assert "head-feet axis looks flipped" in mapped.loc["flip_z", "error"]
    assert "lungs cut off at the inferior edge" in mapped.loc["cut_inferior_40mm", "error"]
    for case in mapped.index:
        assert mapped.loc[case, "error"] == prepared.loc[case, "error"], case
        assert "object at 0x" not in mapped.loc[case, "error"]
