"""Anatomy QC of a registered scan: is it a whole chest, the right way round, thin enough, and well registered?

A wrong scan can register "well enough" to pass a Dice floor: lungs cut off at the bases, voxel data flipped
while the header was kept, 10 mm slices. ``RegisterToAtlasd`` (``custom.prepare.transforms``) therefore runs the
four checks below on every scan after its registration, in every workflow that reads CT (prepare, embed,
emphysema inference, MONAI Label), and decides ``ok`` / ``warning`` / ``failed`` with the reasons.

``cut_off`` (fails)      Field of view. The lung mask's cross-section in the outer ``edge_mm`` of each face of the
                         volume, as a share of the lung's largest cross-section along that axis (``edge_shares``).
                         Above ``max_edge_share`` the lungs run off that edge: "lungs cut off at the inferior
                         edge". At the superior face, round air regions smaller than ``airway_mm2`` (the trachea,
                         which leaves through the top of most chest scans) are not counted.
``flipped`` (fails)      Orientation. The lung mask is registered to the atlas again at a coarse 6 mm grid as it
                         is and mirrored along each axis (``orientation_dice``, four small ANTs runs). When a
                         mirrored copy overlaps the atlas better than the scan itself by more than ``flip_margin``
                         Dice, and well (at least ``warn_dice``: a normal pair of lungs, so one-sided disease or a
                         missing lung is not read as a flip), that axis looks flipped ("head-feet axis looks
                         flipped"). Lungs are far from
                         symmetric head-feet (apex vs diaphragm domes) and anterior-posterior (posterior recesses,
                         heart in front); left-right they differ less (the larger right lung, the cardiac notch of
                         the left), which still gives a clear margin on the scans calibrated (docs/prepare.md).
``thick_slices`` (warns) The input's slice spacing along the head-feet axis above ``max_slice_mm``: thick slices
                         average fine structure away (LAA-950 of the real CT, sharp kernel, drops from 5.8 % at its
                         own 5 mm to 1.7 % at 10 mm; docs/prepare.md), which the method was not trained for.
``registration``         Dice below ``min_dice`` fails (the registration or the mask is broken); Dice below
                         ``warn_dice``, or a share of landmarks inside the lung below ``warn_share_ratio`` times the
                         atlas's own share, warns.

``cut_off`` and ``flipped`` can be accepted knowingly (``accept``): the subject is then prepared with status
``warning`` and the reason marked "(accepted)". Thresholds are calibrated in ``bundle/scripts/calibrate_qc.py``
(table in docs/prepare.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from custom.prepare.landmarks import RegistrationQCError

logger = logging.getLogger("drasclr.prepare")

CUT_OFF = "cut_off"
FLIPPED = "flipped"
THICK_SLICES = "thick_slices"
REGISTRATION = "registration"
CHECKS = (CUT_OFF, FLIPPED, THICK_SLICES, REGISTRATION)
ACCEPTABLE = (CUT_OFF, FLIPPED)  # failures a user may accept knowingly
OK, WARNING, FAILED = "ok", "warning", "failed"
STATUS_ORDER = {FAILED: 0, WARNING: 1, OK: 2}  # flagged first

FACE_NAMES = {"L": "left", "R": "right", "A": "anterior", "P": "posterior", "S": "superior", "I": "inferior"}
OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
AXIS_NAMES = {
    "L": "left-right",
    "R": "left-right",
    "A": "anterior-posterior",
    "P": "anterior-posterior",
    "S": "head-feet",
    "I": "head-feet",
}


@dataclass(frozen=True)
class QCLimits:
    """The thresholds of the checks (module docstring); defaults calibrated in docs/prepare.md."""

    max_edge_share: float = 0.02
    edge_mm: float = 3.0
    airway_mm2: float = 500.0
    flip_margin: float = 0.02
    max_slice_mm: float = 5.0
    min_dice: float = 0.5
    warn_dice: float = 0.80
    warn_share_ratio: float = 0.80
    orientation_mm: float = 6.0


DEFAULT_LIMITS = QCLimits()


class AnatomyQCError(RegistrationQCError):
    """A scan that failed the anatomy QC; ``qc`` holds the numbers and reasons (what qc.json would hold)."""

    def __init__(self, message: str, qc: dict | None = None):  # noqa: B042 - __reduce__ below pickles both
        super().__init__(message)
        self.qc = qc or {}

    def __reduce__(self):  # picklable across worker processes with its QC numbers
        return (type(self), (str(self), self.qc))


def parse_accept(accept) -> tuple:
    """``accept`` as a tuple of check names: None, a name, "a,b", "['a', 'b']" or a list; unknown names are
    refused."""
    if accept is None or accept is False:
        return ()
    if isinstance(accept, str):
        accept = [a.strip(" '\"") for a in accept.strip("[]() ").replace(";", ",").split(",")]
    names = tuple(sorted({str(a).strip() for a in accept if str(a).strip()}))
    unknown = [n for n in names if n not in ACCEPTABLE]
    if unknown:
        raise ValueError(f"accept: unknown QC failure(s) {unknown}; failures that can be accepted: {list(ACCEPTABLE)}")
    return names


# ----------------------------------------------------------------------------------------------- measurements
def head_feet_axis(axcodes: str) -> int:
    """Index of the S/I axis in ``axcodes`` (2 for the atlas's LAS)."""
    for axis, code in enumerate(axcodes):
        if code in "SI":
            return axis
    raise ValueError(f"axis codes {axcodes!r} have no head-feet (S/I) axis")


def edge_shares(lung: np.ndarray, spacing, axcodes: str, edge_mm: float = 3.0, airway_mm2: float = 500.0) -> dict:
    """Lung cross-section within ``edge_mm`` of each face of the volume, as a share of the lung's largest
    cross-section along that axis: {face name: share}. At the superior face connected air regions under
    ``airway_mm2`` (the trachea) are left out."""
    lung = np.asarray(lung, dtype=bool)
    spacing = np.asarray(spacing, dtype=np.float64)
    out = {}
    for axis, code in enumerate(axcodes):
        others = tuple(a for a in range(3) if a != axis)
        area_mm2 = float(np.prod(spacing[list(others)]))
        profile = lung.sum(axis=others).astype(np.float64) * area_mm2
        largest = float(profile.max()) if profile.size else 0.0
        depth = max(1, int(round(edge_mm / spacing[axis])))
        for side, code_here in (("first", OPPOSITE[code]), ("last", code)):
            slab_index = range(depth) if side == "first" else range(lung.shape[axis] - depth, lung.shape[axis])
            best = 0.0
            for index in slab_index:
                section = np.take(lung, index, axis=axis)
                if not section.any():
                    continue
                if code_here == "S" and airway_mm2 > 0:
                    labels, count = ndimage.label(section)
                    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:] * area_mm2
                    value = float(sizes[sizes >= airway_mm2].sum())
                else:
                    value = float(section.sum()) * area_mm2
                best = max(best, value)
            out[FACE_NAMES[code_here]] = round(best / largest, 4) if largest else 0.0
    return out


def _soft_working(mask: np.ndarray, affine: np.ndarray, working_mm: float):
    """The lung cropped (+20 mm) and block-averaged to about ``working_mm`` (a soft border), and its RAS affine."""
    from custom.prepare.registration import average_down, crop_to_mask

    binary, affine = crop_to_mask(np.asarray(mask) > 0, affine, 20.0)
    spacing = float(np.linalg.norm(affine[:3, :3], axis=0).mean())
    return average_down(binary, affine, max(1, int(round(working_mm / spacing))))


_ATLAS_WORKING: dict = {}


def _atlas_working(atlas_mask: np.ndarray, atlas_affine: np.ndarray, working_mm: float):
    key = (id(atlas_mask), atlas_mask.shape, working_mm)
    if key not in _ATLAS_WORKING:
        from custom.prepare.registration import ras_to_ants

        soft, affine = _soft_working(atlas_mask, atlas_affine, working_mm)
        grid = np.stack(
            np.meshgrid(*[np.arange(n, dtype=np.float64) for n in soft.shape], indexing="ij"), axis=0
        ).reshape(3, -1)
        _ATLAS_WORKING.clear()  # one atlas per process
        _ATLAS_WORKING[key] = (soft, affine, ras_to_ants(soft, affine), grid)
    return _ATLAS_WORKING[key]


def _centroid_world(soft: np.ndarray, affine: np.ndarray) -> np.ndarray:
    centre = np.asarray(ndimage.center_of_mass(soft), dtype=np.float64)
    return affine[:3, :3] @ centre + affine[:3, 3]


def orientation_dice(
    lung: np.ndarray,
    affine: np.ndarray,
    atlas_mask: np.ndarray,
    atlas_affine: np.ndarray,
    axcodes: str,
    working_mm: float = 6.0,
    seed: int = 2024,
    given_atlas_to_subject_world: np.ndarray | None = None,
) -> dict:
    """Soft Dice with the atlas lung after a coarse affine registration (ANTs, Mattes MI, 30x15 iterations at
    ``working_mm``) of the lung mask as it is (``"none"``) and mirrored along each axis (keyed by the axis name
    of ``axcodes``: "left-right", "anterior-posterior", "head-feet").

    ``given_atlas_to_subject_world``: the full registration of the scan as it is (atlas world -> subject world);
    ``"none"`` is then the better of the coarse run and that transform on the same coarse grid, so a coarse run
    that stops short (small lungs, a far start) does not make a mirrored copy look better."""
    import ants

    from custom.prepare.registration import RAS_TO_LPS, _seeded_ants, ants_affine_to_matrix, ras_to_ants

    atlas_soft, atlas_aff, fixed, grid = _atlas_working(atlas_mask, atlas_affine, working_mm)
    soft, soft_aff = _soft_working(lung, affine, working_mm)
    atlas_total = float(atlas_soft.sum())
    given = None
    if given_atlas_to_subject_world is not None:
        to_soft = np.linalg.solve(soft_aff, np.asarray(given_atlas_to_subject_world, dtype=np.float64) @ atlas_aff)
        warped = ndimage.map_coordinates(soft, to_soft[:3, :3] @ grid + to_soft[:3, 3:4], order=1, cval=0.0).reshape(
            atlas_soft.shape
        )
        total = float(warped.sum()) + atlas_total
        given = 2.0 * float(np.minimum(warped, atlas_soft).sum()) / total if total else 0.0
    # Start every registration with the lung's centre of mass on the atlas lung's (a scan's world origin can be
    # anywhere): without it a coarse run from a far start can stop short, and its mirrored copy then "wins".
    soft_aff = soft_aff.copy()
    soft_aff[:3, 3] += _centroid_world(atlas_soft, atlas_aff) - _centroid_world(soft, soft_aff)
    out = {}
    for name, axis in [("none", None)] + [(AXIS_NAMES[c], a) for a, c in enumerate(axcodes)]:
        moving = soft if axis is None else np.ascontiguousarray(np.flip(soft, axis))
        folder = tempfile.mkdtemp(prefix="drasclr_orient_")
        try:
            with _seeded_ants(seed):
                result = ants.registration(
                    fixed=fixed,
                    moving=ras_to_ants(moving, soft_aff),
                    type_of_transform="Affine",
                    aff_metric="mattes",
                    aff_sampling=32,
                    aff_random_sampling_rate=0.1,
                    aff_iterations=(30, 15),
                    aff_shrink_factors=(2, 1),
                    aff_smoothing_sigmas=(1, 0),
                    outprefix=os.path.join(folder, "o_"),
                )
            atlas_lps_to_subject_lps = ants_affine_to_matrix(result["fwdtransforms"][0])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        atlas_to_subject = np.linalg.solve(RAS_TO_LPS @ soft_aff, atlas_lps_to_subject_lps @ RAS_TO_LPS @ atlas_aff)
        coords = atlas_to_subject[:3, :3] @ grid + atlas_to_subject[:3, 3:4]
        warped = ndimage.map_coordinates(moving, coords, order=1, cval=0.0).reshape(atlas_soft.shape)
        total = float(warped.sum()) + atlas_total
        out[name] = round(2.0 * float(np.minimum(warped, atlas_soft).sum()) / total, 4) if total else 0.0
    if given is not None:
        out["none"] = round(max(out["none"], given), 4)
    return out


def slice_spacing(original_spacing, axcodes: str) -> float:
    """The input's voxel spacing along the head-feet axis (the slice spacing of an axial series), mm."""
    spacing = np.asarray(original_spacing, dtype=np.float64).ravel()
    if spacing.size != 3:
        return float("nan")
    return round(float(spacing[head_feet_axis(axcodes)]), 3)


# ----------------------------------------------------------------------------------------------- decision
@dataclass
class Finding:
    check: str
    level: str  # "warning" or "failed"
    message: str
    accepted: bool = False

    def text(self) -> str:
        return self.message + (" (accepted)" if self.accepted else "")


@dataclass
class QCResult:
    status: str
    findings: list = field(default_factory=list)
    measures: dict = field(default_factory=dict)

    @property
    def reasons(self) -> list:
        return [f.text() for f in self.findings]

    @property
    def failures(self) -> list:
        return [f for f in self.findings if f.level == FAILED and not f.accepted]

    def as_qc(self) -> dict:
        """The QC fields of qc.json / image meta: status, reasons, checks and numbers."""
        return {
            "qc_status": self.status,
            "qc_reasons": self.reasons,
            "qc_checks": sorted({f.check for f in self.findings}),
            **self.measures,
        }


def assess(measures: dict, limits: QCLimits = DEFAULT_LIMITS, accept=()) -> QCResult:
    """Decide ok / warning / failed from the numbers (``measures``: ``dice``, ``share_inside_lung``,
    ``atlas_share_inside_lung``, ``edge_share`` {face: share}, ``orientation_dice`` {"none" / axis: Dice} or
    None, ``slice_mm``)."""
    accept = parse_accept(accept)
    findings = []

    for face, share in sorted((measures.get("edge_share") or {}).items(), key=lambda kv: -kv[1]):
        if share > limits.max_edge_share:
            findings.append(
                Finding(
                    CUT_OFF,
                    FAILED,
                    f"lungs cut off at the {face} edge ({share:.0%} of the largest lung "
                    f"cross-section lies in the outer {limits.edge_mm:g} mm; limit "
                    f"{limits.max_edge_share:.0%})",
                )
            )

    orientation = measures.get("orientation_dice") or {}
    if orientation and "none" in orientation:
        gains = {axis: dice - orientation["none"] for axis, dice in orientation.items() if axis != "none"}
        axis, gain = max(gains.items(), key=lambda kv: kv[1])
        if gain > limits.flip_margin and orientation[axis] >= limits.warn_dice:
            findings.append(
                Finding(
                    FLIPPED,
                    FAILED,
                    f"{axis} axis looks flipped (mirrored {axis} the lungs match the atlas with "
                    f"Dice {orientation[axis]:.2f}, as given {orientation['none']:.2f}); check the "
                    "image header / slice order",
                )
            )

    slice_mm = measures.get("slice_mm")
    if slice_mm is not None and np.isfinite(slice_mm) and slice_mm > limits.max_slice_mm + 1e-6:
        findings.append(
            Finding(
                THICK_SLICES,
                WARNING,
                f"slices {slice_mm:g} mm apart (> {limits.max_slice_mm:g} mm): thick slices blur "
                "the lung texture the method reads and lower LAA-950",
            )
        )

    dice = measures.get("dice")
    if dice is not None:
        if dice < limits.min_dice:
            findings.append(
                Finding(
                    REGISTRATION,
                    FAILED,
                    f"registration to the atlas failed: lung overlap (Dice) {dice:.2f} < "
                    f"{limits.min_dice:.2f}; check the lung mask and the image orientation",
                )
            )
        elif dice < limits.warn_dice:
            findings.append(
                Finding(
                    REGISTRATION, WARNING, f"poor registration: lung overlap (Dice) {dice:.2f} < {limits.warn_dice:.2f}"
                )
            )
    share, atlas_share = measures.get("share_inside_lung"), measures.get("atlas_share_inside_lung")
    if share is not None and atlas_share:
        ratio = share / atlas_share
        if ratio < limits.warn_share_ratio:
            findings.append(
                Finding(
                    REGISTRATION,
                    WARNING,
                    f"only {share:.0%} of the landmarks fall inside the lung ({ratio:.0%} of the "
                    f"atlas's own {atlas_share:.0%}; limit {limits.warn_share_ratio:.0%})",
                )
            )

    for finding in findings:
        if finding.level == FAILED and finding.check in accept:
            finding.accepted = True
    if any(f.level == FAILED and not f.accepted for f in findings):
        status = FAILED
    elif findings:
        status = WARNING
    else:
        status = OK
    numbers = dict(measures)
    if share is not None and atlas_share:
        numbers["share_ratio"] = round(share / atlas_share, 4)
    if orientation and "none" in orientation:
        numbers["flip_gain"] = round(max(d - orientation["none"] for a, d in orientation.items() if a != "none"), 4)
    numbers["qc_limits"] = asdict(limits)
    numbers["qc_accept"] = list(accept)
    numbers["qc_accepted"] = sorted({f.check for f in findings if f.accepted})
    return QCResult(status=status, findings=findings, measures=numbers)


def accepted_checks(qc: dict) -> tuple:
    """The checks whose failure a QC record (qc.json) let through only because they were accepted: a later run
    that does not accept them must not reuse the result. Records without ``qc_accepted`` (older entries): the
    acceptable checks that both had a finding and were accepted (their findings are always failures)."""
    if qc.get("qc_accepted") is not None:
        return tuple(sorted(qc["qc_accepted"]))
    return tuple(sorted(set(qc.get("qc_checks") or ()) & set(qc.get("qc_accept") or ()) & set(ACCEPTABLE)))


def reason_of_error(error: str, source: str | None = None) -> str:
    """The reason part of a failure message: without the leading "<source>: ", "failed QC: " and the trailing
    hint on ``accept`` (what the manifest's ``qc_reason`` and the QC sheet show)."""
    text = str(error or "")
    if source and text.startswith(f"{source}: "):
        text = text[len(source) + 2 :]
    if text.startswith("failed QC: "):
        text = text[len("failed QC: ") :]
    hint = text.rfind(" (to prepare it anyway:")
    return text[:hint] if hint >= 0 else text


def reason_text(qc: dict) -> str:
    """One line: the reasons of a QC dict (qc.json), "" when none."""
    reasons = qc.get("qc_reasons") or []
    return "; ".join(reasons) if isinstance(reasons, (list, tuple)) else str(reasons)


__all__ = [
    "ACCEPTABLE",
    "AnatomyQCError",
    "CHECKS",
    "CUT_OFF",
    "FLIPPED",
    "Finding",
    "QCLimits",
    "QCResult",
    "REGISTRATION",
    "THICK_SLICES",
    "accepted_checks",
    "assess",
    "edge_shares",
    "orientation_dice",
    "parse_accept",
    "reason_of_error",
    "reason_text",
    "slice_spacing",
]
