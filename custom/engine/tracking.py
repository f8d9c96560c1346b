"""The MLflow run of a pre-training: MONAI's ``MLFlowHandler`` plus what a user comparing runs in the MLflow UI
needs to tell which data and code made a run, and a resume that continues the same run cleanly.

- tags: bundle version (``configs/metadata.json``), git commit (when the code is a git checkout), host, world
  size, data folder, the command line;
- the prepared cohort's ``manifest.csv`` as an MLflow dataset input (name, digest, source) and as an artifact;
- at completion, artifacts: the config files the run was started with, the training-curve picture (drawn from
  this run's metric history) and the exported weights (``models/pretrained.pt``, loadable with ``torch.load``);
- resume: the run id is kept in the checkpoint folder (``mlflow_run.json``); a resumed training continues that
  run, says "resumed from iteration N" (console and tag ``resumed_at_iterations``), and does not log again the
  steps the run already holds (the resume is exact, so they would be the same numbers twice).
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from monai.handlers import MLFlowHandler

import custom
from custom.atomic_io import atomic_path

logger = logging.getLogger(__name__)
RUN_RECORD = "mlflow_run.json"


def bundle_version() -> str:
    try:
        return str(json.loads((Path(custom.bundle_root()) / "configs" / "metadata.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def git_commit() -> str | None:
    """The commit of the code when it runs from a git checkout (with ``+dirty`` for uncommitted changes)."""
    root = Path(custom.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def invoked_config_files(default=None) -> list[str]:
    """The ``--config_file`` files of the command line (``monai.bundle run``), else ``default``."""
    argv = sys.argv
    value = None
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
    if value is None:
        return [
            str(p) for p in ([] if default is None else default if isinstance(default, (list, tuple)) else [default])
        ]
    value = value.strip()
    if value.startswith("["):
        import ast

        return [str(p) for p in ast.literal_eval(value)]
    return [p for p in value.split(",") if p]


def _world_size() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


class PretrainingRun(MLFlowHandler):
    """``MLFlowHandler`` (all its arguments) + ``run_dir`` (where ``mlflow_run.json`` is kept: the checkpoint
    folder), ``dataset_dir`` (the prepared cache: its manifest is the run's dataset), ``config_files`` and
    ``weights`` / ``curves_file`` (logged at completion). Attach it after the handler that loads a checkpoint,
    so it sees the resumed iteration."""

    def __init__(
        self,
        run_dir: str | Path,
        dataset_dir: str | Path | None = None,
        config_files=None,
        weights: str | Path | None = None,
        curves_file: str | Path | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.run_dir = Path(run_dir)
        self.dataset_dir = None if dataset_dir is None else Path(dataset_dir)
        self.config_files = [Path(p) for p in (config_files or [])]
        self.weights = None if weights is None else Path(weights)
        self.curves_file = None if curves_file is None else Path(curves_file)
        self.logged_up_to = 0  # steps at or below this are already in the run (a resumed run)

    # ---- start: continue the recorded run on resume, then tags and the dataset
    def start(self, engine) -> None:
        resumed_at = int(engine.state.iteration or 0)
        if resumed_at and self.cur_run is None:
            self.cur_run = self._recorded_run()
            if self.cur_run is not None:
                self.logged_up_to = self._last_logged_step()
        super().start(engine)
        run_id = self.cur_run.info.run_id
        if resumed_at:
            message = f"resumed from iteration {resumed_at}"
            if self.logged_up_to:
                message += f" (MLflow run {run_id} continues; its steps up to {self.logged_up_to} are kept)"
            engine.logger.info(message)
            print(message, flush=True)
            earlier = self.cur_run.data.tags.get("resumed_at_iterations", "")
            self.client.set_tag(run_id, "resumed_at_iterations", ",".join(filter(None, [earlier, str(resumed_at)])))
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.run_dir / RUN_RECORD) as tmp:
                Path(tmp).write_text(json.dumps({"run_id": run_id, "tracking_uri": self.client.tracking_uri}))
        self._log_tags(run_id)
        self._log_manifest(run_id)

    def _recorded_run(self):
        try:
            record = json.loads((self.run_dir / RUN_RECORD).read_text())
            return self.client.get_run(record["run_id"])
        except Exception as error:  # noqa: BLE001 - no record or another store: a new run, said in the log
            logger.info("no MLflow run to continue in %s (%s): starting a new one", self.run_dir, error)
            return None

    def _last_logged_step(self) -> int:
        keys = list(self.cur_run.data.metrics)
        if not keys:
            return 0
        return max(m.step for m in self.client.get_metric_history(self.cur_run.info.run_id, keys[0]))

    def _log_tags(self, run_id: str) -> None:
        tags = {
            "bundle_version": bundle_version(),
            "host": platform.node(),
            "world_size": str(_world_size()),
            "command": shlex.join(sys.argv)[:4000],
        }
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        if self.dataset_dir is not None:
            tags["dataset_dir"] = str(self.dataset_dir.resolve())
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def _log_manifest(self, run_id: str) -> None:
        """The prepared cohort's manifest: an MLflow dataset input (digest = what data) and an artifact."""
        manifest = None if self.dataset_dir is None else self.dataset_dir / "manifest.csv"
        if manifest is None or not manifest.is_file():
            return
        import mlflow
        import pandas as pd

        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": it is a local file
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(table, source=str(manifest.resolve()), name="prepared_cohort")
        logged = {d.dataset.digest for d in self.client.get_run(run_id).inputs.dataset_inputs}
        if dataset.digest not in logged:
            self.client.log_inputs(run_id, [mlflow.entities.DatasetInput(dataset._to_mlflow_entity())])
            self.client.log_artifact(run_id, str(manifest), artifact_path="dataset")

    # ---- iterations: a resumed run does not log again what the run holds
    def iteration_completed(self, engine) -> None:
        if engine.state.iteration > self.logged_up_to:
            super().iteration_completed(engine)

    # ---- completion: config files, the curves, the weights
    def complete(self) -> None:
        super().complete()
        if self.cur_run is None:
            return
        run_id = self.cur_run.info.run_id
        for path in self.config_files:
            if path.is_file():
                self.client.log_artifact(run_id, str(path), artifact_path="config")
        if self.curves_file is not None:
            try:
                from custom.engine.training_curves import plot_training_curves

                plot_training_curves(self.client.tracking_uri, self.curves_file, run_id=run_id)
                self.client.log_artifact(run_id, str(self.curves_file), artifact_path="figures")
            except Exception as error:  # noqa: BLE001 - a picture must not fail a finished training
                logger.warning("training curves not drawn: %s", error)
        if self.weights is not None and self.weights.is_file():
            self.client.log_artifact(run_id, str(self.weights), artifact_path="model")
