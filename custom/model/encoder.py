"""The DrasCLR encoder e(x, p) with its projection head g (paper §3, reference widths).

Every convolution is a 3x3x3 Loc-CondConv (padding 1) followed by BatchNorm and ELU. A 32^3 patch ends at
1^3 with 128 channels, so the representation h is 128-d; the head is Linear-ReLU-Linear. Layer names follow
the released checkpoint (conv1, bn1, conv2, bn2, downsample1..3.{conv,bn}1..3, conv3, bn3, conv4, bn4, fc)
so importing official weights is a key-for-key mapping.

``conditioning`` swaps how p enters (paper §4.4.1 ablation, ``custom.model.conditioning``); the default
"loc_condconv" is the method, with exactly the layers and state-dict keys above.
"""

from __future__ import annotations

import torch
from torch import nn

from custom.model.conditioning import check_conditioning, conditioned_conv3d, location_fusion


class DownsampleBlock(nn.Module):
    """[conv, conv, conv stride 2], each followed by BN and ELU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_experts: int,
        mode: str,
        conditioning: str = "loc_condconv",
        init: str = "reference",
    ):
        super().__init__()

        def conv(i: int, o: int, stride: int = 1) -> nn.Module:
            return conditioned_conv3d(conditioning, i, o, stride, num_experts, mode, init)

        self.conv1 = conv(in_channels, out_channels)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.conv2 = conv(out_channels, out_channels)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.conv3 = conv(out_channels, out_channels, 2)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x, location)))
        x = self.act(self.bn2(self.conv2(x, location)))
        return self.act(self.bn3(self.conv3(x, location)))


class DrasCLREncoder(nn.Module):
    """f(x, p) = g(e(x, p)); ``forward`` returns (h, z): the representation and its projection."""

    def __init__(
        self,
        in_channels: int = 1,
        representation_dim: int = 128,
        projection_dim: int = 128,
        num_experts: int = 8,
        mode: str = "grouped",
        conditioning: str = "loc_condconv",
        init: str = "reference",
    ):
        super().__init__()
        self.representation_dim = representation_dim
        self.projection_dim = projection_dim
        self.num_experts = num_experts
        self.conditioning = check_conditioning(conditioning)

        def conv(i: int, o: int, stride: int = 1) -> nn.Module:
            return conditioned_conv3d(conditioning, i, o, stride, num_experts, mode, init)

        self.conv1 = conv(in_channels, 8)
        self.bn1 = nn.BatchNorm3d(8)
        self.conv2 = conv(8, 8, 2)
        self.bn2 = nn.BatchNorm3d(8)
        self.downsample1 = DownsampleBlock(8, 16, num_experts, mode, conditioning, init)
        self.downsample2 = DownsampleBlock(16, 32, num_experts, mode, conditioning, init)
        self.downsample3 = DownsampleBlock(32, 64, num_experts, mode, conditioning, init)
        self.conv3 = conv(64, 128)
        self.bn3 = nn.BatchNorm3d(128)
        self.conv4 = conv(128, representation_dim, 2)
        self.bn4 = nn.BatchNorm3d(representation_dim)
        self.act = nn.ELU()
        self.location_fusion = location_fusion(conditioning, representation_dim)
        self.fc = nn.Sequential(
            nn.Linear(representation_dim, representation_dim), nn.ReLU(), nn.Linear(representation_dim, projection_dim)
        )

    def represent(self, x: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        """e(x, p): the 128-d representation used downstream (paper eq. 10)."""
        x = self.act(self.bn1(self.conv1(x, location)))
        x = self.act(self.bn2(self.conv2(x, location)))
        x = self.downsample1(x, location)
        x = self.downsample2(x, location)
        x = self.downsample3(x, location)
        x = self.act(self.bn3(self.conv3(x, location)))
        x = self.act(self.bn4(self.conv4(x, location)))
        # A 32^3 patch ends at 1^3; average any spatial remainder so other patch sizes still give a vector.
        return self.location_fusion(x.mean(dim=(2, 3, 4)), location)

    def forward(self, x: torch.Tensor, location: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.represent(x, location)
        return h, self.fc(h)
