"""Table 3 (paper §4.2.2): which rows the survival table has and the cross-validated Cox model of each.

``SurvivalAnalysis`` (config id ``survival``) holds the clinical columns and model settings; ``run`` fits every
row on a loaded cohort: the imaging sets, the clinical references (confounders only, spirometry, BODE) and the
imaging + clinical combinations, each with the confounders. The clinical-only rows use the subjects the imaging
rows have, so every row is paired. The model itself is ``custom.evaluation.survival.cross_validated_cox``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from custom.evaluation.cohort import CohortData
from custom.evaluation.notes import Notes
from custom.evaluation.survival import (
    BODE_PARTS,
    DEFAULT_PERCENTILES,
    bode_index,
    cross_validated_cox,
    encode_covariates,
)
from custom.flags import as_bool
from custom.subject_table import require_columns


class SurvivalAnalysis:
    """Cox survival rows of Table 3. ``time``/``event``: follow-up (years) and death columns; ``confounders`` (those
    also in ``categorical`` one-hot coded); ``spirometry`` columns; ``bode``: BODE part -> column; ``percentiles``
    of follow-up at which C(t) is read; ``penalizer`` (lifelines ridge), ``pca_components`` of the image features
    (None keeps all), ``repeats`` of the cross-validation, ``bootstrap`` resamples for the standard error;
    ``imaging`` sets (None: all) and ``combined`` sets (each also + spirometry and + BODE)."""

    def __init__(
        self,
        enabled: bool = True,
        folds: int = 5,
        seed: int = 0,
        time: str = "survival_years",
        event: str = "death_event",
        confounders: Sequence[str] = (),
        categorical: Sequence[str] = (),
        spirometry: Sequence[str] = ("fev1pp", "fev1_fvc"),
        bode: dict | None = None,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        penalizer: float = 0.5,
        pca_components: int | None = None,
        repeats: int = 1,
        bootstrap: int = 200,
        imaging: Sequence[str] | None = None,
        combined: Sequence[str] = (),
    ):
        self.enabled = as_bool(enabled)
        self.folds, self.seed = int(folds), int(seed)
        self.time, self.event = time, event
        self.confounders = list(confounders or [])
        self.categorical = [c for c in (categorical or []) if c in self.confounders]
        self.spirometry = list(spirometry)
        self.bode = dict(bode or {})
        unknown = sorted(set(self.bode) - set(BODE_PARTS))
        if unknown:
            raise ValueError(f"survival bode: unknown part(s) {unknown}; the parts are {list(BODE_PARTS)}")
        self.percentiles = tuple(percentiles)
        self.penalizer, self.pca_components = float(penalizer), pca_components
        self.repeats, self.bootstrap = int(repeats), int(bootstrap)
        self.imaging = None if imaging is None else list(imaging)
        self.combined = list(combined or [])

    def params(self) -> dict:
        return {"survival_penalizer": self.penalizer, "survival_pca_components": self.pca_components}

    def rows(self, sets: dict) -> list[dict]:
        """Table 3 rows: imaging sets, clinical references, and imaging + clinical combinations."""
        rows = [
            {"group": "Imaging", "feature_row": s, "imaging": s, "clinical": []}
            for s in (self.imaging or list(sets))
            if s in sets
        ]
        rows += [
            {"group": "Clinical", "feature_row": "Confounders only", "imaging": None, "clinical": []},
            {"group": "Clinical", "feature_row": "Spirometry", "imaging": None, "clinical": self.spirometry},
            {"group": "Clinical", "feature_row": "BODE", "imaging": None, "clinical": ["bode_index"]},
        ]
        for s in self.combined:
            if s in sets:
                rows += [
                    {
                        "group": "Imaging + Clinical",
                        "feature_row": f"{s} + Spirometry",
                        "imaging": s,
                        "clinical": self.spirometry,
                    },
                    {
                        "group": "Imaging + Clinical",
                        "feature_row": f"{s} + BODE",
                        "imaging": s,
                        "clinical": ["bode_index"],
                    },
                ]
        return rows

    def run(self, cohort: CohortData, notes: Notes) -> pd.DataFrame:
        """One row per Table 3 row x percentile: horizon, C(t), bootstrap s.e., n, events, status, note."""
        sets, clinical, source = cohort.sets, cohort.clinical, cohort.source
        require_columns(clinical, [self.time, self.event, *self.confounders], source)
        imaged = set().union(*(set(t.index) for t in sets.values())) if sets else set(clinical.index)
        table = clinical.loc[clinical.index.isin(imaged)].copy()
        bode_reason = ""
        try:
            table["bode_index"] = bode_index(table, self.bode)
        except KeyError as err:
            bode_reason = f"BODE not computed: {err.args[0]}"
            notes.add(f"[survival] {bode_reason} ({source})")
        numeric = [c for c in self.confounders if c not in self.categorical]
        out = []
        for row in self.rows(sets):
            reason = bode_reason if "bode_index" in row["clinical"] and bode_reason else ""
            if not reason:
                require_columns(table, row["clinical"], source)
            needed = [self.time, self.event, *self.confounders, *([] if reason else row["clinical"])]
            frame = table[needed].dropna()
            if row["imaging"]:
                frame = frame.loc[frame.index.intersection(sets[row["imaging"]].index)]
            result = None
            if not reason:
                covariates = encode_covariates(frame, numeric + row["clinical"], self.categorical)
                image = sets[row["imaging"]].loc[frame.index].to_numpy() if row["imaging"] else None
                result = cross_validated_cox(
                    image,
                    covariates,
                    frame[self.time].to_numpy(),
                    frame[self.event].to_numpy(),
                    folds=self.folds,
                    seed=self.seed,
                    repeats=self.repeats,
                    penalizer=self.penalizer,
                    pca_components=self.pca_components,
                    percentiles=self.percentiles,
                    n_bootstrap=self.bootstrap,
                )
                reason = result.reason
            horizons = (
                result.horizons
                if result is not None
                else np.percentile(table[self.time].dropna().astype(float), list(self.percentiles))
            )
            note = "; ".join(n for n in [*(result.notes if result else []), reason] if n)
            ok = result is not None and result.status == "ok"
            for p, (percentile, horizon) in enumerate(zip(self.percentiles, horizons)):
                out.append(
                    {
                        "group": row["group"],
                        "feature_row": row["feature_row"],
                        "percentile": percentile,
                        "horizon_years": float(horizon),
                        "concordance": float(result.concordance[p]) if ok else float("nan"),
                        "standard_error": float(result.standard_error[p]) if ok else float("nan"),
                        "n_subjects": len(frame),
                        "n_events": int(frame[self.event].sum()),
                        "n_folds": result.n_folds if result else 0,
                        "repeats": result.repeats if result else 0,
                        "status": "ok" if ok else "n/a",
                        "note": note,
                    }
                )
        return pd.DataFrame(out)
