"""Read a CT (NIfTI file or DICOM series folder), orient it like the atlas, resample it to 1 mm, check HU.

Reading and orienting use MONAI (``LoadImage``, ``Orientation``), so arrays are (x, y, z) as MONAI readers give
them and affines are RAS. The 1 mm resampling is a separable linear interpolation that keeps the origin and
the axis directions, the same grid MONAI ``Spacing`` would produce, but in a fraction of its time and memory
(a 512x512x64 DICOM series needs ~0.3 GB instead of ~4 GB).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from custom.errors import InputError  # noqa: F401 - the base of this module's errors, re-exported
from custom.errors import producer_of, workflow_command

logger = logging.getLogger("drasclr.prepare")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
HU_AIR_MAX = -500.0  # the darkest voxel of a CT in HU is air (about -1000); above this it is not HU
HU_PLAUSIBLE = (-10000.0, 40000.0)


class NotHounsfieldError(InputError):
    """The intensities are not Hounsfield units (normalised, MR, or raw stored values)."""


@dataclass
class CTVolume:
    """A CT resampled to the working grid: HU array (x, y, z) and its RAS voxel-to-world affine."""

    hu: np.ndarray
    affine: np.ndarray
    source: str
    original_spacing: tuple
    original_shape: tuple

    @property
    def spacing(self) -> tuple:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def is_dicom_file(path: Path) -> bool:
    """DICOM part-10 files carry 'DICM' at byte 128; extensions are unreliable."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom_series_dir(path: Path) -> bool:
    """A folder with at least one DICOM file (by magic bytes or a .dcm name, so a corrupt slice still counts)."""
    return path.is_dir() and any(p.suffix.lower() == ".dcm" or is_dicom_file(p) for p in path.iterdir() if p.is_file())


def _reader_for(path: Path) -> str:
    if path.is_dir():
        if not is_dicom_series_dir(path):
            raise InputError(f"{path}: folder holds no DICOM files (expected one DICOM series per folder)")
        return "PydicomReader"
    if is_nifti(path):
        return "NibabelReader"
    if path.is_file() and is_dicom_file(path):
        raise InputError(f"{path}: a single DICOM file; give the folder holding the whole series")
    if not path.exists():
        maker = producer_of(path)  # the bundle's own demo scans: say which workflow writes them
        raise InputError(f"{path}: file not found" + (f"; made by {workflow_command(maker)}" if maker else ""))
    raise InputError(f"{path}: unsupported input (expected .nii, .nii.gz or a DICOM series folder)")


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:limit] if text else ''}"


def _read_failure(path: Path, reader: str, err: BaseException) -> str:
    """A one-line reason, found by reading the file directly (MONAI's message lists every reader it tried)."""
    try:
        if reader == "NibabelReader":
            import nibabel as nib

            np.asanyarray(nib.load(str(path)).dataobj)
        else:
            import pydicom

            for file in sorted(p for p in path.iterdir() if p.is_file()):
                try:
                    pydicom.dcmread(str(file)).pixel_array
                except Exception as inner:  # noqa: BLE001 - name the first unreadable slice
                    if is_dicom_file(file) or file.suffix.lower() == ".dcm":
                        return f"slice {file.name}: {_first_line(inner)}"
    except Exception as inner:  # noqa: BLE001
        return _first_line(inner)
    return _first_line(err)


# Library warnings that are noise for every scan, filtered for the whole process on import of this module (every
# workflow that reads CT imports it, worker processes too): (message start, category, module that warns).
QUIET_WARNINGS = (
    # MONAI's MetaTensor(x, affine=A, meta=m) when m already holds an affine (MONAI itself writes the affine into a
    # meta dict handed to it, so passing one dict to two MetaTensors warns); the affine given is the one kept
    ("Setting affine, but the applied meta contains an affine", UserWarning, r"monai\.data\.meta_tensor"),
)
for _message, _category, _module in QUIET_WARNINGS:
    warnings.filterwarnings("ignore", message=_message, category=_category, module=_module)


class _DropNotices(logging.Filter):
    """Drops the library notices that are noise for a valid scan, counting them."""

    PREFIXES = {
        # pydicom, when MONAI turns every slice's header into metadata: vendor private tags (e.g. Philips
        # 01F11026) whose bytes do not match their VR; nothing of ours reads them
        "pydicom": ("Error while processing tag",),
        # once per LoadImage on machines without nvImageCodec (CPU): not actionable (also in configs/logging.conf,
        # but worker processes and scripts do not read that)
        "monai.data.nvimgcodec_pydicom_plugin": ("nvImageCodec is not available",),
    }

    def __init__(self, prefixes):
        super().__init__()
        self.prefixes, self.dropped = prefixes, []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.prefixes):
            self.dropped.append(message)
            return False
        return True


@contextlib.contextmanager
def quiet_readers(source: str = ""):
    """While reading one image: the notices of ``_DropNotices`` are dropped (one DEBUG line says how many)."""
    filters = {name: _DropNotices(prefixes) for name, prefixes in _DropNotices.PREFIXES.items()}
    for name, flt in filters.items():
        logging.getLogger(name).addFilter(flt)
    try:
        yield
    finally:
        for name, flt in filters.items():
            logging.getLogger(name).removeFilter(flt)
            if flt.dropped:
                logger.debug("%s: %d %s notice(s) dropped, first: %s", source, len(flt.dropped), name, flt.dropped[0])


def load_oriented(path: str | Path, axcodes: str):
    """Read an image with MONAI and orient it to ``axcodes``; returns (array (x,y,z) float32, RAS affine)."""
    from monai.transforms import LoadImage, Orientation

    path = Path(path)
    reader = _reader_for(path)
    try:
        with warnings.catch_warnings(), quiet_readers(str(path)):
            warnings.simplefilter("ignore")
            image = LoadImage(image_only=True, ensure_channel_first=True, reader=reader)(str(path))
            image = Orientation(axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    except InputError:
        raise
    except Exception as err:  # MONAI wraps reader errors in long multi-reader reports; find the real cause
        raise InputError(f"{path}: could not read the image ({_read_failure(path, reader, err)})") from err
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(f"{path}: expected one 3D volume, got array of shape {tuple(image.shape)}")
    array = image[0].detach().cpu().numpy().astype(np.float32, copy=False)
    affine = np.asarray(image.affine, dtype=np.float64)
    if min(array.shape) < 2:
        raise InputError(f"{path}: not a 3D volume (shape {array.shape})")
    return array, affine


def _axis_positions(size: int, spacing: float, new_spacing: float) -> np.ndarray:
    """Input index of each output sample along one axis: origin kept, step ``new_spacing`` mm."""
    count = int(np.floor((size - 1) * spacing / new_spacing + 1e-6)) + 1
    return np.arange(count, dtype=np.float64) * (new_spacing / spacing)


def resample_isotropic(array: np.ndarray, affine: np.ndarray, new_spacing: float = 1.0, nearest: bool = False):
    """Resample (x, y, z) to ``new_spacing`` mm keeping origin and directions; linear or nearest neighbour."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out = torch.from_numpy(np.ascontiguousarray(array))
    for axis in range(3):
        pos = _axis_positions(array.shape[axis], float(spacing[axis]), new_spacing)
        slabs = out.movedim(axis, 0).contiguous()  # gathering whole slabs along dim 0 is fast
        if nearest:
            idx = torch.from_numpy(np.clip(np.rint(pos), 0, array.shape[axis] - 1).astype(np.int64))
            out = slabs[idx].movedim(0, axis)
            continue
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, array.shape[axis] - 1)
        weight = torch.from_numpy((pos - lo).astype(np.float32)).reshape(-1, 1, 1)
        low = slabs[torch.from_numpy(lo)]
        low += (slabs[torch.from_numpy(hi)] - low) * weight
        out = low.movedim(0, axis)
    out = out.contiguous()
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] / spacing * new_spacing
    return out.numpy(), new_affine


def validate_hu(array: np.ndarray, source: str) -> None:
    """Refuse inputs that are not Hounsfield units, saying which file and what was seen."""
    sample = array[::4, ::4, ::4]
    if not np.isfinite(sample).all():
        raise NotHounsfieldError(f"{source}: image contains NaN or infinite values")
    lo, hi = float(sample.min()), float(sample.max())
    if hi - lo < 1e-3:
        raise NotHounsfieldError(f"{source}: image is constant ({lo:g}); not a CT in Hounsfield units")
    if lo >= -10.0 and hi <= 10.0:
        raise NotHounsfieldError(
            f"{source}: intensities span [{lo:g}, {hi:g}], which looks normalised, not Hounsfield units (HU); "
            "give the original CT in HU (air about -1000, soft tissue about 40)"
        )
    if lo > HU_AIR_MAX:
        hint = (
            " If these are raw stored values, HU = stored * RescaleSlope + RescaleIntercept (often -1024)."
            if lo >= -100.0
            else ""
        )
        raise NotHounsfieldError(
            f"{source}: darkest intensity is {lo:g}, but a CT in Hounsfield units (HU) has air at about -1000; "
            f"this is not HU (intensities span [{lo:g}, {hi:g}]).{hint}"
        )
    if lo < HU_PLAUSIBLE[0] or hi > HU_PLAUSIBLE[1]:
        raise NotHounsfieldError(
            f"{source}: intensities span [{lo:g}, {hi:g}], outside any plausible Hounsfield unit range"
        )


def load_ct(path: str | Path, axcodes: str = "LAS", spacing: float = 1.0) -> CTVolume:
    """Load a CT, check it is HU, orient to ``axcodes`` (the atlas's), resample to ``spacing`` mm."""
    array, affine = load_oriented(path, axcodes)
    validate_hu(array, str(path))
    original_spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    original_shape = tuple(int(s) for s in array.shape)
    hu, new_affine = resample_isotropic(array, affine, spacing)
    # values below -1024 are padding outside the reconstruction circle (-2048, -3024): call them air
    np.maximum(hu, -1024.0, out=hu)
    return CTVolume(
        hu=hu, affine=new_affine, source=str(path), original_spacing=original_spacing, original_shape=original_shape
    )


def load_mask_like(path: str | Path, ct: CTVolume, axcodes: str = "LAS") -> np.ndarray:
    """Read a user lung mask and sample it (nearest) on the CT's working grid; nonzero = lung."""
    array, affine = load_oriented(path, axcodes)
    vox_map = np.linalg.solve(affine, ct.affine)  # CT working voxel -> mask voxel
    linear = vox_map[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > 1e-3:
        raise InputError(f"{path}: lung mask grid is rotated with respect to the image {ct.source}")
    out = np.asarray(array > 0.5)
    for axis in range(3):
        pos = np.arange(ct.hu.shape[axis]) * linear[axis, axis] + vox_map[axis, 3]
        idx = np.rint(pos).astype(np.int64)
        inside = (idx >= 0) & (idx < out.shape[axis])
        taken = np.take(out, np.clip(idx, 0, out.shape[axis] - 1), axis=axis)
        shape = [1, 1, 1]
        shape[axis] = len(idx)
        out = taken & inside.reshape(shape)
    if out.shape != ct.hu.shape:
        raise InputError(f"{path}: lung mask could not be placed on the grid of {ct.source}")
    if not out.any():
        raise InputError(f"{path}: lung mask is empty on the grid of {ct.source} (wrong file or wrong image?)")
    return out
