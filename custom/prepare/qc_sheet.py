"""The cohort QC sheet: every subject's QC picture and numbers on one page, flagged subjects first.

``prepare_cohort`` writes it into the cache folder at the end of a run (``write_qc_sheet``):

    qc.csv          one row per subject: subject_id, qc_status (failed | warning | ok), qc_reason, dice,
                    share_inside_lung, atlas_share_inside_lung, share_ratio, edge_inferior, edge_superior,
                    edge_max (largest lung share at any face), flip_axis / flip_gain (the mirrored axis that fits
                    the atlas best and its Dice gain over the scan as given; > 0.02 fails), slice_mm,
                    lung_volume_ml, registration_seconds, seconds, source, picture (path relative to cache_dir)
    qc_sheet.html   the same rows with their pictures, failed first, then warnings, then ok
    qc_sheet.png    a contact sheet of the pictures (at most ``max_tiles``, flagged first), each framed in its
                    status colour and captioned with its reason

Pictures: ``<subject_id>/qc.png`` of each cache entry (``WritePreparedSubjectd``), and for a subject that failed
the anatomy QC ``.qc_failed/<subject_id>.png`` with its numbers in ``.qc_failed/<subject_id>.json``
(``RegisterToAtlasd``). A subject that failed before registration (unreadable file, no lungs) has no picture.

The emphysema inference writes the same sheet into its ``output_dir`` (``write_inference_qc_sheet``): its rows are
the subjects of ``emphysema_report.csv`` and ``failures.csv`` there (``inference_manifest``), with
``<subject_id>/qc.json`` / ``qc.png`` written by ``SaveQCRecordd`` and ``.qc_failed/`` as in a cache.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from custom.atomic_io import atomic_path
from custom.prepare import cache
from custom.prepare.anatomy_qc import STATUS_ORDER, reason_of_error, reason_text
from custom.prepare.qc_figure import STATUS_COLOURS, _small_png

logger = logging.getLogger("drasclr.prepare")
QC_CSV = "qc.csv"
SHEET_HTML = "qc_sheet.html"
SHEET_PNG = "qc_sheet.png"
QC_PICTURE = cache.QC_PICTURE
FAILED_DIR = cache.QC_FAILED_DIR
QC_COLUMNS = [
    "subject_id",
    "qc_status",
    "qc_reason",
    "dice",
    "share_inside_lung",
    "atlas_share_inside_lung",
    "share_ratio",
    "edge_inferior",
    "edge_superior",
    "edge_max",
    "flip_axis",
    "flip_gain",
    "slice_mm",
    "lung_volume_ml",
    "registration_seconds",
    "seconds",
    "source",
    "picture",
]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _record_name(subject_id: str) -> str:
    """The file name ``RegisterToAtlasd`` gives a QC failure record (ids of the inference may not be folder-safe)."""
    try:
        return cache.safe_subject_id(subject_id)
    except ValueError:
        return subject_id


def _row(cache_dir: Path, manifest_row: dict) -> dict:
    subject_id = str(manifest_row["subject_id"])
    failed = manifest_row.get("status") == "failed"
    if failed:
        name = _record_name(subject_id)
        qc = _read_json(cache_dir / FAILED_DIR / f"{name}.json")
        picture = cache_dir / FAILED_DIR / f"{name}.png"
        status = "failed"
        reason = reason_of_error(manifest_row.get("error"), manifest_row.get("source"))
    else:
        entry = cache_dir / str(manifest_row.get("path") or subject_id)
        qc = _read_json(entry / cache.QC)
        picture = entry / QC_PICTURE
        status = str(qc.get("qc_status") or manifest_row.get("qc_status") or "ok")
        reason = reason_text(qc) if qc else str(manifest_row.get("qc_reason") or "")
    edges = qc.get("edge_share") or {}
    orientation = qc.get("orientation_dice") or {}
    flips = {a: d - orientation["none"] for a, d in orientation.items() if a != "none"} if "none" in orientation else {}
    flip_axis = max(flips, key=flips.get) if flips else ""
    share, atlas_share = qc.get("share_inside_lung"), qc.get("atlas_share_inside_lung")
    return {
        "subject_id": subject_id,
        "qc_status": status,
        "qc_reason": reason,
        "dice": qc.get("dice", manifest_row.get("dice")),
        "share_inside_lung": share,
        "atlas_share_inside_lung": atlas_share,
        "share_ratio": round(share / atlas_share, 4) if share is not None and atlas_share else None,
        "edge_inferior": edges.get("inferior"),
        "edge_superior": edges.get("superior"),
        "edge_max": max(edges.values()) if edges else None,
        "flip_axis": flip_axis,
        "flip_gain": round(flips[flip_axis], 4) if flip_axis else None,
        "slice_mm": qc.get("slice_mm"),
        "lung_volume_ml": qc.get("lung_volume_ml"),
        "registration_seconds": qc.get("registration_seconds", manifest_row.get("registration_seconds")),
        "seconds": qc.get("seconds", manifest_row.get("seconds")),
        "source": qc.get("source", manifest_row.get("source")),
        "picture": str(picture.relative_to(cache_dir)) if picture.is_file() else "",
    }


def qc_table(cache_dir: str | Path, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per subject of the manifest (``manifest.csv`` of ``cache_dir`` by default), flagged first:
    failed, then warning, then ok; by subject id within each."""
    cache_dir = Path(cache_dir)
    if manifest is None:
        manifest = cache.read_manifest(cache_dir)
    rows = [_row(cache_dir, r) for r in manifest.to_dict("records")]
    table = pd.DataFrame(rows, columns=QC_COLUMNS)
    if len(table):
        order = table.qc_status.map(STATUS_ORDER).fillna(len(STATUS_ORDER))
        table = table.assign(_order=order).sort_values(["_order", "subject_id"], kind="stable")
        table = table.drop(columns="_order").reset_index(drop=True)
    return table


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return "-"
    return pattern.format(value)


def _numbers(row) -> str:
    parts = [
        f"Dice {_fmt(row.dice, '{:.2f}')}",
        f"landmarks in lung {_fmt(row.share_inside_lung, '{:.0%}')} ({_fmt(row.share_ratio, '{:.0%}')} of atlas)",
        f"edge inf/sup {_fmt(row.edge_inferior, '{:.1%}')}/{_fmt(row.edge_superior, '{:.1%}')}",
        f"flip gain {_fmt(row.flip_gain, '{:+.3f}')} ({row.flip_axis or '-'})",
        f"slices {_fmt(row.slice_mm, '{:g}')} mm",
        f"lung {_fmt(row.lung_volume_ml, '{:.0f}')} ml",
    ]
    return ", ".join(parts)


def _write_html(table: pd.DataFrame, path: Path, title: str) -> None:
    counts = table.qc_status.value_counts().to_dict()
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("failed", "warning", "ok"))
    lines = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em} table{border-collapse:collapse} "
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px} "
        ".badge{color:white;padding:2px 6px;border-radius:3px;font-weight:bold}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(table)} subjects: {summary}. Flagged subjects first. "
        "Thresholds and what each check means: docs/prepare.md, section Quality control.</p>",
        "<table><tr><th>subject</th><th>QC</th><th>reason</th><th>numbers</th><th>picture</th></tr>",
    ]
    for row in table.itertuples():
        colour = STATUS_COLOURS.get(row.qc_status, "#555")
        picture = (
            f"<a href='{html.escape(row.picture)}'><img src='{html.escape(row.picture)}' width='480'></a>"
            if row.picture
            else "(no picture)"
        )
        lines.append(
            f"<tr><td>{html.escape(row.subject_id)}<br><small>{html.escape(str(row.source or ''))}</small>"
            f"</td><td><span class='badge' style='background:{colour}'>{html.escape(row.qc_status)}</span>"
            f"</td><td>{html.escape(row.qc_reason or '')}</td><td>{html.escape(_numbers(row))}</td>"
            f"<td>{picture}</td></tr>"
        )
    lines += ["</table>", "</body></html>"]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines), encoding="utf-8")


def _write_png(table: pd.DataFrame, cache_dir: Path, path: Path, title: str, max_tiles: int, columns: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = table.head(max_tiles)
    rest = len(table) - len(shown)
    tiles = len(shown) + (1 if rest else 0)
    columns = max(1, min(columns, tiles))
    rows = max(1, math.ceil(tiles / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.1 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), shown.itertuples()):
        colour = STATUS_COLOURS.get(row.qc_status, "#555")
        if row.picture:
            with Image.open(cache_dir / row.picture) as picture:
                ax.imshow(np.asarray(picture.convert("RGB")))
        else:
            ax.text(
                0.5,
                0.5,
                "no picture\n(failed before registration)",
                ha="center",
                va="center",
                fontsize=9,
                transform=ax.transAxes,
            )
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)
        caption = f"{row.subject_id}: {row.qc_status.upper()}"
        if row.qc_reason:
            caption += "\n" + "\n".join(textwrap.wrap(textwrap.shorten(row.qc_reason, 130, placeholder=" ..."), 66))
        ax.set_title(caption, fontsize=8, color=colour)
    if rest:
        axes.ravel()[len(shown)].text(
            0.5, 0.5, f"... and {rest} more subjects\n(see {SHEET_HTML})", ha="center", va="center", fontsize=10
        )
    counts = table.qc_status.value_counts().to_dict()
    fig.suptitle(
        f"{title}: {len(table)} subjects, "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("failed", "warning", "ok"))
        + " (flagged first)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.1 * rows + 0.5)))
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=80)
    finally:
        plt.close(fig)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(_small_png(buffer.getvalue(), colours=192))


def write_qc_sheet(
    cache_dir: str | Path,
    manifest: pd.DataFrame | None = None,
    out_dir: str | Path | None = None,
    title: str | None = None,
    max_tiles: int = 48,
    columns: int = 4,
) -> dict:
    """Write qc.csv, qc_sheet.html and qc_sheet.png for the subjects of ``cache_dir``'s manifest into
    ``out_dir`` (default ``cache_dir``; the HTML links the pictures where they are, relative to ``out_dir``).
    Returns {"csv", "html", "png": paths, "table": the qc.csv table}."""
    cache_dir = Path(cache_dir)
    out_dir = Path(out_dir) if out_dir else cache_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    table = qc_table(cache_dir, manifest)
    title = title or f"Prepare QC: {cache_dir.name}"
    paths = {"csv": out_dir / QC_CSV, "html": out_dir / SHEET_HTML, "png": out_dir / SHEET_PNG}
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False)
    rel = os.path.relpath(cache_dir.resolve(), out_dir.resolve())  # picture links relative to the sheet
    linked = table.assign(picture=[os.path.normpath(os.path.join(rel, p)) if p else "" for p in table.picture])
    _write_html(linked, paths["html"], title)
    _write_png(table, cache_dir, paths["png"], title, max_tiles, columns)
    return {**paths, "table": table}


def _read_table(path: Path) -> pd.DataFrame:
    """A table of an earlier or this run (ids as text, empty cells ""), or an empty one when absent."""
    try:
        return pd.read_csv(path, dtype={"subject_id": str}, keep_default_na=False)
    except (OSError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=["subject_id"])


def inference_manifest(
    output_dir: str | Path, report_csv: str = "emphysema_report.csv", failures_csv: str = "failures.csv"
):
    """The emphysema inference's records in ``output_dir`` as manifest rows for ``qc_table``: every subject of
    its cohort report (status ok, its folder ``<subject_id>/`` holding qc.json and qc.png) and of its failures
    (status failed; pictures in ``.qc_failed/``). Both tables already merge earlier runs into the same folder, so
    the sheet does too. Rows of runs before qc.json was written keep the report's qc_status / qc_reasons / Dice."""
    output_dir = Path(output_dir)
    mapped, failed = _read_table(output_dir / report_csv), _read_table(output_dir / failures_csv)
    dice = pd.to_numeric(mapped.get("registration_dice", pd.Series(index=mapped.index)), errors="coerce")
    rows = [
        {
            "subject_id": r["subject_id"],
            "status": "ok",
            "path": r["subject_id"],
            "source": r.get("source", ""),
            "qc_status": r.get("qc_status") or "ok",
            "qc_reason": r.get("qc_reasons") or "",
            "dice": None if pd.isna(d) else float(d),
        }
        for r, d in zip(mapped.to_dict("records"), dice)
    ]
    rows += [{**r, "status": "failed", "path": ""} for r in failed.to_dict("records")]
    columns = ["subject_id", "status", "path", "source", "qc_status", "qc_reason", "dice", "error"]
    return pd.DataFrame(rows, columns=columns)


def write_inference_qc_sheet(
    output_dir: str | Path, report_csv: str = "emphysema_report.csv", failures_csv: str = "failures.csv"
):
    """The cohort QC sheet (qc.csv, qc_sheet.html, qc_sheet.png) of an emphysema inference ``output_dir``
    (``inference_manifest``); returns ``write_qc_sheet``'s paths, or None when it could not be drawn (logged: a
    picture never fails a run)."""
    output_dir = Path(output_dir)
    try:
        manifest = inference_manifest(output_dir, report_csv, failures_csv)
        if not len(manifest):
            return None
        paths = write_qc_sheet(output_dir, manifest, title=f"Emphysema inference QC: {output_dir.name}")
        logger.info("QC sheet: %s", paths["html"])
        return paths
    except Exception as err:  # noqa: BLE001
        logger.warning("could not write the QC sheet of %s: %s", output_dir, err)
        return None


__all__ = ["QC_COLUMNS", "inference_manifest", "qc_table", "write_inference_qc_sheet", "write_qc_sheet"]
