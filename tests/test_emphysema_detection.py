"""The detection evaluation of paper §4.3-4.4 (Table 5, Fig. 5, Table 7): one binary detector per subtype tested with
the 25 % rule, the Patch-LAA density baseline, the paired test of Table 7, the label-efficiency subsets and the
Table 5 writer. Small random boxes and real components (EmphysemaNetwork, sklearn, scipy, the ignite trainer of
``finetune``); the SYNTHETIC-cohort run of the bundle config is in tests/test_emphysema_finetune.py (slow)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hand_cut_box_inputs
from scipy import stats

from custom.emphysema.cross_validation import (
    DetectionCrossValidation,
    DetectionResults,
    Experiment,
    FinetuneRunner,
    SubjectFolds,
    annotation_subset,
    binary_task,
    experiments,
    subject_folds,
    task_labels,
)
from custom.emphysema.detection_rule import DetectionRule, box_predictions, box_probabilities
from custom.emphysema.detection_tables import TABLE5_ROWS, detection_table, summarise
from custom.emphysema.detection_writers import DetectionTablesWriter, LocationTableWriter
from custom.emphysema.labelled_patches import LabelledPatches
from custom.emphysema.network import EMPHYSEMA_CLASSES, EmphysemaNetwork
from custom.emphysema.patch_laa import PatchLAARunner, box_hu, patch_laa_features
from custom.emphysema.random_location import RandomLocations, location_folds, location_table, paired_location_test
from custom.model.network import DrasCLRNetwork

H, C, P = (EMPHYSEMA_CLASSES.index(k) for k in ("healthy", "centrilobular", "paraseptal"))


def _boxes(labels, subjects=None, seed=0, laa_share=0.3) -> LabelledPatches:
    """Random 64^3 HU regions (parenchyma around -800 HU), emphysema boxes with ``laa_share`` of their voxels at
    -1000 HU; lung everywhere; a shifted, rotated region-to-atlas map per box."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    regions = rng.normal(-800, 60, (n, 64, 64, 64))
    for k in np.flatnonzero(labels != H):
        regions[k][rng.random((64, 64, 64)) < laa_share * (0.8 + 0.4 * rng.random())] = -1000
    matrices = []
    for k in range(n):
        angle = 0.1 * (k + 1)
        m = np.eye(4)
        m[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        m[:3, 3] = [100 + 3 * k, 120, 90]
        matrices.append(m)
    subjects = [f"S{k}" for k in range(n)] if subjects is None else list(subjects)
    table = pd.DataFrame({"subject_id": subjects, "label": [EMPHYSEMA_CLASSES[k] for k in labels]})
    return LabelledPatches(
        regions.clip(-1024, 400).astype(np.int16),
        np.ones((n, 64, 64, 64), dtype=bool),
        np.stack(matrices),
        labels,
        table,
    )


def _hand_cut_probabilities(network, boxes, index, stride):
    """(M, C): each evaluated patch of box ``index`` classified alone."""
    with torch.no_grad():
        return np.stack(
            [torch.softmax(network(x[None]), 1)[0].numpy() for x in hand_cut_box_inputs(boxes, index, stride)]
        )


def _spread_readout(network, inputs, scale=3.0):
    """Set the 2-class linear layer to read the direction along which the representations of ``inputs`` vary most
    (a random encoder's representations differ little between neighbouring patches): logit 1 - logit 0 spans about
    ±``scale`` over them, centred at 0."""
    with torch.no_grad():
        h = network.embed(inputs).double()
        centred = h - h.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        projection = centred @ direction
        k = scale / projection.abs().max()
        network.classifier.weight.zero_()
        network.classifier.bias.zero_()
        network.classifier.weight[1] = (k * direction).float()
        network.classifier.bias[1] = float(-k * (h.mean(0) @ direction))
    return network


# ---------------------------------------------------------------- the binary detector and the 25 % rule
def test_binary_detector_decision_is_the_25_percent_rule_by_brute_force():
    """A 2-class detector's box call = (share of evaluated box voxels with p(subtype) > threshold) >= 25 %, each
    voxel's p computed alone from a hand-cut patch; the boundary share 2/8 = 25 % is a detection, 1/8 is not."""
    torch.manual_seed(3)
    boxes = _boxes([C, H], seed=1)
    network = _spread_readout(EmphysemaNetwork(num_classes=2).eval(), hand_cut_box_inputs(boxes, 0, 16))
    brute = np.stack([_hand_cut_probabilities(network, boxes, i, stride=16) for i in range(2)])  # (2, 8, 2)
    # float32 sums of the folded (rule) and plain (hand-cut) forward passes differ, amplified by the readout
    np.testing.assert_allclose(box_probabilities(network, boxes, stride=16, batch_size=16), brute, atol=1e-4)
    p_subtype = brute[..., 1]
    ranked = np.sort(p_subtype[0])[::-1]
    assert np.diff(-ranked[:3]).min() > 1e-2  # well-separated voxel probabilities: the counts below are exact
    for threshold, share0 in ((float(ranked[1] + ranked[2]) / 2, 2 / 8), (float(ranked[0] + ranked[1]) / 2, 1 / 8)):
        # threshold between box 0's 2nd and 3rd (1st and 2nd) largest p: 2 (1) of its 8 voxels lie above it
        frame = DetectionRule(stride=16, threshold=threshold, batch_size=16).predict(
            network, boxes, subtype="centrilobular"
        )
        shares = (p_subtype > threshold).mean(axis=1)
        assert shares[0] == share0
        np.testing.assert_allclose(frame["share_centrilobular"], shares)
        assert frame["detected_centrilobular"].tolist() == (shares >= 0.25).tolist()
        assert frame["detected_centrilobular"].iloc[0] == (share0 >= 0.25)
        assert list(frame.columns) == [
            "box",
            "subject_id",
            "label",
            "share_healthy",
            "share_centrilobular",
            "detected_centrilobular",
        ]
    # a detector of the wrong width is refused, not read as another rule
    with pytest.raises(ValueError, match="expects 2"):
        box_predictions(EmphysemaNetwork(num_classes=3).eval(), boxes, [0], stride=32, subtype="paraseptal")


# ---------------------------------------------------------------- Patch LAA
def test_patch_laa_features_are_a_hand_count():
    region = np.full((2, 64, 64, 64), -800, dtype=np.int16)
    lungs = np.zeros((2, 64, 64, 64), dtype=bool)
    lungs[0, 16:48, 16:48, 16:40] = True  # 32 * 32 * 24 = 24576 lung voxels in box 0's 32^3 box
    region[0, 16:48, 16:48, 16:19] = -1000  # 3 slabs of 1024 voxels, inside lung
    region[0, 16:48, 16:48, 19:21] = -960  # 2 slabs, inside lung
    region[0, 16:48, 16:48, 21:22] = -950  # not below -950: not counted
    region[0, 16:48, 16:48, 44:46] = -1000  # 2 slabs inside the box but outside the lung
    region[0, 0:16] = -1024  # outside the box: never counted
    lungs[1, 20:30, 20:30, 20:30] = False  # box 1 has no lung voxel in the box ...
    region[1, 16:48, 16:48, 16:24] = -990  # ... so all its 32768 box voxels count: 8 of 32 slabs below -950
    boxes = LabelledPatches(
        region,
        lungs,
        np.stack([np.eye(4)] * 2),
        np.array([H, C]),
        pd.DataFrame({"subject_id": ["A", "B"], "label": ["healthy", "centrilobular"]}),
    )
    features = patch_laa_features(boxes, features=("laa950", "perc15"))
    assert features[0, 0] == pytest.approx(5 * 1024 / 24576)
    # box 0 lung voxels sorted: 3072 at -1000, 2048 at -960, the rest above; 15 % of 24575 = 3686.25 -> -960
    assert features[0, 1] == -960.0
    assert features[1, 0] == pytest.approx(8 / 32) and features[1, 1] == -990.0
    every_voxel = patch_laa_features(boxes, [0], within_lung=False)
    assert every_voxel[0, 0] == pytest.approx(7 * 1024 / 32768)  # the 2 out-of-lung slabs now count
    assert len(box_hu(boxes, 0)) == 24576 and len(box_hu(boxes, 1)) == 32768


def test_patch_laa_regression_calls_boxes_by_their_density():
    labels = np.array([H] * 6 + [C] * 6)
    boxes = _boxes(labels, seed=2, laa_share=0.2)
    runner = PatchLAARunner()
    result = runner.train(binary_task(boxes, "centrilobular"), np.arange(0, 12, 2))
    frame = result.model.predict(boxes, np.arange(1, 12, 2), "centrilobular")
    assert frame["detected_centrilobular"].tolist() == (frame["p_centrilobular"] > 0.5).tolist()
    assert frame["detected_centrilobular"].tolist() == (frame["label"] == "centrilobular").tolist()
    assert (frame.loc[frame["label"] == "healthy", "laa950"] < 0.01).all()
    assert runner.describe().startswith("Patch LAA: logistic regression on LAA-950 of the box's lung voxels")
    with pytest.raises(ValueError, match="needs healthy"):
        runner.train(binary_task(boxes, "centrilobular"), np.arange(6))
    with pytest.raises(ValueError, match="features"):
        PatchLAARunner(features=("laa910",))


# ---------------------------------------------------------------- Table 7: a paired test over the same folds
def _table7_metrics(patch, random, subtype="centrilobular"):
    rows = []
    for fold, (a, b) in enumerate(zip(patch, random)):
        for location, value in (("patch", a), ("random", b)):
            rows.append(
                {
                    "scheme": "linear_readout",
                    "init": "pretrained",
                    "fraction": 1.0,
                    "task": "binary",
                    "fold": fold,
                    "subtype": subtype,
                    "location": location,
                    "accuracy": value,
                }
            )
    return pd.DataFrame(rows)


def test_table7_uses_the_paired_test():
    """Fold accuracies that vary a lot between folds but drop by 3-6 points in every fold with random locations:
    the paired test (the folds are shared) finds the drop, the unpaired one (Welch or not) does not."""
    patch = np.array([0.60, 0.70, 0.80, 0.90, 0.75])
    random = patch - np.array([0.03, 0.05, 0.04, 0.06, 0.05])
    paired = stats.ttest_rel(patch, random, alternative="greater").pvalue
    unpaired = stats.ttest_ind(patch, random, alternative="greater").pvalue
    assert paired < 0.005 and unpaired > 0.2  # the data on which the choice matters
    row = location_table(_table7_metrics(patch, random)).iloc[0]
    assert row["p (one-sided paired t-test)"] == pytest.approx(paired, rel=1e-2)
    assert row["paired folds"] == 5 and row["mean difference"] == pytest.approx(0.046)
    assert row["patch location"] == "0.75 ± 0.11" and row["random location folds"] == 5
    per_fold = location_folds(_table7_metrics(patch, random))
    np.testing.assert_allclose(per_fold["difference"], patch - random)
    # a fold without a number on one arm is left out of the pairs; no spread in the differences: no p
    with_gap = _table7_metrics(np.r_[patch, 0.5], np.r_[random, np.nan])
    assert location_table(with_gap).iloc[0]["paired folds"] == 5
    assert paired_location_test(patch, random)["p"] == pytest.approx(paired)
    assert np.isnan(paired_location_test([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])["p"])
    assert np.isnan(paired_location_test([0.9], [0.8])["p"])


# ---------------------------------------------------------------- label efficiency subsets
def test_annotation_subsets_of_one_subtype_nest_and_keep_every_healthy_box():
    labels = task_labels(np.array([H] * 8 + [C] * 10 + [P] * 4), "centrilobular")
    assert labels.tolist() == [0] * 8 + [1] * 10 + [-1] * 4
    train = np.r_[np.arange(0, 6), np.arange(8, 16)]  # 6 healthy + 8 centrilobular training boxes
    subsets = {f: annotation_subset(labels, train, f, seed=4, classes=[1]) for f in (0.1, 0.2, 0.5, 0.9, 1.0)}
    fractions = sorted(subsets)
    for small, large in zip(fractions, fractions[1:]):
        assert set(subsets[small]) <= set(subsets[large])
    for fraction, chosen in subsets.items():
        assert set(chosen) <= set(train)
        assert (labels[chosen] == 0).sum() == 6  # every healthy box kept
        assert (labels[chosen] == 1).sum() == max(1, math.ceil(fraction * 8))
    both = annotation_subset(labels, train, 0.5, seed=4)
    assert (labels[both] == 0).sum() == 3 and (labels[both] == 1).sum() == 4
    view = binary_task(_boxes(np.array([H, C, P])), "paraseptal")
    assert view.labels.tolist() == [0, -1, 1]


# ---------------------------------------------------------------- Table 5 writer
def _table5_metrics(multiclass=False, skip=()):
    rows = []
    runs = [
        r for r in experiments(fractions=[0.5], random_location=True, multiclass=multiclass) if r.scheme not in skip
    ]
    for run in runs:
        for fold in range(3):
            for subtype in ("centrilobular", "paraseptal"):
                rows.append(
                    {
                        "experiment": run.name,
                        "scheme": run.scheme,
                        "init": run.init,
                        "fraction": run.fraction,
                        "location": run.location,
                        "task": run.task,
                        "fold": fold,
                        "subtype": subtype,
                        "status": "ok",
                        "f1": 0.5 + 0.1 * fold,
                        "precision": 0.6,
                        "recall": 0.7,
                        "accuracy": 0.8 - 0.05 * (run.location == "random"),
                        "n_train_boxes": 20,
                        "n_train_positive": 10,
                    }
                )
    return pd.DataFrame(rows)


def test_table5_writer_emits_the_four_rows_of_each_subtype(tmp_path):
    metrics = _table5_metrics()
    results = DetectionResults(pd.DataFrame(), metrics, 40, 8, "rule: test", baseline="Patch LAA: test")
    paths = DetectionTablesWriter().write(results, tmp_path, note="SYNTHETIC")
    table = pd.read_csv(paths["table"])
    for subtype in ("centrilobular", "paraseptal"):
        rows = table[table["subtype"] == subtype]
        assert list(zip(rows["scheme"], rows["model"])) == [
            ("linear readout", "Patch LAA (logistic regression)"),
            ("linear readout", "DrasCLR (ours)"),
            ("full fine-tuning", "patch-based CNN from scratch"),
            ("full fine-tuning", "DrasCLR (ours)"),
        ]
        assert (rows["f1"] == "0.60 ± 0.10").all() and (rows["folds"] == 3).all()
    text = paths["table_md"].read_text()
    assert text.startswith("SYNTHETIC") and "Patch LAA: test" in text and text.count("| centrilobular |") == 4
    # the 3-class softmax is an extra fifth row when the run had it; a row the run lacks says so
    extra = detection_table(summarise(_table5_metrics(multiclass=True, skip=("patch_laa",))))
    rows = extra[extra["subtype"] == "centrilobular"]
    assert len(rows) == 5 and rows["model"].iloc[-1].startswith("DrasCLR, one 3-class softmax")
    assert rows["f1"].iloc[0] == "not run" and rows["folds"].iloc[0] == 0
    assert len(TABLE5_ROWS) == 4
    seven = LocationTableWriter().write(results, tmp_path)
    assert len(pd.read_csv(seven["location_folds"])) == 6 and "Per fold" in seven["location_table_md"].read_text()


# ---------------------------------------------------------------- the cross-validation end to end (small)
class _RecordingRunner(FinetuneRunner):
    """The real linear-readout runner; keeps what each call trained on and the width of the network it built."""

    calls: list

    def train(self, patches, indices, pretrained_path, fold=0, num_classes=3):
        result = super().train(patches, indices, pretrained_path, fold, num_classes)
        self.calls.append(
            {
                "fold": fold,
                "labels": patches.labels[indices].tolist(),
                "indices": list(indices),
                "outputs": result.network.classifier.out_features,
                "num_classes": num_classes,
            }
        )
        return result


def test_cross_validation_trains_one_binary_detector_per_subtype_on_shared_folds(tmp_path):
    labels = [H, H, H, C, C, C, H, C, H, C, P, P]
    subjects = ["A", "A", "B", "B", "C", "C", "D", "D", "E", "E", "F", "F"]
    boxes = _boxes(labels, subjects, seed=5)
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained.pt"
    torch.save(DrasCLRNetwork().state_dict(), pretrained)
    runner = _RecordingRunner(freeze_encoder=True, epochs=2, lr=1e-2, batch_size=4)
    runner.calls = []
    runs = [
        Experiment("patch_laa", "none"),
        Experiment("linear_readout", "pretrained"),
        Experiment("linear_readout", "pretrained", location="random"),
        Experiment("linear_readout", "pretrained", fraction=0.5),
        Experiment("linear_readout", "pretrained", task="multiclass"),
    ]  # the optional extra row
    cv = DetectionCrossValidation(
        boxes,
        pretrained,
        SubjectFolds(2, seed=0),
        runs,
        {"patch_laa": PatchLAARunner(), "linear_readout": runner},
        DetectionRule(stride=32, batch_size=16),
        RandomLocations(seed=1),
        progress=False,
    )
    results = cv.run()
    folds = subject_folds(boxes, 2, 0)
    metrics, predictions = results.fold_metrics, results.predictions
    assert len(metrics) == 2 * 2 * len(runs)  # fold x subtype x experiment
    binary_calls = [c for c in runner.calls if c["num_classes"] == 2]
    assert len(runner.calls) - len(binary_calls) == 2  # the 3-class extra: one network per fold for both subtypes
    for call in binary_calls:  # every detector: 2 outputs, trained on healthy (0) and one subtype's (1) boxes only
        assert call["outputs"] == 2 and set(call["labels"]) == {0, 1}
    for call in runner.calls:
        assert call["outputs"] == call["num_classes"]
    extra = metrics[metrics["task"] == "multiclass"]
    assert (extra["status"] == "ok").all() and set(extra["subtype"]) == {"centrilobular", "paraseptal"}
    metrics = metrics[metrics["task"] == "binary"]
    for (fold, subtype, name), rows in metrics.groupby(["fold", "subtype", "experiment"]):
        train, test = folds[fold]
        task = task_labels(boxes.labels, subtype)
        trainable = {0, 1} <= set(task[train].tolist())
        assert (rows["status"].iloc[0] == "ok") == trainable, (fold, subtype, name)
        mine = predictions[
            (predictions["fold"] == fold) & (predictions["subtype"] == subtype) & (predictions["experiment"] == name)
        ]
        if trainable:  # tested on exactly this fold's healthy and subtype boxes
            assert sorted(mine["box"]) == sorted(test[task[test] >= 0].tolist())
            positives = int((task[train] == 1).sum())
            expected = positives if rows["fraction"].iloc[0] == 1.0 else math.ceil(0.5 * positives)
            assert rows["n_train_positive"].iloc[0] == expected
            assert rows["n_train_boxes"].iloc[0] - expected == int((task[train] == 0).sum())
        else:
            assert mine.empty and rows["f1"].isna().all()
    laa = predictions[predictions["scheme"] == "patch_laa"]
    assert (laa["detected"] == (laa["score"] > 0.5)).all()
    nets = predictions[predictions["scheme"] == "linear_readout"]
    assert (nets["detected"] == (nets["score"] >= 0.25)).all()  # one voxel per box (stride 32): share 0 or 1
    assert set(metrics.loc[metrics["status"] == "ok", "subtype"]) >= {"centrilobular"}
    assert results.folds()["subject_id"].is_unique and results.n_folds == 2
    table = location_table(metrics)
    assert set(table["subtype"]) == {"centrilobular", "paraseptal"}


def test_batchnorm_recalibration_takes_a_training_set_one_above_its_batch_size():
    """Full fine-tuning recomputes BatchNorm statistics over the training boxes in batches of 16; 17 boxes (a binary
    task's training part can have any size) must not leave a last batch of one, which train-mode BatchNorm refuses
    on the 1x1x1 deepest feature map."""
    from custom.emphysema.finetune import RecalibrateBatchNorm

    boxes = _boxes([H] * 17, seed=6)
    network = EmphysemaNetwork(num_classes=2)
    before = network.encoder.bn4.running_mean.clone()
    RecalibrateBatchNorm(network, boxes, batch_size=16)()
    assert not torch.equal(before, network.encoder.bn4.running_mean) and not network.training
