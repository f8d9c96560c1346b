"""An evaluated cohort: its clinical table and the feature sets of its subjects, paired.

Every comparison is paired: all feature sets are read out on the same subjects (those every set and the clinical
table share, unless ``common_subjects`` is false), so differences between rows are differences between features.
``Cohort`` is the config component (``evaluate.yaml``: ``copd``, ``covid_cohort``); ``load`` returns a
``CohortData`` the analyses read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from custom.errors import MissingInputError
from custom.evaluation.baselines import Baselines
from custom.evaluation.feature_sets import EmbeddingSets
from custom.evaluation.notes import Notes
from custom.flags import as_bool
from custom.subject_table import read_subject_table


@dataclass
class CohortData:
    """A loaded cohort: ``clinical`` indexed by subject id (read from ``source``) and ``sets`` (name -> subject
    table), restricted to the paired subjects."""

    name: str
    source: str
    clinical: pd.DataFrame
    sets: dict


def shared_subjects(clinical: pd.DataFrame, sets: dict, common: bool, notes: Notes, cohort: str) -> dict:
    """Restrict every set to the subjects it shares with the clinical table (and with every other set)."""
    ids = set(clinical.index)
    if common:
        for table in sets.values():
            ids &= set(table.index)
    restricted = {}
    for name, table in sets.items():
        keep = sorted(ids & set(table.index))
        left_out = len(table) - len(keep)
        if left_out:
            notes.add(
                f"[{cohort}] {name}: {left_out} subject(s) not shared with the clinical table"
                + (" and the other sets" if common else "")
                + " left out"
            )
        restricted[name] = table.loc[keep]
    return restricted


class Cohort:
    """Clinical table (``clinical``, one row per subject, column subject_id) + embedding sets (``embeddings``, an
    ``EmbeddingSets``) + computed baselines (``baselines``, a ``Baselines`` or None).

    ``required``: a cohort the run cannot do without (the COPD-like one) raises when its table or every feature set
    is missing; an optional one (the COVID-like one) is skipped with a note instead."""

    def __init__(
        self,
        name: str,
        clinical: str | Path | None,
        embeddings: EmbeddingSets | None = None,
        baselines: Baselines | None = None,
        common_subjects: bool = True,
        required: bool = True,
    ):
        self.name, self.clinical = str(name), clinical
        self.embeddings, self.baselines = embeddings, baselines
        self.common_subjects, self.required = as_bool(common_subjects), as_bool(required)

    def load(self, notes: Notes) -> CohortData | None:
        if not self.required and not (self.clinical and Path(self.clinical).is_file()):
            notes.add(f"[{self.name}] skipped: no clinical table ({self.clinical})")
            return None
        clinical = read_subject_table(self.clinical, f"{self.name} clinical table")
        sets = self.embeddings.read(notes, self.name) if self.embeddings is not None else {}
        if self.baselines is not None:
            sets.update(self.baselines.compute(notes, self.name))
        if not sets and self.required:
            paths = list(self.embeddings.paths.values()) if self.embeddings is not None else []
            cache = self.baselines.prepared_cache if self.baselines is not None else None
            raise MissingInputError(
                paths[0] if paths else cache,
                "feature sets (subject embeddings)",
                "embed",
                f"none of {paths} exists and no prepared cache for the baselines ({cache})",
            )
        sets = {
            k: v for k, v in shared_subjects(clinical, sets, self.common_subjects, notes, self.name).items() if len(v)
        }
        if not sets:
            if self.required:
                raise ValueError(f"{self.clinical}: no feature set shares subjects with the clinical table")
            notes.add(f"[{self.name}] no feature set shares subjects with the clinical table: skipped")
            return None
        return CohortData(self.name, str(self.clinical), clinical, sets)

    def params(self) -> dict:
        return {"clinical": self.clinical, "common_subjects": self.common_subjects}
