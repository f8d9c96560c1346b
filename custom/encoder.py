"""The DrasCLR encoder e(x, p) with its projection head g (paper §3, reference widths).

Every convolution is a 3x3x3 Loc-CondConv (padding 1) followed by BatchNorm and ELU. A 32^3 patch ends at
1^3 with 128 channels, so the representation h is 128-d; the head is Linear-ReLU-Linear. Layer names follow
the released checkpoint (conv1, bn1, conv2, bn2, downsample1..3.{conv,bn}1..3, conv3, bn3, conv4, bn4, fc)
so importing official weights is a key-for-key mapping.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from custom.loc_condconv import LocCondConv3d


class DownsampleBlock(nn.Module):
    """[conv, conv, conv stride 2], each followed by BN and ELU."""

    def __init__(self, in_channels: int, out_channels: int, num_experts: int, mode: str):
        super().__init__()
        self.conv1 = LocCondConv3d(in_channels, out_channels, num_experts=num_experts, mode=mode)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.conv2 = LocCondConv3d(out_channels, out_channels, num_experts=num_experts, mode=mode)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.conv3 = LocCondConv3d(out_channels, out_channels, stride=2, num_experts=num_experts, mode=mode)
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
    ):
        super().__init__()
        self.representation_dim = representation_dim
        self.projection_dim = projection_dim
        self.conv1 = LocCondConv3d(in_channels, 8, num_experts=num_experts, mode=mode)
        self.bn1 = nn.BatchNorm3d(8)
        self.conv2 = LocCondConv3d(8, 8, stride=2, num_experts=num_experts, mode=mode)
        self.bn2 = nn.BatchNorm3d(8)
        self.downsample1 = DownsampleBlock(8, 16, num_experts, mode)
        self.downsample2 = DownsampleBlock(16, 32, num_experts, mode)
        self.downsample3 = DownsampleBlock(32, 64, num_experts, mode)
        self.conv3 = LocCondConv3d(64, 128, num_experts=num_experts, mode=mode)
        self.bn3 = nn.BatchNorm3d(128)
        self.conv4 = LocCondConv3d(128, representation_dim, stride=2, num_experts=num_experts, mode=mode)
        self.bn4 = nn.BatchNorm3d(representation_dim)
        self.act = nn.ELU()
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
        return x.mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor, location: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.represent(x, location)
        return h, self.fc(h)
