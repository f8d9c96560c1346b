"""SYNTHETIC demo cohorts for the DrasCLR bundle: a COPD-like cohort (emphysema subtypes, confounders,
clinical table, box annotations) and a COVID-like cohort (ground glass, consolidation, CT-0..CT-4).

Deterministic by seed: each subject draws from its own random streams keyed by (seed, cohort, index), so a
subject is identical whatever the cohort size, and tables can be drawn without images.

Output layout under ``out_dir`` (paths in the CSVs are relative to ``out_dir``)::

    images/<id>.nii.gz            int16 HU, RAS affine with the true spacing
    labels/<id>_lesions.nii.gz    uint8 lesion codes (custom.synthetic.labels)
    lungs/<id>_lung.nii.gz        uint8 lung mask, 1 right, 2 left
    transforms/<id>.json          atlas->subject 4x4 world transform and the non-rigid part
    dicom/<id>/IM0001.dcm ...     the same image as a DICOM series (every ``dicom_every``-th subject)
    cohort.csv / covid_cohort.csv manifest; clinical.csv / covid_clinical.csv; annotations.csv;
    datalist.json / covid_datalist.json (MONAI datalist); SYNTHETIC_README.txt
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from custom.synthetic import labels
from custom.synthetic.anatomy import (
    BLOOD_HU,
    AtlasReference,
    body_hu,
    draw_airways,
    draw_body_habitus,
    draw_vessel_tree,
    load_atlas_reference,
    lung_height,
    sample_atlas,
)
from custom.synthetic.annotations import ANNOTATION_COLUMNS, BOX_MM, healthy_boxes, lesion_boxes
from custom.synthetic.clinical import draw_clinical_row, is_healthy_control
from custom.synthetic.confounders import (
    AIR_TRAPPING_SHIFT_HU,
    AIRWAY_WALL_HU,
    add_scanner_noise,
    draw_scan_protocol,
    place_air_trapping,
)
from custom.synthetic.covid import covid_lesion_hu, draw_covid_row, grade_from_involvement, place_covid_lesions
from custom.synthetic.emphysema import LESION_HU, place_emphysema
from custom.synthetic.geometry import (
    DEFAULT_FOV_CENTRE_MM,
    DEFAULT_FOV_MM,
    SubjectGrid,
    draw_deformation,
    draw_world_transform,
    make_subject_grid,
    subject_to_atlas_voxel,
    subject_voxels_to_atlas_voxels,
)
from custom.synthetic.texture import PARENCHYMA_HU, parenchymal_texture
from custom.synthetic.writer import (
    SYNTHETIC_NOTE,
    save_csv,
    save_json,
    save_nifti,
    save_text,
    write_dicom_series,
)

COHORT_CODES = {"copd": 0, "covid": 1}
ID_PREFIX = {"copd": "SYN", "covid": "COV"}
STREAMS = ("clinical", "protocol", "geometry", "image", "annotation")
HU_STORE_RANGE = (-1024, 3071)
COHORT_LESION_CODES = {
    "copd": (labels.CENTRILOBULAR, labels.PARASEPTAL, labels.PANLOBULAR, labels.AIRWAY_WALL, labels.AIR_TRAPPING),
    "covid": (labels.GROUND_GLASS, labels.CONSOLIDATION),
}


def subject_id(cohort: str, index: int) -> str:
    return f"{ID_PREFIX[cohort]}{index:04d}"


def subject_streams(seed: int, cohort: str, index: int) -> dict[str, np.random.Generator]:
    """Independent random streams of one subject, keyed by (seed, cohort, index)."""
    root = np.random.SeedSequence(entropy=int(seed), spawn_key=(COHORT_CODES[cohort], int(index)))
    return {name: np.random.default_rng(child) for name, child in zip(STREAMS, root.spawn(len(STREAMS)))}


def plan_subject(seed: int, cohort: str, index: int, include_panlobular: bool = True, grade_probs=None):
    """Table-level draws of one subject (no image): clinical row, scan protocol, and its streams."""
    streams = subject_streams(seed, cohort, index)
    sid = subject_id(cohort, index)
    if cohort == "copd":
        row = draw_clinical_row(streams["clinical"], sid, index, include_panlobular)
    else:
        row = draw_covid_row(streams["clinical"], sid, index, grade_probs)
    protocol = draw_scan_protocol(streams["protocol"])
    return row, protocol, streams


def _protocol_columns(protocol: dict) -> dict:
    return {k: protocol[k] for k in ("kernel", "noise_std_hu", "inspiration_shift_hu")}


def draw_clinical_table(num_subjects: int, seed: int = 0, include_panlobular: bool = True) -> pd.DataFrame:
    """The COPD clinical table without images (identical to the one ``generate_cohort`` writes, minus the
    image-measured columns): cheap enough for hundreds of draws in tests and power calculations."""
    rows = []
    for index in range(num_subjects):
        row, protocol, _ = plan_subject(seed, "copd", index, include_panlobular)
        rows.append({**row, **_protocol_columns(protocol)})
    return pd.DataFrame(rows)


def _lung_crop(lung: np.ndarray, margin: int = 2) -> tuple[slice, slice, slice]:
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(lung.any(axis=other))
        if hits.size == 0:
            raise RuntimeError("the synthetic lung left the field of view; reduce scale or translation")
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + margin + 1, lung.shape[axis])))
    return tuple(box)


def _blend(base: np.ndarray, target: np.ndarray, mask: np.ndarray, spacing, edge_mm: float = 1.0) -> np.ndarray:
    """Put ``target`` into ``mask`` with a thin partial-volume rim outside it."""
    if not mask.any():
        return base
    weight = ndimage.gaussian_filter(mask.astype(np.float32), sigma=[edge_mm / s for s in spacing], truncate=2.0)
    np.maximum(weight, mask, out=weight)
    return base * (1.0 - weight) + target * weight


def synthesize_subject(
    cohort: str,
    row: dict,
    protocol: dict,
    streams: dict[str, np.random.Generator],
    grid: SubjectGrid,
    reference: AtlasReference,
    deformation_mm: float = 4.0,
    fov_centre_mm=DEFAULT_FOV_CENTRE_MM,
) -> dict:
    """Image, lesion map, lung mask, transform and measured quantities of one subject (in memory)."""
    geo, img = streams["geometry"], streams["image"]
    spacing = grid.spacing
    habitus = draw_body_habitus(geo)
    world = draw_world_transform(
        geo, reference.lung_centre_mm, fov_centre_mm, size_factor=protocol["lung_size_factor"]
    )
    deformation = draw_deformation(geo, amplitude_mm=deformation_mm)
    atlas_to_subject = np.asarray(world["atlas_to_subject"])
    atlas_vox = subject_to_atlas_voxel(grid, atlas_to_subject, reference.affine_1mm, deformation)
    lung_label, depth = sample_atlas(reference, atlas_vox)
    hu = body_hu(reference, atlas_vox, depth, habitus)
    lung = lung_label > 0
    crop = _lung_crop(lung)
    lung_c, depth_c = lung[crop], depth[crop]
    height = lung_height(reference, atlas_vox[2][crop])
    half_depth = float(reference.lung_max_vox[1] - reference.lung_min_vox[1]) / 2.0
    centre_y = float(reference.lung_centre_vox[1])
    posterior = np.clip((centre_y - atlas_vox[1][crop]) / (2 * half_depth) + 0.5, 0.0, 1.0)
    del atlas_vox
    shape_c = lung_c.shape

    lesion_c = np.zeros(shape_c, dtype=np.uint8)
    lung_hu = PARENCHYMA_HU + protocol["inspiration_shift_hu"] + 30.0 * (posterior - 0.4)
    texture, fine = parenchymal_texture(img, shape_c, spacing)
    lung_hu = lung_hu.astype(np.float32) + texture
    del texture
    if cohort == "copd":
        fractions = {
            "centrilobular": row["cle_fraction"],
            "paraseptal": row["paraseptal_fraction"],
            "panlobular": row["panlobular_fraction"],
        }
        place_emphysema(img, lesion_c, lung_c, height, depth_c, fractions, spacing)
        place_air_trapping(img, lesion_c, lung_c, height, posterior, row["air_trapping_fraction"], spacing)
        lung_hu[lesion_c == labels.AIR_TRAPPING] += AIR_TRAPPING_SHIFT_HU
        emphysema = np.isin(lesion_c, labels.EMPHYSEMA_CODES)
        target = np.full(shape_c, LESION_HU[labels.CENTRILOBULAR], dtype=np.float32)
        for code, value in LESION_HU.items():
            target[lesion_c == code] = value
        lung_hu = _blend(lung_hu, target + 8.0 * fine, emphysema, spacing)
        thickening = row["airway_disease"]
    else:
        place_covid_lesions(img, lesion_c, lung_c, height, depth_c, posterior, row, spacing)
        target = covid_lesion_hu(img, lesion_c, spacing)
        emphysema = np.zeros(shape_c, dtype=bool)
        involved = lesion_c > 0
        lung_hu = _blend(lung_hu, np.nan_to_num(target, nan=-450.0) + 10.0 * fine, involved, spacing)
        thickening = 0.0

    vessels = draw_vessel_tree(img, shape_c, spacing, depth_c)
    vessels[emphysema] *= 0.4  # emphysema prunes the small vessels
    lung_hu = lung_hu * (1.0 - vessels) + BLOOD_HU * vessels
    lumen, wall, thick = draw_airways(img, shape_c, spacing, depth_c, thickening)
    free = lung_c & (lesion_c == labels.NONE)
    lung_hu[lumen & free] = -1000.0
    lung_hu[(wall | thick) & free] = AIRWAY_WALL_HU + 25.0 * fine[(wall | thick) & free]
    lesion_c[thick & free] = labels.AIRWAY_WALL

    hu_c = hu[crop]  # a view: writing it fills the lung in the full volume
    hu_c[lung_c] = lung_hu[lung_c]
    lesion = np.zeros(grid.shape, dtype=np.uint8)
    lesion[crop] = np.where(lung_c, lesion_c, labels.NONE)
    add_scanner_noise(img, hu, protocol, spacing)
    image = np.clip(np.rint(hu), *HU_STORE_RANGE).astype(np.int16)

    n_lung = int(lung.sum())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(lesion[crop][lung_c], minlength=len(labels.LESION_NAMES))
    measured = {
        "lung_volume_ml": round(n_lung * voxel_ml, 1),
        "laa950_percent": round(100.0 * float((image[lung] < -950).mean()), 3),
        "mean_lung_hu": round(float(image[lung].mean()), 1),
    }
    for code in COHORT_LESION_CODES[cohort]:
        measured[f"measured_{labels.LESION_NAMES[code]}_fraction"] = round(float(counts[code]) / n_lung, 5)
    transform = {
        "note": SYNTHETIC_NOTE,
        "convention": (
            "atlas_to_subject maps atlas physical RAS mm (affine of atlas_lung_mask.nii.gz) to subject physical "
            "RAS mm. The subject voxel at physical point y shows atlas point inv(atlas_to_subject) @ y + u(y); "
            "u is the non-rigid part (zero when amplitude_mm is 0), see custom.synthetic.geometry."
        ),
        **world,
        "subject_to_atlas": np.linalg.inv(atlas_to_subject).tolist(),
        "subject_affine": grid.affine.tolist(),
        "subject_shape": list(grid.shape),
        "subject_spacing": list(grid.spacing),
        "atlas_affine": reference.affine_1mm.tolist(),
        "deformation": deformation,
        "body": habitus,
        "scan_protocol": protocol,
    }
    return {
        "image": image,
        "lesion": lesion,
        "lung": lung_label,
        "transform": transform,
        "measured": measured,
    }


def _annotation_rows(
    row: dict, volumes: dict, grid: SubjectGrid, reference: AtlasReference, rng, annotate: bool, max_boxes: dict
) -> list[dict]:
    lung = volumes["lung"] > 0
    lesion = volumes["lesion"]
    crop = _lung_crop(lung, margin=0)
    offset = np.array([s.start for s in crop])
    found = []
    if annotate:
        for code, name in ((labels.CENTRILOBULAR, "centrilobular"), (labels.PARASEPTAL, "paraseptal")):
            if volumes["measured"][f"measured_{name}_fraction"] > 0:
                for centre, share in lesion_boxes(lesion[crop], lung[crop], code, grid.spacing, max_boxes[name]):
                    found.append((name, centre + offset, share))
    if is_healthy_control(row):
        for centre, share in healthy_boxes(rng, lesion[crop], lung[crop], grid.spacing, max_boxes["healthy"]):
            found.append(("healthy", centre + offset, share))
    out = []
    transform = volumes["transform"]
    for name, centre, share in found:
        mm = (grid.affine @ np.r_[centre, 1.0])[:3]
        atlas = subject_voxels_to_atlas_voxels(
            grid, np.asarray(transform["atlas_to_subject"]), reference.affine_1mm, transform["deformation"], centre
        )[0]
        out.append(
            dict(
                zip(
                    ANNOTATION_COLUMNS,
                    [row["subject_id"], name, *map(int, centre), *np.round(mm, 2), BOX_MM, *np.round(atlas, 1),
                     round(share, 4)],
                )
            )
        )
    return out


def _write_subject(out: Path, sid: str, volumes: dict, grid: SubjectGrid, dicom: bool, seed: int, kernel: str):
    paths = {
        "image": f"images/{sid}.nii.gz",
        "label": f"labels/{sid}_lesions.nii.gz",
        "lung_mask": f"lungs/{sid}_lung.nii.gz",
        "transform": f"transforms/{sid}.json",
        "dicom": f"dicom/{sid}" if dicom else "",
    }
    save_nifti(out / paths["image"], volumes["image"], grid.affine, np.int16)
    save_nifti(out / paths["label"], volumes["lesion"], grid.affine, np.uint8)
    save_nifti(out / paths["lung_mask"], volumes["lung"], grid.affine, np.uint8)
    save_json(out / paths["transform"], {"subject_id": sid, **volumes["transform"]})
    if dicom:
        write_dicom_series(out / paths["dicom"], volumes["image"], grid.affine, sid, seed, kernel=kernel)
    return paths


README_TEXT = """SYNTHETIC DATA - NOT REAL PATIENTS.
Generated by the DrasCLR bundle (custom.synthetic, bundle/scripts/generate_demo_cohort.py) from the atlas lung
mask and a stated generative model (bundle/docs/synthetic_cohort.md). It exists to exercise the pipeline
(prepare, pretrain, evaluate) and its tests. No clinical conclusion can be drawn from it.
{cohorts}
"""


def _readme(out: Path) -> str:
    lines = []
    for cohort, prefix in (("copd", ""), ("covid", "covid_")):
        manifest = out / f"{prefix}cohort.csv"
        if manifest.is_file():
            lines.append(f"{cohort}: {manifest.name}, {prefix}clinical.csv ({len(pd.read_csv(manifest))} subjects)")
    return README_TEXT.format(cohorts="\n".join(lines))


def _run_cohort(
    cohort: str,
    out_dir,
    num_subjects: int,
    seed: int,
    voxel_size,
    deformation_mm: float,
    dicom_every: int,
    fov_mm,
    progress: bool,
    include_panlobular: bool = True,
    annotation_fraction: float = 0.0,
    max_boxes: dict | None = None,
    grade_probs=None,
):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = make_subject_grid(voxel_size, fov_mm)
    reference = load_atlas_reference(step=max(1, int(round(min(grid.spacing)))))
    max_boxes = max_boxes or {"centrilobular": 6, "paraseptal": 4, "healthy": 12}  # healthy lung dominates a map
    manifest, clinical, annotations = [], [], []
    for index in tqdm(range(num_subjects), desc=f"synthetic {cohort} cohort", disable=not progress):
        start = time.perf_counter()
        row, protocol, streams = plan_subject(seed, cohort, index, include_panlobular, grade_probs)
        volumes = synthesize_subject(cohort, row, protocol, streams, grid, reference, deformation_mm)
        sid = row["subject_id"]
        if cohort == "copd":
            annotate = streams["annotation"].random() < annotation_fraction
            annotations += _annotation_rows(row, volumes, grid, reference, streams["annotation"], annotate, max_boxes)
        else:
            measured = volumes["measured"]
            involved = measured["measured_ground_glass_fraction"] + measured["measured_consolidation_fraction"]
            row["measured_involvement_fraction"] = round(involved, 5)
            row["measured_grade"] = grade_from_involvement(involved)
        dicom = dicom_every > 0 and index % dicom_every == 0
        paths = _write_subject(out, sid, volumes, grid, dicom, seed, protocol["dicom_kernel"])
        clinical.append({**row, **_protocol_columns(protocol), **volumes["measured"]})
        manifest.append(
            {
                "subject_id": sid,
                "cohort": cohort,
                **paths,
                "shape": "x".join(map(str, grid.shape)),
                "spacing_mm": "x".join(f"{s:g}" for s in grid.spacing),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    prefix = "" if cohort == "copd" else "covid_"
    manifest_df = pd.DataFrame(manifest)
    save_csv(out / f"{prefix}cohort.csv", manifest_df)
    save_csv(out / f"{prefix}clinical.csv", pd.DataFrame(clinical))
    if cohort == "copd":
        save_csv(out / "annotations.csv", pd.DataFrame(annotations, columns=ANNOTATION_COLUMNS))
    datalist = {
        "description": SYNTHETIC_NOTE,
        "training": [
            {"image": m["image"], "label": m["label"], "lung_mask": m["lung_mask"], "subject_id": m["subject_id"]}
            for m in manifest
        ],
    }
    save_json(out / f"{prefix}datalist.json", datalist)
    save_text(out / "SYNTHETIC_README.txt", _readme(out))
    absolute = manifest_df.copy()
    for column in ("image", "label", "lung_mask", "transform", "dicom"):
        absolute[column] = [str(out / p) if p else "" for p in absolute[column]]
    return absolute


def generate_cohort(
    out_dir,
    num_subjects: int = 8,
    seed: int = 0,
    voxel_size: float | tuple[float, float, float] = 2.0,
    deformation_mm: float = 4.0,
    include_panlobular: bool = True,
    dicom_every: int = 4,
    annotation_fraction: float = 1.0,
    fov_mm=DEFAULT_FOV_MM,
    progress: bool = True,
) -> pd.DataFrame:
    """Write the SYNTHETIC COPD-like cohort and return its manifest (absolute paths; ``cohort.csv`` holds
    the same with paths relative to ``out_dir``). ``dicom_every=k`` also writes subjects 0, k, 2k, ... as
    DICOM (0: none); ``deformation_mm=0`` makes every subject exactly an affine image of the atlas."""
    return _run_cohort(
        "copd", out_dir, num_subjects, seed, voxel_size, deformation_mm, dicom_every, fov_mm, progress,
        include_panlobular=include_panlobular, annotation_fraction=annotation_fraction,
    )


def generate_covid_cohort(
    out_dir,
    num_subjects: int = 5,
    seed: int = 0,
    voxel_size: float | tuple[float, float, float] = 2.0,
    deformation_mm: float = 4.0,
    dicom_every: int = 0,
    grade_probs=None,
    fov_mm=DEFAULT_FOV_MM,
    progress: bool = True,
) -> pd.DataFrame:
    """Write the SYNTHETIC COVID-like cohort (``covid_cohort.csv``, ``covid_clinical.csv`` with the CT grade)
    and return its manifest. Grades cycle CT-0..CT-4 with the subject index unless ``grade_probs`` is given."""
    return _run_cohort(
        "covid", out_dir, num_subjects, seed, voxel_size, deformation_mm, dicom_every, fov_mm, progress,
        grade_probs=grade_probs,
    )
