"""Emphysema maps for a list of scans, as the bundle's ``inference`` config runs them with a MONAI
``SupervisedEvaluator``: the datalist, a dataset that turns a scan that cannot be read or registered into a
recorded failure instead of a stopped run, the iteration that skips such items, and the cohort report handler
(``emphysema_report.csv`` with one row per subject, ``failures.csv`` with the file and the reason).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path

import pandas as pd
from monai.data import Dataset

from custom.atomic_io import atomic_path
from custom.emphysema.report import write_cohort_csv
from custom.engine import subject_shards

logger = logging.getLogger("drasclr.emphysema")
ERROR_KEY = "error"
REUSED_KEY = "reused_row"  # a scan mapped by an earlier run with the same model and settings (JSON text)
ROW_FILE = "cohort_row.json"  # <output_dir>/<subject_id>/: the scan's cohort row and what made it


def _stored_row(output_dir, item, stamp) -> str | None:
    """The cohort row an earlier run stored for this item's subject if it mapped the same source with the same
    model and settings (``stamp``); None otherwise."""
    subject = item.get("subject_id") if isinstance(item, dict) else None
    if not output_dir or not subject or not stamp or not stamp.get("model_sha1"):
        return None
    try:
        stored = json.loads((Path(output_dir) / str(subject) / ROW_FILE).read_text())
    except (OSError, ValueError):
        return None
    same = stored.get("stamp") == stamp and stored.get("report", {}).get("source") == str(item.get("image", ""))
    return json.dumps(stored["report"]) if same else None


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


def scan_shard(source) -> list:
    """This process's scans of ``scan_datalist(source)``: all of them, or under torchrun its rank's share
    (``custom.engine.subject_shards``; the cohort report merges the shares in input order)."""
    subject_shards.init_subject_group()
    return subject_shards.shard(scan_datalist(source))


class FailureTolerantDataset(Dataset):
    """``monai.data.Dataset`` whose items become ``{"subject_id", "source", "error"}`` when preprocessing
    raises, so one bad scan is reported and the others are still mapped. With ``reuse_dir`` and ``stamp``, a
    scan an earlier run already mapped there with the same model and settings becomes ``{"subject_id",
    "reused_row"}`` (resume per subject) instead of being mapped again. With ``output_dir``, every item that
    names no ``output_dir`` of its own gets it: where the map's transforms write its outputs
    (``scan_transforms.item_output_dir``; an item without one is a request whose outputs are temporary)."""

    def __init__(self, data, transform=None, reuse_dir: str | None = None, stamp: dict | None = None, output_dir=None):
        super().__init__(data, transform)
        self.reuse_dir, self.stamp, self.output_dir = reuse_dir, stamp, output_dir

    def _transform(self, index: int):
        item = self.data[index]
        stored = _stored_row(self.reuse_dir, item, self.stamp)
        if stored is not None:
            return {"subject_id": str(item["subject_id"]), REUSED_KEY: stored}
        try:
            if self.output_dir and isinstance(item, dict) and not item.get("output_dir"):
                item = {**item, "output_dir": str(self.output_dir)}
            return self.transform(item) if self.transform is not None else item
        except Exception as err:  # noqa: BLE001 - every failure is reported per subject
            from custom.prepare.transforms import transform_error

            err = transform_error(err)  # the failing step's own message (names the file), as prepare reports it
            item = self.data[index]
            source = str(item.get("image", "")) if isinstance(item, dict) else str(item)
            message = " ".join((str(err) or type(err).__name__).split())[:1000]
            if source and source not in message:
                message = f"{source}: {message}"
            logger.debug("preprocessing %s failed:\n%s", source, traceback.format_exc())
            subject = item.get("subject_id") if isinstance(item, dict) else None
            return {
                "subject_id": str(subject or Path(source).name),
                "source": source,
                ERROR_KEY: message,
                "error_type": type(err).__name__,
            }


def skip_failed_scans(engine, batchdata):
    """``SupervisedEvaluator`` iteration: failed items pass through as their error record, the rest run the
    evaluator's own iteration (inferer, then postprocessing)."""
    if isinstance(batchdata, dict) and ERROR_KEY in batchdata:
        return {key: batchdata[key] for key in ("subject_id", "source", ERROR_KEY, "error_type")}
    if isinstance(batchdata, dict) and REUSED_KEY in batchdata:
        return {key: batchdata[key] for key in ("subject_id", REUSED_KEY)}
    return engine._iteration(engine, batchdata)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


REPORT_FILE, FAILURES_FILE = "emphysema_report.csv", "failures.csv"
FAILURE_COLUMNS = ["subject_id", "source", ERROR_KEY, "error_type"]


def _read_rows(path: Path) -> pd.DataFrame:
    """An earlier run's table in ``output_dir`` (ids as text), or an empty one."""
    if not path.is_file():
        return pd.DataFrame()
    try:
        return pd.read_csv(path, dtype={"subject_id": str}, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError) as error:
        logger.warning("earlier table %s not readable (%s): it is replaced by this run's rows", path, error)
        return pd.DataFrame()


def _without(table: pd.DataFrame | None, subject_ids: set) -> pd.DataFrame:
    """``table`` less the rows of ``subject_ids``."""
    if table is None or table.empty or "subject_id" not in table.columns:
        return pd.DataFrame()
    return table[~table["subject_id"].astype(str).isin(subject_ids)]


class CohortReport:
    """Ignite handler: after every scan, append its report (or its failure) and rewrite
    ``<output_dir>/emphysema_report.csv`` and ``failures.csv``, so a stopped run keeps what it finished.
    Under torchrun each rank keeps its rows (each scan's own outputs are on disk as soon as it is mapped) and
    rank 0 writes the merged tables at completion, in input order.

    Rows that earlier runs wrote into the same ``output_dir`` are kept (read when the run starts): a subject this
    run maps or fails replaces its earlier row in both tables, the others stay, before this run's rows."""

    def __init__(self, output_dir: str, inferer=None, report_key: str = "report", stamp: dict | None = None):
        self.output_dir = Path(output_dir)
        self.inferer = inferer
        self.report_key = report_key
        self.stamp = stamp  # model and settings, stored with each row so a later run can reuse it
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
        self._position = 0
        self._earlier = {name: _read_rows(self.output_dir / name) for name in (REPORT_FILE, FAILURES_FILE)}

    def _next_position(self) -> int:
        """Input position of this rank's next scan (``subject_shards.shard``'s rule; batch size 1)."""
        position = subject_shards.positions(self._position + 1)[-1]
        self._position += 1
        return position

    def _start(self, engine) -> None:
        self._started = time.perf_counter()

    def _record(self, engine) -> None:
        output = engine.state.output
        seconds = round(time.perf_counter() - self._started, 2)
        position = self._next_position()
        if isinstance(output, dict) and REUSED_KEY in output:
            self.reports.append((position, json.loads(_first(output[REUSED_KEY]))))
        elif isinstance(output, dict) and ERROR_KEY in output:
            failure = {k: _first(output.get(k)) for k in ("subject_id", "source", ERROR_KEY, "error_type")}
            self.failures.append((position, failure))
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
                self.reports.append((position, report))
                self._store(report)
        if subject_shards.world() == 1:
            self.write(self.reports, self.failures)

    def _store(self, report: dict) -> None:
        """``<output_dir>/<subject_id>/cohort_row.json``: the row and the stamp that made it (atomic)."""
        if not self.stamp or not report.get("subject_id"):
            return
        folder = self.output_dir / str(report["subject_id"])
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ROW_FILE) as tmp:
            Path(tmp).write_text(json.dumps({"stamp": self.stamp, "report": report}, default=str))

    def write(self, reports: list, failures: list) -> None:
        """Write the tables of (position, row) pairs, rows in position order."""
        reports = [row for _, row in sorted(reports, key=lambda pair: pair[0])]
        failures = [row for _, row in sorted(failures, key=lambda pair: pair[0])]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        earlier = getattr(self, "_earlier", {})
        done_now = {str(row.get("subject_id")) for row in reports + failures}
        kept = {name: _without(earlier.get(name), done_now) for name in (REPORT_FILE, FAILURES_FILE)}
        if reports or len(kept[REPORT_FILE]):
            write_cohort_csv(reports, self.output_dir / REPORT_FILE, earlier=kept[REPORT_FILE])
        table = pd.concat([kept[FAILURES_FILE], pd.DataFrame(failures, columns=FAILURE_COLUMNS)], ignore_index=True)
        with atomic_path(self.output_dir / FAILURES_FILE) as tmp:
            table.reindex(columns=FAILURE_COLUMNS).to_csv(tmp, index=False)

    def _summary(self, engine) -> None:
        reports, failures = self.reports, self.failures
        if subject_shards.world() > 1:
            tagged = subject_shards.gather_in_order((p, (p, "report", r)) for p, r in reports)
            tagged += subject_shards.gather_in_order((p, (p, "failure", r)) for p, r in failures)
            reports = [(p, r) for p, kind, r in tagged if kind == "report"]
            failures = [(p, r) for p, kind, r in tagged if kind == "failure"]
            if subject_shards.is_main():
                self.write(reports, failures)
            subject_shards.barrier()
        if subject_shards.is_main():
            logger.info(
                "emphysema maps: %d scans mapped, %d failed; outputs in %s",
                len(reports),
                len(failures),
                self.output_dir,
            )
            from custom.prepare.qc_sheet import write_inference_qc_sheet  # the cohort QC sheet, merged tables

            write_inference_qc_sheet(self.output_dir, REPORT_FILE, FAILURES_FILE)
