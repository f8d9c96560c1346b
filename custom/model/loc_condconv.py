"""Loc-CondConv: a 3D convolution whose kernel is a location-dependent mix of N expert kernels (paper eq. 3-4).

W(p) = sum_n alpha_n(p) W_n with alpha = sigmoid(Linear(3 -> N)(p)); one conv bias is shared by the experts.
The reference evaluates this one sample at a time. Here the whole batch runs in one call, either as one
grouped convolution with a per-sample kernel (``mode="grouped"``; a batch that shares one location, as in the
reference's batch order, takes a single ordinary convolution) or, using linearity, as one ordinary
convolution with all N expert kernels followed by the alpha-weighted sum of the N outputs
(``mode="experts"``). Both give the numbers of the one-sample definition (``mode="per_sample"``, kept for
tests and benchmarks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("grouped", "experts", "per_sample")
INITS = ("reference", "torch")


def per_sample_conv3d(
    x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """Convolve sample b of ``x`` (B, C, ...) with ``kernels[b]`` (B, O, C, k, k, k) in one grouped convolution."""
    b, out_channels, in_channels, k = kernels.shape[0], kernels.shape[1], kernels.shape[2], kernels.shape[3]
    grouped_input = x.reshape(1, b * in_channels, x.shape[2], x.shape[3], x.shape[4])
    grouped_kernels = kernels.reshape(b * out_channels, in_channels, k, k, k)
    if in_channels == 1:
        # One channel per group: oneDNN's channels-last kernel is much faster on CPU.
        grouped_input = grouped_input.contiguous(memory_format=torch.channels_last_3d)
        grouped_kernels = grouped_kernels.contiguous(memory_format=torch.channels_last_3d)
    out = F.conv3d(grouped_input, grouped_kernels, None, stride, padding, 1, b)
    out = out.contiguous().view(b, out_channels, out.shape[2], out.shape[3], out.shape[4])
    return out if bias is None else out + bias.view(1, -1, 1, 1, 1)


class LocationRouting(nn.Module):
    """alpha(p) = sigmoid(W_r p + b): one mixing weight per expert kernel, from the atlas location."""

    def __init__(self, num_coordinates: int, num_experts: int):
        super().__init__()
        self.fc = nn.Linear(num_coordinates, num_experts)

    def forward(self, location: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(location))


class LocCondConv3d(nn.Module):
    """3D convolution conditioned on an atlas location ``p`` of shape (B, 3)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        num_experts: int = 8,
        num_coordinates: int = 3,
        bias: bool = True,
        mode: str = "grouped",
        init: str = "reference",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"LocCondConv3d mode must be one of {MODES}, got {mode!r}")
        if init not in INITS:
            raise ValueError(f"LocCondConv3d init must be one of {INITS}, got {init!r}")
        self.init = init
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.num_experts = num_experts
        self.mode = mode
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels, kernel_size, kernel_size, kernel_size)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.routing = LocationRouting(num_coordinates, num_experts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``reference``: the authors' layer subclasses torch's conv and re-runs its initialisation on the whole
        (N, out, in, k, k, k) tensor, so kaiming-uniform sees fan-in out*in*k^3 and the kernels and bias start
        sqrt(out) times smaller than one Conv3d's; the released weights were trained from that start.
        ``torch``: each expert kernel gets one Conv3d's initialisation (fan-in in*k^3)."""
        if self.init == "reference":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            fan_in = self.weight.shape[1] * self.weight[0, 0].numel()
        else:
            for expert in self.weight:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            fan_in = self.in_channels * self.kernel_size**3
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def mixed_kernels(self, location: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels (B, out, in, k, k, k) = sum_n alpha_n(p_b) W_n."""
        alpha = self.routing(location)
        return torch.mm(alpha, self.weight.flatten(1)).view((alpha.shape[0],) + self.weight.shape[1:])

    def forward(self, x: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        if self.mode == "grouped":
            return self._forward_grouped(x, location)
        if self.mode == "experts":
            return self._forward_experts(x, location)
        return self._forward_per_sample(x, location)

    def _forward_grouped(self, x: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if b > 1 and bool((location == location[0:1]).all()):
            # One location for the whole batch (the reference's batch order): one kernel, one plain conv.
            kernel = self.mixed_kernels(location[0:1])[0]
            return F.conv3d(x, kernel, self.bias, self.stride, self.padding)
        return per_sample_conv3d(x, self.mixed_kernels(location), self.bias, self.stride, self.padding)

    def _forward_experts(self, x: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        alpha = self.routing(location)
        stacked = self.weight.reshape(
            self.num_experts * self.out_channels, self.in_channels, self.kernel_size, self.kernel_size, self.kernel_size
        )
        out = F.conv3d(x, stacked, None, self.stride, self.padding)
        out = out.reshape(b, self.num_experts, self.out_channels, out.shape[2], out.shape[3], out.shape[4])
        out = torch.einsum("bn,bnoxyz->boxyz", alpha, out)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1, 1)
        return out

    def _forward_per_sample(self, x: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        """The paper's definition, one sample at a time (the reference implementation's loop)."""
        outputs = []
        for i in range(x.shape[0]):
            alpha = self.routing(location[i : i + 1])[0]
            kernel = (alpha.view(-1, 1, 1, 1, 1, 1) * self.weight).sum(0)
            outputs.append(F.conv3d(x[i : i + 1], kernel, self.bias, self.stride, self.padding))
        return torch.cat(outputs, 0)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, num_experts={self.num_experts}, mode={self.mode}, init={self.init}"
        )


def set_loc_condconv_mode(module: nn.Module, mode: str) -> nn.Module:
    """Switch every Loc-CondConv layer of ``module`` to ``mode`` (weights are unchanged)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for layer in module.modules():
        if isinstance(layer, LocCondConv3d):
            layer.mode = mode
    return module
