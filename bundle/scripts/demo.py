"""The main job on the embedded demo data, end to end on CPU (SYNTHETIC cohort: numbers are not clinical).

    python bundle/scripts/demo.py                      # generate -> prepare -> pre-train -> embed
    python bundle/scripts/demo.py --num_subjects 12 --max_epochs 6

Each stage is the bundle's own workflow (generate.yaml, prepare.yaml, train.yaml through ConfigWorkflow, as
``python -m monai.bundle run`` would run them) and is resumable: a second run reuses what is finished.
Outputs go under bundle/demo_data (cohort, prepared cache, embeddings) and bundle/runs/train (checkpoints,
MLflow store, curves); the query encoder lands in bundle/models/pretrained.pt.
"""

from __future__ import annotations

import time
from pathlib import Path

import fire
from monai.bundle import ConfigWorkflow

import custom
from custom.embedding import embed_cohort
from custom.training_curves import plot_training_curves

BUNDLE = Path(custom.bundle_root())
CONFIGS = BUNDLE / "configs"


def _stage(name: str, start: float) -> None:
    print(f"\n=== {name} ({time.perf_counter() - start:.0f} s elapsed) ===", flush=True)


def main(num_subjects: int = 8, seed: int = 0, max_epochs: int = 3, epoch_length: int = 40, batch_size: int = 16,
         num_workers: int = 2):
    start = time.perf_counter()
    data = BUNDLE / "demo_data"
    cohort_csv = data / "synthetic" / "cohort.csv"

    _stage(f"1/4 generate a SYNTHETIC cohort of {num_subjects} subjects", start)
    if cohort_csv.is_file():
        print(f"reusing {cohort_csv}")
    else:
        generate = ConfigWorkflow(config_file=str(CONFIGS / "generate.yaml"), workflow_type="infer", run_id="run",
                                  num_subjects=num_subjects, seed=seed)
        generate.initialize()
        generate.run()

    _stage("2/4 prepare: lung mask -> affine registration to the atlas -> 581 landmark patches", start)
    prepare = ConfigWorkflow(config_file=str(CONFIGS / "prepare.yaml"), workflow_type="infer", run_id="prepare",
                             source=str(cohort_csv), num_workers=num_workers)
    prepare.initialize()
    prepare.run()

    _stage(f"3/4 pre-train DrasCLR ({max_epochs} epochs x {epoch_length} iterations, batch {batch_size})", start)
    train = ConfigWorkflow(config_file=str(CONFIGS / "train.yaml"), workflow_type="train", max_epochs=max_epochs,
                           epoch_length=epoch_length, batch_size=batch_size, num_workers=num_workers, seed=seed)
    train.initialize()
    train.run()
    tracking_uri = train.parser.get_parsed_content("tracking_uri")
    output_dir = Path(train.parser.get_parsed_content("output_dir"))
    model_path = train.parser.get_parsed_content("model_path")
    train.finalize()
    curves = plot_training_curves(tracking_uri, output_dir / "training_curves.png",
                                  title="DrasCLR pre-training on the SYNTHETIC demo cohort")

    _stage("4/4 embed every prepared subject (patch embeddings + subject mean, eq. 10-11)", start)
    table = embed_cohort(data / "prepared", model_path, data / "embeddings")

    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    print(f"  query encoder:       {model_path}")
    print(f"  checkpoints, MLflow: {output_dir}  (tracking URI {tracking_uri})")
    print(f"  training curves:     {curves}")
    print(f"  subject embeddings:  {data / 'embeddings' / 'subject_embeddings.csv'} ({len(table)} subjects x 128)")
    print("  (all numbers come from a SYNTHETIC cohort)")


if __name__ == "__main__":
    fire.Fire(main)
