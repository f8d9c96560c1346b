"""The study's readouts: every feature set on the same subjects and the same folds, repeated, kept per subject.

The evaluation workflow reports mean ± s.d. over folds; the study needs each subject's out-of-fold prediction
so that two methods can be compared subject by subject (``custom.evaluation.paired_bootstrap``). The fits are
the evaluation's own (``cross_validated_readout`` for linear readouts, ``cross_validated_cox`` for survival); the
study only fixes the subjects (those every feature set has, sorted) and the fold seed of each repeat
(``seed + repeat``), which makes the folds identical for every feature set.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from custom.evaluation.readouts import cross_validated_readout
from custom.evaluation.survival import cross_validated_cox, survival_folds
from custom.evaluation.targets import Target, targets_from_specs
from custom.subject_table import require_columns

COLUMNS = (
    "cohort",
    "target",
    "label",
    "kind",
    "metric",
    "method",
    "share",
    "repeat",
    "fold",
    "subject_id",
    "truth",
    "prediction",
    "time",
    "event",
)
METRIC_OF_KIND = {"continuous": "r2", "ordinal": "accuracy", "binary": "accuracy", "categorical": "accuracy"}


def class_codes(target: Target, values: pd.Series) -> dict:
    """{class: integer code} on the target's ordinal scale (its ``order``, else the sorted classes)."""
    order = list(target.order) if target.order else sorted(values.unique().tolist())
    return {value: code for code, value in enumerate(order)}


class StudyReadouts:
    """Readouts of one cohort: ``targets`` (the evaluation's target specs), ``survival`` (``{time, event,
    pca_components, penalizer}`` or None), ``folds`` x ``repeats`` cross-validation seeded by ``seed``."""

    def __init__(
        self,
        targets: dict,
        survival: dict | None = None,
        folds: int = 5,
        repeats: int = 3,
        seed: int = 0,
        pca_components=None,
    ):
        self.targets = targets_from_specs(targets)
        self.survival = dict(survival) if survival else None
        self.folds, self.repeats, self.seed = int(folds), int(repeats), int(seed)
        self.pca_components = pca_components

    def fingerprint(self) -> str:
        """A short hash of every setting that changes the predictions (cached predictions of other ones are
        not reused)."""
        settings = [self.targets, self.survival, self.folds, self.repeats, self.seed, self.pca_components]
        return hashlib.sha1(repr(settings).encode()).hexdigest()[:10]

    def predictions(
        self, cohort: str, clinical: pd.DataFrame, features: pd.DataFrame, method: str, share: float, source: str
    ) -> tuple[pd.DataFrame, list[str]]:
        """Long table (``COLUMNS``) of one feature set's out-of-fold predictions, and notes (targets that could
        not be read out, with the reason). ``clinical`` and ``features`` are indexed by subject id and must hold
        the same subjects in the same order for every feature set of the study (the caller aligns them)."""
        if not clinical.index.equals(features.index):
            raise ValueError(f"{source}: feature rows and clinical rows are not the same subjects in the same order")
        x = features.to_numpy(np.float64)
        frames, notes = [], []
        for target in self.targets.values():
            values, _ = target.values(clinical, source)
            rows = clinical.index.get_indexer(values.index)
            codes = None if target.kind == "continuous" else class_codes(target, values)
            y = values.to_numpy() if codes is None else values.map(codes).to_numpy()
            for repeat in range(self.repeats):
                result = cross_validated_readout(
                    x[rows], y, target.kind, self.folds, self.seed + repeat, self.pca_components
                )
                if result.status != "ok":
                    notes.append(f"[{cohort}] {target.shown}: not read out ({result.reason})")
                    break
                for number, fold in enumerate(result.folds):
                    frames.append(
                        self._rows(cohort, target.name, target.shown, target.kind, METRIC_OF_KIND[target.kind])
                        .assign(method=method, share=share, repeat=repeat, fold=number)
                        .pipe(_with, values.index[fold.test], fold.truth, fold.prediction)
                    )
        if self.survival:
            frames.extend(self._survival(cohort, clinical, x, method, share, source, notes))
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
        return table.reindex(columns=COLUMNS), notes

    def _survival(self, cohort, clinical, x, method, share, source, notes) -> list[pd.DataFrame]:
        spec = self.survival
        require_columns(clinical.reset_index(), [spec["time"], spec["event"]], source)
        time = clinical[spec["time"]].to_numpy(np.float64)
        event = clinical[spec["event"]].to_numpy().astype(bool)
        frames = []
        for repeat in range(self.repeats):
            result = cross_validated_cox(
                x,
                pd.DataFrame(index=range(len(time))),
                time,
                event,
                folds=self.folds,
                seed=self.seed + repeat,
                repeats=1,
                penalizer=float(spec.get("penalizer", 0.5)),
                pca_components=spec.get("pca_components"),
                n_bootstrap=2,  # the study's intervals are its paired bootstrap; this one is not read
            )
            if result.status != "ok":
                notes.append(f"[{cohort}] survival: not read out for {method} ({result.reason})")
                return []
            frame = self._rows(cohort, "survival", spec.get("label", "Survival C"), "survival", "c_index")
            frame = frame.assign(method=method, share=share, repeat=repeat)
            frame = _with(frame, clinical.index, np.full(len(time), np.nan), result.risk)
            fold_of = np.empty(len(time), dtype=int)
            for number, (_, test) in enumerate(survival_folds(event, self.folds, self.seed + repeat)[0]):
                fold_of[test] = number  # the folds cross_validated_cox used (same planner, same seed)
            frame["fold"] = fold_of
            frames.append(frame.assign(time=time, event=event.astype(int)))
        return frames

    @staticmethod
    def _rows(cohort, target, label, kind, metric) -> pd.DataFrame:
        return pd.DataFrame({"cohort": [cohort], "target": target, "label": label, "kind": kind, "metric": metric})


def _with(frame: pd.DataFrame, subject_ids, truth, prediction) -> pd.DataFrame:
    """``frame``'s single row repeated once per subject, with the subjects' truth and prediction."""
    n = len(subject_ids)
    out = frame.loc[frame.index.repeat(n)].reset_index(drop=True)
    return out.assign(subject_id=list(subject_ids), truth=np.asarray(truth, float), prediction=np.asarray(prediction))
