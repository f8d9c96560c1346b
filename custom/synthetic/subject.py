"""One SYNTHETIC subject: the steps every synthetic cohort shares, and the hooks where a cohort paints its own
lesions (``SyntheticCohortGenerator``; the COPD-like and COVID-like generators are ``custom.synthetic.copd_like``
and ``custom.synthetic.covid_like``).

Deterministic by seed: each subject draws from its own random streams keyed by (seed, cohort, index), so a
subject is identical whatever the cohort size, and tables can be drawn without images.

A subject is made in order: its table row and scan protocol (``plan``); its place in the world (body habitus,
atlas -> subject transform, smooth deformation); body and lung sampled from the atlas; parenchyma with texture;
the cohort's lesions (``paint_lesions``); vessels and airways; scanner noise; the measured quantities and the
transform record. The random draws happen in that order, from the streams ``geometry`` and ``image``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

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
from custom.synthetic.confounders import AIRWAY_WALL_HU, add_scanner_noise, draw_scan_protocol
from custom.synthetic.geometry import (
    DEFAULT_FOV_CENTRE_MM,
    DEFAULT_FOV_MM,
    SubjectGrid,
    draw_deformation,
    draw_world_transform,
    make_subject_grid,
    subject_to_atlas_voxel,
)
from custom.synthetic.texture import PARENCHYMA_HU, parenchymal_texture
from custom.synthetic.writer import SYNTHETIC_NOTE

COHORT_CODES = {"copd": 0, "covid": 1}
STREAMS = ("clinical", "protocol", "geometry", "image", "annotation")
HU_STORE_RANGE = (-1024, 3071)
PROTOCOL_COLUMNS = ("kernel", "noise_std_hu", "inspiration_shift_hu")
TRANSFORM_CONVENTION = (
    "atlas_to_subject maps atlas physical RAS mm (affine of atlas_lung_mask.nii.gz) to subject physical "
    "RAS mm. The subject voxel at physical point y shows atlas point inv(atlas_to_subject) @ y + u(y); "
    "u is the non-rigid part (zero when amplitude_mm is 0), see custom.synthetic.geometry."
)


def subject_streams(seed: int, cohort: str, index: int) -> dict[str, np.random.Generator]:
    """Independent random streams of one subject, keyed by (seed, cohort, index)."""
    root = np.random.SeedSequence(entropy=int(seed), spawn_key=(COHORT_CODES[cohort], int(index)))
    return {name: np.random.default_rng(child) for name, child in zip(STREAMS, root.spawn(len(STREAMS)))}


def protocol_columns(protocol: dict) -> dict:
    """The scan-protocol columns of the clinical table."""
    return {k: protocol[k] for k in PROTOCOL_COLUMNS}


def lung_crop(lung: np.ndarray, margin: int = 2) -> tuple[slice, slice, slice]:
    """The bounding box of the lung (plus ``margin`` voxels), as slices."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(lung.any(axis=other))
        if hits.size == 0:
            raise RuntimeError("the synthetic lung left the field of view; reduce scale or translation")
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + margin + 1, lung.shape[axis])))
    return tuple(box)


def blend(base: np.ndarray, target: np.ndarray, mask: np.ndarray, spacing, edge_mm: float = 1.0) -> np.ndarray:
    """Put ``target`` into ``mask`` with a thin partial-volume rim outside it."""
    if not mask.any():
        return base
    weight = ndimage.gaussian_filter(mask.astype(np.float32), sigma=[edge_mm / s for s in spacing], truncate=2.0)
    np.maximum(weight, mask, out=weight)
    return base * (1.0 - weight) + target * weight


@dataclass
class SubjectPlan:
    """The table-level draws of one subject (no image): its clinical row, scan protocol and random streams."""

    index: int
    row: dict
    protocol: dict
    streams: dict


@dataclass
class LungRegion:
    """The lung's bounding box, where lesions are painted: masks and priors cropped to it, the lesion map being
    filled (uint8 codes of ``custom.synthetic.labels``) and the fine parenchymal texture."""

    lung: np.ndarray
    height: np.ndarray
    depth: np.ndarray
    posterior: np.ndarray
    lesion: np.ndarray
    fine: np.ndarray
    spacing: tuple


class SyntheticCohortGenerator:
    """A synthetic cohort of ``num_subjects`` subjects drawn with ``seed`` on a grid of ``voxel_size`` mm over
    ``fov_mm``, deformed non-rigidly by up to ``deformation_mm`` (0: affine images of the atlas); every
    ``dicom_every``-th subject is also delivered as a DICOM series (0: none).

    A cohort sets ``cohort``, ``id_prefix``, ``file_prefix`` (of its tables), ``lesion_codes`` (measured per
    subject), ``annotation_columns`` (None: no annotation table) and implements ``draw_row`` and
    ``paint_lesions``; ``finish`` may add image-measured columns and return annotation rows."""

    cohort = ""
    id_prefix = ""
    file_prefix = ""
    lesion_codes: tuple = ()
    annotation_columns: tuple | None = None

    def __init__(
        self,
        num_subjects: int,
        seed: int = 0,
        voxel_size: float | tuple = 2.0,
        deformation_mm: float = 4.0,
        dicom_every: int = 0,
        fov_mm=DEFAULT_FOV_MM,
        fov_centre_mm=DEFAULT_FOV_CENTRE_MM,
    ):
        self.num_subjects, self.seed = int(num_subjects), int(seed)
        self.voxel_size, self.deformation_mm = voxel_size, float(deformation_mm)
        self.dicom_every, self.fov_mm, self.fov_centre_mm = int(dicom_every), fov_mm, fov_centre_mm

    # ------------------------------------------------------------ what a cohort defines
    def draw_row(self, rng: np.random.Generator, subject_id: str, index: int) -> dict:
        raise NotImplementedError

    def paint_lesions(
        self, rng: np.random.Generator, region: LungRegion, row: dict, lung_hu: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Fill ``region.lesion`` and return (lung HU with the lesions, the emphysema mask that prunes vessels,
        the airway-wall thickening)."""
        raise NotImplementedError

    def finish(self, plan: SubjectPlan, volumes: dict, grid: SubjectGrid, reference: AtlasReference) -> list[dict]:
        """After synthesis: add image-measured columns to ``plan.row``; return the subject's annotation rows."""
        return []

    # ------------------------------------------------------------ shared steps
    @cached_property
    def grid(self) -> SubjectGrid:
        return make_subject_grid(self.voxel_size, self.fov_mm)

    @cached_property
    def reference(self) -> AtlasReference:
        return load_atlas_reference(step=max(1, int(round(min(self.grid.spacing)))))

    def subject_id(self, index: int) -> str:
        return f"{self.id_prefix}{index:04d}"

    def plan(self, index: int) -> SubjectPlan:
        """Table-level draws of subject ``index`` (no image)."""
        streams = subject_streams(self.seed, self.cohort, index)
        row = self.draw_row(streams["clinical"], self.subject_id(index), index)
        return SubjectPlan(int(index), row, draw_scan_protocol(streams["protocol"]), streams)

    def table_row(self, plan: SubjectPlan, volumes: dict) -> dict:
        """The subject's row of the clinical table: drawn values, scan protocol, measured quantities."""
        return {**plan.row, **protocol_columns(plan.protocol), **volumes["measured"]}

    def wants_dicom(self, index: int) -> bool:
        return self.dicom_every > 0 and index % self.dicom_every == 0

    def subjects(self):
        """(plan, volumes, annotation rows) of every subject, in order."""
        for index in range(self.num_subjects):
            plan = self.plan(index)
            volumes = self.synthesize(plan)
            yield plan, volumes, self.finish(plan, volumes, self.grid, self.reference)

    def synthesize(
        self, plan: SubjectPlan, grid: SubjectGrid | None = None, reference: AtlasReference | None = None
    ) -> dict:
        """Image, lesion map, lung mask, transform and measured quantities of one subject (in memory)."""
        grid, reference = grid or self.grid, reference or self.reference
        geo, img = plan.streams["geometry"], plan.streams["image"]
        habitus = draw_body_habitus(geo)
        world = draw_world_transform(
            geo, reference.lung_centre_mm, self.fov_centre_mm, size_factor=plan.protocol["lung_size_factor"]
        )
        deformation = draw_deformation(geo, amplitude_mm=self.deformation_mm)
        atlas_to_subject = np.asarray(world["atlas_to_subject"])
        atlas_vox = subject_to_atlas_voxel(grid, atlas_to_subject, reference.affine_1mm, deformation)
        hu, lung_label, crop, region_priors = self._body_and_lung(reference, atlas_vox, habitus)
        del atlas_vox
        region, lung_hu = self._parenchyma(img, region_priors, plan.protocol, grid.spacing)
        lung_hu, emphysema, thickening = self.paint_lesions(img, region, plan.row, lung_hu)
        lung_hu = self._vessels_and_airways(img, region, lung_hu, emphysema, thickening)
        hu[crop][region.lung] = lung_hu[region.lung]  # hu[crop] is a view: this fills the lung in the full volume
        lesion = np.zeros(grid.shape, dtype=np.uint8)
        lesion[crop] = np.where(region.lung, region.lesion, labels.NONE)
        add_scanner_noise(img, hu, plan.protocol, grid.spacing)
        image = np.clip(np.rint(hu), *HU_STORE_RANGE).astype(np.int16)
        transform = self._transform_record(
            world, atlas_to_subject, deformation, habitus, plan.protocol, grid, reference
        )
        return {
            "image": image,
            "lesion": lesion,
            "lung": lung_label,
            "transform": transform,
            "measured": self._measure(image, lesion, lung_label > 0, crop, region.lung, grid.spacing),
        }

    @staticmethod
    def _body_and_lung(reference: AtlasReference, atlas_vox: np.ndarray, habitus: dict):
        """Body HU and lung labels sampled from the atlas, the lung's bounding box and the priors inside it."""
        lung_label, depth = sample_atlas(reference, atlas_vox)
        hu = body_hu(reference, atlas_vox, depth, habitus)
        lung = lung_label > 0
        crop = lung_crop(lung)
        half_depth = float(reference.lung_max_vox[1] - reference.lung_min_vox[1]) / 2.0
        centre_y = float(reference.lung_centre_vox[1])
        priors = {
            "lung": lung[crop],
            "depth": depth[crop],
            "height": lung_height(reference, atlas_vox[2][crop]),
            "posterior": np.clip((centre_y - atlas_vox[1][crop]) / (2 * half_depth) + 0.5, 0.0, 1.0),
        }
        return hu, lung_label, crop, priors

    @staticmethod
    def _parenchyma(img: np.random.Generator, priors: dict, protocol: dict, spacing) -> tuple[LungRegion, np.ndarray]:
        """Parenchymal HU (inspiration, gravity gradient, texture) over the lung's bounding box."""
        shape = priors["lung"].shape
        lung_hu = PARENCHYMA_HU + protocol["inspiration_shift_hu"] + 30.0 * (priors["posterior"] - 0.4)
        texture, fine = parenchymal_texture(img, shape, spacing)
        lung_hu = lung_hu.astype(np.float32) + texture
        region = LungRegion(
            priors["lung"],
            priors["height"],
            priors["depth"],
            priors["posterior"],
            np.zeros(shape, dtype=np.uint8),
            fine,
            tuple(spacing),
        )
        return region, lung_hu

    @staticmethod
    def _vessels_and_airways(
        img: np.random.Generator, region: LungRegion, lung_hu: np.ndarray, emphysema: np.ndarray, thickening: float
    ) -> np.ndarray:
        """Vessels (pruned in emphysema), airway lumen and walls (thickened by ``thickening``) in lesion-free lung."""
        shape, spacing, fine = region.lung.shape, region.spacing, region.fine
        vessels = draw_vessel_tree(img, shape, spacing, region.depth)
        vessels[emphysema] *= 0.4  # emphysema prunes the small vessels
        lung_hu = lung_hu * (1.0 - vessels) + BLOOD_HU * vessels
        lumen, wall, thick = draw_airways(img, shape, spacing, region.depth, thickening)
        free = region.lung & (region.lesion == labels.NONE)
        lung_hu[lumen & free] = -1000.0
        lung_hu[(wall | thick) & free] = AIRWAY_WALL_HU + 25.0 * fine[(wall | thick) & free]
        region.lesion[thick & free] = labels.AIRWAY_WALL
        return lung_hu

    def _measure(self, image, lesion, lung, crop, lung_c, spacing) -> dict:
        """Lung volume, LAA-950, mean lung HU and the measured share of each of the cohort's lesion codes."""
        n_lung = int(lung.sum())
        voxel_ml = float(np.prod(spacing)) / 1000.0
        counts = np.bincount(lesion[crop][lung_c], minlength=len(labels.LESION_NAMES))
        measured = {
            "lung_volume_ml": round(n_lung * voxel_ml, 1),
            "laa950_percent": round(100.0 * float((image[lung] < -950).mean()), 3),
            "mean_lung_hu": round(float(image[lung].mean()), 1),
        }
        for code in self.lesion_codes:
            measured[f"measured_{labels.LESION_NAMES[code]}_fraction"] = round(float(counts[code]) / n_lung, 5)
        return measured

    @staticmethod
    def _transform_record(world, atlas_to_subject, deformation, habitus, protocol, grid, reference) -> dict:
        return {
            "note": SYNTHETIC_NOTE,
            "convention": TRANSFORM_CONVENTION,
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
