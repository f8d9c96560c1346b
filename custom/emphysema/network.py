"""The emphysema patch classifier: DrasCLR encoder + one linear layer (paper §4.3.1).

Same single-tensor input as ``DrasCLRNetwork`` (B, 4, 32, 32, 32): normalised intensity + 3 atlas-location
channels, location read at the patch centre. Output: class logits (B, C) for ``EMPHYSEMA_CLASSES``. The voxel
maps made with it use ``MAP_LABELS`` (0 background = outside the lung, then the classes: 1 healthy lung, ...).
The state dict holds ``encoder.*`` (the same keys as ``models/pretrained.pt`` from pre-training, so pre-trained
weights load with ``load_pretrained_encoder``) and ``classifier.*``.

``freeze_encoder=True`` is the paper's linear readout: the encoder is a fixed feature extractor (eval mode,
no gradients); ``False`` is full fine-tuning. The configs build it as ``classifier_def`` from the architecture
id ``encoder_def`` (``configs/network.yaml``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from custom.model.network import DrasCLRNetwork
from custom.model.weights import encoder_state, load_into

EMPHYSEMA_CLASSES = ("healthy", "centrilobular", "paraseptal")
NUM_EMPHYSEMA_CLASSES = len(EMPHYSEMA_CLASSES)

# The emphysema MAP's label values (emphysema_mask.nii.gz, reports, pictures, MONAI Label): 0 is outside the lung,
# so that healthy lung (1) is told apart from background; a lung voxel's label is its class index + 1.
MAP_LABELS = ("background",) + EMPHYSEMA_CLASSES
BACKGROUND_LABEL = 0
HEALTHY_LABEL = MAP_LABELS.index("healthy")
SUBTYPE_LABELS = {name: MAP_LABELS.index(name) for name in EMPHYSEMA_CLASSES if name != "healthy"}


class EmphysemaNetwork(DrasCLRNetwork):
    def __init__(
        self,
        num_classes: int = NUM_EMPHYSEMA_CLASSES,
        representation_dim: int = 128,
        projection_dim: int = 128,
        num_experts: int = 8,
        freeze_encoder: bool = False,
        mode: str = "grouped",
        conditioning: str = "loc_condconv",
    ):
        super().__init__(
            representation_dim,
            projection_dim,
            num_experts,
            output="representation",
            mode=mode,
            conditioning=conditioning,
        )
        self.classifier = nn.Linear(representation_dim, num_classes)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a fixed feature extractor keeps its BatchNorm statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_encoder:
            with torch.no_grad():
                h = self.embed(x)
        else:
            h = self.embed(x)
        return self.classifier(h)


def load_pretrained_encoder(network: EmphysemaNetwork, model_path: str | Path) -> EmphysemaNetwork:
    """Copy pre-trained ``encoder.*`` weights (``models/pretrained.pt``) into ``network``.

    Raises when an encoder key is missing, so a wrong file fails loudly instead of leaving random weights.
    """
    load_into(network.encoder, encoder_state(model_path, strip_prefix=True), model_path, "encoder")
    return network
