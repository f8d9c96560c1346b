"""Pre-train and embed the baselines and ablations of paper §4.4 (Tables 6 and 8) on a prepared cohort.

    python bundle/scripts/run_ablations.py --dataset_dir bundle/demo_data/prepared --out_dir /tmp/ablations \\
        --variants plain_moco,conditioning_none,conditioning_concatenation,conditioning_hypernetwork,neighbours_0 \\
        --max_epochs 1 --epoch_length 20
    python bundle/scripts/run_ablations.py --dataset_dir /data/prepared --out_dir /data/ablations --paper true

Each variant (``custom.engine.ablation.VARIANTS``; default: all) is pre-trained with the bundle's training workflow
(train.yaml + ablation.yaml, with paper.yaml between them under ``--paper true``) and its encoder embeds every
subject: ``<out_dir>/<variant>/subject_embeddings.csv`` and ``patch_embeddings/<id>.npy``, the layout of the
embed workflow, so the evaluation reads each folder as one embedding set. (Table 7, random vs patch locations,
is the emphysema detection run's: ``emphysema_finetune.yaml``, ``random_location: true``.) Resumable: finished
variants are skipped and a stopped pre-training continues from its checkpoint. A variant that fails is recorded
and the others go on. ``<out_dir>/ablations.csv`` lists each variant's status and the
wall and CPU seconds spent training and embedding; MLflow runs go to ``<out_dir>/mlruns.db`` (experiment
drasclr_ablation): one parent run ``ablations`` per call, each variant's pre-training a child run of it.

Like for like: every variant merges the same configs and overrides as the method (``neighbours_2``) and only
changes its own switches, so each gets the same budget (iterations x batch), schedule, batch order, data and
queue length K; the budget each got is printed and recorded (``variant.json``, ``ablations.csv``, MLflow
params). A finished variant trained with other settings is not reused (it fails with a message). ``--dry_run
true`` prints each variant's config files and planned budget and trains nothing. On/off options accept
true/false/yes/no/1/0/on/off in any case (``custom.flags``).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import pandas as pd
from monai.utils import path_to_sqlite_uri

import custom
from custom.atomic_io import atomic_path
from custom.engine.ablation import (
    VARIANTS,
    ablation_config_files,
    check_inherited,
    check_reusable,
    family_run,
    get_variant,
    planned_budget,
    run_variant,
    training_configs,
    training_settings,
    variant_done,
)
from custom.flags import fire_cli

BUNDLE = Path(custom.bundle_root())
DEMO_DATASET = str(BUNDLE / "demo_data" / "prepared")
DEFAULT_OUT_DIR = str(BUNDLE / "runs" / "ablations")


def plan_variants(variants: str | list | tuple | None) -> list[str]:
    """Canonical names to run, in order, each once."""
    if variants is None or variants == "all":
        names = list(VARIANTS)
    else:
        names = [n.strip() for n in (variants.split(",") if isinstance(variants, str) else variants)]
    return list(dict.fromkeys(get_variant(n).name for n in names if n))


def main(
    dataset_dir: str = DEMO_DATASET,
    out_dir: str = DEFAULT_OUT_DIR,
    variants: str | None = None,
    paper: bool = False,
    max_epochs: int | None = None,
    epoch_length: int | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    mlflow: bool = True,
    seed: int = 0,
    dry_run: bool = False,
):
    out = Path(out_dir)
    plan = plan_variants(variants)
    schedule = {
        "max_epochs": max_epochs,
        "epoch_length": epoch_length,
        "batch_size": batch_size,
        "num_workers": num_workers,
    }
    overrides = {k: v for k, v in schedule.items() if v is not None}
    overrides.update(mlflow=mlflow, tracking_uri=path_to_sqlite_uri(str(out / "mlruns.db")))
    print(f"ablation variants: {', '.join(plan)} -> {out}", flush=True)
    print("configs: " + ", ".join(Path(f).name for f in ablation_config_files(paper)), flush=True)
    if dry_run:
        for name in plan:
            print(f"[{name}] " + _budget_line(_planned(name, dataset_dir, out, paper, seed, overrides)[0]))
        return
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in schedule.items() if v is not None}
    parent = family_run(
        out, dataset_dir, plan, paper, enabled=mlflow, tracking_uri=overrides["tracking_uri"], seed=seed, **settings
    )
    with parent, parent.nested():  # one parent run; each variant's pre-training a child run of it
        table = _run_plan(plan, dataset_dir, out, paper, seed, overrides)
        if parent.run_id:
            ok = table["status"].str.startswith("ok")
            parent.log_metrics({"variants_ok": int(ok.sum()), "variants_failed": int((~ok).sum())})
    if table["status"].str.startswith("failed").any():
        raise SystemExit(1)


def _run_plan(plan: list[str], dataset_dir, out: Path, paper, seed: int, overrides: dict) -> pd.DataFrame:
    """Train and embed every variant of ``plan`` (skipping finished ones); writes and returns ``ablations.csv``."""
    rows = []
    for name in plan:
        folder = out / name
        print(f"\n=== {name}: {VARIANTS[name].description} ===", flush=True)
        start = time.perf_counter()
        try:
            budget, settings = _planned(name, dataset_dir, out, paper, seed, overrides)
            print(f"[{name}] {_budget_line(budget)}", flush=True)
            if variant_done(folder):
                check_reusable(folder, settings)
                print(f"[{name}] finished in an earlier run: skipped", flush=True)
                rows.append(_row(name, "ok (earlier run)", json.loads((folder / "variant.json").read_text()), folder))
                continue
            record = run_variant(name, dataset_dir, out, seed=seed, paper=paper, **overrides)
        except Exception as error:  # noqa: BLE001 - a batch job records the failure and goes on with the other variants
            traceback.print_exc()
            rows.append({"variant": name, "status": f"failed: {type(error).__name__}: {error}"})
            continue
        rows.append(_row(name, "ok", record, folder))
        print(
            f"[{name}] got {_budget_line(record.get('budget'))}; train {record['train_seconds']:.1f} s (CPU "
            f"{record['train_cpu_seconds']:.0f} s), embed {record['embed_seconds']:.1f} s (CPU "
            f"{record['embed_cpu_seconds']:.0f} s), total {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    table = pd.DataFrame(rows)
    with atomic_path(out / "ablations.csv") as tmp:
        table.to_csv(tmp, index=False)
    print("\n" + table.to_string(index=False), flush=True)
    return table


def _planned(name: str, dataset_dir, out: Path, paper, seed: int, overrides: dict) -> tuple[dict, dict]:
    """(planned budget, inherited settings) of a trainable variant, as ``run_variant`` will train it; refuses a
    variant whose config does not inherit the method's training settings."""
    drasclr, variant = training_configs(
        name, paper, dataset_dir=str(dataset_dir), output_dir=str(out / name), seed=seed, **overrides
    )
    check_inherited(drasclr, variant, name)
    return planned_budget(variant), training_settings(drasclr, variant)


def _budget_line(budget: dict | None) -> str:
    if not budget:
        return "budget not recorded"
    per_epoch = budget["epoch_length"] or "a full pass"
    steps = f"{budget['iterations']} iterations (" if budget["iterations"] else "("
    return (
        f"budget: {steps}{budget['max_epochs']} epochs x {per_epoch}) of batch {budget['batch_size']}, order "
        f"{budget['order']}, {budget['num_queues']} queue(s) of K = {budget['queue_size']}"
    )


BUDGET = ("iterations", "batch_size", "max_epochs", "epoch_length", "order", "queue_size", "num_queues")


def _row(name: str, status: str, record: dict, folder: Path) -> dict:
    times = ("train_seconds", "train_cpu_seconds", "embed_seconds", "embed_cpu_seconds")
    budget = record.get("budget") or {}
    return {
        "variant": name,
        "status": status,
        **{k: budget.get(k) for k in BUDGET},
        **{k: record.get(k) for k in times},
        "weights": record.get("weights"),
        "embeddings": str(folder),
    }


if __name__ == "__main__":
    fire_cli(main)
