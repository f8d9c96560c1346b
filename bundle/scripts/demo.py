"""The main job on the embedded demo data, end to end on CPU (SYNTHETIC cohort: numbers are not clinical).

    python bundle/scripts/demo.py            # generate -> prepare -> pre-train -> embed -> fine-tune -> maps -> evaluate

Each stage is the bundle's own workflow (the configs under bundle/configs, run through ConfigWorkflow as
``python -m monai.bundle run`` runs them); a second run reuses the cohorts, the prepared caches and the plain-MoCo
baseline. Outputs:
bundle/demo_data (cohorts, prepared caches, embeddings), bundle/models (pretrained.pt, model.pt) and
bundle/runs (training, plain MoCo baseline, fine-tuning, emphysema maps, evaluation; MLflow sqlite stores).
It ends by printing the phenotype table (the paper's Table 2 layout) and where the tables and pictures are.

The plain-MoCo baseline is trained like DrasCLR: the same configs and the same overrides (epochs, iterations per
epoch, batch, data, seed), so the same budget, schedule and batch order, and a single queue of DrasCLR's
per-landmark length K; only its own switches differ (``custom.engine.ablation``). Its budget is printed and recorded in
``runs/ablations/plain_moco/variant.json`` and its MLflow params; a stored baseline trained otherwise is retrained.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
from monai.bundle import ConfigWorkflow

import custom
from custom.engine.ablation import (
    check_reusable,
    planned_budget,
    run_variant,
    training_configs,
    training_settings,
    variant_done,
)
from custom.engine.training_curves import plot_training_curves
from custom.flags import fire_cli

BUNDLE = Path(custom.bundle_root())
CONFIGS = BUNDLE / "configs"
STAGES = 8


class Stages:
    """Prints numbered stage banners with the elapsed time, and records each stage's duration."""

    def __init__(self):
        self.start = time.perf_counter()
        self.durations: dict[str, float] = {}
        self._current = None

    def __call__(self, index: int, title: str) -> None:
        self._close()
        self._current = (title, time.perf_counter())
        print(f"\n=== {index}/{STAGES} {title} ({time.perf_counter() - self.start:.0f} s elapsed) ===", flush=True)

    def _close(self) -> None:
        if self._current:
            title, began = self._current
            self.durations[title] = time.perf_counter() - began
            self._current = None

    def summary(self) -> str:
        self._close()
        lines = [f"  {seconds:6.0f} s  {title}" for title, seconds in self.durations.items()]
        return "\n".join(lines + [f"  {time.perf_counter() - self.start:6.0f} s  total"])


def _run(config: str | list, run_id: str, workflow_type: str = "infer", **overrides):
    files = [str(CONFIGS / c) for c in ([config] if isinstance(config, str) else config)]
    workflow = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0], workflow_type=workflow_type, run_id=run_id, **overrides
    )
    workflow.initialize()
    workflow.run()
    return workflow


def main(
    num_subjects: int = 10,
    covid_subjects: int = 8,
    seed: int = 0,
    max_epochs: int = 3,
    epoch_length: int = 40,
    batch_size: int = 16,
    num_workers: int = 2,
    finetune_epochs: int = 10,
    map_subjects: int = 4,
    map_stride: int = 32,
):
    stage = Stages()
    data = BUNDLE / "demo_data"
    runs = BUNDLE / "runs"
    synthetic = data / "synthetic"

    stage(1, f"generate SYNTHETIC cohorts: {num_subjects} COPD-like subjects, {covid_subjects} COVID-like subjects")
    if (synthetic / "cohort.csv").is_file() and (synthetic / "covid_cohort.csv").is_file():
        print(f"reusing {synthetic}")
    else:
        _run("generate.yaml", "run", num_subjects=num_subjects, covid_subjects=covid_subjects, seed=seed)

    stage(2, "prepare: lung mask -> affine registration to the atlas -> 581 landmark patches (both cohorts)")
    _run(
        "prepare.yaml",
        "prepare",
        source=str(synthetic / "cohort.csv"),
        cache_dir=str(data / "prepared"),
        num_workers=num_workers,
    )
    _run(
        "prepare.yaml",
        "prepare",
        source=str(synthetic / "covid_cohort.csv"),
        cache_dir=str(data / "prepared_covid"),
        num_workers=num_workers,
    )

    # One set of training overrides for DrasCLR and its baseline: the same budget, schedule, order and data.
    training = dict(
        dataset_dir=str(data / "prepared"),
        max_epochs=max_epochs,
        epoch_length=epoch_length,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
    )
    stage(3, f"pre-train DrasCLR ({max_epochs} epochs x {epoch_length} iterations, batch {batch_size})")
    train = _run("train.yaml", "training", workflow_type="train", **training)
    tracking_uri = train.parser.get_parsed_content("tracking_uri")
    train_dir = Path(train.parser.get_parsed_content("output_dir"))
    pretrained = Path(train.parser.get_parsed_content("model_path"))
    train.finalize()
    curves = plot_training_curves(
        tracking_uri, train_dir / "training_curves.png", title="DrasCLR pre-training on the SYNTHETIC demo cohort"
    )

    ablations = runs / "ablations"
    moco = ablations / "plain_moco"
    drasclr_config, moco_config = training_configs("plain_moco", **{**training, "output_dir": str(moco)})
    budget = planned_budget(moco_config)
    stage(
        4,
        f"pre-train the plain MoCo baseline with DrasCLR's budget (no location conditioning, one global queue "
        f"of K = {budget['queue_size']}; {budget['max_epochs']} epochs x {budget['epoch_length']} iterations, "
        f"batch {budget['batch_size']}) and embed with it",
    )
    try:  # a baseline (finished or stopped) trained with other settings is not like for like: train it again
        check_reusable(moco, training_settings(drasclr_config, moco_config))
    except ValueError as error:
        print(f"{error}: retraining the baseline")
        shutil.rmtree(moco)
    if variant_done(moco):
        print(f"reusing {moco}")
    else:
        training_only = {k: v for k, v in training.items() if k not in ("dataset_dir", "seed")}
        record = run_variant("plain_moco", data / "prepared", ablations, seed=seed, **training_only)
        print(f"plain MoCo got: {record['budget']}")

    stage(5, "embed every prepared subject with DrasCLR (581 patch embeddings + subject mean, eq. 10-11)")
    _run(
        "embed.yaml", "embed", source=str(data / "prepared"), out_dir=str(data / "embeddings"), weights=str(pretrained)
    )
    _run(
        "embed.yaml",
        "embed",
        source=str(data / "prepared_covid"),
        out_dir=str(data / "embeddings_covid"),
        weights=str(pretrained),
    )

    stage(
        6,
        "fine-tune the per-subtype emphysema detectors on the annotated boxes (-> models/model.pt) and cross-validate "
        "box detection",
    )
    _run("emphysema_finetune.yaml", "finetune", epochs=finetune_epochs, progress=True)
    _run("emphysema_finetune.yaml", "detection", progress=True)

    stage(
        7,
        f"emphysema maps of {map_subjects} COPD-like subjects (sliding window over the lung at stride "
        f"{map_stride}, report, pictures)",
    )
    maps_dir = runs / "emphysema_maps"
    cohort = pd.read_csv(synthetic / "cohort.csv", dtype={"subject_id": str}).head(map_subjects)
    scans = [
        {"subject_id": row.subject_id, "image": str(synthetic / row.image), "lung_mask": str(synthetic / row.lung_mask)}
        for row in cohort.itertuples()
    ]
    _run("inference.yaml", "inference", input=scans, output_dir=str(maps_dir), stride=map_stride, min_stride=map_stride)

    stage(8, "evaluate: linear readouts, Cox survival, COVID-like grading, baselines (paper Tables 2-8)")
    evaluation_dir = runs / "evaluate"
    _run("evaluate.yaml", "evaluate", output_dir=str(evaluation_dir))

    table2 = evaluation_dir / "tables" / "table2_phenotypes.md"
    print("\n" + (table2.read_text() if table2.is_file() else f"(no {table2}: see the log above)"))
    first_map = sorted(p for p in maps_dir.glob("*/emphysema_coronal.png"))
    print("Stage timings:\n" + stage.summary())
    print("\nWhere things are (all numbers come from a SYNTHETIC cohort):")
    print(f"  encoder weights:       {pretrained}  (emphysema detectors: {BUNDLE / 'models' / 'model.pt'})")
    print(f"  training curves:       {curves}")
    print(f"  subject embeddings:    {data / 'embeddings' / 'subject_embeddings.csv'}")
    print(
        f"  evaluation tables:     {evaluation_dir / 'tables'}  (CSV + Markdown), plots in {evaluation_dir / 'plots'}"
    )
    print(f"  emphysema detection:   {runs / 'emphysema_detection'}")
    print(
        f"  emphysema maps:        {maps_dir}  (NIfTI, report.json, emphysema_report.csv"
        + (f", pictures such as {first_map[0]}" if first_map else "")
        + ")"
    )
    finetune_store = BUNDLE / "runs" / "finetune" / "mlruns.db"  # fine-tuning and detection (emphysema_finetune.yaml)
    print(f"  MLflow stores:         {train_dir / 'mlruns.db'}, {evaluation_dir / 'mlruns.db'}, {finetune_store}")
    print("  what each run holds:   bundle/docs/mlflow.md")
    if shutil.which("mlflow"):
        print(f"  browse them:           mlflow ui --backend-store-uri {tracking_uri}")


if __name__ == "__main__":
    fire_cli(main)
