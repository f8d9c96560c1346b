"""The emphysema patch classifiers: DrasCLR encoder + one linear layer (paper §4.3.1), and the map model.

Same single-tensor input as ``DrasCLRNetwork`` (B, 4, 32, 32, 32): normalised intensity + 3 atlas-location
channels, location read at the patch centre. Output: class logits (B, C) for ``EMPHYSEMA_CLASSES``. The voxel
maps made with it use ``MAP_LABELS`` (0 background = outside the lung, then the classes: 1 healthy lung, ...).
The state dict holds ``encoder.*`` (the same keys as ``models/pretrained.pt`` from pre-training, so pre-trained
weights load with ``load_pretrained_encoder``) and ``classifier.*``.

``freeze_encoder=True`` is the paper's linear readout: the encoder is a fixed feature extractor (eval mode,
no gradients); ``False`` is full fine-tuning. The configs build it as ``classifier_def`` from the architecture
id ``encoder_def`` (``configs/network.yaml``).

``EmphysemaDetectors`` is the deployable map model (``models/model.pt``, the configs' ``classifier_def``): the paper's
one binary detector per subtype (healthy vs that subtype, each an ``EmphysemaNetwork(num_classes=2)``), side by side.
Its output (B, K) is each detector's log-odds of its subtype; a voxel's subtype probability is the sigmoid of it, and
where several subtypes reach the threshold the map takes the most probable (``detector_probabilities``).
``EmphysemaNetwork(num_classes=3)``, the 3-class softmax of earlier versions, is a documented extra, not the paper's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from custom.errors import InputError
from custom.model.network import DrasCLRNetwork
from custom.model.weights import encoder_state, load_into, read_state

EMPHYSEMA_CLASSES = ("healthy", "centrilobular", "paraseptal")
NUM_EMPHYSEMA_CLASSES = len(EMPHYSEMA_CLASSES)

# The emphysema MAP's label values (emphysema_mask.nii.gz, reports, pictures, MONAI Label): 0 is outside the lung,
# so that healthy lung (1) is told apart from background; a lung voxel's label is its class index + 1.
MAP_LABELS = ("background",) + EMPHYSEMA_CLASSES
BACKGROUND_LABEL = 0
HEALTHY_LABEL = MAP_LABELS.index("healthy")
SUBTYPE_LABELS = {name: MAP_LABELS.index(name) for name in EMPHYSEMA_CLASSES if name != "healthy"}
SUBTYPES = tuple(SUBTYPE_LABELS)  # the subtypes with a binary detector, in class order


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


class EmphysemaDetectors(nn.Module):
    """One binary detector per subtype (``detectors[subtype]``: output 0 healthy, 1 the subtype), trained each on
    healthy boxes vs that subtype's boxes (paper §4.3.1). ``forward`` returns (B, K) log-odds, one per subtype in
    ``subtypes`` order (logit 1 minus logit 0 of its detector: its softmax probability is the sigmoid)."""

    def __init__(
        self,
        subtypes: tuple = SUBTYPES,
        representation_dim: int = 128,
        projection_dim: int = 128,
        num_experts: int = 8,
        freeze_encoder: bool = False,
        mode: str = "grouped",
        conditioning: str = "loc_condconv",
    ):
        super().__init__()
        unknown = [name for name in subtypes if name not in SUBTYPES]
        if unknown or not subtypes:
            raise ValueError(f"subtypes must be a non-empty selection of {SUBTYPES}, got {list(subtypes)}")
        self.subtypes = tuple(subtypes)
        self.freeze_encoder = bool(freeze_encoder)
        self.detectors = nn.ModuleDict(
            {
                name: EmphysemaNetwork(
                    2, representation_dim, projection_dim, num_experts, freeze_encoder, mode, conditioning
                )
                for name in self.subtypes
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([log_odds(detector(x)) for detector in self.detectors.values()], dim=1)

    def detector_logits(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits of detector ``index`` (training: each detector sees only its own boxes)."""
        return self.detectors[self.subtypes[index]](x)


def same_encoders(detectors: list) -> bool:
    """True when every detector holds bit-identical encoder weights and BatchNorm statistics (linear readouts of
    one pre-trained encoder): features computed once then serve all of them."""
    first = detectors[0].encoder.state_dict()
    return all(
        all(torch.equal(first[key], value) for key, value in d.encoder.state_dict().items()) for d in detectors[1:]
    )


def log_odds(binary_logits: torch.Tensor) -> torch.Tensor:
    """(B,) log-odds of output 1 of a binary detector's (B, 2) logits."""
    return binary_logits[:, 1] - binary_logits[:, 0]


def detector_probabilities(subtype_probabilities: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Class probabilities in ``EMPHYSEMA_CLASSES`` order from per-subtype detector probabilities (K along ``dim``):
    "healthy" is 1 minus the largest subtype probability (no detector fires where it exceeds 0.5); the subtype
    channels are the detectors' own. The map's rule (``sliding_window.decide_labels``) then takes, among the
    subtypes at or above the threshold, the most probable one."""
    healthy = 1.0 - subtype_probabilities.amax(dim=dim, keepdim=True)
    return torch.cat([healthy, subtype_probabilities], dim=dim)


def load_pretrained_encoder(
    network: EmphysemaNetwork | EmphysemaDetectors, model_path: str | Path
) -> EmphysemaNetwork | EmphysemaDetectors:
    """Copy pre-trained ``encoder.*`` weights (``models/pretrained.pt``) into ``network`` (into every detector of
    ``EmphysemaDetectors``).

    Raises when an encoder key is missing, so a wrong file fails loudly instead of leaving random weights.
    """
    state = encoder_state(model_path, strip_prefix=True)
    targets = network.detectors.values() if isinstance(network, EmphysemaDetectors) else [network]
    for target in targets:
        load_into(target.encoder, state, model_path, "encoder")
    return network


def require_fitting_model(network: nn.Module, model_path: str | Path) -> Path:
    """``model_path`` when its weights fit ``network`` (same keys), else one ``InputError`` line saying what the
    file holds and how to proceed (a 3-class model of bundle <= 0.6 meets the detectors of later versions)."""
    state = read_state(model_path)
    wanted, held = set(network.state_dict()), set(state)
    if wanted == held:
        return Path(model_path)
    if isinstance(network, EmphysemaDetectors) and "classifier.weight" in state:
        raise InputError(
            f"{model_path}: a single classifier with {state['classifier.weight'].shape[0]} outputs, not per-subtype "
            "detectors: re-run the finetune workflow, or map with it: "
            "--classifier_def#_target_ custom.emphysema.network.EmphysemaNetwork"
        )
    missing, extra = sorted(wanted - held), sorted(held - wanted)
    raise InputError(
        f"{model_path}: weights do not fit {type(network).__name__} "
        f"(missing {len(missing)} keys such as {missing[:1]}, unexpected {len(extra)} such as {extra[:1]})"
    )
