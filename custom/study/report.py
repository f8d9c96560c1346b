"""The study's write-up: the compute-curve picture and ``report.md`` with every table the comparison computed.

The report is mechanical on purpose: it lays out the numbers (scores, paired differences, counts of intervals
above, across and below zero) and what produced them (preset, seed, generator, budgets read from MLflow, run
time per stage); the reading of them is written by a person, not generated here. Every number in it is about
SYNTHETIC cohorts, and the report and the picture say so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from custom.atomic_io import atomic_path  # noqa: E402
from custom.evaluation.tables import METRIC_HEADERS, format_value, markdown  # noqa: E402
from custom.figures import save_figure  # noqa: E402
from custom.study.comparison import PAIRED_COLUMNS, SCORE_COLUMNS  # noqa: E402

# the study's metric names -> the names custom.evaluation.tables formats and heads
TABLE_METRIC = {"r2": "r2", "accuracy": "accuracy", "c_index": "concordance"}
RECORD_KEYS = ("preset", "seed", "generator", "copd_subjects", "covid_subjects", "bundle_version")
BUDGET_COLUMNS = ("method", "iterations", "batch_size", "patches_seen")
STAGE_COLUMNS = ("stage", "seconds")
CURVE_FILE = "compute_curve.png"
BANNER = (
    "> **SYNTHETIC DATA.** Every number in this report is computed on SYNTHETIC cohorts made by the bundle's "
    "generator, where the truth is known by construction. It says nothing about patients, nor about the "
    "paper's COPDGene or MosMed results."
)


def _require(table: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; it has {list(table.columns)}")


def _metric_header(metric: str) -> str:
    return METRIC_HEADERS.get(TABLE_METRIC.get(metric, metric), metric)


def _value(value: float, metric: str) -> str:
    return format_value(value, None, TABLE_METRIC.get(metric, metric))


def _interval(estimate: float, low: float, high: float, metric: str) -> str:
    """'0.42 [0.30, 0.51]' (accuracies in percent, as the other tables)."""
    text = _value(estimate, metric)
    if text != "n/a" and math.isfinite(low) and math.isfinite(high):
        text += f" [{_value(low, metric)}, {_value(high, metric)}]"
    return text


def _percent(share: float) -> str:
    return f"{share * 100:g} %"


def _duration(seconds) -> str:
    if seconds is None or not math.isfinite(float(seconds)):
        return "n/a"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {rest:02d} s" if hours else f"{minutes} min {rest:02d} s"


def _methods(scores: pd.DataFrame, reference: str | None = None) -> tuple[list, list]:
    """(learned methods, fixed baselines) in the order the table first names them, the reference first."""
    learned = list(dict.fromkeys(scores.loc[scores["share"].notna(), "method"]))
    learned.sort(key=lambda method: method != reference)
    fixed = list(dict.fromkeys(scores.loc[scores["share"].isna(), "method"]))
    return learned, fixed


def full_share(scores: pd.DataFrame) -> float:
    """The largest share of the pre-training budget any learned method was read out at (100 % in a study)."""
    shares = scores["share"].dropna()
    if shares.empty:
        raise ValueError("scores table: no learned method (every share is NaN), so there is no full budget")
    return float(shares.max())


def compute_curve(scores: pd.DataFrame, out_file: str | Path, reference: str | None = "DrasCLR") -> Path:
    """One panel per (cohort, target): each learned method's score against the share of the pre-training budget
    (percentile bootstrap interval as bars), fixed baselines as a horizontal line with a shaded interval."""
    _require(scores, SCORE_COLUMNS, "scores table")
    learned, fixed = _methods(scores, reference)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(learned + fixed)}
    panels = list(scores.groupby(["cohort", "target"], sort=False))
    if not panels:
        raise ValueError("scores table: no rows to draw")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.7 * rows), squeeze=False)
    all_shares = np.sort(scores["share"].dropna().unique()) * 100
    step = np.min(np.diff(all_shares)) if len(all_shares) > 1 else 10.0
    dodge = 0.12 * step / max(len(learned), 1)
    for ax, ((cohort, _), block) in zip(axes.flat, panels):
        metric = block["metric"].iloc[0]
        scale = 100.0 if TABLE_METRIC.get(metric) == "accuracy" else 1.0
        for i, method in enumerate(learned):
            line = block[(block["method"] == method) & block["share"].notna()].sort_values("share")
            line = line[np.isfinite(line["estimate"].to_numpy(dtype=float))]
            if line.empty:
                continue
            est, low, high = (line[c].to_numpy(dtype=float) * scale for c in ("estimate", "low", "high"))
            bars = np.nan_to_num(np.vstack([est - low, high - est]), nan=0.0)
            x = line["share"].to_numpy(dtype=float) * 100 + (i - (len(learned) - 1) / 2) * dodge
            ax.errorbar(x, est, yerr=bars, marker="o", ms=4, capsize=3, color=colours[method], label=method)
        for method in fixed:
            row = block[(block["method"] == method) & block["share"].isna()]
            if row.empty or not np.isfinite(float(row["estimate"].iloc[0])):
                continue
            est, low, high = (float(row[c].iloc[0]) * scale for c in ("estimate", "low", "high"))
            ax.axhline(est, ls="--", lw=1.2, color=colours[method], label=method)
            if math.isfinite(low) and math.isfinite(high):
                ax.axhspan(low, high, color=colours[method], alpha=0.15, lw=0)
        ax.set_title(f"{cohort}: {block['label'].iloc[0]}", fontsize=10)
        ax.set_xlabel("share of the pre-training budget (%)")
        ax.set_ylabel(_metric_header(metric))
        ax.set_xticks(all_shares)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        handles.update({name: handle for handle, name in zip(*ax.get_legend_handles_labels())})
    names = [m for m in learned + fixed if m in handles]
    figure.legend([handles[n] for n in names], names, loc="lower center", ncol=min(len(names), 6), frameon=False)
    confidence = float(scores["confidence"].iloc[0])
    figure.suptitle(
        f"SYNTHETIC cohorts: score against pre-training compute ({confidence * 100:g} % bootstrap intervals)",
        fontsize=11,
    )
    figure.tight_layout(rect=(0, 0.06, 1, 0.96))
    return save_figure(figure, out_file, dpi=120)


def _run_table(record: dict) -> pd.DataFrame:
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"study record: missing key(s) {missing}; it has {sorted(record)}")
    rows = [
        ("preset", record["preset"]),
        ("seed", record["seed"]),
        ("generator model", record["generator"]),
        ("COPD-like subjects (SYNTHETIC)", record["copd_subjects"]),
        ("COVID-like subjects (SYNTHETIC)", record["covid_subjects"]),
        ("bundle version", record["bundle_version"]),
    ]
    rows += [(key, record[key]) for key in ("started", "finished") if record.get(key) is not None]
    for key, value in (record.get("settings") or {}).items():
        shown = value if isinstance(value, str | int | float | bool) else json.dumps(value, default=str)
        rows.append((f"setting `{key}`", shown))
    return pd.DataFrame(rows, columns=["Item", "Value"])


def _budget_table(budgets: pd.DataFrame) -> pd.DataFrame:
    _require(budgets, BUDGET_COLUMNS, "budgets table")
    optional = {
        "order": "Batch order",
        "queue_size": "Queue length",
        "num_queues": "Queues",
        "train_seconds": "Train time",
        "mlflow_run_id": "MLflow run",
        "source": "Read from",
    }
    table = pd.DataFrame(
        {
            "Method": budgets["method"],
            "Iterations": budgets["iterations"],
            "Batch": budgets["batch_size"],
            "Patches seen": budgets["patches_seen"],
        }
    )
    for column, header in optional.items():
        if column in budgets.columns:
            values = budgets[column]
            table[header] = values.map(_duration) if column == "train_seconds" else values.fillna("n/a")
    return table


def _stage_table(stage_times: pd.DataFrame) -> pd.DataFrame:
    _require(stage_times, STAGE_COLUMNS, "stage times table")
    table = pd.DataFrame({"Stage": stage_times["stage"], "Wall time": stage_times["seconds"].map(_duration)})
    if "cpu_seconds" in stage_times.columns:
        table["CPU time"] = stage_times["cpu_seconds"].map(_duration)
    if "detail" in stage_times.columns:
        table["Detail"] = stage_times["detail"].fillna("")
    total = {"Stage": "**total**", "Wall time": _duration(stage_times["seconds"].sum())}
    if "cpu_seconds" in stage_times.columns:
        total["CPU time"] = _duration(stage_times["cpu_seconds"].sum())
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True).fillna("")


def _score_grid(scores: pd.DataFrame, share: float, reference: str) -> pd.DataFrame:
    """Rows = (cohort, target), columns = learned methods at ``share`` (the reference first), then fixed baselines."""
    learned, fixed = _methods(scores, reference)
    rows = []
    for (cohort, _), block in scores.groupby(["cohort", "target"], sort=False):
        metric = block["metric"].iloc[0]
        cells = {"Cohort": cohort, "Target": block["label"].iloc[0], "Metric": _metric_header(metric)}
        for method in learned + fixed:
            at = block["share"].isna() if method in fixed else np.isclose(block["share"], share)
            row = block[(block["method"] == method) & at]
            cells[method] = (
                "—" if row.empty else _interval(*(float(row[c].iloc[0]) for c in ("estimate", "low", "high")), metric)
            )
        rows.append(cells)
    return pd.DataFrame(rows)


def _paired_at(paired: pd.DataFrame, share: float) -> pd.DataFrame:
    block = paired[np.isclose(paired["share"], share)]
    rows = []
    for _, r in block.iterrows():
        rows.append(
            {
                "Cohort": r["cohort"],
                "Target": r["label"],
                "Metric": _metric_header(r["metric"]),
                "Baseline": r["baseline"],
                f"{r['reference']} − baseline [CI]": _interval(r["estimate"], r["low"], r["high"], r["metric"]),
                "Share of resamples > 0": f"{r['share_above_zero']:.3f}",
                "CI excludes 0": "yes" if r["excludes_zero"] else "no",
                "Subjects": int(r["n_subjects"]),
            }
        )
    return pd.DataFrame(rows)


def _paired_by_share(paired: pd.DataFrame) -> pd.DataFrame:
    """Rows = (cohort, target, baseline), columns = shares of the budget."""
    shares = sorted(paired["share"].unique())
    rows = []
    for (cohort, _, baseline), block in paired.groupby(["cohort", "target", "baseline"], sort=False):
        cells = {
            "Cohort": cohort,
            "Target": block["label"].iloc[0],
            "Metric": _metric_header(block["metric"].iloc[0]),
            "Baseline": baseline,
        }
        for share in shares:
            row = block[np.isclose(block["share"], share)]
            cells[_percent(share)] = (
                "—"
                if row.empty
                else _interval(*(float(row[c].iloc[0]) for c in ("estimate", "low", "high")), row["metric"].iloc[0])
            )
        rows.append(cells)
    return pd.DataFrame(rows)


def side_of_zero(paired: pd.DataFrame) -> pd.Series:
    """'above' (low > 0), 'below' (high < 0) or 'includes' for every row of the paired table."""
    side = np.where(paired["low"] > 0, "above", np.where(paired["high"] < 0, "below", "includes"))
    return pd.Series(side, index=paired.index)


def summary_counts(paired: pd.DataFrame) -> pd.DataFrame:
    """Per (baseline, share): on how many targets the reference's interval is above 0, includes 0, below 0."""
    sides = paired.assign(side=side_of_zero(paired))
    rows = []
    for (baseline, share), block in sides.groupby(["baseline", "share"], sort=False):
        counts = block["side"].value_counts()
        rows.append(
            {
                "baseline": baseline,
                "share": share,
                "targets": len(block),
                "above": int(counts.get("above", 0)),
                "includes": int(counts.get("includes", 0)),
                "below": int(counts.get("below", 0)),
            }
        )
    return pd.DataFrame(rows, columns=["baseline", "share", "targets", "above", "includes", "below"])


def _summary_tables(paired: pd.DataFrame, share: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = summary_counts(paired)
    at_full = counts[np.isclose(counts["share"], share)]
    full = pd.DataFrame(
        {
            "Baseline": at_full["baseline"],
            "Targets": at_full["targets"],
            "Interval above 0": at_full["above"],
            "Interval includes 0": at_full["includes"],
            "Interval below 0": at_full["below"],
        }
    )
    shares = sorted(counts["share"].unique())
    every = []
    for baseline, block in counts.groupby("baseline", sort=False):
        cells = {"Baseline": baseline}
        for s in shares:
            row = block[np.isclose(block["share"], s)]
            counts_at = row.iloc[0] if len(row) else None
            cells[_percent(s)] = (
                "—" if counts_at is None else f"{counts_at['above']} / {counts_at['includes']} / {counts_at['below']}"
            )
        every.append(cells)
    return full, pd.DataFrame(every)


def _section(table: pd.DataFrame, title: str, caption: str = "") -> str:
    """``tables.markdown`` of a table, or its title and a line saying there is nothing to show."""
    if table.empty:
        return f"### {title}\n\n(no rows: the study produced nothing for this table)\n"
    return markdown(table, title, caption=caption)


def _write_csv(table: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def write_report(
    out_dir: str | Path,
    record: dict,
    scores: pd.DataFrame,
    paired: pd.DataFrame,
    stage_times: pd.DataFrame,
    budgets: pd.DataFrame,
) -> Path:
    """``report.md`` (with ``compute_curve.png``, ``scores.csv`` and ``paired_differences.csv`` beside it) in
    ``out_dir``, each written atomically; returns the report's path."""
    out_dir = Path(out_dir)
    _require(scores, SCORE_COLUMNS, "scores table")
    _require(paired, PAIRED_COLUMNS, "paired differences table")
    run = _run_table(record)
    budget = _budget_table(budgets)
    stages = _stage_table(stage_times)
    share = full_share(scores)
    references = list(dict.fromkeys(paired["reference"]))
    reference = references[0] if references else "the reference"
    confidence = float(scores["confidence"].iloc[0]) if len(scores) else 0.95
    level = f"{confidence * 100:g} %"
    repeats = sorted(set(scores["repeats"]))

    _write_csv(scores, out_dir / "scores.csv")
    _write_csv(paired, out_dir / "paired_differences.csv")
    compute_curve(scores, out_dir / CURVE_FILE, reference)

    full_summary, every_summary = _summary_tables(paired, share)
    scale_note = "Accuracies are in percent (differences in percentage points); R² and C as fractions."
    blocks = [
        "# DrasCLR evidence study: report (SYNTHETIC)",
        BANNER,
        "## Run",
        _section(run, "What was run"),
        "## Pre-training budgets",
        _section(
            budget,
            "Budget of every pre-trained method",
            caption="Read back from each pre-training run's MLflow params (column 'Read from'); patches seen = "
            "iterations × batch.",
        ),
        "## Run time per stage",
        _section(stages, "Wall-clock and CPU time of every stage", caption=f"Preset `{record['preset']}`."),
        "## Scores at the full pre-training budget",
        _section(
            _score_grid(scores, share, reference),
            f"Scores at {_percent(share)} of the budget: estimate [{level} interval]",
            caption=f"Mean over the cross-validation repeats ({', '.join(map(str, repeats))} repeats) of each "
            f"method's out-of-fold score; percentile bootstrap interval over subjects. Fixed baselines are not "
            f"pre-trained. {scale_note}",
        ),
        "## Paired differences at the full pre-training budget",
        _section(
            _paired_at(paired, share),
            f"{reference} minus each baseline at {_percent(share)} of the budget",
            caption="Paired bootstrap over the subjects both methods predicted, every repeat of a subject kept "
            f"together; {level} percentile interval. Learned baselines are compared at the same share of the "
            f"budget, fixed baselines as they are. {scale_note}",
        ),
        "## Compute curve",
        f"![Score against the share of the pre-training budget (SYNTHETIC)]({CURVE_FILE})",
        _section(
            _paired_by_share(paired),
            f"{reference} minus each baseline at every share of the budget: difference [{level} interval]",
            caption=scale_note,
        ),
        "## Mechanical summary",
        _section(
            full_summary,
            f"Targets on which {reference}'s interval against each baseline lies above 0, includes 0 or lies "
            f"below 0, at {_percent(share)} of the budget",
        ),
        _section(
            every_summary,
            "The same counts at every share of the budget (above / includes / below)",
        ),
        "Full-precision numbers: `scores.csv` and `paired_differences.csv` beside this file.",
    ]
    notes = list(dict.fromkeys(record.get("notes") or []))
    if notes:
        blocks += ["## Notes", "What the run could not do (a target without a row above is one of these):"]
        blocks.append("\n".join(f"- {note}" for note in notes))
    path = out_dir / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n\n".join(b.rstrip("\n") for b in blocks) + "\n")
    return path
