"""Patch and subject embeddings from prepared subjects (paper eq. 10-11).

For every prepared subject: e(x^j, p^j) for all J landmarks (J x 128, saved per subject as ``<id>.npy``) and
the subject embedding, their mean, gathered into one table (``subject_embeddings.csv``: subject_id + e0..e127)
that pandas loads directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from custom.data.atlas import landmark_locations
from custom.atomic_io import atomic_path
from custom.data.intensity import hu_to_network
from custom.model.network import DrasCLRNetwork, network_input
from custom.data.patch_dataset import prepared_patch_files


def load_network(model_path: str | Path, device: str | torch.device = "cpu") -> DrasCLRNetwork:
    """The representation network with the ``encoder.*`` weights of ``model_path``.

    Accepts ``models/pretrained.pt`` (a DrasCLRNetwork state dict) and ``models/model.pt`` (the fine-tuned
    emphysema classifier, whose extra ``classifier.*`` weights are not needed for embeddings).
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"model weights not found: {model_path} (train first, or import official weights)")
    state = torch.load(model_path, map_location="cpu")
    encoder_state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder_state:
        raise ValueError(f"{model_path} holds no 'encoder.*' weights: not a DrasCLR bundle model file")
    network = DrasCLRNetwork()
    network.load_state_dict(encoder_state, strict=True)
    return network.to(device).eval()


@torch.no_grad()
def embed_patches(network: DrasCLRNetwork, patches_hu: np.ndarray, locations: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(J, S, S, S) HU patches at (J, 3) locations -> (J, 128) representations."""
    device = next(network.parameters()).device
    out = []
    for start in range(0, len(patches_hu), batch_size):
        hu = torch.as_tensor(np.asarray(patches_hu[start : start + batch_size], dtype=np.float32))
        x = network_input(hu_to_network(hu).unsqueeze(1), torch.as_tensor(locations[start : start + batch_size]))
        out.append(network(x.to(device)).cpu())
    return torch.cat(out).numpy()


def embed_cohort(
    cache_dir: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    device: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Embed every prepared subject of ``cache_dir``; returns (and writes) the subject embedding table."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    network = load_network(model_path, device)
    locations = landmark_locations()
    out_dir = Path(out_dir)
    (out_dir / "patch_embeddings").mkdir(parents=True, exist_ok=True)
    rows = []
    files = prepared_patch_files(cache_dir)
    for patch_file in tqdm(files, desc="embed", unit="subject", disable=not progress):
        subject_id = patch_file.parent.name
        patch_embeddings = embed_patches(network, np.load(patch_file, mmap_mode="r"), locations, batch_size)
        with atomic_path(out_dir / "patch_embeddings" / f"{subject_id}.npy") as tmp:
            np.save(tmp, patch_embeddings.astype(np.float32))
        rows.append([subject_id] + patch_embeddings.mean(0).tolist())
    dim = len(rows[0]) - 1
    table = pd.DataFrame(rows, columns=["subject_id"] + [f"e{i}" for i in range(dim)])
    with atomic_path(out_dir / "subject_embeddings.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table
