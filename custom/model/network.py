"""The single-tensor ``network_def`` that MONAI inferers, TorchScript, verify_net_in_out and MONAI Label expect.

Input (B, 4, S, S, S): channel 0 is the normalised intensity, channels 1-3 the normalised atlas location p of
every voxel (DESIGN.md "Location"). The location routing the Loc-CondConv kernels is read at the patch centre
voxel (index S // 2: a landmark's patch spans centre - 16 .. centre + 15). Output: the 128-d representation
e(x, p) (paper eq. 10), or the projection z when ``output="projection"``. ``conditioning`` selects an ablation
encoder (``custom.model.conditioning``); the default is the method's Loc-CondConv encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from custom.model.encoder import DrasCLREncoder

OUTPUTS = ("representation", "projection")


class DrasCLRNetwork(nn.Module):
    def __init__(
        self,
        representation_dim: int = 128,
        projection_dim: int = 128,
        num_experts: int = 8,
        output: str = "representation",
        mode: str = "grouped",
        conditioning: str = "loc_condconv",
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.output = output
        self.encoder = DrasCLREncoder(
            in_channels=1,
            representation_dim=representation_dim,
            projection_dim=projection_dim,
            num_experts=num_experts,
            mode=mode,
            conditioning=conditioning,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation (or projection) of the 4-channel input; subclasses call this instead of
        ``super().forward``, which TorchScript cannot compile."""
        if x.dim() != 5 or x.shape[1] != 4:
            raise ValueError("DrasCLRNetwork expects (B, 4, S, S, S): intensity + 3 atlas-location channels")
        centre = x.shape[2] // 2, x.shape[3] // 2, x.shape[4] // 2
        location = x[:, 1:4, centre[0], centre[1], centre[2]]
        h, z = self.encoder(x[:, 0:1], location)
        if self.output == "projection":
            return z
        return h


def network_input(intensity: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
    """Build the 4-channel input from (B, 1, S, S, S) intensity and a (B, 3) patch-centre location.

    The location is broadcast over the patch; for dense maps, callers fill channels 1-3 voxel by voxel instead.
    """
    b, _, sx, sy, sz = intensity.shape
    loc = location.to(intensity.dtype).view(b, 3, 1, 1, 1).expand(b, 3, sx, sy, sz)
    return torch.cat([intensity, loc], dim=1)
