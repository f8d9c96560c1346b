"""Calibrate the anatomy QC (custom/prepare/anatomy_qc.py) on good scans and damaged versions of them.

Good scans: the shared real CT (TCIA Lung-PET-CT-Dx A0001, both kernels, DICOM) and SYNTHETIC subjects of
``custom.synthetic`` (2 mm, with their lung masks). Damaged versions of each (``custom.prepare.qc_damage``):
field of view cut above the lung base (5 to 60 mm) and below the apex (0 to 40 mm; the apex is the highest
slice whose lung cross-section is 2 % of the largest, so the trachea above it does not count), each axis
flipped (voxel data mirrored, header kept), thick slices (5, 8, 10 mm; only those thicker than the input).
Every version goes through the real scan pipeline (``LoadCTd`` -> ``LungMaskd`` -> ``RegisterToAtlasd``, the
QC included, with the failures accepted so every number is measured) and the default decision is taken from
its numbers. LAA-950 (share of lung voxels below -950 HU) shows what thick slices do to a density readout.

    python bundle/scripts/calibrate_qc.py --out_dir runs/calibrate_qc [--synthetic 3] [--kernels soft_kernel_B]
    python bundle/scripts/calibrate_qc.py --out_dir runs/calibrate_qc --sheet_dir runs/qc_sheet_demo

Writes ``<out_dir>/calibration.csv`` and prints it as a markdown table (docs/prepare.md "Quality control").
``--sheet_dir``: also prepares a small demo cohort (the real CT, a few damaged versions, two synthetic subjects)
with the prepare workflow, whose cohort QC sheet lands in that cache folder.
Real CT: Li, P., et al. (2020), Lung-PET-CT-Dx, The Cancer Imaging Archive, https://doi.org/10.7937/TCIA.2020.NNC20461
(CC BY 4.0).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for ``custom``

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from custom.flags import fire_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("DRASCLR_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL_CT = Path(os.environ.get("DRASCLR_REAL_CT", SHARED_DATA / "real_ct")) / "lung_pet_ct_dx_A0001"
CUTS_INFERIOR = (5, 10, 15, 20, 40, 60)
CUTS_SUPERIOR = (0, 10, 20, 40)
THICK = (5, 8, 10)
AXES = {0: "x (left-right)", 1: "y (anterior-posterior)", 2: "z (head-feet)"}


def damaged_versions(name: str, image: Path, out_dir: Path, lung_mask: Path | None = None) -> list:
    """Write the damaged versions of one scan; returns [(case, expected, image path, mask path or None)]."""
    from custom.prepare import qc_damage
    from custom.prepare.transforms import load_scan

    array, affine = qc_damage.read_scan(image)
    if lung_mask is not None:
        mask, mask_affine = qc_damage.read_scan(lung_mask)
        lung, lung_affine = mask > 0, mask_affine
    else:
        loaded, lung = load_scan(image)
        lung_affine = np.asarray(loaded.affine, dtype=np.float64)
    base, apex = qc_damage.lung_heights(lung, lung_affine)
    spacing_z = float(np.linalg.norm(affine[:3, 2]))
    folder = out_dir / "scans" / name
    cases = []

    def add(case, expected, arr, aff, m=None, m_aff=None):
        path = qc_damage.write_nifti(arr, aff, folder / f"{case}.nii.gz")
        mpath = qc_damage.write_nifti(m, m_aff, folder / f"{case}_mask.nii.gz", mask=True) if m is not None else None
        cases.append((case, expected, path, mpath))

    add("original", "ok", array, affine, *((mask, mask_affine) if lung_mask is not None else (None, None)))
    for mm in CUTS_INFERIOR:
        arr, aff = qc_damage.cut(array, affine, below_mm=base + mm)
        m = qc_damage.cut(mask, mask_affine, below_mm=base + mm) if lung_mask is not None else (None, None)
        add(f"cut_inferior_{mm}mm", "cut_off", arr, aff, *m)
    for mm in CUTS_SUPERIOR:
        arr, aff = qc_damage.cut(array, affine, above_mm=apex - mm)
        m = qc_damage.cut(mask, mask_affine, above_mm=apex - mm) if lung_mask is not None else (None, None)
        add(f"cut_superior_{mm}mm", "cut_off", arr, aff, *m)
    for axis in (0, 1, 2):
        add(
            f"flip_{'xyz'[axis]}",
            "flipped",
            qc_damage.flip(array, axis),
            affine,
            *((qc_damage.flip(mask, axis), mask_affine) if lung_mask is not None else (None, None)),
        )
    for mm in THICK:
        if mm <= spacing_z + 1e-6:
            continue
        arr, aff = qc_damage.thicken(array, affine, mm)
        m = qc_damage.thicken(mask, mask_affine, mm, mask=True) if lung_mask is not None else (None, None)
        add(f"thick_{mm}mm", "thick_slices" if mm > 5 else "ok", arr, aff, *m)
    return cases


def measure(image: Path, lung_mask: Path | None, chain) -> dict:
    """Run load -> lung mask -> register (+QC) on one scan; the QC numbers, LAA-950 and timings."""
    from custom.prepare.anatomy_qc import AnatomyQCError
    from custom.prepare.transforms import run_transforms

    start = time.perf_counter()
    try:
        out = run_transforms(chain, {"image": str(image), "lung_mask": str(lung_mask) if lung_mask else None})
    except AnatomyQCError as err:  # only a Dice below min_dice cannot be accepted
        return {**err.qc, "seconds": round(time.perf_counter() - start, 1), "laa950": None}
    hu = out["image"][0].numpy()
    lung = out["lung_mask"][0].numpy() > 0
    qc = dict(out["registration"]["qc"])
    qc["laa950"] = round(100.0 * float((hu[lung] < -950).mean()), 2) if lung.any() else None
    qc["lung_volume_ml"] = round(float(lung.sum()) / 1000.0, 0)
    qc["registration_seconds"] = round(out["registration"]["seconds"], 2)
    qc["seconds"] = round(time.perf_counter() - start, 1)
    return qc


def default_decision(qc: dict) -> tuple:
    """(status, reasons) of the default settings (nothing accepted) from the measured numbers."""
    from custom.prepare import anatomy_qc

    keys = ("dice", "share_inside_lung", "atlas_share_inside_lung", "edge_share", "orientation_dice", "slice_mm")
    verdict = anatomy_qc.assess({k: qc.get(k) for k in keys}, anatomy_qc.QCLimits(), accept=())
    return verdict.status, verdict.reasons


def table_row(source: str, case: str, expected: str, qc: dict) -> dict:
    status, reasons = default_decision(qc)
    edges = qc.get("edge_share") or {}
    orientation = qc.get("orientation_dice") or {}
    gains = {a: d - orientation["none"] for a, d in orientation.items() if a != "none"} if orientation else {}
    best = max(gains, key=gains.get) if gains else ""
    return {
        "source": source,
        "case": case,
        "expected": expected,
        "status": status,
        "reasons": "; ".join(reasons),
        "dice": qc.get("dice"),
        "share_ratio": qc.get("share_ratio"),
        "edge_inferior": edges.get("inferior"),
        "edge_superior": edges.get("superior"),
        "edge_max": max(edges.values()) if edges else None,
        "dice_as_given": orientation.get("none"),
        "flip_axis": best,
        "flip_gain": round(gains[best], 4) if best else None,
        **{f"dice_flip_{a.split('-')[0]}": d for a, d in orientation.items() if a != "none"},
        "slice_mm": qc.get("slice_mm"),
        "laa950": qc.get("laa950"),
        "lung_ml": qc.get("lung_volume_ml"),
        "qc_seconds": qc.get("qc_seconds"),
        "registration_seconds": qc.get("registration_seconds"),
        "seconds": qc.get("seconds"),
    }


def decide_again(table: pd.DataFrame, atlas_share: float) -> pd.DataFrame:
    """``status`` and ``reasons`` of every row taken again from its measured numbers with the current default
    thresholds (no registration runs): to try thresholds on a measured table."""
    from custom.prepare import anatomy_qc

    def value(row, key):
        v = row.get(key)
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)

    statuses, reasons = [], []
    for row in table.to_dict("records"):
        edges = {"inferior": value(row, "edge_inferior") or 0.0, "superior": value(row, "edge_superior") or 0.0}
        if (value(row, "edge_max") or 0.0) > max(edges.values()):
            edges["side"] = value(row, "edge_max")
        orientation = {
            "none": value(row, "dice_as_given"),
            "left-right": value(row, "dice_flip_left"),
            "anterior-posterior": value(row, "dice_flip_anterior"),
            "head-feet": value(row, "dice_flip_head"),
        }
        ratio = value(row, "share_ratio")
        measures = {
            "dice": value(row, "dice"),
            "atlas_share_inside_lung": atlas_share,
            "share_inside_lung": None if ratio is None else ratio * atlas_share,
            "edge_share": edges,
            "orientation_dice": orientation if orientation["none"] is not None else None,
            "slice_mm": value(row, "slice_mm"),
        }
        verdict = anatomy_qc.assess(measures, anatomy_qc.QCLimits(), accept=())
        statuses.append(verdict.status)
        reasons.append("; ".join(verdict.reasons))
    return table.assign(status=statuses, reasons=reasons)


def markdown(table: pd.DataFrame) -> str:
    columns = [
        "source",
        "case",
        "expected",
        "status",
        "dice",
        "share_ratio",
        "edge_inferior",
        "edge_superior",
        "flip_axis",
        "flip_gain",
        "slice_mm",
        "laa950",
        "qc_seconds",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table[columns].itertuples(index=False):
        cells = []
        for value in row:
            if isinstance(value, float):
                cells.append(
                    "-"
                    if np.isnan(value)
                    else f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:.0f}"
                )
            else:
                cells.append(str(value) if value is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _span(values, digits: int, signed: bool = False) -> str:
    """ "lo – hi" of the finite values (one value when equal), "-" when none; minus signs as in docs/prepare.md."""
    values = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    if not values:
        return "-"

    def fmt(v):
        text = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
        text = text.replace("-", "−")
        return "0" if float(f"{v:.{digits}f}") == 0 and not signed else text

    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo} – {hi}"


def summary_markdown(table: pd.DataFrame) -> str:
    """One row per damage over every source (the table of docs/prepare.md "Calibration"): the decision on the
    real CT's kernels and on the SYNTHETIC subjects, and the ranges of the numbers behind it."""
    real = [s for s in table.source.unique() if str(s).startswith("real_")]
    synthetic = [s for s in table.source.unique() if not str(s).startswith("real_")]
    kernels = {s: str(s).split("_")[-1] for s in real}  # real_soft_kernel_B -> B
    head = ["case"] + [f"real {k}" for k in kernels.values()]
    head += [f"{synthetic[0]}-{str(synthetic[-1])[-1]}" if len(synthetic) > 1 else "synthetic"] if synthetic else []
    laa = f"LAA-950 % real {kernels[real[-1]]}; SYN" if real else "LAA-950 % SYN"
    head += ["edge share inf / sup", "flip gain (axis)", "Dice", "share", laa]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fullest = table.source.value_counts().index[0]  # its case order (the real CT has no 5 mm thickening)
    for case in list(table[table.source == fullest].case) + [
        c for c in table.case.unique() if c not in set(table[table.source == fullest].case)
    ]:
        rows = table[table.case == case]
        cells = [case]
        for source in real:
            status = rows[rows.source == source].status
            cells.append(status.iloc[0] if len(status) else "-")
        if synthetic:
            counts = rows[rows.source.isin(synthetic)].status.value_counts()
            cells.append(", ".join(f"{s} ×{n}" if n > 1 else s for s, n in counts.items()) or "-")
        cells.append(f"{_span(rows.edge_inferior, 3)} / {_span(rows.edge_superior, 3)}")
        axes = sorted(set(rows.flip_axis.dropna().astype(str)) - {""})
        gain = _span(rows.flip_gain, 3, signed=True)
        flipped = len(rows) and (rows.flip_gain > 0).all()
        gain = f"**{gain} ({', '.join(axes)})**" if flipped else f"{gain} ({', '.join(axes)})"
        cells += [gain, _span(rows.dice, 3), _span(rows.share_ratio, 2)]
        laa_real = rows[rows.source == real[-1]].laa950 if real else pd.Series(dtype=float)
        cells.append(f"{_span(laa_real, 2)}; {_span(rows[rows.source.isin(synthetic)].laa950, 2)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(
    out_dir: str = "runs/calibrate_qc",
    synthetic: int = 3,
    kernels: str = "soft_kernel_B,sharp_kernel_L",
    seed: int = 0,
    sheet_dir: str | None = None,
    skip_table: bool = False,
    decide_only: bool = False,
    only: str = "",
) -> str:
    """Make the damaged versions, run the QC on each, write ``calibration.csv`` and print the table; returns
    the CSV's path. ``decide_only``: take the decisions of ``<out_dir>/calibration.csv`` again with the current
    thresholds (its measured numbers kept) and print the table. ``only``: measure just these sources
    (comma-separated, e.g. ``SYN0001,SYN0002``), to split the run over processes; concatenate the CSVs."""
    from monai.transforms import Compose

    if decide_only:
        from custom.prepare.transforms import load_atlas

        path = Path(out_dir) / "calibration.csv"
        table = decide_again(pd.read_csv(path), load_atlas().share_inside_lung)
        table.to_csv(path, index=False)
        print(markdown(table))
        print()
        print(summary_markdown(table))
        return str(path)

    from custom.prepare.anatomy_qc import ACCEPTABLE
    from custom.prepare.transforms import LoadCTd, LungMaskd, RegisterToAtlasd
    from custom.synthetic import generate_cohort

    out = Path(out_dir).resolve()  # absolute: the demo cohort CSV names the scans written here
    out.mkdir(parents=True, exist_ok=True)
    sources = []
    for kernel in [k for k in str(kernels).split(",") if k]:
        series = REAL_CT / kernel
        if not series.is_dir():
            raise FileNotFoundError(f"{series}: real CT not found (set DRASCLR_REAL_CT)")
        sources.append((f"real_{kernel}", series, None))
    if synthetic:
        manifest = generate_cohort(
            out / "synthetic", num_subjects=int(synthetic), seed=seed, dicom_every=0, progress=False
        )
        for row in manifest.itertuples():
            sources.append((row.subject_id, Path(row.image), Path(row.lung_mask)))

    all_cases = {}
    for name, image, mask in sources:
        started = time.perf_counter()
        all_cases[name] = damaged_versions(name, image, out, mask)
        print(f"{name}: {len(all_cases[name])} versions written in {time.perf_counter() - started:.0f} s", flush=True)

    if not skip_table:
        chain = Compose(
            [
                LoadCTd("image"),
                LungMaskd("image"),
                RegisterToAtlasd("image", accept=list(ACCEPTABLE), failure_pictures=False),
            ]
        )
        rows = []
        wanted = {s for s in str(only or "").split(",") if s}
        for name, cases in all_cases.items():
            if wanted and name not in wanted:
                continue
            for case, expected, image, mask in cases:
                qc = measure(image, mask, chain)
                rows.append(table_row(name, case, expected, qc))
                print(
                    f"{name:>24} {case:<20} expected {expected:<13} -> {rows[-1]['status']:<8} "
                    f"{rows[-1]['reasons'][:110]}",
                    flush=True,
                )
                pd.DataFrame(rows).to_csv(out / "calibration.csv", index=False)
        table = pd.DataFrame(rows)
        table.to_csv(out / "calibration.csv", index=False)
        print(markdown(table))
        print()
        print(summary_markdown(table))
        print(f"\nwritten: {out / 'calibration.csv'}")
    if sheet_dir:
        demo_sheet(all_cases, Path(sheet_dir))
    return str(out / "calibration.csv")


def demo_sheet(all_cases: dict, cache_dir: Path) -> None:
    """Prepare a small demo cohort (real CT as given and damaged, two SYNTHETIC subjects) with the prepare
    workflow, which writes its QC sheet into ``cache_dir``."""
    from custom.prepare.workflow import prepare_cohort

    rows = []
    real = next((k for k in all_cases if k.startswith("real_")), None)
    if real:
        rows.append((f"{real}", str(REAL_CT / real[len("real_") :]), ""))
        for case in ("cut_inferior_40mm", "flip_z", "flip_y", "thick_10mm"):
            match = [c for c in all_cases[real] if c[0] == case]
            if match:
                rows.append((f"{real}_{case}", str(match[0][2]), ""))
    synthetic = [k for k in all_cases if not k.startswith("real_")][:2]
    for name in synthetic:
        original = [c for c in all_cases[name] if c[0] == "original"][0]
        rows.append((f"SYNTHETIC_{name}", str(original[2]), str(original[3] or "")))
    cache_dir.mkdir(parents=True, exist_ok=True)
    csv = cache_dir.parent / f"{cache_dir.name}_cohort.csv"
    pd.DataFrame(rows, columns=["subject_id", "image", "lung_mask"]).to_csv(csv, index=False)
    manifest = prepare_cohort(csv, cache_dir, progress=False, resume=False)
    print(manifest[["subject_id", "status", "qc_status", "qc_reason"]].to_string())
    print(f"QC sheet: {cache_dir / 'qc_sheet.html'}, {cache_dir / 'qc_sheet.png'}, {cache_dir / 'qc.csv'}")


if __name__ == "__main__":
    fire_cli(main)
