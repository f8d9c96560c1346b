"""MONAI dictionary transforms of the emphysema map: a CT path in, the network's 5-channel scan out
(``preprocessing``), and the probability map back on the input's grid, written with its report and pictures
(``postprocessing``). MONAI Label runs the same two chains around ``inferer(image, network)``.

Preprocessing is the scan pipeline of every workflow (``custom.prepare.transforms``: ``LoadCTd`` -> ``LungMaskd``
-> ``RegisterToAtlasd``, the config ids ``load``, ``lung_mask``, ``register`` that prepare and embed use too),
then MONAI ``CropForegroundd`` to the lung plus the patch half (16 voxels, so every patch centred in the lung is
whole) and ``ScanChannelsd`` (``dense_input.scan_channels``). The image's meta data keep what is needed to go
back: the input grid (``original_affine``, ``spatial_shape``) and the world -> atlas voxel map
(``atlas_from_world``, which cropping does not change).

The input grid is the NIfTI file's own voxel grid; for a DICOM series it is the series' voxel lattice at its own
spacing, in the atlas's axis order (LAS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialResample

from custom.data.intensity import HALF_RANGE, HU_SHIFT
from custom.data.location import location_to_centre
from custom.emphysema.dense_input import LUNG_CHANNEL, scan_channels
from custom.emphysema.network import EMPHYSEMA_CLASSES, MAP_LABELS
from custom.emphysema.sliding_window import map_labels
from custom.flags import as_bool
from custom.prepare.transforms import DEFAULT_MIN_DICE, LoadCTd, LungMaskd, RegisterToAtlasd, input_grid
from custom.prepare.transforms import meta_of as _meta

PATCH_HALF = 16
REGISTRATION_KEY = "registration"  # RegisterToAtlasd's whole result (what the prepare cache stores): dropped here
OUTPUT_DIR_KEY = "output_dir"  # an item's output folder: the inference config's dataset sets it on every scan
TEMPORARY_DIR_KEY = "temporary_output_dir"  # the folder of an item that named none (a MONAI Label request)
RESULT_KEY = "result"  # what MONAI Label returns as the result JSON of a request


def item_output_dir(d: dict, default: str | None = None) -> tuple:
    """(folder, temporary) where an item's outputs go: its own ``output_dir`` (a scan of the inference run),
    else ``default``, else a fresh temporary folder kept in the item (a request from outside the run, e.g.
    MONAI Label's ``{"image": path}``), which ``RequestResultd`` removes once the map is made."""
    folder = d.get(OUTPUT_DIR_KEY) or default
    if folder:
        return Path(folder), False
    if not d.get(TEMPORARY_DIR_KEY):
        import tempfile

        d[TEMPORARY_DIR_KEY] = tempfile.mkdtemp(prefix="drasclr_emphysema_")
    return Path(d[TEMPORARY_DIR_KEY]), True


def _hu_of(image: torch.Tensor) -> np.ndarray:
    """HU of the network intensity channel (exact inside the window [-1024, 240])."""
    return np.round((image.detach().cpu().numpy().astype(np.float64) + 1.0) * HALF_RANGE - HU_SHIFT, 3)


# ------------------------------------------------------------------------------------------------ preprocessing
class ScanChannelsd(MapTransform):
    """(1, X, Y, Z) HU + lung mask -> the (5, X, Y, Z) scan channels (intensity, atlas location x3, lung) of
    ``dense_input.scan_channels``, on the image's (possibly cropped) grid; drops ``mask_key``."""

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "lung_mask", allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            affine = np.asarray(image.affine, dtype=np.float64)
            subject_to_atlas = np.asarray(image.meta["atlas_from_world"], dtype=np.float64) @ affine
            lung = d.pop(self.mask_key)[0].numpy() > 0
            channels = scan_channels(image[0].numpy(), lung, subject_to_atlas)
            d[key] = MetaTensor(channels, affine=image.affine, meta=_meta(image))
        return d


def preprocessing_chain(atlas_dir: str | None = None, registration: str = "fast", min_dice: float = DEFAULT_MIN_DICE):
    """The ``preprocessing`` of ``configs/inference.yaml`` (keys ``image`` and ``lung_mask``), read from it."""
    from custom.prepare.pipeline import chain_from_config

    return chain_from_config("inference.yaml", "preprocessing", atlas_dir, registration, min_dice)


# ----------------------------------------------------------------------------------------------- postprocessing
def prepared_arrays(image: torch.Tensor, pred: torch.Tensor, threshold: float) -> dict:
    """Numpy views of one scan on the prepared grid: HU, lung, map labels (``MAP_LABELS``), atlas x of every
    voxel."""
    image = image.as_tensor() if isinstance(image, MetaTensor) else image
    pred = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
    lung = image[LUNG_CHANNEL].numpy() > 0.5
    labels = map_labels(pred.float(), torch.from_numpy(lung), threshold).numpy()
    atlas_x = location_to_centre(image[1:4].permute(1, 2, 3, 0))[..., 0].numpy()
    return {"hu": _hu_of(image[0]), "lung": lung, "labels": labels, "atlas_x": atlas_x}


class EmphysemaReportd(MapTransform):
    """Per-region emphysema report of ``keys`` (prepared-grid probabilities) into ``report_key`` (a dict);
    written as ``<output folder>/<subject_id>/report.json`` with pictures beside it (``item_output_dir``: the
    item's ``output_dir``, else ``output_dir``, else a temporary folder, where no pictures are drawn).

    With ``model_path``, the report says which weights made the map and what they were trained on (their model
    card, ``custom.emphysema.model_card``), and a model trained on SYNTHETIC data that maps a scan which is not
    synthetic puts its warning in the report, the CSV row and the picture titles."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        threshold: float = 0.5,
        output_dir: str | None = None,
        pictures: bool = True,
        report_key: str = "report",
        model_path: str | None = None,
        allow_missing_keys=False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.model_path = model_path
        self._provenance: dict | None = None
        self.image_key = image_key
        self.threshold = float(threshold)
        self.output_dir = output_dir
        self.pictures = as_bool(pictures)
        self.report_key = report_key

    def __call__(self, data):
        from custom.emphysema import pictures, report

        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key]
            meta = image.meta if isinstance(image, MetaTensor) else {}
            subject = str(d.get("subject_id") or meta.get("subject_id") or "scan")
            arrays = prepared_arrays(image, d[key], self.threshold)
            voxel_ml = float(np.prod(np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0))) / 1000.0
            info = {
                "subject_id": subject,
                "source": str(meta.get("filename_or_obj", "")),
                "threshold": self.threshold,
                "registration_dice": meta.get("registration_dice"),
                "qc_status": meta.get("qc_status"),
                "qc_reasons": meta.get("qc_reasons"),
            }
            info = {k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}
            info.update(self._model_info(info["source"]))
            d[self.report_key] = report.emphysema_report(
                arrays["hu"], arrays["lung"], arrays["labels"], arrays["atlas_x"], voxel_ml=voxel_ml, **info
            )
            root, temporary = item_output_dir(d, self.output_dir)
            folder = root / subject
            report.write_report_json(d[self.report_key], folder / "report.json")
            if self.pictures and not temporary:  # nobody sees the pictures of a temporary folder
                title = f"{subject}: emphysema (threshold {self.threshold:g})"
                if info.get("model_trained_on"):
                    title += f"; model trained on {info['model_trained_on']}"
                warning = info.get("warning")
                pictures.coronal_slices(
                    arrays["hu"],
                    arrays["lung"],
                    arrays["labels"],
                    folder / "emphysema_coronal.png",
                    title,
                    warning=warning,
                )
                pictures.coronal_projection(
                    arrays["lung"], arrays["labels"], folder / "emphysema_projection.png", title, warning=warning
                )
        return d

    def _model_info(self, source: str) -> dict:
        """The report fields that say which model made the map (read once: the SHA-1 of the weights)."""
        if not self.model_path:
            return {}
        from custom.emphysema.model_card import map_warning, model_provenance

        if self._provenance is None:
            self._provenance = model_provenance(self.model_path)
        return {
            "model_file": self._provenance["file"],
            "model_sha1": self._provenance["sha1"],
            "model_trained_on": self._provenance["trained_on"],
            "model_task": self._provenance.get("task", "unknown"),
            "warning": map_warning(self._provenance, source),
        }


class ResampleToInputd(MapTransform):
    """Prepared-grid probabilities (C, X, Y, Z) -> ``probabilities_key`` on the input grid (``original_affine``,
    ``spatial_shape`` of the image meta) with MONAI ``SpatialResample`` (bilinear; outside the lung P(healthy)
    is 1), and ``keys`` replaced by the label map there (1, ...) in ``MAP_LABELS``: 0 outside the lung (the
    image's lung channel, resampled the same way, below 0.5), 1 healthy lung, 2 centrilobular, 3 paraseptal."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        threshold: float = 0.5,
        probabilities_key: str = "probabilities",
        allow_missing_keys=False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.threshold = float(threshold)
        self.probabilities_key = probabilities_key
        self.resample = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            meta = d[self.image_key].meta
            pred = d[key]
            src_affine = torch.as_tensor(np.asarray(d[self.image_key].affine, dtype=np.float64))
            dst_affine = torch.as_tensor(np.asarray(meta["original_affine"], dtype=np.float64))
            shape = [int(s) for s in np.asarray(meta["spatial_shape"]).ravel()[:3]]
            image = d[self.image_key]
            lung = (image.as_tensor() if isinstance(image, MetaTensor) else image)[LUNG_CHANNEL : LUNG_CHANNEL + 1]
            plain = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
            # the subtype probabilities and the lung in one pass (same interpolation weights)
            stacked = MetaTensor(torch.cat([plain[1:].float(), lung.float()]), affine=src_affine)
            out = self.resample(stacked, dst_affine=dst_affine, spatial_size=shape).as_tensor().clamp_(0.0, 1.0)
            out, lung_in = out[:-1], out[-1] >= 0.5
            probabilities = torch.cat([(1.0 - out.sum(0, keepdim=True)).clamp_(0.0, 1.0), out])
            labels = map_labels(probabilities, lung_in, self.threshold)[None]
            out_meta = {
                "filename_or_obj": meta.get("filename_or_obj"),
                "original_affine": dst_affine,
                "spatial_shape": np.asarray(shape),
            }
            d[self.probabilities_key] = MetaTensor(probabilities, affine=dst_affine, meta=dict(out_meta))
            d[key] = MetaTensor(labels, affine=dst_affine, meta=dict(out_meta))
        return d


class SaveEmphysemaMapsd(MapTransform):
    """Write ``<output folder>/<subject_id>/emphysema_probabilities.nii.gz`` (x, y, z, class in
    ``EMPHYSEMA_CLASSES`` order, float32) and ``emphysema_mask.nii.gz`` (uint8 labels of ``MAP_LABELS``) with
    MONAI's NibabelWriter, atomically. The folder is ``item_output_dir``'s; an item with a temporary one (a
    request: its caller receives ``pred`` itself) gets no files."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | None = None,
        probabilities_key: str = "probabilities",
        allow_missing_keys=False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = output_dir
        self.probabilities_key = probabilities_key

    @staticmethod
    def _write(array: MetaTensor, path: Path, dtype) -> Path:
        from monai.data import NibabelWriter

        from custom.atomic_io import atomic_path

        writer = NibabelWriter(output_dtype=dtype)
        writer.set_data_array(array, channel_dim=0, squeeze_end_dims=True)
        writer.set_metadata({"affine": array.affine, "original_affine": array.affine}, resample=False)
        with atomic_path(path) as tmp:
            writer.write(str(tmp), verbose=False)
        return path

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            subject = str(d.get("subject_id") or d[key].meta.get("subject_id") or "scan")
            root, temporary = item_output_dir(d, self.output_dir)
            if temporary:
                continue
            folder = root / subject
            outputs = {"mask": str(self._write(d[key], folder / "emphysema_mask.nii.gz", np.uint8))}
            if self.probabilities_key in d:
                outputs["probabilities"] = str(
                    self._write(d[self.probabilities_key], folder / "emphysema_probabilities.nii.gz", np.float32)
                )
            d["outputs"] = outputs
        return d


class RequestResultd(MapTransform):
    """The last postprocessing step: ``report_key`` becomes the item's ``result`` (``{"report": ...}``; MONAI
    Label returns it as the result JSON of the request), and an item's temporary output folder
    (``item_output_dir``) is removed with all it holds, so a served request leaves no files behind."""

    def __init__(self, keys: KeysCollection = "pred", report_key: str = "report", allow_missing_keys=True):
        super().__init__(keys, allow_missing_keys)
        self.report_key = report_key

    def __call__(self, data):
        import shutil

        d = dict(data)
        if self.report_key in d:
            d[RESULT_KEY] = {"report": d[self.report_key]}
        temporary = d.pop(TEMPORARY_DIR_KEY, None)
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
        return d


__all__ = [
    "EMPHYSEMA_CLASSES",
    "MAP_LABELS",
    "EmphysemaReportd",
    "LoadCTd",
    "LungMaskd",
    "RegisterToAtlasd",
    "RequestResultd",
    "ResampleToInputd",
    "SaveEmphysemaMapsd",
    "ScanChannelsd",
    "input_grid",
    "item_output_dir",
    "prepared_arrays",
    "preprocessing_chain",
]
