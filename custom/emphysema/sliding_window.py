"""Voxel-wise emphysema probabilities by sliding the patch classifier over the lung (paper §4.3.1, Fig. 3).

The paper slides the 32^3 classifier with a step of 1 voxel: one network evaluation per lung voxel, millions per
scan. ``EmphysemaInferer`` evaluates the classifier (``dense_input.outputs_at``: the patch centred at a
voxel, routed by that voxel's atlas location) only at the points of a regular grid with spacing ``stride`` that
are corners of grid cells holding lung voxels, and fills every lung voxel by trilinear interpolation of its
cell's corners. Voxels outside the lung are healthy (class probabilities; the map labels them background, see
``map_labels``). ``stride=1`` evaluates every lung voxel: the paper's brute force, exactly.

The map model is ``EmphysemaDetectors``, one binary detector per subtype: a voxel's subtype probability is that
subtype's detector, and where several reach the threshold the most probable wins (``map_values``); the 3-class
softmax ``EmphysemaNetwork`` (a documented extra) maps too.

What is interpolated (``interpolation``): ``"probabilities"`` (default), or ``"logits"``: each detector's
log-odds (of the 3-class softmax: its log-probabilities, whose per-point log-normaliser cancels in the softmax that
follows). Interpolated logits are exact
where the logits are affine in space (tested); on the real CT with the demo model they did not let a coarser
grid reach the brute force (32 refined to 16: Dice 0.80 / 0.91 against it, ``bundle/docs/emphysema.md``), and at
the default grid both agree with it, so the default keeps the probabilities (the maps of earlier versions).
Both evaluate the same points: refinement is decided on the evaluated points' own labels.

Optional refinement (``min_stride`` < ``stride``): a cell whose corners disagree about the label (``threshold``
on the subtype probabilities) straddles an emphysema border; its voxels are redone on a grid of half the
stride, down to ``min_stride``. Cells whose corners agree keep the coarse interpolation: with subtype corners it
has their label (interpolated probabilities: a convex combination on one side of the threshold stays there;
logits: the set where one class's softmax reaches a threshold >= 0.5 is convex in the logits); with healthy
corners the interpolated logits can, rarely, reach a subtype inside the cell, which is then labelled so.
``bundle/scripts/benchmark_emphysema.py`` measures the maps against the brute force.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from custom.emphysema.dense_input import LUNG_CHANNEL, outputs_at
from custom.emphysema.folded_classifier import fold, folded_outputs_at, supports_folding
from custom.emphysema.network import (
    BACKGROUND_LABEL,
    EMPHYSEMA_CLASSES,
    HEALTHY_LABEL,
    SUBTYPES,
    EmphysemaDetectors,
    detector_probabilities,
)
from custom.flags import as_bool

HEALTHY = EMPHYSEMA_CLASSES.index("healthy")  # class index (network output), not a map label
INTERPOLATIONS = ("logits", "probabilities")


def decide_labels(probabilities: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Class indices (int8) of ``EMPHYSEMA_CLASSES`` from class probabilities (C, ...): the subtype (1..C-1) whose
    probability reaches ``threshold`` (the most probable one if several do), else 0 (healthy). NaN (not
    evaluated) gives -1. A map's labels are ``map_labels``."""
    subtypes = probabilities[1:]
    best = subtypes.max(dim=0)
    labels = torch.where(best.values >= threshold, best.indices + 1, torch.zeros_like(best.indices)).to(torch.int8)
    labels[torch.isnan(probabilities).any(dim=0)] = -1
    return labels


def map_labels(probabilities: torch.Tensor, lung: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The map (uint8, ``network.MAP_LABELS``) of class probabilities (C, ...) and a lung mask (...): 0 outside
    the lung, inside it the decided class + 1 (1 healthy lung, 2 centrilobular, 3 paraseptal)."""
    classes = decide_labels(probabilities, threshold).to(torch.uint8) + (HEALTHY_LABEL - HEALTHY)
    return torch.where(torch.as_tensor(lung, dtype=torch.bool), classes, torch.full_like(classes, BACKGROUND_LABEL))


class _SoftmaxValues:
    """What a softmax classifier over ``EMPHYSEMA_CLASSES`` (the 3-class extra) interpolates: its probabilities, or
    its log-probabilities (``log``), turned into class probabilities after interpolation."""

    def __init__(self, network: torch.nn.Module, log: bool):
        self.log = log
        self.width = len(EMPHYSEMA_CLASSES)

    def values(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(outputs, dim=1) if self.log else torch.softmax(outputs, dim=1)

    def probabilities(self, values: torch.Tensor) -> torch.Tensor:
        return torch.softmax(values, dim=0) if self.log else values


class _DetectorValues:
    """What ``EmphysemaDetectors`` interpolates: each subtype detector's probability, or its log-odds (``log``);
    after interpolation, class probabilities by ``network.detector_probabilities`` (a subtype without a detector
    has probability 0)."""

    def __init__(self, network: EmphysemaDetectors, log: bool):
        self.log = log
        self.width = len(network.subtypes)
        self.channels = torch.tensor([SUBTYPES.index(name) for name in network.subtypes])

    def values(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs if self.log else torch.sigmoid(outputs)

    def probabilities(self, values: torch.Tensor) -> torch.Tensor:
        own = torch.sigmoid(values) if self.log else values
        subtypes = own.new_zeros((len(SUBTYPES), *own.shape[1:]))
        subtypes[self.channels] = own
        return detector_probabilities(subtypes, dim=0)


def map_values(network: torch.nn.Module, log: bool = False):
    """How the map reads ``network``'s outputs (``_DetectorValues`` or ``_SoftmaxValues``)."""
    return (_DetectorValues if isinstance(network, EmphysemaDetectors) else _SoftmaxValues)(network, log)


def point_probabilities(
    network: torch.nn.Module, channels: torch.Tensor, centres: torch.Tensor, batch_size: int = 8, folded: bool = False
) -> torch.Tensor:
    """(N, 3) class probabilities of the map at voxels ``centres`` (N, 3), each by its own network evaluation: the
    step-1 brute force at those points (``folded``: through ``folded_classifier`` when the network supports it)."""
    head = map_values(network)
    if folded and supports_folding(network):
        outputs = folded_outputs_at(fold(network), channels, centres, batch_size)
    else:
        outputs = outputs_at(network, channels, centres, batch_size)
    return head.probabilities(head.values(outputs).T).T


class _AxisGrid:
    """Grid points along one axis (``lo``, ``lo`` + stride, ..., ending exactly at ``hi`` - 1) and, for every
    voxel of [lo, hi), the index of its cell's lower corner, the upper corner (= lower where the weight is 0)
    and the interpolation weight."""

    def __init__(self, lo: int, hi: int, stride: int):
        last = hi - 1
        positions = np.arange(lo, last + stride, stride, dtype=np.int64)
        self.positions = np.unique(np.minimum(positions, last))
        voxels = np.arange(lo, hi, dtype=np.int64)
        cell = np.clip(np.searchsorted(self.positions, voxels, side="right") - 1, 0, max(len(self.positions) - 2, 0))
        upper = np.minimum(cell + 1, len(self.positions) - 1)
        span = np.maximum(self.positions[upper] - self.positions[cell], 1)
        weight = (voxels - self.positions[cell]) / span
        self.lower = torch.from_numpy(cell)
        self.upper = torch.from_numpy(np.where(weight > 0, upper, cell))
        self.weight = torch.from_numpy(weight.astype(np.float32))

    def __len__(self) -> int:
        return len(self.positions)

    def matrix(self) -> torch.Tensor:
        """(voxels, grid points) float32: row v holds the weights of v's lower and upper grid point."""
        out = torch.zeros((len(self.weight), len(self.positions)), dtype=torch.float32)
        rows = torch.arange(len(self.weight))
        out.index_put_((rows, self.lower), 1.0 - self.weight, accumulate=True)
        out.index_put_((rows, self.upper), self.weight, accumulate=True)
        return out


def _interpolate(values: torch.Tensor, grids: list) -> torch.Tensor:
    """Trilinear interpolation of grid values (C, gx, gy, gz) to every voxel (C, Lx, Ly, Lz), one axis at a time,
    each a product with that axis's (voxels x grid points) weight matrix (BLAS; gathering the corners of tens of
    millions of voxels took most of a map's bookkeeping). Grid points no voxel needs may be NaN: they enter with
    weight 0 as 0."""
    out = torch.nan_to_num(values, nan=0.0)
    for axis, grid in enumerate(grids):
        out = torch.einsum(_EINSUM[axis], out, grid.matrix())
    return out


_EINSUM = ("cxyz,Xx->cXyz", "cxyz,Yy->cxYz", "cxyz,Zz->cxyZ")


def _straddling(labels: torch.Tensor, grids: list) -> torch.Tensor:
    """(Lx, Ly, Lz) bool: the voxels whose interpolation corners disagree about the label. Decided on the small
    "extended" grid (per axis 2g - 1 entries: each grid point, then each cell between two), which every voxel
    indexes once (a voxel on a grid plane uses the point, the others the cell): one gather at the voxel scale."""
    low, high = labels, labels
    index = []
    for axis, grid in enumerate(grids):
        extended = torch.arange(2 * len(grid) - 1)
        first, second = extended // 2, extended // 2 + extended % 2
        low = torch.minimum(low.index_select(axis, first), low.index_select(axis, second))
        high = torch.maximum(high.index_select(axis, first), high.index_select(axis, second))
        index.append(2 * grid.lower + (grid.upper != grid.lower).long())
    disagree = low != high
    return disagree[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]


def _needed_corners(active: torch.Tensor, grids: list) -> torch.Tensor:
    """(gx, gy, gz) bool: the grid points that some active voxel's interpolation reads."""
    out = active.to(torch.int32)
    for axis, grid in enumerate(grids):
        moved = out.movedim(axis, 0)
        reduced = torch.zeros((len(grid), *moved.shape[1:]), dtype=torch.int32)
        reduced.index_add_(0, grid.lower, moved)
        uses_upper = grid.weight > 0
        reduced.index_add_(0, grid.upper[uses_upper], moved[uses_upper])
        out = (reduced > 0).to(torch.int32).movedim(0, axis)
    return out > 0


class _VoxelCorners:
    """The 8 interpolation corners of voxels (N, 3) of the box, kept once per distinct corner set (voxels of a
    cell share theirs; a voxel on a grid plane uses a face, edge or point of it): ``corners`` (M, 8, 3) grid
    indices, ``inverse`` (N,) each voxel's set, ``weights`` (N, 8) its trilinear weights."""

    def __init__(self, voxels: torch.Tensor, grids: list):
        lower = torch.stack([g.lower[voxels[:, a]] for a, g in enumerate(grids)], dim=1)
        upper = torch.stack([g.upper[voxels[:, a]] for a, g in enumerate(grids)], dim=1)
        w = torch.stack([g.weight[voxels[:, a]] for a, g in enumerate(grids)], dim=1)
        key = lower.new_zeros(len(voxels))
        for a, g in enumerate(grids):
            key = (key * len(g) + lower[:, a]) * len(g) + upper[:, a]
        unique, inverse = np.unique(key.numpy(), return_inverse=True)
        first = np.zeros(len(unique), dtype=np.int64)
        first[inverse.reshape(-1)] = np.arange(len(key))  # any voxel of a set: they share its corners
        first = torch.from_numpy(first)
        bits = torch.tensor([[(k >> a) & 1 for a in range(3)] for k in range(8)], dtype=torch.bool)  # (8, 3)
        self.corners = torch.where(bits[None], upper[first][:, None, :], lower[first][:, None, :])  # (M, 8, 3)
        self.inverse = torch.from_numpy(inverse.reshape(-1))
        self.weights = torch.where(bits[None], w[:, None, :], 1.0 - w[:, None, :]).prod(dim=2)  # (N, 8)

    def interpolate(self, grid_values: torch.Tensor) -> torch.Tensor:
        """(C, N) trilinear interpolation of grid values (C, gx, gy, gz) at the voxels."""
        c = self.corners
        at_corners = grid_values[:, c[..., 0], c[..., 1], c[..., 2]]  # (C, M, 8)
        return torch.einsum("cnk,nk->cn", at_corners[:, self.inverse], self.weights)

    def straddling(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the voxels whose corners disagree about the label."""
        c = self.corners
        at_corners = labels[c[..., 0], c[..., 1], c[..., 2]]  # (M, 8)
        return (at_corners.min(dim=1).values != at_corners.max(dim=1).values)[self.inverse]


def _unique_rows(index: torch.Tensor, shape: list) -> torch.Tensor:
    """The distinct rows of (N, 3) grid indices, sorted (``torch.unique(dim=0)`` takes a minute on millions)."""
    flat = ((index[:, 0] * shape[1] + index[:, 1]) * shape[2] + index[:, 2]).numpy()
    flat = torch.from_numpy(np.unique(flat))
    return torch.stack([flat // (shape[1] * shape[2]), (flat // shape[2]) % shape[1], flat % shape[2]], dim=1)


def _bounding_box(mask: torch.Tensor) -> tuple:
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(mask.any(dim=other[1]).any(dim=other[0]))[:, 0]
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return lo, hi


class EmphysemaInferer(Inferer):
    """``inferer(inputs, network)``: (B, 5, X, Y, Z) scan channels (``dense_input.scan_channels``) -> (B, C, X, Y, Z)
    class probabilities, healthy outside the lung (see the module docstring).

    Args:
        stride: grid spacing in voxels (1 = every lung voxel, the brute force).
        min_stride: refine cells whose corners disagree down to this spacing (capped at ``stride``);
            ``None`` = no refinement. The defaults (32 refined to 8) are measured against the
            step-1 brute force in ``bundle/docs/emphysema.md``.
        threshold: subtype probability that makes a voxel emphysema (the paper uses 0.5).
        folded: evaluate the Loc-CondConv classifier through ``custom.emphysema.folded_classifier`` (same
            numbers, 1.3-1.7x faster on 2 CPU cores in the benchmark); False, or any other network, calls the
            network's forward.
        batch_size: patches per network call.
        progress: show a tqdm progress bar over the evaluated patches.
        interpolation: ``"logits"`` or ``"probabilities"``: what is interpolated between evaluated points.
    """

    def __init__(
        self,
        stride: int = 32,
        min_stride: int | None = 8,
        threshold: float = 0.5,
        batch_size: int = 8,
        progress: bool = False,
        folded: bool = True,
        interpolation: str = "probabilities",
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.interpolation = interpolation
        if int(stride) < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if min_stride is not None and int(min_stride) < 1:
            raise ValueError(f"min_stride must be >= 1, got {min_stride}")
        self.stride = int(stride)
        self.min_stride = min(int(min_stride), self.stride) if min_stride is not None else self.stride
        self.threshold = float(threshold)
        self.folded = as_bool(folded)
        self.batch_size = int(batch_size)
        self.progress = as_bool(progress)
        self.last_evaluations = 0  # network evaluations of the last call (patches), for benchmarks and logs

    def strides(self) -> list:
        """The grid spacings visited: ``stride``, halved until ``min_stride``."""
        out = [self.stride]
        while out[-1] > self.min_stride:
            out.append(max(self.min_stride, out[-1] // 2))
        return out

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        if inputs.dim() != 5 or inputs.shape[1] != LUNG_CHANNEL + 1:
            raise ValueError(
                f"EmphysemaInferer expects (B, {LUNG_CHANNEL + 1}, X, Y, Z) scan channels "
                f"(intensity, location x3, lung mask), got {tuple(inputs.shape)}"
            )
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        with torch.inference_mode():
            out = torch.stack([self.probability_map(x, network) for x in plain.detach().cpu()])
        out = out.to(inputs.device)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
            out.is_batch = inputs.is_batch
        return out

    def probability_map(self, channels: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        """(C, X, Y, Z) probabilities of one (5, X, Y, Z) scan."""
        from tqdm.auto import tqdm

        channels = channels.float().contiguous()
        lung = channels[LUNG_CHANNEL] > 0.5
        head = map_values(network, log=self.interpolation == "logits")
        num_classes = len(EMPHYSEMA_CLASSES)
        out = torch.zeros((num_classes, *lung.shape), dtype=torch.float32)
        out[HEALTHY] = 1.0
        self.last_evaluations = 0
        if not bool(lung.any()):
            return out
        lo, hi = _bounding_box(lung)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        lung_box = lung[box]
        result = out[(slice(None), *box)]  # a view: filled level by level
        # evaluated points (sorted flat voxel indices and probabilities): nested grids reuse their shared points
        cache = {"keys": np.zeros(0, dtype=np.int64), "values": torch.zeros((0, head.width))}
        bar = tqdm(desc="emphysema map", unit="patch", disable=not self.progress)
        # weights are read now, not at construction: a bundle loads them after building the inferer
        classifier = fold(network) if self.folded and supports_folding(network) else None
        strides = self.strides()
        voxels = torch.zeros((0, 3), dtype=torch.long)  # box voxels to redo at the current level
        for level, stride in enumerate(strides):
            grids = [_AxisGrid(lo[a], hi[a], stride) for a in range(3)]
            if level == 0:  # every lung voxel: separable interpolation over the lung's bounding box
                needed = _needed_corners(lung_box, grids)
                points = torch.nonzero(needed)
            else:  # only the voxels of cells that straddle a label border: corner by corner
                corners = _VoxelCorners(voxels, grids)
                points = _unique_rows(corners.corners.reshape(-1, 3), [len(g) for g in grids])
            centres = torch.stack([torch.from_numpy(grids[a].positions)[points[:, a]] for a in range(3)], dim=1)
            values = self._evaluate(network, channels, centres, cache, bar, head, classifier)
            grid_values = torch.full((head.width, *(len(g) for g in grids)), float("nan"))
            grid_values[:, points[:, 0], points[:, 1], points[:, 2]] = values.T
            last = level == len(strides) - 1
            labels = None if last else decide_labels(head.probabilities(grid_values), self.threshold)
            if level == 0:
                result.copy_(head.probabilities(_interpolate(grid_values, grids)))
                if last:
                    break
                voxels = torch.nonzero(lung_box & _straddling(labels, grids))
            else:
                result[:, voxels[:, 0], voxels[:, 1], voxels[:, 2]] = head.probabilities(
                    corners.interpolate(grid_values)
                )
                if last:
                    break
                voxels = voxels[corners.straddling(labels)]
            if len(voxels) == 0:
                break
        bar.close()
        result[:, ~lung_box] = 0.0
        result[HEALTHY, ~lung_box] = 1.0
        return out

    def _evaluate(self, network, channels, centres, cache, bar, head, classifier=None) -> torch.Tensor:
        """The values to interpolate (``head``: ``map_values``) at integer ``centres`` (N, 3), computing only those
        not already in ``cache`` (sorted flat voxel indices ``keys`` and their ``values``)."""
        shape = channels.shape[1:]
        keys = ((centres[:, 0] * shape[1] + centres[:, 1]) * shape[2] + centres[:, 2]).numpy()
        todo = np.nonzero(~np.isin(keys, cache["keys"]))[0]
        if len(todo):
            todo_t = torch.from_numpy(todo)
            chunk = self.batch_size * 8
            bar.total = (bar.total or 0) + len(todo)
            parts = []
            for start in range(0, len(todo_t), chunk):
                part = centres[todo_t[start : start + chunk]]
                if classifier is not None:
                    outputs = folded_outputs_at(classifier, channels, part, self.batch_size)
                else:
                    outputs = outputs_at(network, channels, part, self.batch_size)
                parts.append(head.values(outputs))
                bar.update(len(part))
            self.last_evaluations += len(todo)
            all_keys = np.concatenate([cache["keys"], keys[todo]])
            all_values = torch.cat([cache["values"], torch.cat(parts)]) if len(cache["keys"]) else torch.cat(parts)
            order = np.argsort(all_keys, kind="stable")
            cache["keys"], cache["values"] = all_keys[order], all_values[torch.from_numpy(order)]
        if not len(keys):
            return torch.zeros((0, head.width))
        return cache["values"][torch.from_numpy(np.searchsorted(cache["keys"], keys))]
