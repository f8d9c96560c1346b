"""Healthy boxes of the SYNTHETIC COPD-like cohort sit where the emphysema boxes are, so a classifier that reads
atlas location cannot tell the labels apart by where they are (the location shortcut of
bundle/docs/emphysema_finetune.md, "Limits").

One cohort of 40 subjects at 4 mm is synthesised once; every subject's boxes are drawn twice from the same
annotation stream, with healthy boxes matched to the subtypes' priors (the default) and at random places (the
earlier placement). A location-only classifier (atlas_x/y/z of the box centre; logistic regression, 15 nearest
neighbours, gradient boosting), cross-validated with folds grouped by subject, separates healthy boxes from a
subtype's boxes. Bounds, from the counts of this cohort (about 100 centrilobular, 60 paraseptal and 70 healthy
boxes per subtype): under no location difference the ROC AUC has a standard error near 0.045, so 0.70 is about
four of them above chance, and grouped folds add little; the random placement reaches 0.8 and more for
centrilobular boxes, which sit upper and central while random healthy boxes spread over the whole lung.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from custom.synthetic import CopdLikeGenerator, labels
from custom.synthetic.annotations import RANDOM_MIN_LUNG_SHARE, box_voxels
from custom.synthetic.clinical import is_healthy_control
from custom.synthetic.copd_like import DEFAULT_MAX_BOXES, healthy_box_centres
from custom.synthetic.subject import lung_crop

VOXEL_MM = 4.0
NUM_SUBJECTS = 40
SUBTYPES = ("centrilobular", "paraseptal")
CHANCE_BOUND = 0.70  # location-only AUC of matched healthy boxes against the subtype's boxes
SHORTCUT_BOUND = 0.80  # what the random placement gives for centrilobular boxes
LOCATION = ["atlas_x", "atlas_y", "atlas_z"]


def _models() -> dict:
    return {
        "logistic": make_pipeline(StandardScaler(), LogisticRegression()),
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=15)),
        "boosting": HistGradientBoostingClassifier(max_depth=3, random_state=0),
    }


def location_auc(positives: pd.DataFrame, negatives: pd.DataFrame, model) -> float:
    """Out-of-fold ROC AUC of ``model`` telling ``positives`` from ``negatives`` by box-centre atlas location only,
    five folds grouped by subject (no subject in training and test)."""
    frame = pd.concat([positives, negatives], ignore_index=True)
    truth = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    score = cross_val_predict(
        model, frame[LOCATION].to_numpy(), truth, groups=frame["subject_id"], cv=GroupKFold(5), method="predict_proba"
    )[:, 1]
    return float(roc_auc_score(truth, score))


@pytest.fixture(scope="module")
def cohort_boxes() -> dict:
    """Box tables of one cohort under both placements (``matched`` healthy rows carry the subtype they were
    matched to in ``matched_to``), and per healthy box whether its 32 mm box holds emphysema or lies in lung."""
    generator = CopdLikeGenerator(NUM_SUBJECTS, seed=0, voxel_size=VOXEL_MM, dicom_every=0)
    grid, reference = generator.grid, generator.reference
    half = box_voxels(grid.spacing) // 2
    tables = {"matched": [], "random": [], "all": []}  # "all": matched, healthy boxes from every subject
    checks = []
    for index in range(NUM_SUBJECTS):
        plan = generator.plan(index)
        volumes = generator.synthesize(plan)
        for placement, rows in tables.items():
            generator.healthy_placement = "matched" if placement == "all" else placement
            generator.healthy_subjects = "all" if placement == "all" else "controls"
            rows.extend(generator.finish(generator.plan(index), volumes, grid, reference))
        if not is_healthy_control(plan.row):
            continue
        # the same draws, read where the matched subtype is still known (the table does not carry it)
        lung = volumes["lung"] > 0
        crop = lung_crop(lung, margin=0)
        rng = generator.plan(index).streams["annotation"]
        rng.random()  # ``finish`` first draws whether the subject is annotated
        picked = healthy_box_centres(rng, volumes, grid, reference, crop, generator.max_boxes["healthy"], "matched")
        offset = np.array([s.start for s in crop])
        emphysema_share = ndimage.uniform_filter(
            np.isin(volumes["lesion"], labels.EMPHYSEMA_CODES).astype(np.float32), size=2 * half + 1, mode="constant"
        )
        for centre, share, name in picked:
            centre = centre + offset
            checks.append(
                {
                    "subject_id": plan.row["subject_id"],
                    "centre": tuple(int(c) for c in centre),
                    "matched_to": name,
                    "lung_share": share,
                    "centre_in_lung": bool(lung[tuple(centre)]),
                    "emphysema_in_box": float(emphysema_share[tuple(centre)]) > 0,
                }
            )
    out = {placement: pd.DataFrame(rows) for placement, rows in tables.items()}
    out["checks"] = pd.DataFrame(checks)
    healthy = out["matched"]["label"] == "healthy"
    centres = list(out["matched"].loc[healthy, ["centre_x", "centre_y", "centre_z"]].itertuples(index=False, name=None))
    assert centres == list(out["checks"]["centre"]), "the written healthy boxes are the ones drawn from the stream"
    out["matched"].loc[healthy, "matched_to"] = out["checks"]["matched_to"].to_numpy()
    return out


def test_lesion_boxes_do_not_depend_on_the_healthy_placement(cohort_boxes):
    matched, random = cohort_boxes["matched"], cohort_boxes["random"]
    pd.testing.assert_frame_equal(
        matched.loc[matched["label"] != "healthy", random.columns].reset_index(drop=True),
        random[random["label"] != "healthy"].reset_index(drop=True),
    )
    counts = matched["label"].value_counts()
    assert counts["centrilobular"] >= 60 and counts["paraseptal"] >= 30 and counts["healthy"] >= 100, counts


def test_matched_healthy_boxes_are_valid_and_reach_the_pleura(cohort_boxes):
    checks = cohort_boxes["checks"]
    assert checks["centre_in_lung"].all() and not checks["emphysema_in_box"].any()
    # both subtypes get their half of every control's boxes
    per_subject = checks.groupby(["subject_id", "matched_to"]).size().unstack()
    assert (per_subject[list(SUBTYPES)] == 6).all().all(), per_subject
    # paraseptal-matched boxes sit at the pleura, with less lung in the box than the random placement allowed
    paraseptal = checks[checks["matched_to"] == "paraseptal"]
    assert (paraseptal["lung_share"] < RANDOM_MIN_LUNG_SHARE).mean() > 0.3
    random_healthy = cohort_boxes["random"].query("label == 'healthy'")
    assert (random_healthy["share_in_box"] >= RANDOM_MIN_LUNG_SHARE).all()
    # no two boxes of a subject overlap
    size = box_voxels((VOXEL_MM,) * 3)
    for _, boxes in checks.groupby("subject_id"):
        centres = np.array(boxes["centre"].tolist())
        apart = (np.abs(centres[:, None, :] - centres[None, :, :]) >= size).any(axis=2)
        assert (apart | np.eye(len(centres), dtype=bool)).all()


def test_location_alone_cannot_tell_matched_healthy_boxes_from_a_subtype(cohort_boxes):
    boxes = cohort_boxes["matched"]
    aucs = {}
    for subtype in SUBTYPES:
        positives = boxes[boxes["label"] == subtype]
        negatives = boxes[boxes["matched_to"] == subtype]
        for name, model in _models().items():
            aucs[subtype, name] = location_auc(positives, negatives, model)
    print("location-only AUC, matched healthy boxes vs subtype:", {k: round(v, 3) for k, v in aucs.items()})
    assert max(aucs.values()) <= CHANCE_BOUND, aucs


def test_random_placement_was_a_location_shortcut(cohort_boxes):
    """The earlier placement on the same cohort: centrilobular boxes are told from healthy ones by where they are;
    the healthy pool of the matched placement (what a subtype's binary detector trains on: half of it matched to
    the other subtype) is clearly less separable."""
    random, matched = cohort_boxes["random"], cohort_boxes["matched"]
    positives = matched[matched["label"] == "centrilobular"]
    aucs = {}
    for name, model in _models().items():
        aucs["random", name] = location_auc(positives, random[random["label"] == "healthy"], model)
        aucs["matched pool", name] = location_auc(positives, matched[matched["label"] == "healthy"], model)
        aucs["matched", name] = location_auc(positives, matched[matched["matched_to"] == "centrilobular"], model)
    print("location-only AUC, centrilobular vs healthy:", {k: round(v, 3) for k, v in aucs.items()})
    for name in _models():
        assert aucs["random", name] >= SHORTCUT_BOUND, aucs
        assert aucs["random", name] >= aucs["matched", name] + 0.15, aucs
        assert aucs["matched pool", name] <= aucs["random", name] - 0.05, aucs


def test_healthy_boxes_from_every_subject_add_to_the_controls_boxes(cohort_boxes):
    """``healthy_subjects="all"``: the controls keep exactly their boxes, every other subject adds at most
    ``healthy_other`` emphysema-free boxes, and the lesion boxes do not change."""
    matched, every = cohort_boxes["matched"], cohort_boxes["all"]
    columns = list(every.columns)
    lesions = every[every["label"] != "healthy"].reset_index(drop=True)
    pd.testing.assert_frame_equal(lesions, matched.loc[matched["label"] != "healthy", columns].reset_index(drop=True))
    healthy = every[every["label"] == "healthy"]
    controls = set(matched.loc[matched["label"] == "healthy", "subject_id"])
    pd.testing.assert_frame_equal(
        healthy[healthy["subject_id"].isin(controls)].reset_index(drop=True),
        matched.loc[matched["label"] == "healthy", columns].reset_index(drop=True),
    )
    others = healthy[~healthy["subject_id"].isin(controls)]
    assert others["subject_id"].nunique() > len(controls)
    assert others.groupby("subject_id").size().max() <= DEFAULT_MAX_BOXES["healthy_other"]
