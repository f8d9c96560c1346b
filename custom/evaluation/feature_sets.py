"""The subject-level feature sets the evaluation compares, each a table indexed by subject id: the embedding
tables (``subject_embeddings.csv``, read by ``custom.subject_table``) that the embed workflow writes for DrasCLR
and that ``bundle/scripts/run_ablations.py`` writes for plain MoCo and the ablation models.

``EmbeddingSets`` is the config component (``evaluate.yaml``: ``copd#embeddings``, ``covid_cohort#embeddings``):
display name -> table or the folder holding it; a set whose file does not exist yet is skipped with a note. The
baselines computed from the prepared cache (LAA-950, a random-init encoder) are in ``custom.evaluation.baselines``.
"""

from __future__ import annotations

import pandas as pd

from custom.subject_table import embedding_path, read_embedding_table


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
            sets[name] = read_embedding_table(path)
        return sets
