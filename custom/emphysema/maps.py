"""Emphysema maps for a list of scans, as the bundle's ``inference`` config runs them with a MONAI
``SupervisedEvaluator``: the datalist, a dataset that turns a scan that cannot be read or registered into a
recorded failure instead of a stopped run, the iteration that skips such items, and the cohort report handler
(``emphysema_report.csv`` with one row per subject, ``failures.csv`` with the file and the reason).
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import pandas as pd
from monai.data import Dataset

from custom.atomic_io import atomic_path
from custom.emphysema.report import write_cohort_csv

logger = logging.getLogger("drasclr.emphysema")
ERROR_KEY = "error"


def scan_datalist(source) -> list:
    """Data dicts ``{"subject_id", "image"[, "lung_mask"]}`` for a scan path, a folder, a CSV
    (``subject_id,image[,lung_mask]``), a list of those, or a list of data dicts (see
    ``custom.prepare.workflow.discover_inputs`` for how folders and CSVs are read)."""
    from custom.prepare.workflow import discover_inputs

    items = []
    for entry in (source if isinstance(source, (list, tuple)) else [source]):
        if isinstance(entry, dict):
            items.append(dict(entry))
            continue
        for found in discover_inputs(entry):
            item = {"subject_id": found.subject_id, "image": found.image}
            if found.lung_mask:
                item["lung_mask"] = found.lung_mask
            items.append(item)
    if not items:
        raise FileNotFoundError(f"no scans found in {source!r}")
    ids = [item.get("subject_id") for item in items]
    duplicates = sorted({i for i in ids if i is not None and ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate subject ids {duplicates}: outputs would overwrite each other")
    return items


class FailureTolerantDataset(Dataset):
    """``monai.data.Dataset`` whose items become ``{"subject_id", "source", "error"}`` when preprocessing
    raises, so one bad scan is reported and the others are still mapped."""

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as err:  # noqa: BLE001 - every failure is reported per subject
            item = self.data[index]
            source = str(item.get("image", "")) if isinstance(item, dict) else str(item)
            message = " ".join((str(err) or type(err).__name__).split())[:1000]
            if source and source not in message:
                message = f"{source}: {message}"
            logger.debug("preprocessing %s failed:\n%s", source, traceback.format_exc())
            subject = item.get("subject_id") if isinstance(item, dict) else None
            return {"subject_id": str(subject or Path(source).name), "source": source, ERROR_KEY: message,
                    "error_type": type(err).__name__}


def skip_failed_scans(engine, batchdata):
    """``SupervisedEvaluator`` iteration: failed items pass through as their error record, the rest run the
    evaluator's own iteration (inferer, then postprocessing)."""
    if isinstance(batchdata, dict) and ERROR_KEY in batchdata:
        return {key: batchdata[key] for key in ("subject_id", "source", ERROR_KEY, "error_type")}
    return engine._iteration(engine, batchdata)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


class CohortReport:
    """Ignite handler: after every scan, append its report (or its failure) and rewrite
    ``<output_dir>/emphysema_report.csv`` and ``failures.csv``, so a stopped run keeps what it finished."""

    def __init__(self, output_dir: str, inferer=None, report_key: str = "report"):
        self.output_dir = Path(output_dir)
        self.inferer = inferer
        self.report_key = report_key
        self.reports: list = []
        self.failures: list = []
        self._started = 0.0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def _reset(self, engine) -> None:
        self.reports, self.failures = [], []

    def _start(self, engine) -> None:
        self._started = time.perf_counter()

    def _record(self, engine) -> None:
        output = engine.state.output
        seconds = round(time.perf_counter() - self._started, 2)
        if isinstance(output, dict) and ERROR_KEY in output:
            failure = {k: _first(output.get(k)) for k in ("subject_id", "source", ERROR_KEY, "error_type")}
            self.failures.append(failure)
            logger.warning("FAILED %s: %s", failure["subject_id"], failure[ERROR_KEY])
        else:
            for item in output if isinstance(output, list) else [output]:
                report = dict(item[self.report_key])
                report["map_seconds"] = seconds  # inferer + report + pictures + resampling + writing
                if self.inferer is not None:
                    report["stride"] = self.inferer.stride
                    report["min_stride"] = self.inferer.min_stride
                    report["network_evaluations"] = self.inferer.last_evaluations
                if "outputs" in item:
                    report["outputs"] = dict(item["outputs"])
                self.reports.append(report)
        self.write()

    def write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.reports:
            write_cohort_csv(self.reports, self.output_dir / "emphysema_report.csv")
        with atomic_path(self.output_dir / "failures.csv") as tmp:
            pd.DataFrame(self.failures, columns=["subject_id", "source", ERROR_KEY, "error_type"]).to_csv(
                tmp, index=False)

    def _summary(self, engine) -> None:
        logger.info("emphysema maps: %d scans mapped, %d failed; outputs in %s", len(self.reports),
                    len(self.failures), self.output_dir)
