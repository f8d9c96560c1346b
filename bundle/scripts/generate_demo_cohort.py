"""Generate the SYNTHETIC demo cohort (not real patients): NIfTI CTs in HU, ground-truth lesion maps, lung
masks, known atlas->subject transforms, a clinical table, emphysema box annotations, some DICOM series, and
optionally the COVID-like cohort. See bundle/docs/synthetic_cohort.md.

    python bundle/scripts/generate_demo_cohort.py --out_dir bundle/demo_data/synthetic --num_subjects 8 --seed 0
    python bundle/scripts/generate_demo_cohort.py --out_dir bundle/demo_data/synthetic --cohort both --covid_subjects 5
    python bundle/scripts/generate_demo_cohort.py --out_dir /tmp/x --num_subjects 4 --pictures_dir bundle/docs/images

Same seed, same arguments -> identical files. ``--voxel_size 1`` gives full-resolution subjects (slow, large).
"""

from __future__ import annotations

import time
from pathlib import Path

from custom.flags import fire_cli
from custom.synthetic import (
    CopdLikeGenerator,
    CovidLikeGenerator,
    draw_clinical_table,
    generate_cohort,
    generate_covid_cohort,
)
from custom.synthetic.pictures import render_clinical_model, render_subject


def showcase_pictures(pictures_dir, seed: int = 0, voxel_size: float = 2.0) -> None:
    """Docs pictures: a COPD-like subject with both emphysema subtypes (the first such subject among 64
    table draws), a CT-3 COVID-like subject, and the clinical model over 500 table draws."""
    pictures = Path(pictures_dir)
    table = draw_clinical_table(64, seed)
    both = table[(table["cle_fraction"] > 0.08) & (table["paraseptal_fraction"] > 0.01) & (table["kernel"] != "sharp")]
    index = int(both.index[0]) if len(both) else int(table["emphysema_fraction"].idxmax())
    copd = CopdLikeGenerator(64, seed, voxel_size)
    plan = copd.plan(index)
    sub = copd.synthesize(plan)
    row, protocol = plan.row, plan.protocol
    render_subject(
        sub["image"],
        sub["lesion"],
        copd.grid.spacing,
        pictures / "synthetic_copd_subject.png",
        f"{row['subject_id']} (COPD-like, {row['gold_label']}, {protocol['kernel']} kernel)",
    )
    covid = CovidLikeGenerator(5, seed, voxel_size)
    plan = covid.plan(3)  # grades cycle with the index: subject 3 is CT-3
    sub = covid.synthesize(plan)
    row = plan.row
    render_subject(
        sub["image"],
        sub["lesion"],
        covid.grid.spacing,
        pictures / "synthetic_covid_subject.png",
        f"{row['subject_id']} (COVID-like, {row['grade_label']}, "
        f"{100 * row['involvement_fraction']:.0f} % involved)",
        window=(-1100.0, 100.0),
    )
    render_clinical_model(draw_clinical_table(500, seed), pictures / "synthetic_clinical_model.png")
    print(f"pictures written to {pictures}")


def main(
    out_dir: str = "bundle/demo_data/synthetic",
    num_subjects: int = 8,
    seed: int = 0,
    voxel_size: float = 2.0,
    cohort: str = "copd",
    covid_subjects: int | None = None,
    deformation_mm: float = 4.0,
    dicom_every: int = 4,
    include_panlobular: bool = True,
    annotation_fraction: float = 1.0,
    pictures_dir: str | None = None,
    progress: bool = True,
) -> None:
    """cohort: 'copd', 'covid' or 'both' (same out_dir; COVID files are prefixed ``covid_``, ids ``COV``)."""
    if cohort not in ("copd", "covid", "both"):
        raise ValueError(f"cohort must be 'copd', 'covid' or 'both', got {cohort!r}")
    out = Path(out_dir)
    start = time.perf_counter()
    copd = covid = None
    if cohort in ("copd", "both"):
        copd = generate_cohort(
            out,
            num_subjects=num_subjects,
            seed=seed,
            voxel_size=voxel_size,
            deformation_mm=deformation_mm,
            include_panlobular=include_panlobular,
            dicom_every=dicom_every,
            annotation_fraction=annotation_fraction,
            progress=progress,
        )
    if cohort in ("covid", "both"):
        covid = generate_covid_cohort(
            out,
            num_subjects=covid_subjects or num_subjects,
            seed=seed,
            voxel_size=voxel_size,
            deformation_mm=deformation_mm,
            dicom_every=0,
            progress=progress,
        )
    elapsed = time.perf_counter() - start
    total = sum(len(m) for m in (copd, covid) if m is not None)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(
        f"SYNTHETIC cohort in {out}: {total} subjects, {elapsed:.1f} s ({elapsed / max(total, 1):.2f} s/subject), "
        f"{size_mb:.1f} MB on disk ({size_mb / max(total, 1):.1f} MB/subject)"
    )
    if pictures_dir:
        showcase_pictures(pictures_dir, seed, voxel_size)


if __name__ == "__main__":
    fire_cli(main)
