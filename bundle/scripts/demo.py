"""Main demo job (what exists so far): the DrasCLR model core on patches cut from the real atlas.

Cuts the 581 landmark patches from the shipped atlas lung mask (lung painted at -850 HU, the rest at 40 HU,
plus noise), runs a few DrasCLR pre-training steps (local + neighbour losses against the landmark queues),
then embeds every landmark patch with the bundle's ``network_def`` (read from bundle/configs/network.yaml)
and prints the subject embedding. The synthetic cohort, preparation and full training workflows replace
this as they land.

    python bundle/scripts/demo.py --steps 3 --batch_size 8
"""

from __future__ import annotations

import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

from custom.atlas import atlas_mask_path, landmark_corners, landmark_locations, landmark_neighbours
from custom.drasclr import DrasCLR
from custom.intensity import hu_to_network
from custom.location import PATCH_SIZE

BUNDLE = Path(__file__).resolve().parent.parent


def atlas_patches(noise_hu: float = 30.0, seed: int = 0) -> torch.Tensor:
    """(581, 1, 32, 32, 32) network-ready patches of a pseudo-CT made from the atlas lung mask."""
    mask = np.asarray(nib.load(str(atlas_mask_path())).dataobj) > 0
    rng = np.random.default_rng(seed)
    corners = landmark_corners()
    patches = np.empty((len(corners), 1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
    for j, (x, y, z) in enumerate(corners):
        window = mask[x : x + PATCH_SIZE, y : y + PATCH_SIZE, z : z + PATCH_SIZE]
        hu = np.where(window, -850.0, 40.0) + rng.normal(0, noise_hu, window.shape)
        patches[j, 0] = hu_to_network(hu)
    return torch.from_numpy(patches)


def main(steps: int = 3, batch_size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    start = time.perf_counter()
    patches = atlas_patches(seed=seed)
    locations = torch.from_numpy(landmark_locations())
    neighbours = torch.from_numpy(landmark_neighbours(2))
    print(f"atlas: {len(patches)} landmark patches of 32^3 (synthetic intensities on the real atlas lung mask)")

    model = DrasCLR(queue_size=256)
    optimiser = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for step in range(steps):
        ids = torch.randint(0, len(patches), (batch_size,))
        view = lambda t: t + 0.05 * torch.randn_like(t)  # noise "augmentation" until MONAI's chain lands
        out = model(
            query=view(patches[ids]),
            key=view(patches[ids]),
            location=locations[ids],
            landmark_ids=ids,
            neighbours=view(patches[neighbours[ids]]),
            neighbour_locations=locations[neighbours[ids]],
        )
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        print(f"step {step + 1}/{steps}: loss {out['loss']:.3f} (local {out['loss_local']:.3f}, "
              f"neighbour {out['loss_neighbour']:.3f}), top-1 local {out['acc_local']:.2f}")

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "network.yaml"))
    parser["bundle_root"] = str(BUNDLE)
    network = parser.get_parsed_content("network_def")
    network.encoder.load_state_dict(model.encoder_q.state_dict())
    network.eval()
    with torch.no_grad():
        loc_maps = locations.view(-1, 3, 1, 1, 1).expand(-1, 3, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE)
        embeddings = torch.cat([network(torch.cat([p, l], 1)) for p, l in zip(patches.split(64), loc_maps.split(64))])
    subject = embeddings.mean(0)
    print(f"patch embeddings: {tuple(embeddings.shape)}; subject embedding (mean, eq. 11): "
          f"norm {subject.norm():.3f}, first values {[round(float(v), 3) for v in subject[:4]]}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    fire.Fire(main)
