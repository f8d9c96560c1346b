"""The evaluation's MLflow run: parameters, every mean / s.d. / C(t) as a metric, and the tables, plots and long
result files as artifacts.

``MlflowLogger`` (config id ``mlflow``) uses an explicit ``MlflowClient``: the fluent API
(``mlflow.set_tracking_uri``) also sets the ``MLFLOW_TRACKING_URI`` environment variable, which would redirect
every later MLflow handler of the process (training, fine-tuning) into this store.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from custom.flags import as_bool

ARTIFACT_FOLDERS = ("tables", "plots")
ARTIFACT_FILES = ("readouts.csv", "survival.csv", "covid_readouts.csv", "notes.txt")


def metric_name(*parts) -> str:
    """An MLflow-safe metric name (alphanumerics, _ - . space : /)."""
    return "/".join(re.sub(r"[^0-9A-Za-z_\-. :]", "_", str(p)) for p in parts)


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


class MlflowLogger:
    """One MLflow run per evaluation in ``tracking_uri`` (a local sqlite store by default; artifacts beside it),
    experiment ``experiment_name``, run ``run_name``. ``enabled: false`` (or no URI) logs nothing."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "drasclr_evaluation",
        run_name: str | None = None,
        enabled: bool = True,
    ):
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.enabled = as_bool(enabled) and bool(tracking_uri)

    def _experiment_id(self, client) -> str:
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        artifacts = None
        if self.tracking_uri.startswith("sqlite:///"):  # artifacts beside the database, as MONAI's MLFlowHandler does
            artifacts = Path(self.tracking_uri[len("sqlite:///") :]).parent.joinpath("mlruns").resolve().as_uri()
        return client.create_experiment(self.experiment_name, artifact_location=artifacts)

    def log(self, params: dict, metrics: dict, out_dir: str | Path) -> str | None:
        """Log one finished run; returns its id (None when disabled)."""
        if not self.enabled:
            return None
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunStatus

        out = Path(out_dir)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        run_id = client.create_run(self._experiment_id(client), run_name=self.run_name).info.run_id
        now = int(time.time() * 1000)
        values = [Param(k, str(v)[:500]) for k, v in params.items()]
        for start in range(0, len(values), 100):  # MLflow caps params at 100 per batch
            client.log_batch(run_id, params=values[start : start + 100])
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for start in range(0, len(items), 500):  # MLflow caps a batch at 1000 entries
            client.log_batch(run_id, metrics=items[start : start + 500])
        for sub in ARTIFACT_FOLDERS:
            if (out / sub).is_dir():
                client.log_artifacts(run_id, str(out / sub), artifact_path=sub)
        for name in ARTIFACT_FILES:
            if (out / name).is_file():
                client.log_artifact(run_id, str(out / name))
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        return run_id
