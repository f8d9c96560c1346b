"""The ``evaluate`` workflow (``bundle/configs/evaluate.yaml``): the order in which its components run.

Feature sets + clinical table (``Cohort``) -> the paper's image-level results: phenotype readouts (Tables 2, 6, 8;
``ReadoutAnalysis``), Cox survival (Table 3; ``SurvivalAnalysis``), COVID-like severity grades (Table 4), the
emphysema-detection results another workflow wrote (Tables 5, 7, Figs. 4-5), written as CSV, Markdown and PNG
(``TableWriter``, the figure components) and logged to MLflow (``MlflowLogger``). Each piece is a config
component a user can swap; this module only runs them in order.

Missing optional inputs (an embedding set not produced yet, no COVID cohort, no detection results) are skipped
with a logged note, which also lands in ``notes.txt``; bad inputs (a missing column, a non-numeric embedding)
stop the run with an error naming the file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from custom.atomic_io import atomic_path
from custom.evaluation.cohort import Cohort
from custom.evaluation.mlflow_logging import MlflowLogger, result_metrics
from custom.evaluation.notes import Notes
from custom.evaluation.readout_analysis import ReadoutAnalysis
from custom.evaluation.survival_analysis import SurvivalAnalysis
from custom.evaluation.tables import TableWriter
from custom.flags import as_bool

SYNTHETIC_NOTE = (
    "Computed on the SYNTHETIC demo cohort: numbers about synthetic data, not about patients, and too "
    "few subjects to rank methods."
)


def synthetic_caption(synthetic: bool) -> str:
    """The caption above every computed table: the synthetic-data warning, or none for real data."""
    return SYNTHETIC_NOTE if as_bool(synthetic) else ""


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


class Evaluation:
    """Run every analysis the inputs allow, in order, and write the results under ``output_dir``:
    ``readouts.csv``, ``survival.csv``, ``covid_readouts.csv``, ``tables/``, ``plots/``, ``notes.txt``.

    ``cohort`` (required) is read out with ``phenotypes`` and, when ``survival`` is enabled, fitted by it;
    ``severity_cohort`` (optional, skipped with a note when absent) is read out with ``severity``; ``figures``
    draw into ``plots/``; ``tracker`` logs the run (None: no MLflow)."""

    def __init__(
        self,
        output_dir: str | Path,
        cohort: Cohort,
        phenotypes: ReadoutAnalysis,
        tables: TableWriter,
        survival: SurvivalAnalysis | None = None,
        severity_cohort: Cohort | None = None,
        severity: ReadoutAnalysis | None = None,
        figures: Sequence = (),
        tracker: MlflowLogger | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.cohort, self.phenotypes, self.survival = cohort, phenotypes, survival
        self.severity_cohort, self.severity = severity_cohort, severity
        self.tables, self.figures, self.tracker = tables, list(figures or []), tracker

    def run(self) -> dict:
        """Returns the long result tables, the notes and the MLflow run id."""
        start = time.perf_counter()
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        notes = Notes()

        copd = self.cohort.load(notes)
        readouts = self.phenotypes.run(copd)
        _write_csv(readouts, out / "readouts.csv")

        survival = None
        if self.survival is not None and self.survival.enabled:
            survival = self.survival.run(copd, notes)
            _write_csv(survival, out / "survival.csv")

        severity = None
        covid = self.severity_cohort.load(notes) if self.severity_cohort is not None and self.severity else None
        if covid is not None:
            severity = self.severity.run(covid)
            _write_csv(severity, out / "covid_readouts.csv")
        elif self.severity is not None:
            notes.add("Table 4 (severity grading) skipped: no COVID-like cohort to read out")

        self.tables.write(
            readouts, self.phenotypes.labels, survival, severity, self.severity.labels if self.severity else {}, notes
        )
        for figure in self.figures:
            figure.draw(out / "plots", copd, notes)
        notes.add(f"evaluation finished in {time.perf_counter() - start:.1f} s; feature sets: {list(copd.sets)}")
        with atomic_path(out / "notes.txt") as tmp:
            tmp.write_text(notes.text())

        run_id = None
        if self.tracker is not None:
            params = {
                "folds": self.phenotypes.readout.folds,
                "seed": self.phenotypes.readout.seed,
                "feature_sets": list(copd.sets),
                "n_subjects": len(copd.clinical),
                "targets": list(self.phenotypes.targets),
                **self.cohort.params(),
                "readout": self.phenotypes.readout.params(),
                **(self.survival.params() if self.survival is not None else {}),
            }
            run_id = self.tracker.log(params, result_metrics(readouts, survival, severity), out)
        return {
            "readouts": readouts,
            "survival": survival,
            "covid": severity,
            "notes": notes.lines,
            "mlflow_run_id": run_id,
            "output_dir": str(out),
        }
