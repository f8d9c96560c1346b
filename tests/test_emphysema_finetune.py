"""Emphysema fine-tuning and box detection: annotation mapping, labelled patches, the 25 % rule, folds, training.

The cohort-based tests use the shared SYNTHETIC ``demo_cohort`` fixture (generated + prepared once per session)
and are marked slow; the rule, the folds and the table checks run on small arrays and are fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hand_cut_box_inputs
from scipy import ndimage

from custom.data.intensity import hu_to_network
from custom.data.location import CORNER_MAX
from custom.emphysema.annotations import (
    AnnotationError,
    map_annotations,
    read_annotations,
)
from custom.emphysema.cross_validation import annotation_subset, subject_folds
from custom.emphysema.detection_rule import (
    DetectionRule,
    box_offsets,
    box_predictions,
    box_probabilities,
    positive_shares,
    subtype_scores,
)
from custom.emphysema.detection_tables import summarise
from custom.emphysema.folded_classifier import FoldedDetectors
from custom.emphysema.labelled_patches import LabelledPatches, load_labelled_patches
from custom.emphysema.network import EMPHYSEMA_CLASSES, EmphysemaDetectors, EmphysemaNetwork
from custom.emphysema.random_location import RandomLocations, with_random_locations
from custom.model.network import DrasCLRNetwork
from custom.synthetic.labels import EMPHYSEMA_CODES

SUBTYPE_CODE = {"centrilobular": 1, "paraseptal": 2}


def _prepared_dir(tmp_path, subjects=("S1",), shape=(60, 60, 60)):
    """A prepared-cache skeleton in the documented format: manifest.csv + <id>/transform.json."""
    root = tmp_path / "prepared"
    rows = []
    for sid in subjects:
        (root / sid).mkdir(parents=True)
        affine = np.diag([-1.0, 1.0, 1.0, 1.0])
        affine[:3, 3] = [30.0, -30.0, -30.0]
        payload = {
            "subject_affine_ras": affine.tolist(),
            "subject_shape": list(shape),
            "subject_to_atlas_vox": np.eye(4).tolist(),
            "atlas_to_subject_vox": np.eye(4).tolist(),
        }
        (root / sid / "transform.json").write_text(pd.Series(payload).to_json())
        rows.append({"subject_id": sid, "status": "ok", "source": "x.nii.gz", "lung_mask": "auto", "path": sid})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def _write(tmp_path, text, name="boxes.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- annotations: errors name the file
def test_missing_column_error_names_the_file(tmp_path):
    path = _write(tmp_path, "subject_id,label,centre_x_mm,centre_y_mm\nS1,healthy,0,0\n")
    with pytest.raises(AnnotationError, match=r"boxes\.csv.*centre_z_mm"):
        read_annotations(path)


def test_unknown_label_unprepared_subject_and_outside_centre_are_named(tmp_path):
    prepared = _prepared_dir(tmp_path)
    header = "subject_id,label,centre_x_mm,centre_y_mm,centre_z_mm\n"
    with pytest.raises(AnnotationError, match=r"boxes\.csv.*'panlobular'.*lines \[3\]"):
        read_annotations(_write(tmp_path, header + "S1,healthy,0,0,0\nS1,Panlobular,0,0,0\n"))
    with pytest.raises(AnnotationError, match=r"other\.csv.*\['S9'\].*not prepared"):
        map_annotations(_write(tmp_path, header + "S1,healthy,0,0,0\nS9,healthy,0,0,0\n", "other.csv"), prepared)
    with pytest.raises(AnnotationError, match=r"far\.csv.*line\(s\) \[3\].*outside its scan"):
        map_annotations(_write(tmp_path, header + "S1,healthy,0,0,0\nS1,healthy,500,0,0\n", "far.csv"), prepared)


def test_world_centres_map_to_voxels_in_ras_and_lps(tmp_path):
    prepared = _prepared_dir(tmp_path)
    # voxel (10, 20, 30): RAS x = 30 - 10 = 20, y = -30 + 20 = -10, z = -30 + 30 = 0
    table = pd.DataFrame(
        {
            "subject_id": ["S1"],
            "label": ["CentriLobular"],
            "centre_x_mm": [20.2],
            "centre_y_mm": [-10.0],
            "centre_z_mm": [0.0],
        }
    )
    mapped = map_annotations(table, prepared)
    assert mapped[["voxel_x", "voxel_y", "voxel_z"]].iloc[0].tolist() == [10, 20, 30]
    assert mapped["label"].iloc[0] == "centrilobular"
    lps = table.assign(centre_x_mm=-20.0, centre_y_mm=10.0)
    assert map_annotations(lps, prepared, "LPS")[["voxel_x", "voxel_y", "voxel_z"]].iloc[0].tolist() == [10, 20, 30]


# ---------------------------------------------------------------- the detection rule
def _random_boxes(n=3, seed=0, labels=None, subjects=None):
    """A small labelled patch set from random HU regions with a rotated, shifted region-to-atlas map."""
    rng = np.random.default_rng(seed)
    regions = rng.normal(-700, 250, (n, 64, 64, 64)).clip(-1024, 400).astype(np.int16)
    matrices = []
    for k in range(n):
        angle = 0.1 * (k + 1)
        m = np.eye(4)
        m[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        m[:3, 3] = [100 + 10 * k, 120, 90]
        matrices.append(m)
    labels = np.arange(n) % 3 if labels is None else np.asarray(labels)
    subjects = [f"S{k}" for k in range(n)] if subjects is None else subjects
    table = pd.DataFrame({"subject_id": subjects, "label": [EMPHYSEMA_CLASSES[k] for k in labels]})
    return LabelledPatches(regions, np.ones_like(regions, dtype=bool), np.stack(matrices), labels, table)


def _brute_force_probabilities(network, boxes, index, stride):
    """Cut every evaluated patch from the stored region by hand and run the network on it alone."""
    with torch.no_grad():
        return np.stack(
            [torch.softmax(network(x[None]), 1)[0].numpy() for x in hand_cut_box_inputs(boxes, index, stride)]
        )


def test_each_detector_trains_on_its_own_boxes_only():
    """The map model's training (``DetectorTrainingStep`` + ``DetectorLoss`` in a MONAI SupervisedTrainer): the
    loss is the sum of each detector's cross-entropy on healthy vs its subtype's boxes, and a detector whose task
    has no box in the data is left exactly as it was, BatchNorm statistics included."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from custom.emphysema.finetune import DetectorLoss, DetectorTrainingStep, training_setup

    torch.manual_seed(0)
    network = EmphysemaDetectors(num_experts=2)
    boxes = _random_boxes(4, labels=[0, 1, 0, 1])  # healthy and centrilobular only
    loader, module = training_setup(boxes, network, batch_size=4)
    loss_function = DetectorLoss(network.subtypes, boxes.labels)
    x = torch.stack([boxes.inputs(i) for i in range(4)])
    untouched = {k: v.clone() for k, v in network.detectors["paraseptal"].state_dict().items()}
    before = {k: v.clone() for k, v in network.detectors["centrilobular"].state_dict().items()}
    with torch.no_grad():  # the loss of the first step, by hand (train mode: batch statistics)
        network.train()
        cle = network.detectors["centrilobular"](x)
        pse = network.detectors["paraseptal"](x[[0, 2]])
        expected = torch.nn.functional.cross_entropy(
            cle, torch.tensor([0, 1, 0, 1])
        ) + torch.nn.functional.cross_entropy(pse, torch.tensor([0, 0]))
    network.load_state_dict(
        {
            **{f"detectors.centrilobular.{k}": v for k, v in before.items()},
            **{f"detectors.paraseptal.{k}": v for k, v in untouched.items()},
        }
    )
    losses = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=module,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-2),
        loss_function=loss_function,
        iteration_update=DetectorTrainingStep(),
        decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)
    after = network.detectors["centrilobular"].state_dict()
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    # data with no box of the paraseptal task (no healthy, no paraseptal box): that detector does not move at all
    torch.manual_seed(0)
    network = EmphysemaDetectors(num_experts=2)
    only_cle = _random_boxes(4, labels=[1, 1, 1, 1])
    loader, module = training_setup(only_cle, network, batch_size=4)
    untouched = {k: v.clone() for k, v in network.detectors["paraseptal"].state_dict().items()}
    SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=module,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-2),
        loss_function=DetectorLoss(network.subtypes, only_cle.labels),
        iteration_update=DetectorTrainingStep(),
        decollate=False,
    ).run()
    assert all(torch.equal(v, untouched[k]) for k, v in network.detectors["paraseptal"].state_dict().items())
    assert not torch.equal(network.detectors["centrilobular"].classifier.weight, before["classifier.weight"])


def test_box_offsets_cover_the_box():
    exact = box_offsets(1)
    assert exact.shape == (32**3, 3) and exact.min() == -16 and exact.max() == 15
    assert box_offsets(32).tolist() == [[0, 0, 0]]
    assert sorted(set(box_offsets(16)[:, 0])) == [-8, 8]
    assert sorted(set(box_offsets(8)[:, 2])) == [-12, -4, 4, 12]
    with pytest.raises(ValueError):
        box_offsets(0)


def test_detection_rule_equals_brute_force():
    torch.manual_seed(0)
    network = EmphysemaNetwork().eval()
    boxes = _random_boxes(3)
    probabilities = box_probabilities(network, boxes, stride=16, batch_size=16)  # 2 boxes share a batch
    assert probabilities.shape == (3, 8, 3)
    brute = [_brute_force_probabilities(network, boxes, index, stride=16) for index in range(3)]
    for index in range(3):
        np.testing.assert_allclose(probabilities[index], brute[index], atol=2e-5)
    # a threshold at the median of p(centrilobular) makes the box shares non-trivial
    threshold = float(np.median(probabilities[..., 1]))
    predictions = box_predictions(network, boxes, stride=16, batch_size=16, threshold=threshold)
    brute_shares = np.array([(b[:, 1] > threshold).mean() for b in brute])
    np.testing.assert_allclose(predictions["share_centrilobular"], brute_shares)
    assert 0 < brute_shares.max() and brute_shares.min() < 1
    assert (predictions["detected_centrilobular"] == (brute_shares >= 0.25)).all()
    rule = DetectionRule(stride=16, threshold=threshold, batch_size=16)  # the config component: same calls
    pd.testing.assert_frame_equal(rule.predict(network, boxes), predictions)
    assert rule.describe().endswith("(stride 16: 8 voxels per box)")


def test_shares_scores_and_summary():
    probabilities = np.zeros((2, 4, 3))
    probabilities[0, :1, 1] = 0.9  # 1 of 4 voxels above 0.5 -> share 0.25 -> detected
    probabilities[1, :, 1] = 0.5  # not > 0.5
    np.testing.assert_allclose(positive_shares(probabilities)[:, 1], [0.25, 0.0])
    frame = pd.DataFrame(
        {
            "label": ["centrilobular", "centrilobular", "healthy", "healthy", "paraseptal"],
            "detected_centrilobular": [True, False, True, False, True],
            "detected_paraseptal": [False] * 5,
        }
    )
    scores = subtype_scores(frame, "centrilobular")  # the paraseptal box is not part of this comparison
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["n_healthy"] == 2
    assert np.isnan(subtype_scores(frame, "paraseptal")["precision"])  # no positive call: undefined
    folds = pd.DataFrame(
        {
            "experiment": "a",
            "scheme": "s",
            "init": "p",
            "fraction": 1.0,
            "subtype": "x",
            "f1": [0.5, 1.0, np.nan],
            "precision": [1, 1, 1],
            "recall": [0.2, 0.4, 0.6],
        }
    )
    row = summarise(folds).iloc[0]
    assert row["f1_n_folds"] == 2 and row["f1_mean"] == 0.75 and row["f1_text"] == "0.75 ± 0.35"


def test_folds_never_share_a_subject_and_subsets_nest():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 1, 0, 1, 1, 2, 0, 0])
    subjects = ["A", "A", "B", "C", "C", "D", "D", "D", "E", "F", "G", "G", "H", "H", "I", "J"]
    boxes = LabelledPatches(
        np.zeros((16, 1, 1, 1)),
        np.zeros((16, 1, 1, 1), bool),
        np.zeros((16, 4, 4)),
        labels,
        pd.DataFrame({"subject_id": subjects}),
    )
    folds = subject_folds(boxes, n_splits=5, seed=0)
    assert len(folds) == 5
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(16))  # every box tested exactly once
    ids = np.asarray(subjects)
    for train, test in folds:
        assert not set(ids[train]) & set(ids[test])
    train = folds[0][0]
    small, large = (annotation_subset(labels, train, f, seed=3) for f in (0.3, 0.7))
    assert set(small) <= set(large) <= set(train)
    assert set(labels[small]) == set(labels[train])  # every class kept
    assert len(annotation_subset(labels, train, 1.0)) == len(train)
    with pytest.raises(ValueError, match="at least 2 subjects"):
        subject_folds(
            LabelledPatches(
                boxes.regions[:2],
                boxes.lungs[:2],
                boxes.region_to_atlas[:2],
                labels[:2],
                pd.DataFrame({"subject_id": ["A", "A"]}),
            )
        )


@pytest.mark.parametrize("source", ["lung", "landmarks"])
def test_random_locations_come_from_the_lung_or_the_landmarks(source):
    """Table 7 moves every box, whole, to a random atlas point: a lung voxel (the paper's random coordinate in the
    lung) or a landmark centre (only locations seen in pre-training)."""
    from custom.data.atlas import atlas_mask_path, landmark_centres
    from custom.emphysema.labelled_patches import CENTRE_IN_REGION

    boxes = _random_boxes(40)
    moved = RandomLocations(seed=2, source=source).apply(boxes)
    np.testing.assert_array_equal(moved.region_to_atlas, with_random_locations(boxes, 2, source=source).region_to_atlas)
    centres = np.stack([(m @ np.r_[[CENTRE_IN_REGION] * 3, 1.0])[:3] for m in moved.region_to_atlas])
    if source == "lung":
        mask = np.asarray(nib.load(str(atlas_mask_path())).dataobj) > 0
        assert mask[tuple(np.rint(centres).astype(int).T)].all()
    else:
        landmarks = {tuple(c) for c in landmark_centres().astype(float).tolist()}
        assert all(tuple(c) in landmarks for c in np.round(centres, 6).tolist())
    assert len(np.unique(np.round(centres), axis=0)) > 30  # drawn, not one point
    np.testing.assert_allclose(moved.region_to_atlas[:, :3, :3], boxes.region_to_atlas[:, :3, :3])  # same layout
    with pytest.raises(ValueError, match="source must be one of"):
        RandomLocations(source="anywhere")


def test_random_locations_change_only_what_a_location_conditioned_encoder_sees():
    """Moved boxes keep their image: an encoder without location conditioning embeds them exactly as before, a
    Loc-CondConv encoder does not."""
    boxes = _random_boxes(3)
    moved = with_random_locations(boxes, seed=5)
    before = torch.stack([boxes.inputs(i) for i in range(3)])
    after = torch.stack([moved.inputs(i) for i in range(3)])
    assert torch.equal(before[:, 0], after[:, 0]) and not torch.equal(before[:, 1:], after[:, 1:])
    torch.manual_seed(0)
    plain, conditioned = DrasCLRNetwork(conditioning="none").eval(), DrasCLRNetwork().eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(after), plain(before), rtol=1e-6, atol=1e-6)
        h, g = conditioned(before), conditioned(after)
    assert (h - g).abs().max() > 1e-2 * h.abs().max()  # relative: the initialisation sets the scale


# ---------------------------------------------------------------- on the SYNTHETIC demo cohort (slow)
def _ground_truth_code(cohort, subject_id, prepared_affine, voxels):
    """Lesion code of the ground-truth label map at prepared-grid voxels, through the two affines."""
    image = nib.load(str(cohort / "synthetic" / "labels" / f"{subject_id}_lesions.nii.gz"))
    world = prepared_affine @ np.c_[voxels, np.ones(len(voxels))].T
    index = np.rint(np.linalg.solve(image.affine, world).T[:, :3]).astype(int)
    return np.asarray(image.dataobj)[index[:, 0], index[:, 1], index[:, 2]]


@pytest.mark.slow
def test_annotation_centres_land_on_their_lesions(demo_cohort):
    import json

    mapped = map_annotations(demo_cohort / "synthetic" / "annotations.csv", demo_cohort / "prepared")
    lesion = mapped[mapped["label"] != "healthy"]
    assert len(lesion) >= 6
    hits = []
    for subject_id, rows in lesion.groupby("subject_id"):
        affine = np.asarray(
            json.loads((demo_cohort / "prepared" / subject_id / "transform.json").read_text())["subject_affine_ras"]
        )
        codes = _ground_truth_code(demo_cohort, subject_id, affine, rows[["voxel_x", "voxel_y", "voxel_z"]].to_numpy())
        hits += list(codes == rows["label"].map(SUBTYPE_CODE).to_numpy())
    assert np.mean(hits) >= 0.9, np.mean(hits)


def _healthy_boxes(cohort, subject_id: str, count: int) -> pd.DataFrame:
    """``count`` healthy box rows of ``subject_id``: centres of 32 mm boxes free of emphysema in the ground truth
    and almost all lung, spread over the candidates."""
    image = nib.load(str(cohort / "synthetic" / "labels" / f"{subject_id}_lesions.nii.gz"))
    lesion = np.asarray(image.dataobj)
    lung = np.asarray(nib.load(str(cohort / "synthetic" / "lungs" / f"{subject_id}_lung.nii.gz")).dataobj) > 0
    box = round(32 / abs(float(image.affine[0, 0])))
    free = ndimage.uniform_filter(np.isin(lesion, EMPHYSEMA_CODES).astype(np.float32), box) == 0
    inside = ndimage.uniform_filter(lung.astype(np.float32), box) > 0.9
    candidates = np.argwhere(free & inside & lung)
    picks = candidates[np.linspace(0, len(candidates) - 1, count).astype(int)]
    world = (image.affine @ np.c_[picks, np.ones(count)].T).T[:, :3]
    return pd.DataFrame(
        {
            "subject_id": subject_id,
            "label": "healthy",
            "centre_x_mm": world[:, 0],
            "centre_y_mm": world[:, 1],
            "centre_z_mm": world[:, 2],
        }
    )


@pytest.fixture(scope="module")
def cohort_boxes(demo_cohort, tmp_path_factory):
    """3 centrilobular boxes of SYN0001 (the generator's) + 3 emphysema-free healthy boxes of SYN0000 picked from
    the ground truth; labelled patches built (CTs reloaded) and cached."""
    root = tmp_path_factory.mktemp("boxes")
    table = pd.read_csv(demo_cohort / "synthetic" / "annotations.csv")
    cle = table[(table.subject_id == "SYN0001") & (table.label == "centrilobular")].head(3)
    healthy = _healthy_boxes(demo_cohort, "SYN0000", 3)
    path = root / "annotations.csv"
    pd.concat([cle[healthy.columns], healthy]).to_csv(path, index=False)
    patches = load_labelled_patches(path, demo_cohort / "prepared", cache_path=root / "boxes.npz")
    pretrained = root / "pretrained.pt"
    from custom.model.network import DrasCLRNetwork

    torch.manual_seed(1)
    network = DrasCLRNetwork().train()
    for module in network.modules():  # BatchNorm statistics of lung patches, as a pre-trained encoder has them
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None  # cumulative: one pass sets them to these patches' statistics
    with torch.no_grad():
        network(torch.stack([patches.inputs(i) for i in range(len(patches))]))
    torch.save(network.state_dict(), pretrained)
    return {
        "annotations": path,
        "patches": patches,
        "cache": root / "boxes.npz",
        "pretrained": pretrained,
        "prepared": demo_cohort / "prepared",
        "root": root,
    }


@pytest.mark.slow
def test_labelled_patches_are_the_dense_network_input_and_cached(cohort_boxes, monkeypatch):
    from custom.emphysema import labelled_patches as module
    from custom.prepare.io import load_ct

    patches = cohort_boxes["patches"]
    assert patches.labels.tolist() == [1, 1, 1, 0, 0, 0]
    assert (patches.table["lung_share_in_box"].iloc[3:] > 0.8).all()
    # the centre patch is the CT around the mapped voxel and the atlas location of that voxel
    subject = module.load_prepared_subject(cohort_boxes["prepared"], "SYN0001")
    hu = load_ct(subject.source).hu
    c = patches.table[["voxel_x", "voxel_y", "voxel_z"]].iloc[0].to_numpy(dtype=np.int64)
    x = patches.inputs(0).numpy()
    expected = hu_to_network(hu[c[0] - 16 : c[0] + 16, c[1] - 16 : c[1] + 16, c[2] - 16 : c[2] + 16])
    np.testing.assert_allclose(x[0], expected, atol=0.5 / 632 + 1e-6)  # HU stored as int16, as in patches.npy
    atlas = (subject.subject_to_atlas_vox @ np.r_[c, 1.0])[:3]
    np.testing.assert_allclose(x[1:, 5, 6, 7], 2.0 * (atlas - 16.0) / np.asarray(CORNER_MAX) - 1.0, atol=1e-5)
    # a second load reads the cache and never reloads a CT
    monkeypatch.setattr(module, "_subject_volumes", lambda *a: pytest.fail("CT reloaded despite the cache"))
    again = load_labelled_patches(cohort_boxes["annotations"], cohort_boxes["prepared"], cohort_boxes["cache"])
    assert np.array_equal(again.regions, patches.regions) and again.labels.tolist() == patches.labels.tolist()


@pytest.mark.slow
def test_linear_readout_learns_and_keeps_the_encoder(cohort_boxes):
    from custom.emphysema.finetune import emphysema_network, finetune

    patches, pretrained = cohort_boxes["patches"], cohort_boxes["pretrained"]
    before = emphysema_network(pretrained, freeze_encoder=True).encoder.state_dict()
    run = finetune(patches, pretrained_path=pretrained, freeze_encoder=True, epochs=25, lr=1e-2, batch_size=3)
    assert run.epoch_losses[-1] < 0.8 * run.epoch_losses[0], run.epoch_losses
    after = run.network.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    again = finetune(patches, pretrained_path=pretrained, freeze_encoder=True, epochs=25, lr=1e-2, batch_size=3)
    assert torch.equal(run.network.classifier.weight, again.network.classifier.weight)  # deterministic


@pytest.mark.slow
def test_full_finetuning_changes_the_encoder_and_writes_a_loadable_model(cohort_boxes, tmp_path):
    from custom.emphysema.finetune import (
        emphysema_network,
        finetune,
        load_emphysema_model,
    )

    patches, pretrained = cohort_boxes["patches"], cohort_boxes["pretrained"]
    before = {k: v.detach().clone() for k, v in emphysema_network(pretrained).encoder.named_parameters()}
    model_path = tmp_path / "models" / "model.pt"
    run = finetune(
        patches,
        pretrained_path=pretrained,
        freeze_encoder=False,
        epochs=1,
        lr=1e-3,
        batch_size=3,
        model_path=model_path,
    )
    assert all(np.isfinite(run.epoch_losses))
    after = dict(run.network.encoder.named_parameters())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, changed  # the weights learn, not only the BatchNorm statistics
    loaded = load_emphysema_model(model_path)
    x = torch.stack([patches.inputs(i) for i in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), run.network(x))
    assert not list(model_path.parent.glob(".tmp-*"))


@pytest.fixture(scope="module")
def detection_boxes(demo_cohort, cohort_boxes):
    """For the detection CV: 2 centrilobular boxes of SYN0001 and of SYN0002 (the generator's) + emphysema-free
    healthy boxes of SYN0000 (2), SYN0001 (2) and SYN0002 (2), so that with 2 subject-grouped folds every training
    part holds both classes of the centrilobular task (the small cohort has no paraseptal box)."""
    root = cohort_boxes["root"] / "detection"
    root.mkdir(exist_ok=True)
    table = pd.read_csv(demo_cohort / "synthetic" / "annotations.csv")
    cle = table[table.subject_id.isin(["SYN0001", "SYN0002"]) & (table.label == "centrilobular")]
    cle = cle.groupby("subject_id").head(2)
    healthy = pd.concat([_healthy_boxes(demo_cohort, s, 2) for s in ("SYN0000", "SYN0001", "SYN0002")])
    path = root / "annotations.csv"
    pd.concat([cle[healthy.columns], healthy]).to_csv(path, index=False)
    patches = load_labelled_patches(path, demo_cohort / "prepared", cache_path=root / "boxes.npz")
    assert sorted(patches.table["label"].value_counts().items()) == [("centrilobular", 4), ("healthy", 6)]
    return {"annotations": path, "cache": root / "boxes.npz", "patches": patches}


@pytest.mark.slow
def test_bundle_configs_finetune_and_detection(cohort_boxes, detection_boxes, tmp_path):
    from monai.bundle import run

    common = {
        "annotations": str(cohort_boxes["annotations"]),
        "prepared_dir": str(cohort_boxes["prepared"]),
        "patch_cache": str(cohort_boxes["cache"]),
        "pretrained_path": str(cohort_boxes["pretrained"]),
        "progress": False,
        "mlflow": False,
    }
    config = str(Path(__file__).resolve().parent.parent / "bundle" / "configs" / "emphysema_finetune.yaml")
    model_path = tmp_path / "model.pt"
    run(
        "finetune",
        config_file=config,
        freeze_encoder=True,
        epochs=2,
        model_path=str(model_path),
        output_dir=str(tmp_path / "ft"),
        **common,
    )
    state = torch.load(model_path)
    assert {tuple(k.split(".")[:3]) for k in state} == {
        ("detectors", d, part) for d in ("centrilobular", "paraseptal") for part in ("encoder", "classifier")
    }  # the map model: one binary detector per subtype
    detectors = EmphysemaDetectors()
    detectors.load_state_dict(state)
    # linear readout: both detectors keep the pre-trained encoder, so a map runs it once for both
    pretrained = torch.load(cohort_boxes["pretrained"])
    for name in ("centrilobular", "paraseptal"):
        encoder = detectors.detectors[name].encoder.state_dict()
        assert all(torch.equal(encoder[k[8:]], v) for k, v in pretrained.items() if k.startswith("encoder."))
    assert FoldedDetectors(detectors.eval()).shared
    out = tmp_path / "detection"
    common.update(annotations=str(detection_boxes["annotations"]), patch_cache=str(detection_boxes["cache"]))
    run(
        "detection",
        config_file=config,
        detection_dir=str(out),
        folds=2,
        fractions=[0.5, 1.0],
        stride=32,
        cv_epochs_linear=2,
        cv_epochs_full=1,
        batch_size=2,
        laa_features=["laa950", "perc15"],
        **common,
    )
    metrics = pd.read_csv(out / "fold_metrics.csv")
    cle = metrics[metrics["subtype"] == "centrilobular"]
    assert (cle["status"] == "ok").all() and len(cle) == 2 * 6  # 2 folds x (LAA, linear, random, full, 0.5, scratch)
    assert (cle["n_train_boxes"] < 10).all()  # trained on a fold's part, never on all boxes
    assert (metrics.loc[metrics["subtype"] == "paraseptal", "status"].str.startswith("not trained")).all()
    table = pd.read_csv(out / "detection_table.csv", keep_default_na=False)  # "n/a" stays text
    assert len(table) == 8 and (table.groupby("subtype").size() == 4).all()  # four rows per subtype
    assert table["model"].tolist()[:4] == [
        "Patch LAA (logistic regression)",
        "DrasCLR (ours)",
        "patch-based CNN from scratch",
        "DrasCLR (ours)",
    ]
    assert (table.loc[table["subtype"] == "paraseptal", "f1"] == "n/a").all()
    predictions = pd.read_csv(out / "box_predictions.csv")
    assert set(predictions["label"]) == {"centrilobular", "healthy"}
    assert predictions.loc[predictions["scheme"] == "patch_laa", ["laa950", "perc15"]].notna().all().all()
    folds = pd.read_csv(out / "folds.csv")
    assert folds["subject_id"].is_unique and set(folds["fold"]) == {0, 1}
    efficiency = pd.read_csv(out / "label_efficiency.csv")
    assert {0.5, 1.0} <= set(efficiency["fraction"])
    assert (out / "label_efficiency.png").stat().st_size > 1000
    text = (out / "detection_table.md").read_text()
    assert "| subtype | scheme | model |" in text and "LAA-950 + Perc15" in text
    table7 = pd.read_csv(out / "table7_location_sensitivity.csv")  # Table 7: linear readout, random vs patch locations
    assert set(table7["subtype"]) == {"centrilobular", "paraseptal"}
    row = table7.set_index("subtype").loc["centrilobular"]
    assert row["random location folds"] == 2 and row["patch location folds"] == 2 and row["paired folds"] == 2
    assert len(pd.read_csv(out / "table7_folds.csv")) == 4
    assert "| subtype | random location | patch location |" in (out / "table7_location_sensitivity.md").read_text()


@pytest.mark.slow
def test_random_locations_move_boxes_into_the_atlas_lung_and_table7_tests_folds(cohort_boxes):
    import nibabel as nib
    from scipy import stats

    from custom.data.atlas import atlas_mask_path
    from custom.emphysema.labelled_patches import CENTRE_IN_REGION, load_labelled_patches
    from custom.emphysema.random_location import location_table, with_random_locations

    patches = load_labelled_patches(
        cohort_boxes["annotations"], cohort_boxes["prepared"], cohort_boxes["cache"], progress=False
    )
    moved = with_random_locations(patches, seed=3)
    again = with_random_locations(patches, seed=3)
    np.testing.assert_array_equal(moved.region_to_atlas, again.region_to_atlas)  # reproducible draw
    lung = np.asarray(nib.load(str(atlas_mask_path())).dataobj) > 0
    centre = np.array([CENTRE_IN_REGION] * 3 + [1.0])
    for before, after in zip(patches.region_to_atlas, moved.region_to_atlas):
        voxel = np.rint(after @ centre)[:3].astype(int)
        assert lung[tuple(voxel)]  # the box centre now sits on an atlas lung voxel
        np.testing.assert_allclose(after[:3, :3], before[:3, :3])  # same layout of locations inside the box
    assert not np.allclose(moved.region_to_atlas[:, :3, 3], patches.region_to_atlas[:, :3, 3])
    assert torch.equal(moved.channels(0)[0], patches.channels(0)[0])  # same image
    assert not torch.equal(moved.channels(0)[1:4], patches.channels(0)[1:4])  # other routing location

    rows = []
    for fold, (patch_acc, random_acc) in enumerate([(0.9, 0.7), (0.8, 0.75), (0.95, 0.6)]):
        for location, accuracy in (("patch", patch_acc), ("random", random_acc)):
            rows.append(
                {
                    "scheme": "linear_readout",
                    "init": "pretrained",
                    "fraction": 1.0,
                    "fold": fold,
                    "subtype": "centrilobular",
                    "location": location,
                    "accuracy": accuracy,
                }
            )
    table = location_table(pd.DataFrame(rows)).iloc[0]
    assert table["patch location"] == "0.88 ± 0.08" and table["random location folds"] == 3
    expected = stats.ttest_rel([0.9, 0.8, 0.95], [0.7, 0.75, 0.6], alternative="greater").pvalue  # same folds
    assert table["p (one-sided paired t-test)"] == pytest.approx(expected, rel=1e-2)
