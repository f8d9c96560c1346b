"""The folded classifier (BatchNorm folded into the expert kernels, two exact layer forms) against the
network's own forward, and the emphysema map through both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom.emphysema.dense_input import intensity_patches_at, probabilities_at, scan_channels
from custom.emphysema.folded_classifier import (
    FoldedClassifier,
    classifier_probabilities_at,
    folded_probabilities_at,
    supports_folding,
)
from custom.emphysema.network import EmphysemaNetwork
from custom.emphysema.sliding_window import EmphysemaInferer
from custom.model.network import network_input


def _trained_looking_network(num_experts: int = 3, seed: int = 0) -> EmphysemaNetwork:
    """Random weights plus non-trivial BatchNorm statistics and affine terms, so folding has work to do."""
    torch.manual_seed(seed)
    network = EmphysemaNetwork(num_experts=num_experts)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return network.eval()


def test_folded_classifier_equals_the_network_for_per_patch_locations():
    network = _trained_looking_network()
    classifier = FoldedClassifier(network)
    forms = [layer["experts_form"] for layer in classifier.layers]
    assert any(forms) and not all(forms)  # both exact forms are exercised
    torch.manual_seed(1)
    patches = torch.randn(5, 1, 32, 32, 32)
    locations = torch.rand(5, 3) * 2 - 1  # every patch routed differently
    with torch.no_grad():
        expected = network(network_input(patches, locations))
    got = classifier(patches, locations)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # and the result really depends on the location (the routing is not ignored)
    assert float((classifier(patches, locations.flip(0)) - got).abs().max()) > 1e-4


def test_folding_reads_weights_when_built():
    network = _trained_looking_network()
    before = FoldedClassifier(network)
    with torch.no_grad():
        network.encoder.bn4.running_mean.add_(1.0)
    patches, locations = torch.randn(2, 1, 32, 32, 32), torch.zeros(2, 3)
    with torch.no_grad():
        expected = network(network_input(patches, locations))
    torch.testing.assert_close(FoldedClassifier(network)(patches, locations), expected, rtol=1e-4, atol=1e-5)
    assert float((before(patches, locations) - expected).abs().max()) > 1e-3


def test_what_cannot_be_folded_is_refused_or_evaluated_through_its_forward():
    network = _trained_looking_network()
    network.train()
    assert not supports_folding(network)  # training-mode BatchNorm uses batch statistics
    with pytest.raises(ValueError, match="eval-mode"):
        FoldedClassifier(network)
    network.eval()
    assert supports_folding(network)
    network.encoder.conditioning = "hypernetwork"  # an ablation encoder: not the Loc-CondConv layers
    assert not supports_folding(network)


def _scan(shape=(40, 38, 36), seed=0):
    rng = np.random.default_rng(seed)
    hu = rng.normal(-820, 90, shape).astype(np.float32)
    lung = np.zeros(shape, bool)
    lung[14:26, 12:24, 13:23] = True
    transform = np.eye(4)
    transform[:3, 3] = (120, 140, 130)
    return scan_channels(hu, lung, transform), lung


def test_probabilities_and_maps_match_the_network_path():
    network = _trained_looking_network(num_experts=2)
    channels, lung = _scan()
    centres = torch.tensor([[0, 0, 0], [39, 37, 35], [20, 18, 17], [3, 30, 1]])  # patches leaving the scan too
    expected = probabilities_at(network, channels, centres)
    torch.testing.assert_close(
        folded_probabilities_at(FoldedClassifier(network), channels, centres, batch_size=3), expected, rtol=0, atol=1e-5
    )
    torch.testing.assert_close(classifier_probabilities_at(network, channels, centres), expected, rtol=0, atol=1e-5)
    # the log-probabilities the inferer interpolates (interpolation "logits"), from both evaluators
    log_expected = probabilities_at(network, channels, centres, log=True)
    torch.testing.assert_close(log_expected.exp(), expected, rtol=0, atol=1e-6)
    log_folded = folded_probabilities_at(FoldedClassifier(network), channels, centres, batch_size=3, log=True)
    torch.testing.assert_close(log_folded, log_expected, rtol=1e-4, atol=1e-4)
    folded = EmphysemaInferer(stride=4, min_stride=2, threshold=0.4, batch_size=8)
    plain = EmphysemaInferer(stride=4, min_stride=2, threshold=0.4, batch_size=8, folded="false")
    assert folded.folded and not plain.folded  # a config's string 'false' means False
    torch.testing.assert_close(folded(channels[None], network), plain(channels[None], network), rtol=0, atol=1e-5)
    assert folded.last_evaluations == plain.last_evaluations > 0


def test_intensity_patches_outside_the_scan_are_air():
    channels, _ = _scan(shape=(12, 10, 9))
    centres = torch.tensor([[0, 0, 0], [11, 9, 8], [6, 5, 4]])
    padded = torch.nn.functional.pad(channels[0], (16,) * 6, value=-1.0)
    expected = torch.stack([padded[x : x + 32, y : y + 32, z : z + 32] for x, y, z in centres.tolist()])[:, None]
    assert torch.equal(intensity_patches_at(channels, centres), expected)
