"""The one reader and writer of the bundle's one-row-per-subject CSV tables, above all the embedding table
(``subject_embeddings.csv``: subject_id, e0..e127) that the embed workflow, the ablation runs and the random-init
baseline write and the evaluation reads.

Subject ids are read and written as text, so ``0001`` stays ``0001``; writes are atomic (a table is either the
old one or the new one, never half written).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from custom.atomic_io import atomic_path
from custom.errors import MissingInputError, producer_of

ID_COLUMN = "subject_id"
EMBEDDING_FILE = "subject_embeddings.csv"


def require_columns(table: pd.DataFrame, columns: Sequence[str], source: str | Path) -> None:
    """Raise a KeyError naming the file and every missing column."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise KeyError(f"{source}: missing column(s) {missing}; the file has {list(table.columns)}")


def read_subject_table(path: str | Path, what: str, id_column: str = ID_COLUMN) -> pd.DataFrame:
    """A CSV with one row per subject, indexed by ``id_column`` (read as text)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(path, what, producer_of(path))
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


def read_embedding_table(path: str | Path) -> pd.DataFrame:
    """Subject embeddings as floats indexed by subject id; non-numeric columns are an error naming the file."""
    path = embedding_path(path)
    table = read_subject_table(path, "embedding table")
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric or table.shape[1] == 0:
        raise ValueError(f"{path}: expected subject_id plus numeric feature columns, got non-numeric {non_numeric}")
    if not np.isfinite(table.to_numpy(np.float64)).all():
        raise ValueError(f"{path}: embeddings contain NaN or infinite values")
    return table.astype(np.float64)


def embedding_table(subject_ids: Sequence[str], vectors) -> pd.DataFrame:
    """The table of ``vectors`` (one row per subject): index subject_id (text), columns e0..e{D-1}."""
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(subject_ids), -1)
    table = pd.DataFrame(
        vectors,
        index=pd.Index([str(s) for s in subject_ids], name=ID_COLUMN),
        columns=[f"e{i}" for i in range(vectors.shape[1])],
    )
    return table


def write_embedding_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write ``table`` (indexed by subject id, as ``embedding_table`` makes) to ``path`` (a file or a folder)
    atomically; returns the file."""
    path = embedding_path(path) if Path(path).suffix != ".csv" else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        table.rename_axis(ID_COLUMN).to_csv(tmp, index=True)
    return path
