"""Writers of the detection cross-validation's outputs, one per product, each a config component
(``emphysema_finetune.yaml``: ``detection_writers``) writing CSV + Markdown (+ PNG) atomically into the run folder:

- ``DetectionTablesWriter``: Table 5 (``detection_table.csv``/``.md``: per subtype its four rows), the tidy
  summary, per-fold metrics, every test box's call and the subject -> fold map;
- ``LabelEfficiencyWriter``: Fig. 5 (``label_efficiency.csv``/``.md``/``.png``);
- ``LocationTableWriter``: Table 7 (``table7_location_sensitivity.csv``/``.md``, and the per-fold numbers of its
  paired test in ``table7_folds.csv``), when the run had random-location experiments.

``write(results, output_dir, note)`` returns {name: path} of what it wrote; ``note`` (the synthetic-data caption)
heads every Markdown table and the figure.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from custom.atomic_io import atomic_path
from custom.emphysema.cross_validation import DetectionResults
from custom.emphysema.detection_plots import plot_label_efficiency
from custom.emphysema.detection_tables import detection_table, efficiency_table, markdown_table, summarise
from custom.emphysema.random_location import RANDOM_LOCATION, location_folds, location_table


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def table_header(results: DetectionResults, note: str = "", summary: str = "Mean ± s.d. over folds.") -> str:
    """What every Markdown table of the run says first: the caption, the data, the folds and the rule."""
    return (f"{note}\n\n" if note else "") + (
        f"{results.n_boxes} boxes from {results.n_subjects} subjects, {results.n_folds} subject-grouped folds (the "
        f"same for every row); one binary detector per subtype (healthy vs subtype boxes); {results.rule}. "
        f"{summary}\n\n"
    )


class DetectionTablesWriter:
    """Table 5 and the run's long results: ``box_predictions.csv``, ``fold_metrics.csv``, ``detection_summary.csv``,
    ``detection_table.csv``/``.md``, ``folds.csv``."""

    def write(self, results: DetectionResults, output_dir: str | Path, note: str = "") -> dict:
        out = Path(output_dir)
        summary = summarise(results.fold_metrics)
        table = detection_table(summary)
        caption = (
            "Table 5: mean ± s.d. over the folds that define the metric (`folds`: how many have an F1); "
            "all training annotations of each fold."
        )
        if results.baseline:
            caption += f" {results.baseline}."
        return {
            "box_predictions": write_csv(results.predictions, out / "box_predictions.csv"),
            "fold_metrics": write_csv(results.fold_metrics, out / "fold_metrics.csv"),
            "summary": write_csv(summary, out / "detection_summary.csv"),
            "table": write_csv(table, out / "detection_table.csv"),
            "table_md": write_text(
                out / "detection_table.md", table_header(results, note, caption) + markdown_table(table)
            ),
            "folds": write_csv(results.folds(), out / "folds.csv"),
        }


class LabelEfficiencyWriter:
    """Fig. 5: ``label_efficiency.csv``/``.md`` (F1 per subtype against the share of annotations, full fine-tuning)
    and ``label_efficiency.png``."""

    def write(self, results: DetectionResults, output_dir: str | Path, note: str = "") -> dict:
        out = Path(output_dir)
        efficiency = efficiency_table(summarise(results.fold_metrics))
        return {
            "efficiency": write_csv(efficiency, out / "label_efficiency.csv"),
            "efficiency_md": write_text(
                out / "label_efficiency.md",
                table_header(results, note) + markdown_table(efficiency.drop(columns=["f1_text"])),
            ),
            "curve": plot_label_efficiency(efficiency, out / "label_efficiency.png", note=note),
        }


class LocationTableWriter:
    """Table 7: box accuracy of the linear readout (each subtype's binary detector) with random vs patch
    locations, one-sided paired t-test over the same folds (``table7_location_sensitivity.csv``/``.md``), and the
    per-fold numbers (``table7_folds.csv``, also in the Markdown). Nothing is written when the run had no
    random-location experiment."""

    def write(self, results: DetectionResults, output_dir: str | Path, note: str = "") -> dict:
        if RANDOM_LOCATION not in set(results.fold_metrics.get("location", ())):
            return {}
        out = Path(output_dir)
        table = location_table(results.fold_metrics)
        per_fold = location_folds(results.fold_metrics)
        shown = table[
            [
                "subtype",
                "random location",
                "patch location",
                "mean difference",
                "paired folds",
                "p (one-sided paired t-test)",
            ]
        ]
        header = table_header(
            results,
            note,
            "Linear readout, box accuracy (subtype vs healthy boxes), mean ± s.d. "
            "over folds; p: one-sided paired t-test (scipy.stats.ttest_rel, patch "
            "> random) over the folds where both arms have a number.",
        )
        text = header + markdown_table(shown) + "\nPer fold (accuracy; difference = patch - random):\n\n"
        return {
            "location_table": write_csv(table, out / "table7_location_sensitivity.csv"),
            "location_folds": write_csv(per_fold, out / "table7_folds.csv"),
            "location_table_md": write_text(out / "table7_location_sensitivity.md", text + markdown_table(per_fold)),
        }
