"""Ways to feed the atlas location p into the encoder, for the ablation of paper §4.4.1 (Table 6).

Every layer here has the call signature of :class:`custom.model.loc_condconv.LocCondConv3d`, ``forward(x, location)``
with ``location`` (B, 3), so the encoder swaps them without other changes:

- ``loc_condconv`` (the method): W(p) = sum_n alpha_n(p) W_n (``custom.model.loc_condconv``).
- ``none``: an ordinary 3x3x3 convolution; the location is ignored.
- ``concatenation``: ordinary convolutions; p joins the pooled 128-d feature of the last layer and the two are
  fused by a fully connected layer (:class:`LocationFusion`). This is the design §4.4.1 names (the last-layer
  feature concatenated with the coordinate, then fully connected layers), not per-layer input channels.
- ``hypernetwork``: each convolution owns a small fully connected network p -> its 3x3x3 kernel
  (:class:`HyperConv3d`). The generator is a two-hidden-layer MLP whose linear output layer writes the whole
  kernel, with the output bias acting as a location-independent base kernel; its hidden width (8) is chosen so
  the layer has about as many parameters as a Loc-CondConv layer with 8 experts (9 vs 8 kernel-sized blocks).
  Unlike Loc-CondConv, the kernel is an unconstrained (signed, deeper) function of p, not a sigmoid-gated
  mixture of experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from custom.model.loc_condconv import LocCondConv3d, per_sample_conv3d

CONDITIONINGS = ("loc_condconv", "none", "concatenation", "hypernetwork")


class PlainConv3d(nn.Conv3d):
    """A standard 3D convolution that accepts (and ignores) the location, so it drops into the encoder."""

    def forward(self, x: torch.Tensor, location: torch.Tensor | None = None) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class HyperConv3d(nn.Module):
    """3D convolution whose kernel is generated from p by a per-layer MLP: W(p) = B + V relu(MLP(p))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        hidden: int = 8,
        num_coordinates: int = 3,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.kernel_shape = (out_channels, in_channels, kernel_size, kernel_size, kernel_size)
        self.embed = nn.Sequential(
            nn.Linear(num_coordinates, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, hidden), nn.ReLU()
        )
        self.generator = nn.Linear(hidden, math.prod(self.kernel_shape))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Base kernel (the generator's bias) and each generated direction start at torch's Conv3d scale; the
        # directions are shrunk by 1/sqrt(hidden) so the initial kernels keep roughly that scale.
        fan_in = self.in_channels * self.kernel_size**3
        bound = 1.0 / math.sqrt(fan_in)
        base = torch.empty(self.kernel_shape)
        nn.init.kaiming_uniform_(base, a=math.sqrt(5))
        with torch.no_grad():
            self.generator.bias.copy_(base.flatten())
            directions = torch.empty(self.generator.weight.shape[1], *self.kernel_shape)
            for d in directions:
                nn.init.kaiming_uniform_(d, a=math.sqrt(5))
            self.generator.weight.copy_(directions.flatten(1).t() / math.sqrt(len(directions)))
        nn.init.uniform_(self.bias, -bound, bound)

    def kernels(self, location: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels (B, out, in, k, k, k)."""
        k = self.kernel_size
        return self.generator(self.embed(location)).view(
            location.shape[0], self.out_channels, self.in_channels, k, k, k
        )

    def forward(self, x: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        location = location.to(x.dtype)
        if x.shape[0] > 1 and bool((location == location[0:1]).all()):
            # One location for the whole batch (the reference's batch order): one kernel, one plain conv.
            return F.conv3d(x, self.kernels(location[0:1])[0], self.bias, self.stride, self.padding)
        return per_sample_conv3d(x, self.kernels(location), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class LocationFusion(nn.Module):
    """Concatenation conditioning: h' = ELU(Linear([h, p])), the fully connected fusion after the last conv."""

    def __init__(self, feature_dim: int, num_coordinates: int = 3):
        super().__init__()
        self.fc = nn.Linear(feature_dim + num_coordinates, feature_dim)
        self.act = nn.ELU()

    def forward(self, features: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(torch.cat([features, location.to(features.dtype)], dim=1)))


class NoFusion(nn.Module):
    """Every conditioning but concatenation: the pooled feature is the representation (no parameters)."""

    def forward(self, features: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        return features


def location_fusion(conditioning: str, feature_dim: int) -> nn.Module:
    """The module applied to the pooled last-layer feature and p: a fusion layer for concatenation only."""
    return LocationFusion(feature_dim) if check_conditioning(conditioning) == "concatenation" else NoFusion()


def check_conditioning(conditioning: str) -> str:
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
    return conditioning


def conditioned_conv3d(
    conditioning: str,
    in_channels: int,
    out_channels: int,
    stride: int = 1,
    num_experts: int = 8,
    mode: str = "grouped",
    init: str = "reference",
) -> nn.Module:
    """The 3x3x3 (padding 1) convolution of one encoder layer under ``conditioning`` (``init`` applies to
    Loc-CondConv: see :meth:`custom.model.loc_condconv.LocCondConv3d.reset_parameters`)."""
    check_conditioning(conditioning)
    if conditioning == "loc_condconv":
        return LocCondConv3d(in_channels, out_channels, stride=stride, num_experts=num_experts, mode=mode, init=init)
    if conditioning == "hypernetwork":
        return HyperConv3d(in_channels, out_channels, stride=stride)
    return PlainConv3d(in_channels, out_channels, 3, stride=stride, padding=1)
