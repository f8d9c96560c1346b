"""The evaluation's MLflow run: the tags, inputs and config every run of the bundle records
(``custom.engine.tracking.WorkflowRun``), the parameters, every mean / s.d. / C(t) as a metric, each readout's
per-fold scores as a metric history (step = fold), and the tables, plots and long result files as artifacts.

It uses an explicit ``MlflowClient`` (through ``WorkflowRun``): the fluent API (``mlflow.set_tracking_uri``) also
sets the ``MLFLOW_TRACKING_URI`` environment variable, which would redirect every later MLflow handler of the
process (training, fine-tuning) into this store.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from custom.engine.tracking import WorkflowRun, metric_name

ARTIFACT_FOLDERS = ("tables", "plots")
ARTIFACT_FILES = ("readouts.csv", "survival.csv", "covid_readouts.csv", "notes.txt")


def result_metrics(readouts: pd.DataFrame | None, survival: pd.DataFrame | None, severity: pd.DataFrame | None) -> dict:
    """{name: value}: phenotype/<set>/<target>/<metric>/mean|sd, covid/..., survival/<row>/c_td_p<percentile>[_se]."""
    metrics = {}
    for frame, prefix in ((readouts, "phenotype"), (severity, "covid")):
        if frame is None:
            continue
        for r in frame[frame["status"] == "ok"].itertuples():
            if np.isfinite(r.mean):
                metrics[metric_name(prefix, r.feature_set, r.target, r.metric, "mean")] = r.mean
            if np.isfinite(r.sd):
                metrics[metric_name(prefix, r.feature_set, r.target, r.metric, "sd")] = r.sd
    if survival is not None:
        for r in survival[survival["status"] == "ok"].itertuples():
            if np.isfinite(r.concordance):
                metrics[metric_name("survival", r.feature_row, f"c_td_p{r.percentile}")] = r.concordance
            if np.isfinite(r.standard_error):
                metrics[metric_name("survival", r.feature_row, f"c_td_p{r.percentile}_se")] = r.standard_error
    return metrics


def fold_metrics(readouts: pd.DataFrame | None, severity: pd.DataFrame | None) -> list:
    """Each readout's per-fold scores (``fold_values``) as metric histories ``<prefix>/<set>/<target>/<metric>/fold``
    at step = fold; rows scored on pooled predictions have none."""
    from mlflow.entities import Metric

    out, now = [], int(time.time() * 1000)
    for frame, prefix in ((readouts, "phenotype"), (severity, "covid")):
        if frame is None or "fold_values" not in frame:
            continue
        for r in frame[frame["status"] == "ok"].itertuples():
            values = pd.to_numeric(pd.Series(str(r.fold_values).split()), errors="coerce")
            name = metric_name(prefix, r.feature_set, r.target, r.metric, "fold")
            out += [Metric(name, float(v), now, fold) for fold, v in enumerate(values) if np.isfinite(v)]
    return out


class MlflowLogger:
    """One MLflow run per evaluation in ``tracking_uri`` (a local sqlite store by default; artifacts beside it),
    experiment ``experiment_name``, run ``run_name``, with the input tables ``datasets`` (``{name: table or
    folder}``; a folder means its ``manifest.csv`` or ``subject_embeddings.csv``; missing ones are skipped) and
    ``embeddings`` (the feature sets, logged as datasets ``embeddings: <name>``) and the ``config_files``.
    ``enabled: false`` (or no URI) logs nothing."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "drasclr_evaluation",
        run_name: str | None = None,
        enabled: bool = True,
        datasets: Mapping | None = None,
        embeddings: Mapping | None = None,
        config_files=None,
    ):
        self.run = WorkflowRun(
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            run_name=run_name,
            enabled=enabled,
            datasets={**(datasets or {}), **{f"embeddings: {k}": v for k, v in (embeddings or {}).items()}},
            dataset_context="evaluation",
            config_files=config_files,
        )
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.enabled = self.run.enabled

    def log(self, params: dict, metrics: dict, out_dir: str | Path, fold_scores: list | None = None) -> str | None:
        """Log one finished evaluation whose outputs are in ``out_dir``; returns the run id (None when disabled).
        ``fold_scores`` (``fold_metrics``): per-fold histories; by default read from ``out_dir``'s result tables."""
        if not self.enabled:
            return None
        out = Path(out_dir)
        if fold_scores is None:
            tables = {n: out / f for n, f in (("readouts", "readouts.csv"), ("covid", "covid_readouts.csv"))}
            frames = {n: pd.read_csv(p) if p.is_file() else None for n, p in tables.items()}
            fold_scores = fold_metrics(frames["readouts"], frames["covid"])
        self.run.artifacts = {
            **{sub: [out / sub] for sub in ARTIFACT_FOLDERS},
            "": [out / name for name in ARTIFACT_FILES],
        }
        with self.run as run:
            run.log_params(params)
            run.log_metrics(metrics)
            run.log_metrics(fold_scores)
        return run.run_id
