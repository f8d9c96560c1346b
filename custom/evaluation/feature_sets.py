"""The subject-level feature sets the evaluation compares, each a table indexed by subject id, and the reader of
the embedding tables (``subject_embeddings.csv``: subject_id, e0..e127) that the embed workflow writes for
DrasCLR and that ``bundle/scripts/run_ablations.py`` writes for plain MoCo and the ablation models.

``EmbeddingSets`` is the config component (``evaluate.yaml``: ``copd#embeddings``, ``covid_cohort#embeddings``):
display name -> table or the folder holding it; a set whose file does not exist yet is skipped with a note. The
baselines computed from the prepared cache (LAA-950, a random-init encoder) are in ``custom.evaluation.baselines``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

EMBEDDING_FILE = "subject_embeddings.csv"


def require_columns(table: pd.DataFrame, columns: Sequence[str], source: str | Path) -> None:
    """Raise a KeyError naming the file and every missing column."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise KeyError(f"{source}: missing column(s) {missing}; the file has {list(table.columns)}")


def read_subject_table(path: str | Path, what: str, id_column: str = "subject_id") -> pd.DataFrame:
    """A CSV with one row per subject, indexed by ``id_column`` (read as text)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    table = pd.read_csv(path, dtype={id_column: str})
    require_columns(table, [id_column], path)
    duplicated = table[id_column][table[id_column].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"{path}: subject ids appear more than once: {duplicated[:5]}")
    return table.set_index(id_column)


def embedding_path(path: str | Path) -> Path:
    """A ``subject_embeddings.csv`` path, or a folder holding one (the embed workflow's ``out_dir``)."""
    path = Path(path)
    return path / EMBEDDING_FILE if path.is_dir() else path


def load_embedding_table(path: str | Path) -> pd.DataFrame:
    """Subject embeddings as floats indexed by subject id; non-numeric columns are an error naming the file."""
    path = embedding_path(path)
    table = read_subject_table(path, "embedding table")
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric or table.shape[1] == 0:
        raise ValueError(f"{path}: expected subject_id plus numeric feature columns, got non-numeric {non_numeric}")
    if not np.isfinite(table.to_numpy(np.float64)).all():
        raise ValueError(f"{path}: embeddings contain NaN or infinite values")
    return table.astype(np.float64)


class EmbeddingSets:
    """Embedding tables by display name (``paths``: name -> ``subject_embeddings.csv`` or the folder holding it;
    a None path is left out). ``read`` returns the tables that exist and notes the others."""

    def __init__(self, paths: dict | None = None):
        self.paths = {str(name): path for name, path in (paths or {}).items()}

    def read(self, notes, cohort: str) -> dict[str, pd.DataFrame]:
        sets: dict[str, pd.DataFrame] = {}
        for name, path in self.paths.items():
            if path is None:
                continue
            if not embedding_path(path).is_file():
                notes.add(f"[{cohort}] feature set {name!r} skipped: {embedding_path(path)} not found")
                continue
            sets[name] = load_embedding_table(path)
        return sets
