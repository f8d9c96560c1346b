"""Patch and subject embeddings from prepared subjects (paper eq. 10-11).

For every prepared subject: e(x^j, p^j) for all J landmarks (J x 128, saved per subject as ``<id>.npy``) and
the subject embedding, their mean, gathered into one table (``subject_embeddings.csv``: subject_id + e0..e127)
that pandas loads directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from custom.atomic_io import atomic_path
from custom.data.atlas import landmark_locations
from custom.data.intensity import hu_to_network
from custom.data.patch_dataset import prepared_patch_files
from custom.engine import subject_shards
from custom.model.network import DrasCLRNetwork, network_input
from custom.model.weights import encoder_state, file_sha1, load_into
from custom.subject_table import embedding_table, write_embedding_table


def load_network(
    model_path: str | Path,
    device: str | torch.device = "cpu",
    conditioning: str = "loc_condconv",
    network: DrasCLRNetwork | None = None,
) -> DrasCLRNetwork:
    """The representation network with the ``encoder.*`` weights of ``model_path``.

    Accepts ``models/pretrained.pt`` (a DrasCLRNetwork state dict) and ``models/model.pt`` (the fine-tuned
    emphysema classifier, whose extra ``classifier.*`` weights are not needed for embeddings). ``network`` is the
    configs' ``representation_def`` (built from ``encoder_def``, so other sizes need no code change); without it,
    the default sizes with ``conditioning`` (an ablation variant's encoder, ``custom.model.conditioning``).
    """
    network = network if network is not None else DrasCLRNetwork(conditioning=conditioning)
    what = f"{network.encoder.conditioning!r} encoder ({encoder_sizes(network)}; set them with --encoder_def#...)"
    load_into(network, encoder_state(model_path), model_path, what)
    return network.to(device).eval()


def encoder_sizes(network: DrasCLRNetwork) -> str:
    """The architecture of ``network``'s encoder in words, for errors and the embedding stamp."""
    encoder = network.encoder
    return (
        f"representation_dim={encoder.representation_dim}, projection_dim={encoder.projection_dim}, "
        f"num_experts={encoder.num_experts}, conditioning={encoder.conditioning}"
    )


@torch.no_grad()
def embed_patches(
    network: DrasCLRNetwork, patches_hu: np.ndarray, locations: np.ndarray, batch_size: int = 64
) -> np.ndarray:
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
    conditioning: str = "loc_condconv",
    network: DrasCLRNetwork | None = None,
) -> pd.DataFrame:
    """Embed every prepared subject of ``cache_dir``; returns (and writes) the subject embedding table.

    Under torchrun (``custom.engine.subject_shards``) each rank embeds its share of the subjects on its own
    device (``cuda:LOCAL_RANK`` when there are GPUs) and rank 0 writes the table, in subject order. Resumable:
    when ``out_dir`` was written by the same weights (``embedding_weights.json``, written at the end of a run),
    subjects whose ``patch_embeddings/<id>.npy`` exists are read back instead of embedded again.
    ``network``: the configs' ``representation_def`` (``load_network``).
    """
    several = subject_shards.init_subject_group()
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    network = load_network(model_path, device, conditioning, network)
    locations = landmark_locations()
    out_dir = Path(out_dir)
    (out_dir / "patch_embeddings").mkdir(parents=True, exist_ok=True)
    files = prepared_patch_files(cache_dir)
    mine = subject_shards.shard(files)
    stamp = {
        "weights": str(Path(model_path).resolve()),
        "weights_sha1": file_sha1(model_path),
        "architecture": encoder_sizes(network),
    }
    reusable = _read_stamp(out_dir) == stamp  # same weights: a subject embedded earlier is not embedded again
    subject_shards.barrier()
    if not reusable and subject_shards.is_main():
        (out_dir / STAMP).unlink(missing_ok=True)  # files written from now on are not those of the old stamp
    where = f" (rank {subject_shards.rank()}/{subject_shards.world()})" if several else ""
    rows = []
    for patch_file in tqdm(mine, desc=f"embed{where}", unit="subject", disable=not progress):
        subject_id = patch_file.parent.name
        target = out_dir / "patch_embeddings" / f"{subject_id}.npy"
        if reusable and target.is_file():
            patch_embeddings = np.load(target)
        else:
            patches = np.load(patch_file, mmap_mode="r")
            if patches.ndim != 4 or len(patches) != len(locations):
                raise ValueError(f"{patch_file}: expected ({len(locations)}, S, S, S) patches, got {patches.shape}")
            patch_embeddings = embed_patches(network, patches, locations, batch_size)
            with atomic_path(target) as tmp:
                np.save(tmp, patch_embeddings.astype(np.float32))
        rows.append([subject_id] + patch_embeddings.astype(np.float32).mean(0).tolist())
    rows = subject_shards.gather_in_order(zip(subject_shards.positions(len(rows)), rows))
    table = embedding_table([row[0] for row in rows], [row[1:] for row in rows])
    if subject_shards.is_main():
        write_embedding_table(table, out_dir)
        with atomic_path(out_dir / STAMP) as tmp:
            Path(tmp).write_text(json.dumps(stamp, indent=1))
    subject_shards.barrier()
    return table.reset_index()


STAMP = "embedding_weights.json"


def _read_stamp(out_dir: Path) -> dict | None:
    """Which weights made the embeddings already in ``out_dir`` (written when a run finishes)."""
    try:
        return json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None
