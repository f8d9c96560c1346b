import json

import torch
from conftest import REPO_ROOT, relative_error
from monai.bundle import ConfigParser, verify_net_in_out
from monai.inferers import SimpleInferer

from custom.data.location import corner_to_location
from custom.model.network import DrasCLRNetwork, network_input

CONFIGS = REPO_ROOT / "bundle" / "configs"


def test_network_reads_location_at_patch_centre():
    net = DrasCLRNetwork().eval()
    intensity = torch.randn(2, 1, 32, 32, 32)
    location = torch.tensor([[0.1, -0.4, 0.7], [-0.9, 0.2, 0.0]])
    x = network_input(intensity, location)
    h_direct, _ = net.encoder(intensity, location)
    assert relative_error(net(x), h_direct) < 1e-6
    # Only the centre voxel's location matters: scrambling the rest of channels 1-3 changes nothing.
    scrambled = x.clone()
    scrambled[:, 1:, :16] = torch.randn_like(scrambled[:, 1:, :16])
    assert relative_error(net(scrambled), h_direct) < 1e-6


def test_torchscript_export_and_reload_gives_same_output(tmp_path):
    net = DrasCLRNetwork().eval()
    x = network_input(torch.randn(3, 1, 32, 32, 32), torch.rand(3, 3) * 2 - 1)
    scripted = torch.jit.script(net)
    scripted.save(str(tmp_path / "model.ts"))
    reloaded = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        assert relative_error(reloaded(x), net(x)) < 1e-6


def test_works_under_monai_inferers():
    net = DrasCLRNetwork().eval()
    x = network_input(torch.randn(2, 1, 32, 32, 32), torch.rand(2, 3) * 2 - 1)
    with torch.no_grad():
        simple = SimpleInferer()(x, net)
        assert simple.shape == (2, 128)
        projection = SimpleInferer()(x, DrasCLRNetwork(output="projection").eval())
        assert projection.shape == (2, 128)


def test_verify_net_in_out_on_the_representation_network(tmp_path):
    """network.yaml's representation network against the bundle metadata's input format and a 128-d output
    (metadata.json itself describes the deployable classifier: tests/test_bundle_conformance.py)."""
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 4
    meta["network_data_format"]["outputs"]["pred"].update(num_channels=128, channel_def={"0": "representation"})
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(tmp_path / "metadata.json"),
        config_file=str(CONFIGS / "network.yaml"),
        device="cpu",
    )


def test_config_builds_the_network():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "network.yaml"))
    parser["bundle_root"] = str(REPO_ROOT / "bundle")
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, DrasCLRNetwork)


def test_landmark_corner_extremes_map_to_unit_cube():
    assert corner_to_location(torch.tensor([312.0, 286.0, 286.0])).tolist() == [1.0, 1.0, 1.0]
    assert corner_to_location(torch.tensor([0.0, 0.0, 0.0])).tolist() == [-1.0, -1.0, -1.0]
