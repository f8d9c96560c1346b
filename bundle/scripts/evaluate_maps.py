"""Emphysema maps judged against the truth of a held-out SYNTHETIC cohort (numbers are not clinical).

    python bundle/scripts/evaluate_maps.py --out_dir /tmp/maps_truth --num_subjects 6
    python bundle/scripts/evaluate_maps.py --out_dir /tmp/maps_truth --num_subjects 2 --voxel_size 4 --stride 48

1. generates a SYNTHETIC cohort with the bundle's generator (configs/generate.yaml) and a seed that is not the demo
   cohort's (default 1000; the demo's seed, on which models/model.pt was trained, is refused unless
   ``--force_seed true``) into ``<out_dir>/cohort``;
2. maps every scan with the bundle's own inference workflow (``python -m monai.bundle run inference``, a
   subprocess: the workflow a user runs is the one judged; only the image is given unless ``--lung_mask true``, so
   the map's own lung segmentation is part of what is judged) into ``<out_dir>/maps``;
3. compares each ``emphysema_mask.nii.gz`` with the generator's lesion and lung maps
   (``custom.emphysema.map_truth``: per subtype and for any emphysema, precision, recall, F1 = Dice inside the
   truth's lung; the shares of the lung; the false-positive share of subjects without emphysema) and writes
   ``map_truth_subjects.csv``, ``map_truth_summary.csv`` (mean, s.d., pooled counts), ``map_truth.md`` and, with
   ``--picture true``, ``map_truth.png`` (per subject one coronal slice: truth beside map).
Resumable: a cohort generated with the same seed, size and voxel size is reused, and the inference workflow reuses
every map it made with the same model and settings (docs/emphysema.md, "resume").
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from monai.bundle import ConfigParser

import custom
from custom.atomic_io import atomic_path
from custom.emphysema.map_truth import SCORED, cohort_summary, compare_map, load_subject
from custom.flags import fire_cli
from custom.synthetic.clinical import is_healthy_control
from custom.synthetic.labels import CENTRILOBULAR, PANLOBULAR, PARASEPTAL

BUNDLE = Path(custom.bundle_root())
CODE_ROOT = Path(custom.__file__).resolve().parent.parent  # holds custom/: the repository, or an exported bundle
CONFIGS = BUNDLE / "configs"
DEFAULT_OUT_DIR = str(BUNDLE / "runs" / "map_truth")
DEFAULT_MODEL = str(BUNDLE / "models" / "model.pt")
SYNTHETIC_NOTE = "SYNTHETIC cohort (generated, not real patients): these figures say nothing clinical."


def demo_seed() -> int:
    """The seed of the demo cohort the shipped model was fine-tuned on (configs/generate.yaml's default)."""
    return int(ConfigParser.load_config_file(str(CONFIGS / "generate.yaml"))["seed"])


def _write_json(path: Path, value: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2))


def _bundle_run(arguments: list, what: str) -> None:
    """``python -m monai.bundle run ...`` where ``custom`` imports from; a failure stops here naming the step."""
    command = [sys.executable, "-m", "monai.bundle", "run", *map(str, arguments)]
    print(" ".join(command), flush=True)
    code = subprocess.run(command, cwd=CODE_ROOT, check=False).returncode
    if code != 0:
        raise SystemExit(f"{what} failed (exit {code}): {' '.join(command)}")


def held_out_cohort(cohort_dir: Path, stamp_path: Path, stamp: dict) -> pd.DataFrame:
    """The generator's cohort table of ``cohort_dir``, generated unless a cohort with the same ``stamp`` (seed,
    size, voxel size) is there already; a cohort made otherwise is never reused nor overwritten."""
    table_path = cohort_dir / "cohort.csv"
    if table_path.is_file():
        stored = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
        if stored != stamp:
            raise SystemExit(
                f"{cohort_dir}: holds a cohort made with {stored or 'unknown settings'}, not {stamp}; "
                "choose another --out_dir or remove it"
            )
        print(f"reusing the held-out cohort in {cohort_dir}")
    else:
        arguments = ["--config_file", CONFIGS / "generate.yaml", "--output_dir", cohort_dir]
        arguments += ["--num_subjects", stamp["num_subjects"], "--seed", stamp["seed"], "--dicom_every", 0]
        if stamp["voxel_size"] is not None:
            arguments += ["--voxel_size", stamp["voxel_size"]]
        _bundle_run(arguments + ["--progress", "false"], "generating the held-out cohort")
        _write_json(stamp_path, stamp)
    return pd.read_csv(table_path, dtype={"subject_id": str})


def _failures(maps_dir: Path) -> dict:
    path = maps_dir / "failures.csv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype={"subject_id": str}, keep_default_na=False)
    return dict(zip(table.subject_id, table.error)) if len(table) else {}


def _map_lines(maps_dir: Path, subject_ids) -> list:
    """Which model made this cohort's maps and with which grid, from the inference report's rows of these subjects
    (model file, SHA-1, what it was trained on; stride, min_stride)."""
    path = maps_dir / "emphysema_report.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame()
    if "subject_id" in table:
        table = table[table.subject_id.isin(list(subject_ids))]
    if table.empty:
        return [f"model: unknown (no rows of these subjects in {path})"]

    def values(column):
        return "/".join(sorted(set(table[column]))) if column in table else "?"

    model = ", ".join(f"{c} {values(c)}" for c in ("model_file", "model_sha1", "model_trained_on"))
    return [f"model: {model}", f"map grid: stride {values('stride')}, min_stride {values('min_stride')}"]


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100.0 * value:.1f}"


def _number(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown(rows: pd.DataFrame, summary: pd.DataFrame, header: list, failures: dict) -> str:
    """The per-subject and the summary table, under a SYNTHETIC banner and the settings that made them."""
    lines = ["# Emphysema maps against the truth (SYNTHETIC)", "", f"**{SYNTHETIC_NOTE}**", ""]
    lines += [f"- {line}" for line in header] + [""]
    lines += [
        "Shares in % of the generator's lung; F1 = Dice; n/a: undefined (nothing mapped and nothing true).",
        "",
        "| subject | true CL % | true PS % | true PL % | mapped CL % | mapped PS % | CL F1 | PS F1 | any precision "
        "| any recall | any F1 | lung Dice |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in rows.iterrows():
        name = r.subject_id + (" (healthy control)" if r.healthy_control else "")
        cells = [_pct(r.true_centrilobular_share), _pct(r.true_paraseptal_share), _pct(r.true_panlobular_share)]
        cells += [_pct(r.mapped_centrilobular_share), _pct(r.mapped_paraseptal_share)]
        cells += [_number(r[c]) for c in ("centrilobular_f1", "paraseptal_f1")]
        cells += [_number(r[f"emphysema_{k}"]) for k in ("precision", "recall", "f1")] + [_number(r.lung_dice)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| metric | subjects | mean | s.d. | pooled |", "|---|---|---|---|---|"]
    for _, s in summary.iterrows():
        lines.append(f"| {s.metric} | {s.n} | {_number(s['mean'])} | {_number(s.sd)} | {_number(s.pooled)} |")
    if failures:
        lines += ["", "Not mapped (inference failures.csv):"] + [f"- {k}: {v}" for k, v in failures.items()]
    return "\n".join(lines) + "\n"


def _las(image: nib.Nifti1Image) -> np.ndarray:
    """The image's array reoriented to LAS (x: patient right to left, so the patient's right is on the viewer's
    left in a coronal slice, as custom.emphysema.pictures draws them)."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(("L", "A", "S"))
    )
    return nib.orientations.apply_orientation(np.asarray(image.dataobj), transform)


def truth_vs_map_figure(subjects: list, path: Path) -> Path:
    """Per subject one coronal slice (the one with the most true emphysema, else the lung's middle): the truth in
    map colours (panlobular orange: the map has no such class) beside the map, over the CT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from custom.emphysema.network import HEALTHY_LABEL, MAP_LABELS, SUBTYPE_LABELS
    from custom.emphysema.pictures import LABEL_COLOURS, WINDOW_HU
    from custom.figures import save_figure

    panlobular = len(MAP_LABELS)  # display code of truth-only panlobular
    colours = ListedColormap([LABEL_COLOURS[code] for code in range(len(MAP_LABELS))] + ["#ff9900"])
    height = 3.0 * len(subjects) + 1.3
    fig, axes = plt.subplots(len(subjects), 2, figsize=(6.4, height), squeeze=False)
    fig.subplots_adjust(top=1 - 1.0 / height, bottom=0.3 / height, hspace=0.15, wspace=0.05)  # margins in inches
    for row, (subject_id, image_path, map_path, lesion_path, lung_path) in zip(axes, subjects):
        hu, labels, lesions, lung = (_las(nib.load(str(p))) for p in (image_path, map_path, lesion_path, lung_path))
        truth = np.where(lung > 0, HEALTHY_LABEL, 0)
        truth[(lung > 0) & (lesions == CENTRILOBULAR)] = SUBTYPE_LABELS["centrilobular"]
        truth[(lung > 0) & (lesions == PARASEPTAL)] = SUBTYPE_LABELS["paraseptal"]
        truth[(lung > 0) & (lesions == PANLOBULAR)] = panlobular
        emphysema = (truth >= 2).sum(axis=(0, 2))
        ys = np.nonzero((lung > 0).any(axis=(0, 2)))[0]
        y = int(np.argmax(emphysema)) if emphysema.any() else int(ys[len(ys) // 2]) if len(ys) else hu.shape[1] // 2
        for ax, (name, shown) in zip(row, (("truth", truth), ("map", labels))):
            ax.imshow(hu[:, y, :].T, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], origin="lower")
            ax.imshow(
                np.ma.masked_equal(shown[:, y, :], 0).T,
                cmap=colours,
                vmin=0,
                vmax=panlobular,
                alpha=0.5,
                origin="lower",
                interpolation="nearest",
            )
            ax.set_title(f"{subject_id} {name} (coronal y={y})", fontsize=8)
            ax.axis("off")
    legend = [Patch(color=LABEL_COLOURS[c], label=MAP_LABELS[c]) for c in range(1, len(MAP_LABELS))]
    fig.legend(
        handles=legend + [Patch(color="#ff9900", label="panlobular (truth only)")],
        loc="lower center",
        ncol=4,
        fontsize=7,
    )
    fig.suptitle(f"Emphysema maps against the truth: SYNTHETIC held-out cohort\n{SYNTHETIC_NOTE}", fontsize=8)
    return save_figure(fig, path, dpi=90, tight=True)


def main(
    out_dir: str = DEFAULT_OUT_DIR,
    num_subjects: int = 6,
    seed: int = 1000,
    force_seed: bool = False,
    voxel_size: float | None = None,
    model_path: str = DEFAULT_MODEL,
    stride: int | None = None,
    min_stride: int | None = None,
    lung_mask: bool = False,
    picture: bool = True,
):
    if int(seed) == demo_seed() and not force_seed:
        raise SystemExit(
            f"seed {seed} is the demo cohort's (configs/generate.yaml), on which models/model.pt was trained: its "
            "subjects are not held out; choose another --seed (default 1000) or pass --force_seed true"
        )
    model = Path(model_path).resolve()
    if not model.is_file():
        raise SystemExit(
            f"{model}: no emphysema model; run the fine-tuning (emphysema_finetune.yaml) or pass --model_path"
        )
    out = Path(out_dir).resolve()
    cohort_dir, maps_dir = out / "cohort", out / "maps"
    size = float(voxel_size) if voxel_size is not None else None
    stamp = {"seed": int(seed), "num_subjects": int(num_subjects), "voxel_size": size}
    cohort = held_out_cohort(cohort_dir, out / "cohort_stamp.json", stamp)

    inputs = pd.DataFrame({"subject_id": cohort.subject_id, "image": [str(cohort_dir / p) for p in cohort.image]})
    if lung_mask:
        inputs["lung_mask"] = [str(cohort_dir / p) for p in cohort.lung_mask]
    with atomic_path(out / "maps_input.csv") as tmp:
        inputs.to_csv(tmp, index=False)
    arguments = ["inference", "--config_file", CONFIGS / "inference.yaml", "--input", out / "maps_input.csv"]
    arguments += ["--output_dir", maps_dir, "--model_path", model, "--pictures", "false", "--progress", "false"]
    for name, value in (("stride", stride), ("min_stride", min_stride)):
        if value is not None:
            arguments += [f"--{name}", int(value)]
    _bundle_run(arguments, "the inference workflow")

    clinical = pd.read_csv(cohort_dir / "clinical.csv", dtype={"subject_id": str}).set_index("subject_id")
    failures = _failures(maps_dir)
    rows, pictured = [], []
    for _, subject in cohort.iterrows():
        sid = subject.subject_id
        files = (maps_dir / sid / "emphysema_mask.nii.gz", cohort_dir / subject.label, cohort_dir / subject.lung_mask)
        if sid in failures or not files[0].is_file():
            failures.setdefault(sid, f"{files[0]}: no map written")
            print(f"{sid}: NOT MAPPED ({failures[sid]})", flush=True)
            continue
        row = {"subject_id": sid, "healthy_control": bool(is_healthy_control(clinical.loc[sid].to_dict()))}
        row.update(compare_map(*load_subject(*files)))
        rows.append(row)
        pictured.append((sid, cohort_dir / subject.image, *files))
        print(
            f"{sid}: true CL {_pct(row['true_centrilobular_share'])} % PS {_pct(row['true_paraseptal_share'])} % "
            f"PL {_pct(row['true_panlobular_share'])} %; mapped CL {_pct(row['mapped_centrilobular_share'])} % "
            f"PS {_pct(row['mapped_paraseptal_share'])} %; F1 CL {_number(row['centrilobular_f1'])} "
            f"PS {_number(row['paraseptal_f1'])} any {_number(row['emphysema_f1'])}; "
            f"lung Dice {_number(row['lung_dice'])}",
            flush=True,
        )
    if not rows:
        raise SystemExit(f"no scan of {cohort_dir} was mapped; see {maps_dir / 'failures.csv'}")
    table = pd.DataFrame(rows)
    summary = cohort_summary(table)
    header = [
        f"held-out cohort: {len(cohort)} subjects, seed {seed} (demo: {demo_seed()}), voxels "
        f"{'/'.join(sorted(set(cohort.spacing_mm.astype(str))))} mm, {cohort_dir}",
        *_map_lines(maps_dir, cohort.subject_id),
        f"map lung: {'the generator lung mask' if lung_mask else 'the workflow segmentation (image only)'}",
        "panlobular (no map class) is emphysema for 'emphysema_*' and a negative for the subtypes",
    ]
    for name, frame in (("map_truth_subjects.csv", table), ("map_truth_summary.csv", summary)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
    with atomic_path(out / "map_truth.md") as tmp:
        tmp.write_text(markdown(table, summary, header, failures))
    if picture:
        truth_vs_map_figure(pictured, out / "map_truth.png")
    print(f"\n{SYNTHETIC_NOTE}\n" + "\n".join(header))
    shown = summary[summary.metric.isin([f"{n}_{k}" for n in SCORED for k in ("precision", "recall", "f1")])]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    fp = summary.set_index("metric").loc["false_positive_share"]
    print(f"false-positive share of subjects without emphysema: pooled {_pct(fp.pooled)} % ({int(fp.n)} subjects)")
    print(
        f"written: {out / 'map_truth_subjects.csv'}, map_truth_summary.csv, map_truth.md"
        + (", map_truth.png" * picture)
    )


if __name__ == "__main__":
    fire_cli(main)
