"""The evidence study as stages: generate -> prepare -> pretrain -> embed -> readouts -> compare -> report.

Every stage resumes: generation is skipped once both cohorts are written, preparation reuses finished subjects,
pre-training continues from checkpoints, embeddings and readouts are cached per feature set. ``stages.json``
keeps each stage's status and its wall and CPU seconds, summed over the calls that worked on it, so the report's
run times survive an interruption. The whole study is one MLflow run; the pre-training runs are its children.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from custom.atomic_io import atomic_path
from custom.engine.ablation import cpu_seconds
from custom.evaluation.baselines import LAA, LAA_PATCH, laa_features
from custom.flags import as_bool
from custom.study.embedding import cohort_embeddings
from custom.study.pretraining import StudyPretraining, mlflow_budgets
from custom.subject_table import read_subject_table

logger = logging.getLogger(__name__)
STAGES = ("generate", "prepare", "pretrain", "embed", "readouts", "compare", "report")
COHORT_FILES = {"copd": ("cohort.csv", "clinical.csv"), "covid": ("covid_cohort.csv", "covid_clinical.csv")}


def _share_name(share: float) -> str:
    return f"{round(100 * share):03d}"


class Study:
    """One study in ``output_dir`` (see the module docstring); the components are study.yaml's."""

    def __init__(
        self,
        output_dir: str | Path,
        record: dict,
        generators: dict,
        writer,
        preparation,
        pretraining: StudyPretraining,
        readouts: dict,
        comparison: dict,
        tracking=None,
        landmark_stride: int = 1,
        baselines=(LAA, LAA_PATCH),
        atlas_dir=None,
        progress: bool = True,
    ):
        self.output_dir = Path(output_dir)
        self.record = dict(record)
        self.generators, self.writer, self.preparation = dict(generators), writer, preparation
        self.pretraining, self.readouts, self.comparison = pretraining, dict(readouts), dict(comparison)
        self.tracking, self.landmark_stride = tracking, int(landmark_stride)
        self.baselines, self.atlas_dir, self.progress = tuple(baselines or ()), atlas_dir, as_bool(progress)
        self.stages_file = self.output_dir / "stages.json"
        self.notes: list[str] = []
        self._sets: dict = {}

    # ------------------------------------------------------------------ bookkeeping
    def stages(self) -> dict:
        return json.loads(self.stages_file.read_text()) if self.stages_file.is_file() else {}

    def _save_stages(self, stages: dict) -> None:
        with atomic_path(self.stages_file) as tmp:
            Path(tmp).write_text(json.dumps(stages, indent=2))

    def _stage(self, name: str, work, detail=lambda result: "") -> object:
        stages = self.stages()
        entry = stages.get(name, {"seconds": 0.0, "cpu_seconds": 0.0, "calls": 0})
        if entry.get("status") == "ok" and name in ("generate",):
            logger.info("study: %s already done", name)
            return None
        logger.info("study: %s ...", name)
        entry["status"] = "running"  # what the report's stage table shows for the stage that writes it
        entry["detail"] = "running when this table was written"
        stages[name] = entry
        self._save_stages(stages)
        start, cpu = time.perf_counter(), cpu_seconds()
        failed = None
        try:
            result = work()
        except Exception as error:
            failed = error
        spent = time.perf_counter() - start
        entry["seconds"] = round(entry["seconds"] + spent, 1)
        entry["cpu_seconds"] = round(entry["cpu_seconds"] + cpu_seconds() - cpu, 1)
        entry["calls"] += 1
        entry["status"] = "failed" if failed else "ok"
        entry["detail"] = f"{type(failed).__name__}: {failed}" if failed else detail(result)
        stages[name] = entry
        self._save_stages(stages)
        if failed:
            raise failed
        logger.info(
            "study: %s done in %.0f s (%.0f s over all calls; %s)", name, spent, entry["seconds"], entry["detail"]
        )
        return result

    def stage_times(self) -> pd.DataFrame:
        stages = self.stages()
        rows = [{"stage": s, **{k: stages[s].get(k) for k in ("seconds", "cpu_seconds", "detail")}} for s in STAGES]
        return pd.DataFrame([r for r in rows if r["seconds"] is not None])

    # ------------------------------------------------------------------ stages
    @property
    def synthetic_dir(self) -> Path:
        return Path(self.writer.out_dir)

    def cache_dir(self, cohort: str) -> Path:
        return self.output_dir / ("prepared" if cohort == "copd" else f"prepared_{cohort}")

    def cohorts(self) -> list[str]:
        return [c for c, g in self.generators.items() if g is not None and g.num_subjects > 0]

    def generate(self) -> str:
        self.writer.write(*[self.generators[c] for c in self.cohorts()])
        return ", ".join(f"{self.generators[c].num_subjects} {c}" for c in self.cohorts())

    def prepare(self) -> str:
        counts = []
        for cohort in self.cohorts():
            manifest = self.preparation(self.synthetic_dir / COHORT_FILES[cohort][0], self.cache_dir(cohort))
            ok = int((manifest["status"] == "ok").sum())
            counts.append(f"{cohort} {ok}/{len(manifest)} ok")
            if ok < len(manifest):
                self.notes.append(f"[{cohort}] {len(manifest) - ok} subject(s) failed preparation (failures.csv)")
        return "; ".join(counts)

    def pretrain(self) -> dict:
        records = self.pretraining.run(self.cache_dir("copd"))
        failed = [m for m, r in records.items() if r.get("status") != "ok"]
        if self.pretraining.reference in failed:
            raise RuntimeError(
                f"the reference method {self.pretraining.reference!r} failed: "
                f"{records[self.pretraining.reference].get('reason')}"
            )
        for method in failed:
            self.notes.append(f"pre-training {method} failed: {records[method].get('reason')}")
        return records

    def feature_sets(self, cohort: str) -> dict:
        """{(method, share): subject table} of one cohort: every method at every share, and the baselines."""
        if cohort in self._sets:
            return self._sets[cohort]
        sets = {}
        for method in self.pretraining.methods:
            record = self.pretraining.record(method)
            if not record or record.get("status") != "ok":
                continue
            for share in self.pretraining.shares:
                sets[(method, share)] = cohort_embeddings(
                    self.pretraining.weights(method, share),
                    record["architecture"],
                    self.cache_dir(cohort),
                    self.output_dir / "embeddings" / cohort,
                    self.landmark_stride,
                    self.atlas_dir,
                    progress=f"embed {cohort}: {method} at {share:.0%}" if self.progress else None,
                )
        if self.baselines:
            subject, patch = laa_features(self.cache_dir(cohort), atlas_dir=self.atlas_dir)
            for name, table in ((LAA, subject), (LAA_PATCH, patch)):
                if name in self.baselines:
                    sets[(name, float("nan"))] = table.astype(np.float64)
        self._sets[cohort] = sets
        return sets

    def embed(self) -> str:
        counts = []
        for cohort in self.cohorts():
            sets = self.feature_sets(cohort)
            counts.append(f"{cohort}: {len(sets)} feature sets")
        return "; ".join(counts)

    def clinical(self, cohort: str) -> pd.DataFrame:
        path = self.synthetic_dir / COHORT_FILES[cohort][1]
        return read_subject_table(path, "clinical table")

    def predict(self) -> pd.DataFrame:
        """Out-of-fold predictions of every feature set (cached per set under ``readouts/``)."""
        frames = []
        for cohort in self.cohorts():
            readout = self.readouts.get(cohort)
            if readout is None:
                continue
            sets = self.feature_sets(cohort)
            clinical = self.clinical(cohort)
            common = sorted(set(clinical.index).intersection(*[set(t.index) for t in sets.values()]))
            if len(common) < len(clinical):
                self.notes.append(f"[{cohort}] {len(clinical) - len(common)} subject(s) without every feature set")
            clinical = clinical.loc[common]
            folder = self.output_dir / "readouts" / f"{cohort}_{readout.fingerprint()}"  # other settings: new folder
            folder.mkdir(parents=True, exist_ok=True)
            bar = tqdm(sets.items(), desc=f"readouts {cohort}", unit="feature set", disable=not self.progress)
            for (method, share), table in bar:
                name = method if np.isnan(share) else f"{method}@{_share_name(share)}"
                path = folder / f"{name.replace(' ', '_').replace('/', '_')}.csv"
                notes_path = path.with_suffix(".notes.json")  # written first: a cached set keeps its notes
                if path.is_file():
                    frames.append(pd.read_csv(path, dtype={"subject_id": str}))
                    self.notes.extend(json.loads(notes_path.read_text()) if notes_path.is_file() else [])
                    continue
                frame, notes = readout.predictions(cohort, clinical, table.loc[common], method, share, str(path))
                self.notes.extend(notes)
                with atomic_path(notes_path) as tmp:
                    Path(tmp).write_text(json.dumps(notes))
                with atomic_path(path) as tmp:
                    frame.to_csv(tmp, index=False)
                frames.append(frame)
        predictions = pd.concat([f for f in frames if len(f)], ignore_index=True)
        with atomic_path(self.output_dir / "predictions.csv") as tmp:
            predictions.to_csv(tmp, index=False)
        return predictions

    def compare(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        from custom.study.comparison import paired_table, score_table

        predictions = pd.read_csv(self.output_dir / "predictions.csv", dtype={"subject_id": str})
        settings = {k: v for k, v in self.comparison.items() if k != "reference"}
        scores = score_table(predictions, **settings)
        paired = paired_table(predictions, reference=self.comparison.get("reference", "DrasCLR"), **settings)
        return scores, paired

    def budgets(self) -> pd.DataFrame:
        records = {m: self.pretraining.record(m) or {"status": "missing"} for m in self.pretraining.methods}
        return pd.DataFrame(mlflow_budgets(records, self.pretraining.tracking_uri if self.pretraining.mlflow else None))

    def report(self, scores: pd.DataFrame, paired: pd.DataFrame) -> Path:
        from custom.study.report import write_report

        record = {
            **self.record,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "notes": list(dict.fromkeys(self.notes)),
        }
        with atomic_path(self.output_dir / "study.json") as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2, default=str))
        budgets, stage_times = self.budgets(), self.stage_times()
        for table, name in ((budgets, "budgets.csv"), (stage_times, "stage_times.csv")):
            with atomic_path(self.output_dir / name) as tmp:
                table.to_csv(tmp, index=False)
        return write_report(self.output_dir, record, scores, paired, stage_times, budgets)

    # ------------------------------------------------------------------ the whole study
    def check_same_study(self, before: dict) -> None:
        """Refuse to resume a study folder made with other settings: its cohorts, weights and predictions would
        be reused as if they were this study's."""
        ignored = {"started", "finished", "notes", "bundle_version"}

        def flat(record: dict) -> dict:
            plain = json.loads(json.dumps({k: v for k, v in record.items() if k not in ignored}, default=str))
            out = {}
            for key, value in plain.items():
                items = value.items() if isinstance(value, dict) else [(None, value)]
                out.update({f"{key}.{sub}" if sub else key: v for sub, v in items})
            return out

        old, new = flat(before), flat(self.record)
        if old and old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(
                f"{self.output_dir}/study.json: this folder holds a study with other settings ({', '.join(changed)}); "
                "give another --output_dir, or delete the folder to start again"
            )

    def run(self) -> Path:
        """Every stage in order (finished work is reused); returns the report."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        earlier = self.output_dir / "study.json"
        before = json.loads(earlier.read_text()) if earlier.is_file() else {}
        self.check_same_study(before)
        self.record["started"] = before.get("started") or datetime.now(timezone.utc).isoformat(timespec="seconds")
        with atomic_path(earlier) as tmp:
            Path(tmp).write_text(json.dumps(self.record, indent=2, default=str))
        tracking = self.tracking
        with tracking if tracking is not None else _Nothing() as run:
            with run.nested() if run is not None else _Nothing():
                self._stage("generate", self.generate, str)
                self._stage("prepare", self.prepare, str)
                self._stage(
                    "pretrain",
                    self.pretrain,
                    lambda r: f"{sum(v.get('status') == 'ok' for v in r.values())}" f"/{len(r)} methods",
                )
                self._stage("embed", self.embed, str)
                self._stage("readouts", self.predict, lambda p: f"{len(p)} predictions")
                scores, paired = self._stage("compare", self.compare, lambda r: f"{len(r[1])} paired differences")
                report = self._stage("report", lambda: self.report(scores, paired), str)
            if run is not None:
                run.log_files(
                    [
                        report,
                        *sorted(self.output_dir.glob("*.csv")),
                        *sorted(self.output_dir.glob("*.png")),
                        self.output_dir / "study.json",
                        self.stages_file,
                    ]
                )
        return report


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False
