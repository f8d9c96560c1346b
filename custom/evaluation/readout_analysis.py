"""Linear readouts of every feature set of a cohort, target by target (paper Tables 2, 4, 6, 8), as one long table.

``LinearReadout`` (config id ``readout``) holds the cross-validation settings shared by every readout of a run;
``ReadoutAnalysis`` (``phenotypes``, ``severity``) applies them to its targets on a loaded cohort. The long table
has one row per (feature_set, target, metric): ``mean``/``sd`` over folds (the paper's summary), except R² when a
test fold holds fewer than ``min_fold_size_for_r2`` subjects: then ``mean`` is R² of the pooled out-of-fold
predictions (per-fold R² of 2-3 subjects is dominated by their tiny variance) and the note says so. Per-fold
values and both summaries are kept in other columns. All sets share the folds (same seed, same targets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

from custom.evaluation.cohort import CohortData
from custom.evaluation.readouts import METRICS, cross_validated_readout
from custom.evaluation.targets import Target, targets_from_specs


@dataclass
class LinearReadout:
    """Cross-validation settings of the readouts (see ``custom.evaluation.readouts``): ``folds`` outer folds with
    ``seed``; ``pca_components`` (an int, a variance share < 1, or None) fitted inside each training fold;
    ``inner_folds`` of LogisticRegressionCV (RidgeCV uses leave-one-out); ``min_fold_size_for_r2``."""

    folds: int = 5
    seed: int = 0
    pca_components: int | float | None = None
    inner_folds: int = 3
    min_fold_size_for_r2: int = 10

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("folds", "seed")}

    def rows(self, name: str, table: pd.DataFrame, target: Target, values: pd.Series, target_note: str) -> list:
        """The long-table rows of one feature set x one target."""
        y = values[values.index.isin(table.index)]
        x = table.loc[y.index].to_numpy()
        result = cross_validated_readout(
            x,
            y.to_numpy(),
            target.kind,
            folds=self.folds,
            seed=self.seed,
            order=target.order,
            pca_components=self.pca_components,
            inner_folds=int(self.inner_folds),
        )
        min_fold = int(self.min_fold_size_for_r2)
        pooled_r2 = target.kind == "continuous" and 0 < result.smallest_test_fold < min_fold
        pooled_note = (
            (
                f"R² of the pooled out-of-fold predictions (test folds of {result.smallest_test_fold} "
                f"subjects, under {min_fold}), no s.d."
            )
            if pooled_r2
            else ""
        )
        note = "; ".join(n for n in [target_note, *result.notes, result.reason, pooled_note] if n)
        rows = []
        for metric in METRICS[target.kind]:
            pooled = result.pooled(metric, target.order)
            rows.append(
                {
                    "feature_set": name,
                    "target": target.name,
                    "column": target.source_column,
                    "label": target.shown,
                    "metric": metric,
                    "mean": pooled if pooled_r2 else result.mean(metric),
                    "sd": float("nan") if pooled_r2 else result.sd(metric),
                    "fold_mean": result.mean(metric),
                    "fold_sd": result.sd(metric),
                    "pooled": pooled,
                    "summary": "pooled" if pooled_r2 else "folds",
                    "n_subjects": result.n_subjects,
                    "n_features": x.shape[1],
                    "n_folds": result.n_folds,
                    "requested_folds": self.folds,
                    "status": result.status,
                    "note": note,
                    "fold_values": " ".join(f"{v:.4f}" for v in result.fold_values(metric)) if result.folds else "",
                }
            )
        return rows


class ReadoutAnalysis:
    """The readouts of ``targets`` (name -> target mapping, see ``custom.evaluation.targets``) with ``readout``'s
    settings; ``run`` gives the long table of a loaded cohort."""

    def __init__(self, readout: LinearReadout, targets: dict):
        self.readout = readout
        self.targets = targets_from_specs(targets)

    @property
    def labels(self) -> dict:
        """Target name -> label shown in tables."""
        return {name: target.shown for name, target in self.targets.items()}

    def run(self, cohort: CohortData) -> pd.DataFrame:
        rows = []
        for target in self.targets.values():
            values, target_note = target.values(cohort.clinical, cohort.source)
            for name, table in cohort.sets.items():
                rows += self.readout.rows(name, table, target, values, target_note)
        return pd.DataFrame(rows)
