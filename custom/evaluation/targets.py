"""Readout targets: which clinical column a readout predicts, of which kind, after which exclusions and transform.

A target is given in a config as a mapping (``{column: fev1pp, kind: continuous, transform: log, label: ...}``);
``Target.from_spec`` accepts exactly the fields of ``Target`` and names any other key, so a misspelt setting stops
the run instead of being ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from custom.evaluation.readouts import KINDS
from custom.subject_table import require_columns

TRANSFORMS = (None, "none", "log")


@dataclass(frozen=True)
class Target:
    """One readout target. ``column`` defaults to the target's name; ``exclude`` lists values left out (e.g. -1 =
    PRISm, not a GOLD grade); ``order`` is the ordinal scale, lowest first (default: the integer grades)."""

    name: str
    kind: str
    column: str | None = None
    transform: str | None = None
    exclude: Sequence = field(default_factory=tuple)
    order: Sequence | None = None
    label: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"target {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"target {self.name!r}: unknown transform {self.transform!r} (log or none)")

    @classmethod
    def from_spec(cls, name: str, spec) -> Target:
        """A ``Target`` from its config mapping; an unknown key is an error naming the target and the key."""
        if isinstance(spec, Target):
            return spec
        spec = dict(spec or {})
        allowed = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"target {name!r}: unknown setting(s) {unknown}; a target takes {sorted(allowed)}")
        if "kind" not in spec:
            raise ValueError(f"target {name!r}: 'kind' is required ({KINDS})")
        spec["exclude"] = tuple(spec.get("exclude") or ())
        return cls(name=name, **spec)

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @property
    def shown(self) -> str:
        return self.label or self.name

    def values(self, clinical: pd.DataFrame, source: str | Path) -> tuple[pd.Series, str]:
        """The target column after exclusions and transform, missing values dropped; and a note on what was
        left out."""
        column = self.source_column
        require_columns(clinical, [column], source)
        values = pd.to_numeric(clinical[column], errors="coerce") if self.kind == "continuous" else clinical[column]
        values = values.dropna()
        notes = []
        excluded = list(self.exclude)
        if excluded:
            dropped = int(values.isin(excluded).sum())
            values = values[~values.isin(excluded)]
            if dropped:
                notes.append(f"{dropped} subject(s) with {column} in {excluded} left out")
        if self.transform == "log":
            if (values <= 0).any():
                raise ValueError(f"{source}: column {column!r} has values <= 0, cannot take the log")
            values = np.log(values.astype(float))
        if self.kind != "continuous":
            values = values.astype(int) if pd.api.types.is_numeric_dtype(values) else values.astype(str)
        return values, "; ".join(notes)


def targets_from_specs(specs: dict) -> dict[str, Target]:
    """{name: Target} from the config's ``targets`` mapping."""
    return {name: Target.from_spec(name, spec) for name, spec in (specs or {}).items()}
