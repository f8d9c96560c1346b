"""A hand-built state dict in the released format, evaluated directly in its own (z, y, x) layout, must give
the same representation and projection as the imported encoder on the same patch in (x, y, z) layout."""

import torch
import torch.nn.functional as F
from conftest import relative_error

from custom.model.network import DrasCLRNetwork, network_input
from custom.model.official_checkpoint import import_to_network, load_official_encoder, load_official_model

N = 8
CONVS = [("conv1", 1, 8, 1), ("conv2", 8, 8, 2)]
for block, (cin, cout) in enumerate([(8, 16), (16, 32), (32, 64)], start=1):
    CONVS += [
        (f"downsample{block}.conv1", cin, cout, 1),
        (f"downsample{block}.conv2", cout, cout, 1),
        (f"downsample{block}.conv3", cout, cout, 2),
    ]
CONVS += [("conv3", 64, 128, 1), ("conv4", 128, 128, 2)]


def _bn_name(conv_name):
    return conv_name.replace("conv", "bn")


def official_state_dict(queue_size=16, landmarks=5):
    g = torch.Generator().manual_seed(1)
    state = {}
    for prefix in ("module.encoder_q.", "module.encoder_k."):
        for name, cin, cout, _ in CONVS:
            state[f"{prefix}{name}.weight"] = (
                torch.randn(N, cout, cin, 3, 3, 3, generator=g) * (2.0 / (27 * cin)) ** 0.5
            )
            state[f"{prefix}{name}.bias"] = torch.randn(cout, generator=g) * 0.1
            state[f"{prefix}{name}._routing_fn.fc.weight"] = torch.randn(N, 3, generator=g)
            state[f"{prefix}{name}._routing_fn.fc.bias"] = torch.randn(N, generator=g)
            bn = f"{prefix}{_bn_name(name)}"
            state[f"{bn}.weight"] = 1 + 0.1 * torch.randn(cout, generator=g)
            state[f"{bn}.bias"] = 0.1 * torch.randn(cout, generator=g)
            state[f"{bn}.running_mean"] = 0.1 * torch.randn(cout, generator=g)
            state[f"{bn}.running_var"] = 0.5 + torch.rand(cout, generator=g)
            state[f"{bn}.num_batches_tracked"] = torch.tensor(100)
        state[f"{prefix}fc.0.weight"] = torch.randn(128, 128, generator=g) / 11
        state[f"{prefix}fc.0.bias"] = torch.randn(128, generator=g) * 0.1
        state[f"{prefix}fc.2.weight"] = torch.randn(128, 128, generator=g) / 11
        state[f"{prefix}fc.2.bias"] = torch.randn(128, generator=g) * 0.1
    state["module.queue"] = F.normalize(torch.randn(128, queue_size, landmarks, generator=g), dim=0)
    state["module.queue_ptr"] = torch.arange(landmarks) % queue_size
    return {"epoch": 20, "state_dict": state}


def reference_layout_forward(state, patch_zyx, location, prefix="module.encoder_q."):
    """The official layout computed directly: per-sample kernel mix, conv on (z, y, x) arrays, eval BN, ELU."""
    outputs = []
    for i in range(patch_zyx.shape[0]):
        x, p = patch_zyx[i : i + 1], location[i : i + 1]
        for name, _, _, stride in CONVS:
            alpha = torch.sigmoid(
                p @ state[f"{prefix}{name}._routing_fn.fc.weight"].t() + state[f"{prefix}{name}._routing_fn.fc.bias"]
            )[0]
            kernel = (alpha.view(-1, 1, 1, 1, 1, 1) * state[f"{prefix}{name}.weight"]).sum(0)
            x = F.conv3d(x, kernel, state[f"{prefix}{name}.bias"], stride=stride, padding=1)
            bn = f"{prefix}{_bn_name(name)}"
            x = F.batch_norm(
                x,
                state[f"{bn}.running_mean"],
                state[f"{bn}.running_var"],
                state[f"{bn}.weight"],
                state[f"{bn}.bias"],
                False,
            )
            x = F.elu(x)
        h = x.flatten(1)
        z = F.linear(
            F.relu(F.linear(h, state[f"{prefix}fc.0.weight"], state[f"{prefix}fc.0.bias"])),
            state[f"{prefix}fc.2.weight"],
            state[f"{prefix}fc.2.bias"],
        )
        outputs.append((h, z))
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


def test_imported_encoder_reproduces_official_layout():
    checkpoint = official_state_dict()
    patch_xyz = torch.randn(3, 1, 32, 32, 32)
    # Make the patch anisotropic in content so a missing axis permutation could not go unnoticed.
    patch_xyz += torch.linspace(-1, 1, 32).view(1, 1, 32, 1, 1)
    location = torch.rand(3, 3) * 2 - 1
    h_ref, z_ref = reference_layout_forward(checkpoint["state_dict"], patch_xyz.permute(0, 1, 4, 3, 2), location)
    encoder = load_official_encoder(checkpoint).eval()
    with torch.no_grad():
        h, z = encoder(patch_xyz, location)
    assert relative_error(h, h_ref) < 1e-5
    assert relative_error(z, z_ref) < 1e-5
    # Without the permutation the numbers differ: the test can fail.
    with torch.no_grad():
        h_wrong, _ = encoder(patch_xyz.permute(0, 1, 4, 3, 2), location)
    assert relative_error(h_wrong, h_ref) > 1e-3


def test_full_model_import_keeps_queue_and_pointers(tmp_path):
    checkpoint = official_state_dict(queue_size=16, landmarks=5)
    torch.save(checkpoint, tmp_path / "official.pth.tar")
    model = load_official_model(tmp_path / "official.pth.tar")
    assert model.queue.keys.shape == (5, 16, 128)
    assert torch.equal(model.queue.keys[3, 7], checkpoint["state_dict"]["module.queue"][:, 7, 3])
    assert model.queue.ptr.tolist() == [0, 1, 2, 3, 4]
    assert not any(p.requires_grad for p in model.encoder_k.parameters())


def test_import_to_network_writes_model_pt(tmp_path):
    checkpoint = official_state_dict()
    out = import_to_network(checkpoint, tmp_path / "models" / "model.pt")
    net = DrasCLRNetwork().eval()
    net.load_state_dict(torch.load(out))
    patch, location = torch.randn(2, 1, 32, 32, 32), torch.rand(2, 3) * 2 - 1
    h_ref, _ = reference_layout_forward(checkpoint["state_dict"], patch.permute(0, 1, 4, 3, 2), location)
    with torch.no_grad():
        assert relative_error(net(network_input(patch, location)), h_ref) < 1e-5


def test_wrong_format_gives_clear_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="official DrasCLR format"):
        load_official_encoder({"state_dict": {"encoder.conv1.weight": torch.zeros(1)}})
    with pytest.raises(FileNotFoundError, match="not found"):
        load_official_encoder(tmp_path / "missing.pth.tar")
