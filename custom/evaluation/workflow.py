"""The ``evaluate`` workflow (``bundle/configs/evaluate.yaml``): feature sets + clinical table -> the paper's
image-level results (Tables 2-4, 6, 8), places for the emphysema-detection results (Tables 5, 7, Figs. 4-5),
written as CSV, Markdown and PNG and logged to MLflow.

Every comparison is paired: all feature sets are read out on the same subjects (those every set and the
clinical table share, unless ``common_subjects`` is false) with the same folds (same seed, same targets), so
differences between rows are differences between features. Missing optional inputs (an embedding set not
produced yet, no COVID cohort, no detection results) are skipped with a logged note, which also lands in
``notes.txt``; bad inputs (a missing column, a non-numeric embedding) stop the run with an error naming the file.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from custom.atomic_io import atomic_path
from custom.evaluation import plots
from custom.evaluation.feature_sets import (
    embedding_path,
    laa_features,
    load_embedding_table,
    random_init_embeddings,
    read_subject_table,
    require_columns,
)
from custom.evaluation.readouts import KINDS, METRICS, cross_validated_readout
from custom.evaluation.survival import (
    bode_index,
    cross_validated_cox,
    encode_covariates,
)
from custom.evaluation.tables import (
    markdown,
    readout_table,
    survival_table,
    write_table,
)
from custom.flags import as_bool

logger = logging.getLogger(__name__)

LAA = "LAA-950"
LAA_PATCH = "LAA-950 (patch)"
RANDOM_INIT = "Random init"
SYNTHETIC_NOTE = ("Computed on the SYNTHETIC demo cohort: numbers about synthetic data, not about patients, and too "
                  "few subjects to rank methods.")


class Notes:
    """Skipped inputs and adaptations, logged as they happen and written to ``notes.txt``."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, text: str) -> None:
        logger.info(text)
        self.lines.append(text)


# ---------------------------------------------------------------- inputs


def target_values(clinical: pd.DataFrame, name: str, spec: dict, source) -> tuple[pd.Series, str]:
    """One target column after exclusions and transform, missing values dropped; and a note on what was left out."""
    column, kind = spec.get("column", name), spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"target {name!r}: kind must be one of {KINDS}, got {kind!r}")
    require_columns(clinical, [column], source)
    values = pd.to_numeric(clinical[column], errors="coerce") if kind == "continuous" else clinical[column]
    values = values.dropna()
    notes = []
    excluded = [v for v in spec.get("exclude", []) or []]
    if excluded:
        dropped = int(values.isin(excluded).sum())
        values = values[~values.isin(excluded)]
        if dropped:
            notes.append(f"{dropped} subject(s) with {column} in {excluded} left out")
    transform = spec.get("transform")
    if transform == "log":
        if (values <= 0).any():
            raise ValueError(f"{source}: column {column!r} has values <= 0, cannot take the log")
        values = np.log(values.astype(float))
    elif transform not in (None, "none"):
        raise ValueError(f"target {name!r}: unknown transform {transform!r} (log or none)")
    if kind != "continuous":
        values = values.astype(int) if pd.api.types.is_numeric_dtype(values) else values.astype(str)
    return values, "; ".join(notes)


def collect_feature_sets(
    embeddings: dict | None, prepared_cache, output_dir: Path, baselines: dict, atlas_dir, notes: Notes, cohort: str
) -> dict[str, pd.DataFrame]:
    """Embedding tables that exist, then the baselines computed from ``prepared_cache``."""
    sets: dict[str, pd.DataFrame] = {}
    for name, path in (embeddings or {}).items():
        if path is None:
            continue
        if not embedding_path(path).is_file():
            notes.add(f"[{cohort}] feature set {name!r} skipped: {embedding_path(path)} not found")
            continue
        sets[name] = load_embedding_table(path)
    want_laa = as_bool(baselines.get("laa950", True)) or as_bool(baselines.get("laa950_patch", True))
    want_random = as_bool(baselines.get("random_init", True))
    if (want_laa or want_random) and not prepared_cache:
        notes.add(f"[{cohort}] LAA-950 and random-init baselines skipped: no prepared cache given")
        return sets
    if (want_laa or want_random) and not (Path(prepared_cache) / "manifest.csv").is_file():
        notes.add(f"[{cohort}] LAA-950 and random-init baselines skipped: no prepared cache at {prepared_cache}")
        return sets
    if want_laa:
        subject, patch = laa_features(prepared_cache, atlas_dir=atlas_dir)
        if as_bool(baselines.get("laa950", True)):
            sets[LAA] = subject
        if as_bool(baselines.get("laa950_patch", True)):
            sets[LAA_PATCH] = patch
    if want_random:
        seed = int(baselines.get("random_init_seed", 0))
        start = time.perf_counter()
        sets[RANDOM_INIT] = random_init_embeddings(
            prepared_cache, output_dir / "baselines" / f"{cohort}_random_init_seed{seed}", seed, atlas_dir=atlas_dir
        )
        notes.add(f"[{cohort}] random-init embeddings ready in {time.perf_counter() - start:.1f} s")
    return sets


def shared_subjects(clinical: pd.DataFrame, sets: dict, common: bool, notes: Notes, cohort: str) -> dict:
    """Restrict every set to the subjects it shares with the clinical table (and with every other set)."""
    ids = set(clinical.index)
    if common:
        for table in sets.values():
            ids &= set(table.index)
    restricted = {}
    for name, table in sets.items():
        keep = sorted(ids & set(table.index))
        left_out = len(table) - len(keep)
        if left_out:
            notes.add(f"[{cohort}] {name}: {left_out} subject(s) not shared with the clinical table"
                      + (" and the other sets" if common else "") + " left out")
        restricted[name] = table.loc[keep]
    return restricted


# ---------------------------------------------------------------- analyses


def run_readouts(sets: dict, clinical: pd.DataFrame, targets: dict, source, folds: int, seed: int,
                 readout: dict) -> pd.DataFrame:
    """Long table: one row per (feature_set, target, metric). ``mean``/``sd`` are over folds (the paper's
    summary), except R² when a test fold holds fewer than ``readout['min_fold_size_for_r2']`` subjects: then
    ``mean`` is R² of the pooled out-of-fold predictions (per-fold R² of 2-3 subjects is dominated by their
    tiny variance) and the note says so. Per-fold values and both summaries are kept in other columns."""
    min_fold = int(readout.get("min_fold_size_for_r2", 10))
    rows = []
    for target, spec in targets.items():
        values, target_note = target_values(clinical, target, spec, source)
        for name, table in sets.items():
            y = values[values.index.isin(table.index)]
            x = table.loc[y.index].to_numpy()
            result = cross_validated_readout(
                x, y.to_numpy(), spec["kind"], folds=folds, seed=seed, order=spec.get("order"),
                pca_components=readout.get("pca_components"), inner_folds=int(readout.get("inner_folds", 3)),
            )
            pooled_r2 = spec["kind"] == "continuous" and 0 < result.smallest_test_fold < min_fold
            pooled_note = (f"R² of the pooled out-of-fold predictions (test folds of {result.smallest_test_fold} "
                           f"subjects, under {min_fold}), no s.d.") if pooled_r2 else ""
            note = "; ".join(n for n in [target_note, *result.notes, result.reason, pooled_note] if n)
            for metric in METRICS[spec["kind"]]:
                pooled = result.pooled(metric, spec.get("order"))
                rows.append({
                    "feature_set": name, "target": target, "column": spec.get("column", target),
                    "label": spec.get("label", target), "metric": metric,
                    "mean": pooled if pooled_r2 else result.mean(metric),
                    "sd": float("nan") if pooled_r2 else result.sd(metric), "fold_mean": result.mean(metric),
                    "fold_sd": result.sd(metric), "pooled": pooled, "summary": "pooled" if pooled_r2 else "folds",
                    "n_subjects": result.n_subjects, "n_features": x.shape[1],
                    "n_folds": result.n_folds, "requested_folds": folds, "status": result.status, "note": note,
                    "fold_values": " ".join(f"{v:.4f}" for v in result.fold_values(metric)) if result.folds else "",
                })
    return pd.DataFrame(rows)


def survival_rows(settings: dict, sets: dict) -> list[dict]:
    """Table 3 rows: imaging sets, clinical references, and imaging + clinical combinations."""
    rows = [{"group": "Imaging", "feature_row": s, "imaging": s, "clinical": []}
            for s in settings.get("imaging") or list(sets) if s in sets]
    spirometry = list(settings.get("spirometry", ["fev1pp", "fev1_fvc"]))
    rows += [
        {"group": "Clinical", "feature_row": "Confounders only", "imaging": None, "clinical": []},
        {"group": "Clinical", "feature_row": "Spirometry", "imaging": None, "clinical": spirometry},
        {"group": "Clinical", "feature_row": "BODE", "imaging": None, "clinical": ["bode_index"]},
    ]
    for s in settings.get("combined") or []:
        if s in sets:
            rows += [
                {"group": "Imaging + Clinical", "feature_row": f"{s} + Spirometry", "imaging": s,
                 "clinical": spirometry},
                {"group": "Imaging + Clinical", "feature_row": f"{s} + BODE", "imaging": s, "clinical": ["bode_index"]},
            ]
    return rows


def run_survival(sets: dict, clinical: pd.DataFrame, settings: dict, source, folds: int, seed: int,
                 notes: Notes) -> pd.DataFrame:
    time_col, event_col = settings.get("time", "survival_years"), settings.get("event", "death_event")
    confounders = list(settings.get("confounders", []))
    categorical = [c for c in settings.get("categorical", []) if c in confounders]
    require_columns(clinical, [time_col, event_col, *confounders], source)
    # the clinical-only rows use the subjects the imaging rows have, so every row of Table 3 is paired
    imaged = set().union(*(set(t.index) for t in sets.values())) if sets else set(clinical.index)
    table = clinical.loc[clinical.index.isin(imaged)].copy()
    bode_reason = ""
    try:
        table["bode_index"] = bode_index(table, settings.get("bode"))
    except KeyError as err:
        bode_reason = f"BODE not computed: {err.args[0]}"
        notes.add(f"[survival] {bode_reason} ({source})")
    percentiles = tuple(settings.get("percentiles", (25, 50, 75)))
    out = []
    for row in survival_rows(settings, sets):
        reason = bode_reason if "bode_index" in row["clinical"] and bode_reason else ""
        if not reason:
            require_columns(table, row["clinical"], source)
        needed = [time_col, event_col, *confounders, *([] if reason else row["clinical"])]
        frame = table[needed].dropna()
        if row["imaging"]:
            frame = frame.loc[frame.index.intersection(sets[row["imaging"]].index)]
        result = None
        if not reason:
            covariates = encode_covariates(frame, [c for c in confounders if c not in categorical] + row["clinical"],
                                           categorical)
            image = sets[row["imaging"]].loc[frame.index].to_numpy() if row["imaging"] else None
            result = cross_validated_cox(
                image, covariates, frame[time_col].to_numpy(), frame[event_col].to_numpy(), folds=folds, seed=seed,
                repeats=int(settings.get("repeats", 1)), penalizer=float(settings.get("penalizer", 0.5)),
                pca_components=settings.get("pca_components"), percentiles=percentiles,
                n_bootstrap=int(settings.get("bootstrap", 200)),
            )
            reason = result.reason
        horizons = (result.horizons if result is not None else
                    np.percentile(table[time_col].dropna().astype(float), list(percentiles)))
        note = "; ".join(n for n in [*(result.notes if result else []), reason] if n)
        for p, (percentile, horizon) in enumerate(zip(percentiles, horizons)):
            ok = result is not None and result.status == "ok"
            out.append({
                "group": row["group"], "feature_row": row["feature_row"], "percentile": percentile,
                "horizon_years": float(horizon),
                "concordance": float(result.concordance[p]) if ok else float("nan"),
                "standard_error": float(result.standard_error[p]) if ok else float("nan"),
                "n_subjects": len(frame), "n_events": int(frame[event_col].sum()),
                "n_folds": result.n_folds if result else 0, "repeats": result.repeats if result else 0,
                "status": "ok" if ok else "n/a", "note": note,
            })
    return pd.DataFrame(out)


# ---------------------------------------------------------------- outputs


def parse_columns(columns) -> list[tuple[str, str]]:
    """'target:metric' strings -> (target, metric) pairs."""
    pairs = []
    for item in columns:
        target, _, metric = str(item).partition(":")
        pairs.append((target, metric or "accuracy"))
    return pairs


def write_tables(out: Path, readouts: pd.DataFrame, survival: pd.DataFrame | None, covid: pd.DataFrame | None,
                 targets: dict, covid_target: dict | None, layouts: dict, external: dict, notes: Notes,
                 caption: str) -> list[str]:
    """Every table as CSV + Markdown under ``out``; returns the Markdown blocks in table order."""
    blocks = []
    labels = {name: spec.get("label", name) for name, spec in targets.items()}
    available = list(dict.fromkeys(readouts["feature_set"])) if len(readouts) else []
    for stem, layout in layouts.items():
        wanted = layout.get("rows") or available
        shown = {v: k for k, v in wanted.items()} if isinstance(wanted, dict) else {}
        rows = [r for r in (wanted.values() if isinstance(wanted, dict) else wanted) if r in available]
        if not rows:
            notes.add(f"{stem} not written: none of its rows {list(wanted)} is an available feature set")
            continue
        display, footnotes = readout_table(readouts, rows, parse_columns(layout["columns"]), labels, shown)
        write_table(display, out / stem, layout.get("title", stem), footnotes, caption)
        blocks.append(markdown(display, layout.get("title", stem), footnotes, caption))
    if survival is not None and len(survival):
        display, footnotes = survival_table(survival)
        title = "Table 3: time-dependent concordance C(t) ± bootstrap s.e., Cox model with the five confounders"
        write_table(display, out / "table3_survival", title, footnotes, caption)
        blocks.append(markdown(display, title, footnotes, caption))
    if covid is not None and len(covid):
        rows = list(dict.fromkeys(covid["feature_set"]))
        name = next(iter(covid["target"]))
        display, footnotes = readout_table(covid, rows, [(name, "accuracy"), (name, "one_off")],
                                           {name: (covid_target or {}).get("label", name)})
        title = "Table 4: COVID-like severity grade, linear readout of the frozen encoder (5-fold CV)"
        write_table(display, out / "table4_covid_severity", title, footnotes, caption)
        blocks.append(markdown(display, title, footnotes, caption))
    for stem, spec in (external or {}).items():
        path = spec.get("path") if isinstance(spec, dict) else spec
        title = spec.get("title", stem) if isinstance(spec, dict) else stem
        if not path or not Path(path).is_file():
            notes.add(f"{stem} not written: no results file ({path}); it comes from the emphysema detection workflow")
            continue
        display = pd.read_csv(path)
        write_table(display, out / stem, title, [f"source: {path}"])
        blocks.append(markdown(display, title, [f"source: {path}"]))
    return blocks


def write_plots(out: Path, clinical: pd.DataFrame, sets: dict, detection: dict, notes: Notes) -> list[Path]:
    written = []
    gold = clinical[["gold"]] if "gold" in clinical.columns else None
    fractions = detection.get("detected_fractions") or {}
    panels, titles, table = [], [], gold
    if gold is not None and fractions.get("path") and Path(fractions["path"]).is_file():
        detected = read_subject_table(fractions["path"], "detected emphysema fractions")
        columns = list(fractions.get("columns") or [c for c in detected.columns if c.endswith("_pct")])
        require_columns(detected, columns, fractions["path"])
        scale = 1.0 if fractions.get("unit", "percent") == "percent" else 100.0
        table = table.join(scale * detected[columns].astype(float), how="inner")
        panels += columns
        titles += ["detected " + re.sub(r"^lung_|_pct$|_fraction$", "", c).replace("_", " ") for c in columns]
    elif fractions.get("path"):
        notes.add(f"detected emphysema box plot: {fractions['path']} not found (emphysema detection writes it)")
    if gold is not None and LAA in sets:
        table = table.join(sets[LAA].rename(columns=lambda c: "LAA-950 %"), how="inner")
        panels.append("LAA-950 %")
        titles.append("LAA-950 (density threshold, not the detector)")
    if gold is not None and panels:
        written.append(plots.fraction_by_gold(table, panels, titles, out / "fraction_by_gold.png",
                                              suptitle="Emphysema by GOLD stage"))
    efficiency = detection.get("label_efficiency") or {}
    if efficiency.get("path") and Path(efficiency["path"]).is_file():
        curve = pd.read_csv(efficiency["path"])
        keys = [efficiency.get(k) for k in ("x", "y", "hue", "yerr", "panel") if efficiency.get(k)]
        require_columns(curve, keys, efficiency["path"])
        written.append(plots.label_efficiency(
            curve, out / "label_efficiency.png", efficiency["x"], efficiency["y"], efficiency["hue"],
            efficiency.get("yerr"), efficiency.get("panel"), efficiency.get("ylabel", "F1")))
    else:
        notes.add(f"label-efficiency curve not drawn: no results file ({efficiency.get('path')}); "
                  "the emphysema detection workflow writes it")
    return written


def metric_name(*parts) -> str:
    """An MLflow-safe metric name (alphanumerics, _ - . space : /)."""
    return "/".join(re.sub(r"[^0-9A-Za-z_\-. :]", "_", str(p)) for p in parts)


def log_to_mlflow(settings: dict, params: dict, readouts, survival, covid, out: Path) -> str:
    """One MLflow run with the parameters, every mean/s.d./C(t) and the tables and plots as artifacts.

    Uses an explicit ``MlflowClient``: the fluent API (``mlflow.set_tracking_uri``) also sets the
    ``MLFLOW_TRACKING_URI`` environment variable, which would redirect every later MLflow handler of the process
    (training, fine-tuning) into this store.
    """
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunStatus

    uri = settings["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    name = settings.get("experiment_name", "drasclr_evaluation")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifacts = None
        if uri.startswith("sqlite:///"):  # artifacts beside the database, as MONAI's MLFlowHandler does
            artifacts = Path(uri[len("sqlite:///"):]).parent.joinpath("mlruns").resolve().as_uri()
        experiment_id = client.create_experiment(name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=settings.get("run_name"))
    run_id = run.info.run_id
    metrics = {}
    for frame, prefix in ((readouts, "phenotype"), (covid, "covid")):
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
    now = int(time.time() * 1000)
    values = [Param(k, str(v)[:500]) for k, v in params.items()]
    for start in range(0, len(values), 100):  # MLflow caps params at 100 per batch
        client.log_batch(run_id, params=values[start : start + 100])
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for start in range(0, len(items), 500):  # MLflow caps a batch at 1000 entries
        client.log_batch(run_id, metrics=items[start : start + 500])
    for sub in ("tables", "plots"):
        if (out / sub).is_dir():
            client.log_artifacts(run_id, str(out / sub), artifact_path=sub)
    for name in ("readouts.csv", "survival.csv", "covid_readouts.csv", "notes.txt"):
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name))
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


# ---------------------------------------------------------------- entry point


def evaluate(
    output_dir,
    clinical,
    targets: dict,
    embeddings: dict | None = None,
    prepared_cache=None,
    atlas_dir=None,
    baselines: dict | None = None,
    folds: int = 5,
    seed: int = 0,
    readout: dict | None = None,
    survival: dict | None = None,
    covid: dict | None = None,
    tables: dict | None = None,
    detection: dict | None = None,
    mlflow: dict | None = None,
    common_subjects: bool = True,
    synthetic: bool = False,
) -> dict:
    """Run every analysis the inputs allow; returns the long result tables and the MLflow run id."""
    start = time.perf_counter()
    common_subjects, synthetic = as_bool(common_subjects), as_bool(synthetic)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = Notes()
    baselines = dict(baselines or {})
    detection = dict(detection or {})
    caption = SYNTHETIC_NOTE if synthetic else ""

    clinical_table = read_subject_table(clinical, "clinical table")
    sets = collect_feature_sets(embeddings, prepared_cache, out, baselines, atlas_dir, notes, "copd")
    if not sets:
        raise FileNotFoundError(f"no feature set available: none of {list((embeddings or {}).values())} exists "
                                f"and no prepared cache for the baselines ({prepared_cache})")
    sets = shared_subjects(clinical_table, sets, common_subjects, notes, "copd")
    sets = {k: v for k, v in sets.items() if len(v)}
    readouts = run_readouts(sets, clinical_table, targets, clinical, folds, seed, dict(readout or {}))
    _write_csv(readouts, out / "readouts.csv")

    survival_results = None
    if survival and as_bool(survival.get("enabled", True)):
        survival_results = run_survival(sets, clinical_table, survival, clinical, folds, seed, notes)
        _write_csv(survival_results, out / "survival.csv")

    covid_results, covid_target = None, None
    covid = dict(covid or {})
    if covid.get("clinical") and Path(covid["clinical"]).is_file():
        covid_table = read_subject_table(covid["clinical"], "COVID clinical table")
        covid_target = dict(covid.get("target") or {"column": "grade", "kind": "ordinal", "label": "Severity"})
        covid_sets = collect_feature_sets(covid.get("embeddings"), covid.get("prepared_cache"), out,
                                          dict(covid.get("baselines") or baselines), atlas_dir, notes, "covid")
        covid_sets = {k: v for k, v in shared_subjects(covid_table, covid_sets, common_subjects, notes,
                                                       "covid").items() if len(v)}
        if covid_sets:
            covid_results = run_readouts(covid_sets, covid_table, {"severity": covid_target}, covid["clinical"],
                                         folds, seed, dict(readout or {}))
            _write_csv(covid_results, out / "covid_readouts.csv")
        else:
            notes.add("[covid] no feature set shares subjects with the COVID clinical table: Table 4 skipped")
    else:
        notes.add(f"[covid] severity grading skipped: no COVID clinical table ({covid.get('clinical')})")

    blocks = write_tables(out / "tables", readouts, survival_results, covid_results, targets, covid_target,
                          dict(tables or {}), detection.get("tables") or {}, notes, caption)
    write_plots(out / "plots", clinical_table, sets, detection, notes)
    notes.add(f"evaluation finished in {time.perf_counter() - start:.1f} s; feature sets: {list(sets)}")
    with atomic_path(out / "tables" / "all_tables.md") as tmp:
        tmp.write_text("\n".join(blocks))
    with atomic_path(out / "notes.txt") as tmp:
        tmp.write_text("\n".join(notes.lines) + "\n")

    run_id = None
    mlflow = dict(mlflow or {})
    if as_bool(mlflow.get("enabled", True)) and mlflow.get("tracking_uri"):
        params = {"folds": folds, "seed": seed, "feature_sets": list(sets), "n_subjects": len(clinical_table),
                  "targets": list(targets), "clinical": clinical, "common_subjects": common_subjects,
                  "readout": readout, "survival_penalizer": (survival or {}).get("penalizer"),
                  "survival_pca_components": (survival or {}).get("pca_components")}
        run_id = log_to_mlflow(mlflow, params, readouts, survival_results, covid_results, out)
    return {"readouts": readouts, "survival": survival_results, "covid": covid_results, "notes": notes.lines,
            "mlflow_run_id": run_id, "output_dir": str(out)}
