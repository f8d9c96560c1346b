"""Pre-training of the study's methods on one budget, with the encoder kept at several shares of it.

Every method is a variant of ``custom.engine.ablation`` trained through the bundle's training workflow
(``pretrain_variant``: train.yaml + ablation.yaml), with the same overrides: the same iterations x batch, cosine
schedule, batch order (the sampler's seed), data and seeds. The budget is cut into ``snapshots`` epochs of equal
length and the training workflow keeps the query encoder at every epoch end and before the first step
(``encoder_snapshots``), so share k / snapshots of the budget is the weights after k epochs of the one run, not a
shorter run with a compressed schedule. A method that fails is recorded and the others go on; a stopped one
resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from fractions import Fraction
from pathlib import Path

from custom.atomic_io import atomic_path
from custom.engine.ablation import cpu_seconds, get_variant, pretrain_variant
from custom.engine.checkpointing import encoder_snapshots
from custom.flags import as_bool

logger = logging.getLogger(__name__)
RECORD = "method.json"
RUN_RECORD = "mlflow_run.json"  # written by custom.engine.tracking.TrainingRun into the checkpoint folder


class StudyPretraining:
    """Pre-train ``methods`` ({display name: ablation variant}; the first is the reference) for ``iterations``
    steps of ``batch_size`` patches each, keeping the encoder at ``shares`` of the budget (multiples of
    1 / ``snapshots``). ``train_overrides``: further training-config ids, applied to every method alike."""

    def __init__(
        self,
        methods: dict,
        out_dir: str | Path,
        iterations: int,
        batch_size: int,
        shares=(0.0, 0.25, 0.5, 1.0),
        snapshots: int = 4,
        seed: int = 0,
        num_workers: int = 2,
        mlflow: bool = True,
        tracking_uri: str | None = None,
        experiment_name: str = "drasclr_study",
        train_overrides: dict | None = None,
    ):
        self.methods = {str(k): get_variant(v).name for k, v in dict(methods).items()}
        if not self.methods:
            raise ValueError("the study needs at least one pre-training method")
        self.out_dir, self.iterations, self.batch_size = Path(out_dir), int(iterations), int(batch_size)
        self.snapshots, self.seed, self.num_workers = int(snapshots), int(seed), int(num_workers)
        if self.snapshots < 1 or self.iterations % self.snapshots:
            raise ValueError(f"iterations ({self.iterations}) must be a multiple of snapshots ({self.snapshots})")
        self.shares = tuple(float(s) for s in shares)
        for share in self.shares:
            steps = Fraction(share).limit_denominator(1000) * self.snapshots
            if not 0 <= share <= 1 or steps.denominator != 1:
                raise ValueError(f"share {share} is not one of k / {self.snapshots} (k = 0 .. {self.snapshots})")
        self.mlflow, self.tracking_uri, self.experiment_name = as_bool(mlflow), tracking_uri, experiment_name
        self.train_overrides = dict(train_overrides or {})

    @property
    def reference(self) -> str:
        return next(iter(self.methods))

    def method_dir(self, method: str) -> Path:
        return self.out_dir / self.methods[method]

    def overrides(self) -> dict:
        """The training-config overrides every method gets (the like-for-like part)."""
        return {
            "max_epochs": self.snapshots,
            "epoch_length": self.iterations // self.snapshots,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "checkpoint_every": 0,
            "encoder_snapshots": True,
            "mlflow": self.mlflow,
            **({"tracking_uri": self.tracking_uri} if self.tracking_uri else {}),
            "experiment_name": self.experiment_name,
            **self.train_overrides,
        }

    def record(self, method: str) -> dict | None:
        path = self.method_dir(method) / RECORD
        return json.loads(path.read_text()) if path.is_file() else None

    def weights(self, method: str, share: float) -> Path:
        """The encoder of ``method`` after ``share`` of the budget."""
        iteration = round(share * self.iterations)
        files = encoder_snapshots(self.method_dir(method) / "encoder_snapshots")
        if iteration not in files:
            raise FileNotFoundError(
                f"{self.method_dir(method)}/encoder_snapshots: no encoder at iteration {iteration} "
                f"({share:.0%} of the budget); pre-training of {method!r} did not finish"
            )
        return files[iteration]

    def run(self, dataset_dir: str | Path, progress: bool = True) -> dict:
        """Pre-train every method not finished yet; returns {method: record} ({"status": "failed", ...} for one
        that raised)."""
        records = {}
        for method, variant in self.methods.items():
            done = self.record(method)
            if done and done.get("status") == "ok":
                records[method] = done
                continue
            out_dir = self.method_dir(method)
            logger.info("pre-training %s (%s): %d iterations x %d", method, variant, self.iterations, self.batch_size)
            start, cpu = time.perf_counter(), cpu_seconds()
            try:
                _, trained = pretrain_variant(variant, dataset_dir, out_dir, seed=self.seed, **self.overrides())
            except Exception as error:  # recorded; the other methods still train
                logger.error("pre-training %s failed: %s", method, error)
                records[method] = {"method": method, "variant": variant, "status": "failed", "reason": str(error)}
                continue
            record = {
                "method": method,
                "variant": variant,
                "status": "ok",
                **trained,
                "train_seconds": round(time.perf_counter() - start, 1),
                "train_cpu_seconds": round(cpu_seconds() - cpu, 1),
                "mlflow_run_id": self._run_id(out_dir),
            }
            for share in self.shares:
                self.weights(method, share)  # every share's encoder is there before the method counts as done
            with atomic_path(out_dir / RECORD) as tmp:
                Path(tmp).write_text(json.dumps(record, indent=2, default=str))
            records[method] = record
        return records

    @staticmethod
    def _run_id(out_dir: Path) -> str | None:
        path = out_dir / "checkpoints" / RUN_RECORD
        return json.loads(path.read_text()).get("run_id") if path.is_file() else None


def mlflow_budgets(records: dict, tracking_uri: str | None) -> list[dict]:
    """Each method's budget as its pre-training run logged it to MLflow (params ``iterations``,
    ``batch_size``, ``max_epochs``, ``epoch_length``, ``order``, ``queue_size``, ``num_queues``): what the
    report and the like-for-like test read, rather than what the study asked for. Without an MLflow run, the
    trainer's record of the same values (column ``source`` says which)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else None
    rows = []
    for method, record in records.items():
        row = {"method": method, "variant": record.get("variant"), "status": record.get("status")}
        run_id = record.get("mlflow_run_id")
        keys = ("iterations", "batch_size", "max_epochs", "epoch_length", "order", "queue_size", "num_queues")
        if client is not None and run_id:
            params = client.get_run(run_id).data.params
            row.update({key: params.get(key) for key in keys}, mlflow_run_id=run_id, source="MLflow params")
        else:  # tracking off (or a failed method): the trainer's own record, said so in the report
            budget = record.get("budget") or {}
            row.update({key: budget.get(key) for key in keys}, source="trainer record (no MLflow run)")
        if row.get("iterations") is not None and row.get("batch_size") is not None:
            row["patches_seen"] = int(row["iterations"]) * int(row["batch_size"])
        row["trained_iterations"] = (record.get("budget") or {}).get("iterations")
        row["train_seconds"] = record.get("train_seconds")
        rows.append(row)
    return rows
