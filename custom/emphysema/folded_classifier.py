"""The emphysema classifier's eval-mode arithmetic rearranged for speed; same numbers as the network.

A map evaluates thousands of patches, each routed by its own atlas location, so every Loc-CondConv layer needs
one kernel per patch. The training-time layer (``LocCondConv3d``, mode "grouped") mixes the per-patch kernels
for every layer and then normalises and activates in separate passes (on 2 CPU cores, batch 16: 123-161
patches/s; this module: 180-229, same patches, in ``bundle/scripts/benchmark_emphysema.py``).
Here, once per set of weights, each layer's BatchNorm is folded into its expert kernels (BN(conv(x, W) + b) is
affine in W, so it commutes with the expert mix), and each layer takes the cheaper of two exact forms:
- high resolution, small kernels: mix one kernel per patch and run one grouped convolution;
- low resolution (<= 8 output voxels), large kernels: convolve with all experts at once and mix the outputs,
  which avoids building a 128x128x27 kernel per patch.
followed by an in-place ELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from custom.emphysema.dense_input import intensity_patches_at, probabilities_at
from custom.emphysema.network import EmphysemaDetectors, log_odds, same_encoders
from custom.model.loc_condconv import LocCondConv3d, per_sample_conv3d

# a layer whose output has at most this many voxels per patch convolves with all experts and mixes the outputs
EXPERTS_FORM_MAX_VOXELS = 8


def _conv_bn_pairs(encoder: nn.Module) -> list:
    """(Loc-CondConv, BatchNorm) pairs in the order ``DrasCLREncoder.represent`` applies them."""
    pairs = [(encoder.conv1, encoder.bn1), (encoder.conv2, encoder.bn2)]
    for block in (encoder.downsample1, encoder.downsample2, encoder.downsample3):
        pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
    return pairs + [(encoder.conv3, encoder.bn3), (encoder.conv4, encoder.bn4)]


def supports_folding(network: nn.Module) -> bool:
    """True for an eval-mode classifier (``encoder`` + linear ``classifier``) with the method's Loc-CondConv
    encoder, or ``EmphysemaDetectors`` of such; anything else (ablation encoders, TorchScript) is evaluated
    through its own forward."""
    if isinstance(network, EmphysemaDetectors):
        return not network.training and all(supports_folding(d) for d in network.detectors.values())
    encoder = getattr(network, "encoder", None)
    return (
        isinstance(network, nn.Module)
        and not network.training
        and isinstance(getattr(network, "classifier", None), nn.Linear)
        and getattr(encoder, "conditioning", None) == "loc_condconv"
        and isinstance(getattr(encoder, "act", None), nn.ELU)
        and all(
            isinstance(conv, LocCondConv3d) and isinstance(bn, nn.BatchNorm3d) for conv, bn in _conv_bn_pairs(encoder)
        )
    )


class FoldedClassifier:
    """``classifier(patches, locations)``: logits (B, C) of (B, 1, 32, 32, 32) intensity patches routed by
    their (B, 3) locations. Weights are read when it is built: build a new one after loading weights."""

    def __init__(self, network: nn.Module, patch_size: int = 32):
        if not supports_folding(network):
            raise ValueError("FoldedClassifier needs an eval-mode EmphysemaNetwork with the Loc-CondConv encoder")
        self.layers = []
        size = patch_size
        with torch.no_grad():
            for conv, bn in _conv_bn_pairs(network.encoder):
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                size = (size + 2 * conv.padding - conv.kernel_size) // conv.stride + 1
                experts = (conv.weight * scale.view(1, -1, 1, 1, 1, 1)).contiguous()
                self.layers.append(
                    {
                        "experts": experts,
                        "bias": ((bias - bn.running_mean) * scale + bn.bias).contiguous(),
                        "routing": conv.routing,
                        "stride": conv.stride,
                        "padding": conv.padding,
                        "experts_form": size**3 <= EXPERTS_FORM_MAX_VOXELS,
                    }
                )
        self.classifier = network.classifier
        self.num_classes = network.classifier.out_features

    @torch.no_grad()
    def __call__(self, patches: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(patches, locations))

    @torch.no_grad()
    def features(self, patches: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """(B, D) representations: the encoder's pooled output."""
        x = patches
        b = x.shape[0]
        for layer in self.layers:
            experts = layer["experts"]
            num_experts, out_channels, in_channels = experts.shape[:3]
            alpha = layer["routing"](locations.to(experts.dtype))  # (B, E)
            if layer["experts_form"]:
                y = F.conv3d(
                    x,
                    experts.view(num_experts * out_channels, *experts.shape[2:]),
                    None,
                    layer["stride"],
                    layer["padding"],
                )
                y = torch.einsum("bn,bnoxyz->boxyz", alpha, y.view(b, num_experts, out_channels, *y.shape[2:]))
                y = y + layer["bias"].view(1, -1, 1, 1, 1)
            else:
                kernels = torch.mm(alpha, experts.flatten(1)).view(b, *experts.shape[1:])
                y = per_sample_conv3d(x, kernels, layer["bias"], layer["stride"], layer["padding"])
            x = F.elu_(y)
        return x.mean(dim=(2, 3, 4))


class FoldedDetectors:
    """``detectors(patches, locations)``: (B, K) log-odds of ``EmphysemaDetectors`` with every detector folded; one
    encoder pass serves all detectors when their encoders are identical (linear readout), else one pass each."""

    def __init__(self, network: nn.Module, patch_size: int = 32):
        detectors = list(network.detectors.values())
        self.shared = same_encoders(detectors)
        self.folded = [FoldedClassifier(d, patch_size) for d in (detectors[:1] if self.shared else detectors)]
        self.heads = [d.classifier for d in detectors]
        self.num_classes = len(detectors)

    @torch.no_grad()
    def __call__(self, patches: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        if self.shared:
            features = self.folded[0].features(patches, locations)
            logits = [head(features) for head in self.heads]
        else:
            logits = [folded(patches, locations) for folded in self.folded]
        return torch.stack([log_odds(out) for out in logits], dim=1)


def fold(network: nn.Module):
    """The folded form of a classifier (``FoldedClassifier``) or of ``EmphysemaDetectors`` (``FoldedDetectors``)."""
    return FoldedDetectors(network) if isinstance(network, EmphysemaDetectors) else FoldedClassifier(network)


@torch.no_grad()
def folded_outputs_at(classifier, channels: torch.Tensor, centres: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(N, C) raw outputs of a folded classifier (``fold``) for the patches centred at ``centres`` (N, 3) of a
    (5|4, X, Y, Z) scan: the numbers of ``dense_input.outputs_at`` with the network, faster."""
    folded = classifier.folded[0] if isinstance(classifier, FoldedDetectors) else classifier
    device = folded.layers[0]["experts"].device
    centres = torch.as_tensor(centres, dtype=torch.long)
    out = []
    for start in range(0, len(centres), batch_size):
        batch = centres[start : start + batch_size]
        patches = intensity_patches_at(channels, batch).to(device)
        locations = channels[1:4, batch[:, 0], batch[:, 1], batch[:, 2]].T.to(device)
        out.append(classifier(patches, locations).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, classifier.num_classes))


def folded_probabilities_at(
    classifier: FoldedClassifier, channels: torch.Tensor, centres: torch.Tensor, batch_size: int = 32, log: bool = False
) -> torch.Tensor:
    """(N, C) softmax (``log``: log-softmax) probabilities of a folded classifier's patches (``folded_outputs_at``)."""
    normalise = torch.log_softmax if log else torch.softmax
    return normalise(folded_outputs_at(classifier, channels, centres, batch_size), dim=1)


def classifier_probabilities_at(
    network: nn.Module, channels: torch.Tensor, centres: torch.Tensor, batch_size: int = 8
) -> torch.Tensor:
    """``dense_input.probabilities_at``, through the folded classifier when the network supports it."""
    if supports_folding(network):
        return folded_probabilities_at(FoldedClassifier(network), channels, centres, batch_size=batch_size)
    return probabilities_at(network, channels, centres, batch_size=batch_size)
