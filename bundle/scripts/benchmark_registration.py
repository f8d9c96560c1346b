"""Registration benchmark: the fast default against the reference recipe, side by side in one run.

Subjects are phantoms made from the atlas lung mask with a known random affine (``custom.prepare.phantom``),
so every landmark has a true position. Each subject goes through the real preparation steps (NIfTI load,
1 mm resampling, classical lung segmentation) and is registered with both recipes; the table reports
registration seconds (wall, and CPU summed over threads: the fairer number on a shared machine) and mean / max
landmark error (mm) per subject and recipe, and the speed-up on the subjects that ran both.
The reference recipe takes minutes per subject, so it runs on the first ``reference_subjects`` only.

    python bundle/scripts/benchmark_registration.py --subjects 3 --reference_subjects 1 --out_dir bench
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for ``custom``

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from custom.data.atlas import atlas_mask_path, landmark_centres  # noqa: E402
from custom.flags import fire_cli  # noqa: E402
from custom.prepare import registration as reg  # noqa: E402
from custom.prepare.io import load_ct  # noqa: E402
from custom.prepare.landmarks import map_landmarks  # noqa: E402
from custom.prepare.lung_mask import segment_lungs  # noqa: E402
from custom.prepare.phantom import make_phantom  # noqa: E402


def landmark_error_mm(registration, ct, phantom, centres) -> np.ndarray:
    """Distance (mm) between registered and known landmark positions, in the 1 mm subject grid."""
    estimated = map_landmarks(registration.atlas_to_subject_vox, centres)
    true_world = phantom.true_landmarks_world()
    true_vox = (np.c_[true_world, np.ones(len(true_world))] @ np.linalg.inv(ct.affine).T)[:, :3]
    return np.linalg.norm((estimated - true_vox) * np.asarray(ct.spacing), axis=1)


def main(
    subjects: int = 3,
    reference_subjects: int = 1,
    out_dir: str = "benchmark_registration",
    seed: int = 100,
    spacing_mm: float = 2.0,
) -> dict:
    """Run both recipes; write ``results.csv`` and ``summary.json`` into ``out_dir`` and print a table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atlas = nib.load(str(atlas_mask_path()))
    atlas_mask = np.asarray(atlas.dataobj) > 0
    centres = landmark_centres()
    fixed = {}
    for recipe in (reg.FAST, reg.REFERENCE):
        start = time.perf_counter()
        fixed[recipe.name] = reg.working_image(atlas_mask, atlas.affine, recipe)
        print(f"atlas working image for {recipe.name}: {time.perf_counter() - start:.1f} s (once per run)")

    rows = []
    for i in range(subjects):
        phantom = make_phantom(out / f"phantom_{i:02d}.nii.gz", seed=seed + i, spacing_mm=spacing_mm)
        ct = load_ct(phantom.path)
        mask = segment_lungs(ct.hu, source=str(phantom.path))
        recipes = [reg.FAST] + ([reg.REFERENCE] if i < reference_subjects else [])
        for recipe in recipes:
            cpu_start = time.process_time()  # all threads of this process: fairer than wall time on a busy machine
            result = reg.register_to_atlas(
                mask, ct.affine, atlas_mask, atlas.affine, recipe, atlas_image=fixed[recipe.name]
            )
            cpu_seconds = time.process_time() - cpu_start
            err = landmark_error_mm(result, ct, phantom, centres)
            result.cleanup()
            rows.append(
                dict(
                    subject=i,
                    recipe=recipe.name,
                    seconds=round(result.seconds, 2),
                    cpu_seconds=round(cpu_seconds, 2),
                    mean_error_mm=round(float(err.mean()), 3),
                    max_error_mm=round(float(err.max()), 3),
                )
            )
            print(rows[-1], flush=True)

    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    same = table[table.subject < reference_subjects]
    paired = same.pivot(index="subject", columns="recipe", values="seconds")
    paired_cpu = same.pivot(index="subject", columns="recipe", values="cpu_seconds")
    summary = {
        recipe: {
            "subjects": int((table.recipe == recipe).sum()),
            "mean_seconds": round(float(table[table.recipe == recipe].seconds.mean()), 2),
            "mean_cpu_seconds": round(float(table[table.recipe == recipe].cpu_seconds.mean()), 2),
            "mean_landmark_error_mm": round(float(table[table.recipe == recipe].mean_error_mm.mean()), 3),
        }
        for recipe in table.recipe.unique()
    }
    if "reference" in paired:
        summary["speedup_on_same_subjects"] = round(float(paired["reference"].mean() / paired["fast"].mean()), 1)
        summary["cpu_speedup_on_same_subjects"] = round(
            float(paired_cpu["reference"].mean() / paired_cpu["fast"].mean()), 1
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table.to_string(index=False))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    fire_cli(main)
