"""The MLflow runs of the bundle's workflows, in one place, so that every run (pre-training, fine-tuning, box
detection, evaluation, an ablation family and its variants) records the same things and a user comparing runs in
the MLflow UI can tell which data, code and settings made each one:

- tags: bundle version (``configs/metadata.json``), git commit (when the code is a git checkout), host, world
  size, the command line, the data folder (``dataset_dir``); ``mlflow.parentRunId`` for a run started inside a
  family's parent run (``nested_runs``: the UI groups the children under their parent);
- the input tables (a prepared cohort's ``manifest.csv``, an annotation or clinical table, embedding tables) as
  MLflow dataset inputs (name, digest, source) and as artifacts under ``dataset/``;
- the config files it was started with (``config/``; for a ``monai.bundle run`` command also ``resolved.yaml``,
  the files merged with the command line's overrides), the pictures it drew (``figures/``), the model it
  exported (``model/``, loadable with ``torch.load``), metrics with steps.

Two ways in: ``TrainingRun`` is MONAI's ``MLFlowHandler`` for an ignite engine (``PretrainingRun``: the
pre-training's, with its resume; the fine-tuning's in ``emphysema_finetune.yaml``); ``WorkflowRun`` is a run
around work that is not an engine (the detection cross-validation, the evaluation, a family's parent run).

Resume (pre-training): the run id is kept in the checkpoint folder (``mlflow_run.json``); a resumed training
continues that run, says "resumed from iteration N" (console and tag ``resumed_at_iterations``), and does not log
again the steps the run already holds (the resume is exact, so they would be the same numbers twice).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from monai.handlers import MLFlowHandler

import custom
from custom.atomic_io import atomic_path
from custom.flags import as_bool

logger = logging.getLogger(__name__)
RUN_RECORD = "mlflow_run.json"
PARENT_ENV = "DRASCLR_MLFLOW_PARENT"  # {"run_id", "tracking_uri"} of the family run the runs started now belong to
PARENT_TAG = "mlflow.parentRunId"


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


# Arguments of ``monai.bundle run`` itself; every other ``--key value`` of its command line is a config override.
RUN_ARGUMENTS = {
    "run_id",
    "init_id",
    "final_id",
    "meta_file",
    "config_file",
    "logging_file",
    "tracking",
    "workflow_type",
    "args_file",
    "properties_path",
}


def invoked_overrides(argv=None) -> dict | None:
    """The config overrides of a ``python -m monai.bundle run`` command line, values parsed as fire parses them
    (``3`` an int, ``[0.5,1.0]`` a list, ``--flag`` alone True); None when the process was not started that way."""
    from fire.parser import DefaultParseValue

    argv = list(sys.argv if argv is None else argv)
    if not argv or not Path(argv[0]).as_posix().endswith("monai/bundle/__main__.py"):
        return None
    overrides, i = {}, 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            continue  # the subcommand and the run id
        key, _, value = arg[2:].partition("=")
        if not _:
            if i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            else:
                value = "True"
        if key not in RUN_ARGUMENTS:
            overrides[key] = DefaultParseValue(value)
    return overrides


def write_resolved_config(config_files, out_file: str | Path) -> Path | None:
    """The config a ``monai.bundle run`` command ran: its config files merged, its overrides applied (expressions
    not evaluated), as YAML; None when there are no files or the command line was not ``monai.bundle run``."""
    from monai.bundle import ConfigParser

    overrides = invoked_overrides()
    files = [str(p) for p in config_files or [] if Path(p).is_file()]
    if overrides is None or not files:
        return None
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    config = {k: v for k, v in parser.get().items() if v or k != "_meta_"}  # read_config adds an empty _meta_
    with atomic_path(out_file) as tmp:
        ConfigParser.export_config_file(config, str(tmp), fmt="yaml", sort_keys=False)
    return Path(out_file)


def log_configs(client, run_id: str, config_files) -> list[str]:
    """The config files under ``config/`` and, for a ``monai.bundle run`` command, ``config/resolved.yaml`` (the
    files merged with the command line's overrides)."""
    import tempfile

    done = log_files(client, run_id, config_files, "config")
    with tempfile.TemporaryDirectory() as folder:
        try:
            resolved = write_resolved_config(config_files, Path(folder) / "resolved.yaml")
        except Exception as error:  # noqa: BLE001 - a record must not fail a finished run
            logger.warning("resolved config not written: %s", error)
            resolved = None
        if resolved is not None:
            client.log_artifact(run_id, str(resolved), artifact_path="config")
            done.append("resolved.yaml")
    return done


def _world_size() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def metric_name(*parts) -> str:
    """An MLflow-safe metric name (alphanumerics, _ - . space : /)."""
    return "/".join(re.sub(r"[^0-9A-Za-z_\-. :]", "_", str(p)) for p in parts)


# ---------------------------------------------------------------- what every run records
def run_tags(tracking_uri: str | None = None, dataset_dir: str | Path | None = None) -> dict:
    """The provenance tags of a run (and its parent, when started inside ``nested_runs`` on the same store)."""
    tags = {
        "bundle_version": bundle_version(),
        "host": platform.node(),
        "world_size": str(_world_size()),
        "command": shlex.join(sys.argv)[:4000],
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    if dataset_dir is not None:
        tags["dataset_dir"] = str(Path(dataset_dir).resolve())
    parent = current_parent(tracking_uri)
    if parent:
        tags[PARENT_TAG] = parent
    return tags


@contextmanager
def nested_runs(run_id: str, tracking_uri: str):
    """Every run started inside this block (in this process or the processes it starts) on the same tracking
    store becomes a child of ``run_id``: MLflow's parent tag, which the UI groups by."""
    before = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = json.dumps({"run_id": run_id, "tracking_uri": tracking_uri})
    try:
        yield run_id
    finally:
        if before is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = before


def current_parent(tracking_uri: str | None) -> str | None:
    """The run id of the enclosing ``nested_runs`` block when it is on ``tracking_uri`` (a parent in another store
    would be a dangling tag)."""
    try:
        parent = json.loads(os.environ.get(PARENT_ENV) or "{}")
    except ValueError:
        return None
    if parent.get("run_id") and tracking_uri and parent.get("tracking_uri") == tracking_uri:
        return parent["run_id"]
    return None


def experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created when absent with its artifacts beside a local sqlite database
    (``<folder of mlruns.db>/mlruns``, as MONAI's ``MLFlowHandler`` does)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///") :]).parent.joinpath("mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def dataset_table(path: str | Path | None) -> Path | None:
    """The table file of an input: a file, or a folder's ``manifest.csv`` (a prepared cache) or
    ``subject_embeddings.csv`` (an embedding folder); None when there is none."""
    if path is None or str(path) == "":
        return None
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in ("manifest.csv", "subject_embeddings.csv") if (path / n).is_file()), path)
    return path if path.is_file() else None


def log_datasets(client, run_id: str, datasets: Mapping | None, context: str | None = None) -> list[str]:
    """Log each ``{name: table or folder}`` as an MLflow dataset input (digest = what data; tag
    ``mlflow.data.context``) and its file as an artifact under ``dataset/``; missing ones are skipped. Returns
    the names logged."""
    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    run = client.get_run(run_id)
    logged = {d.dataset.digest for d in run.inputs.dataset_inputs}
    used = {f.path for f in client.list_artifacts(run_id, "dataset")}
    names = []
    for name, source in (datasets or {}).items():
        table_file = dataset_table(source)
        if table_file is None:
            continue
        try:
            table = pd.read_csv(table_file, dtype=str, keep_default_na=False)
        except (OSError, ValueError) as error:
            logger.warning("%s: not logged as MLflow dataset %r (%s)", table_file, name, error)
            continue
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": it is a local file
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(table, source=str(table_file.resolve()), name=str(name))
        if dataset.digest in logged:
            continue
        tags = [InputTag(key="mlflow.data.context", value=context)] if context else None
        client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags=tags)])
        logged.add(dataset.digest)
        folder = "dataset"  # a second table of the same file name goes into a folder named after its dataset
        if f"dataset/{table_file.name}" in used:
            folder += "/" + re.sub(r"[^0-9A-Za-z_.-]+", "_", str(name)).strip("_")
        client.log_artifact(run_id, str(table_file), artifact_path=folder)
        used.add(f"{folder}/{table_file.name}")
        names.append(str(name))
    return names


def _expand(paths) -> list[Path]:
    """Paths (a glob pattern expands, sorted) that exist."""
    if paths is None:
        return []
    out = []
    for item in [paths] if isinstance(paths, (str, Path)) else paths:
        if item is None:
            continue
        matches = sorted(glob.glob(str(item))) if any(c in str(item) for c in "*?[") else [str(item)]
        out += [Path(p) for p in matches if Path(p).exists()]
    return out


def log_files(client, run_id: str, paths, artifact_path: str | None = None) -> list[str]:
    """Log files and folders (glob patterns allowed) that exist under ``artifact_path``; returns what was logged."""
    done = []
    for path in _expand(paths):
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)
        done.append(str(path))
    return done


def log_params(client, run_id: str, params: Mapping | None) -> None:
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params
    values = [Param(str(k), str(v)[:500]) for k, v in (params or {}).items() if str(k) not in logged]
    for start in range(0, len(values), 100):  # MLflow caps params at 100 per batch
        client.log_batch(run_id, params=values[start : start + 100])


def log_metrics(client, run_id: str, metrics, step: int = 0) -> int:
    """Log ``{name: value}`` (at ``step``) or a list of ``mlflow.entities.Metric``; non-finite values are left
    out. Returns how many were logged."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    if isinstance(metrics, Mapping):
        metrics = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()]
    items = [m for m in metrics if math.isfinite(m.value)]
    for start in range(0, len(items), 500):  # MLflow caps a batch at 1000 entries
        client.log_batch(run_id, metrics=items[start : start + 500])
    return len(items)


def table_metrics(
    table,
    names: Iterable[str],
    values: Iterable[str],
    step: str | None = None,
    prefix: str = "",
    step_scale: float = 1,
) -> list:
    """Metrics as a result table gives them: one per row and ``values`` column, named
    ``prefix/<names columns>/<value column>``, at step ``round(row[step] * step_scale)`` (0 without a step
    column), e.g. per-fold scores at their fold, a label-efficiency curve at its percentage of annotations.
    ``table`` is a DataFrame or a CSV path (a missing file gives none)."""
    import pandas as pd
    from mlflow.entities import Metric

    if not isinstance(table, pd.DataFrame):
        if dataset_table(table) is None:
            return []
        table = pd.read_csv(table)
    names, now, out = list(names), int(time.time() * 1000), []
    columns = [c for c in values if c in table.columns]
    for row in table.to_dict("records"):
        at = 0 if step is None else row.get(step)
        if step is not None and not (isinstance(at, (int, float)) and math.isfinite(at)):
            continue
        for column in columns:
            value = pd.to_numeric(row[column], errors="coerce")
            if pd.notna(value) and math.isfinite(float(value)):
                name = metric_name(*([prefix] if prefix else []), *(row[n] for n in names), column)
                out.append(Metric(name, float(value), now, int(round(float(at) * step_scale))))
    return out


def plot_run_curves(client, run_id: str, out_file, curves=None, title: str = "") -> Path | None:
    """Draw a run's metric histories (``custom.engine.training_curves``; ``curves``: its panels, default the
    pre-training's) and log the picture under ``figures/``;
    a failure is logged, not raised (a picture must not fail a finished run)."""
    try:
        from custom.engine.training_curves import plot_training_curves

        path = plot_training_curves(client.tracking_uri, out_file, run_id=run_id, title=title, panels=curves)
        client.log_artifact(run_id, str(path), artifact_path="figures")
        return path
    except Exception as error:  # noqa: BLE001 - a picture must not fail a finished run
        logger.warning("training curves not drawn: %s", error)
        return None


# ---------------------------------------------------------------- an ignite engine's run
class TrainingRun(MLFlowHandler):
    """``MLFlowHandler`` (its arguments, from ``tracking_uri`` on) + what every run records (module docstring):
    ``dataset_dir`` (tag; its ``manifest.csv`` is the dataset ``prepared_cohort``), ``datasets`` (more ``{name:
    table}`` inputs), ``config_files``, and at completion ``model_files`` (``model/``), ``figures``
    (``figures/``) and the ``curves`` (panels of metric names, ``custom.engine.training_curves``) drawn from the
    run's history into ``curves_file``. ``run_dir``: where ``mlflow_run.json`` is kept so that a resumed training
    continues its run (the checkpoint folder); attach the handler after the one that loads a checkpoint, so it
    sees the resumed iteration."""

    def __init__(
        self,
        run_dir: str | Path | None = None,
        dataset_dir: str | Path | None = None,
        datasets: Mapping | None = None,
        config_files=None,
        model_files=None,
        figures=None,
        curves_file: str | Path | None = None,
        curves=None,
        curves_title: str = "",
        tracking_uri: str | None = None,
        experiment_name: str = "monai_experiment",
        run_name: str | None = None,
        iteration_log: bool | Callable = True,
        epoch_log: bool | Callable = True,
        output_transform: Callable = lambda x: x[0],
        state_attributes=None,
        tag_name: str = "Loss",
        experiment_param: dict | None = None,
        artifacts=None,
        optimizer_param_names="lr",
        close_on_complete: bool = False,
        artifact_location: str | None = None,
    ):
        super().__init__(
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            run_name=run_name,
            iteration_log=iteration_log,
            epoch_log=epoch_log,
            output_transform=output_transform,
            state_attributes=state_attributes,
            tag_name=tag_name,
            experiment_param=experiment_param,
            artifacts=artifacts,
            optimizer_param_names=optimizer_param_names,
            close_on_complete=close_on_complete,
            artifact_location=artifact_location,
        )
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.dataset_dir = None if dataset_dir is None else Path(dataset_dir)
        self.datasets = {**({"prepared_cohort": self.dataset_dir} if self.dataset_dir else {}), **(datasets or {})}
        self.config_files = [Path(p) for p in (config_files or [])]
        self.model_files = [p for p in (model_files or []) if p]
        self.figures = list(figures or [])
        self.curves_file = None if curves_file is None else Path(curves_file)
        self.curves, self.curves_title = curves, curves_title
        self.logged_up_to = 0  # steps at or below this are already in the run (a resumed run)

    # ---- start: continue the recorded run on resume, then tags and the datasets
    def start(self, engine) -> None:
        resumed_at = int(engine.state.iteration or 0) if self.run_dir is not None else 0
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
        elif self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.run_dir / RUN_RECORD) as tmp:
                Path(tmp).write_text(json.dumps({"run_id": run_id, "tracking_uri": self.client.tracking_uri}))
        for key, value in run_tags(self.client.tracking_uri, self.dataset_dir).items():
            self.client.set_tag(run_id, key, value)
        log_datasets(self.client, run_id, self.datasets, context="training")

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

    # ---- iterations: a resumed run does not log again what the run holds
    def iteration_completed(self, engine) -> None:
        if engine.state.iteration > self.logged_up_to:
            super().iteration_completed(engine)

    # ---- completion: config files, pictures, the model
    def complete(self) -> None:
        super().complete()
        if self.cur_run is None:
            return
        run_id = self.cur_run.info.run_id
        log_configs(self.client, run_id, self.config_files)
        if self.curves_file is not None:
            plot_run_curves(self.client, run_id, self.curves_file, self.curves, self.curves_title)
        log_files(self.client, run_id, self.figures, "figures")
        log_files(self.client, run_id, self.model_files, "model")


class PretrainingRun(TrainingRun):
    """The pre-training's run (``train.yaml``): ``weights`` (the exported query encoder) is its model."""

    def __init__(self, run_dir: str | Path, weights: str | Path | None = None, **kwargs):
        kwargs.setdefault("curves_title", "DrasCLR pre-training")
        super().__init__(run_dir=run_dir, model_files=[weights] if weights else None, **kwargs)


# ---------------------------------------------------------------- a run around work that is not an engine
class WorkflowRun:
    """One MLflow run around a piece of work (``run(work)``, or ``with`` it): at the start the tags, the
    ``datasets`` inputs (``{name: table or folder}``; ``dataset_dir``'s manifest as ``prepared_cohort``) and
    ``params``; at the end the ``metric_tables`` (``table_metrics`` keyword dicts with a ``path``), the
    ``figures``, the ``model_files``, ``artifacts`` (``{artifact folder: paths or glob patterns}``) and the
    ``config_files``, then FINISHED (FAILED when the work raised). ``work``: what ``run()`` runs by default.
    ``enabled: false`` (or no URI) only runs the work. ``nested()`` makes the runs started inside it children of
    this one (a family of runs).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "drasclr",
        run_name: str | None = None,
        enabled: bool = True,
        dataset_dir: str | Path | None = None,
        datasets: Mapping | None = None,
        dataset_context: str | None = None,
        params: Mapping | None = None,
        config_files=None,
        metric_tables: Iterable[Mapping] = (),
        figures=None,
        model_files=None,
        artifacts: Mapping | None = None,
        work: Callable | None = None,
    ):
        self.work = work
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.enabled = as_bool(enabled) and bool(tracking_uri)
        self.dataset_dir = dataset_dir
        self.datasets = {**({"prepared_cohort": dataset_dir} if dataset_dir else {}), **(datasets or {})}
        self.dataset_context, self.params = dataset_context, dict(params or {})
        self.config_files, self.metric_tables = config_files, [dict(t) for t in metric_tables or ()]
        self.figures, self.model_files, self.artifacts = figures, model_files, dict(artifacts or {})
        self.client, self.run_id = None, None

    def start(self) -> str | None:
        if not self.enabled:
            return None
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        tags = run_tags(self.client.tracking_uri, self.dataset_dir)
        run = self.client.create_run(
            experiment_id(self.client, self.experiment_name), run_name=self.run_name, tags=tags
        )
        self.run_id = run.info.run_id
        log_datasets(self.client, self.run_id, self.datasets, self.dataset_context)
        log_params(self.client, self.run_id, self.params)
        return self.run_id

    def log_params(self, params: Mapping) -> None:
        if self.run_id:
            log_params(self.client, self.run_id, params)

    def log_metrics(self, metrics, step: int = 0) -> int:
        return log_metrics(self.client, self.run_id, metrics, step) if self.run_id else 0

    def log_files(self, paths, artifact_path: str | None = None) -> list[str]:
        return log_files(self.client, self.run_id, paths, artifact_path) if self.run_id else []

    def finish(self, failed: bool = False) -> None:
        from mlflow.entities import RunStatus

        if not self.run_id:
            return
        if not failed:
            for spec in self.metric_tables:
                spec = dict(spec)
                self.log_metrics(table_metrics(spec.pop("path"), **spec))
            self.log_files(self.figures, "figures")
            self.log_files(self.model_files, "model")
            for folder, paths in self.artifacts.items():
                self.log_files(paths, folder or None)
        log_configs(self.client, self.run_id, self.config_files)
        status = RunStatus.FAILED if failed else RunStatus.FINISHED
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))

    def nested(self):
        """A block whose runs on the same store are children of this run (nothing when disabled)."""
        if not self.run_id:
            return _nothing()
        return nested_runs(self.run_id, self.client.tracking_uri)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.finish(failed=kind is not None)

    def run(self, work: Callable | None = None, *args, **kwargs):
        """``work(*args, **kwargs)`` (default: the ``work`` given at construction) inside this run; returns what it
        returns."""
        with self:
            return (work or self.work)(*args, **kwargs)


@contextmanager
def _nothing():
    yield None
