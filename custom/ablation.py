"""The pre-training baselines and ablations of paper §4.4 (Tables 6-8), each a named variant of the method.

A variant fixes three training choices and one inference choice:

- ``conditioning``: how the atlas location p enters the encoder (``custom.conditioning``; Table 6),
- ``global_queue``: one dictionary of negatives shared by all landmarks (plain MoCo) instead of one per landmark,
- ``num_neighbours``: l, the neighbours of the neighbour loss; 0 trains with the local loss only (Table 8),
- ``location``: ``"true"`` embeds each patch at its own landmark's location, ``"random"`` at a location drawn
  at random in the lung (Table 7); a random-location variant reuses the weights of ``weights_from``.

Table 6 trains every conditioning with the local loss only (§4.4.1), so its Loc-CondConv row is the
``neighbours_0`` variant; ``neighbours_2`` is the full method (DrasCLR). The paper's "MoCo" baseline works on
whole volumes; ``plain_moco`` is its patch version: no location, one global queue, no neighbour loss.
This module holds the registry, trains a variant through the bundle's training config (train.yaml +
ablation.yaml) and embeds a cohort with a variant's weights in the layout of ``custom.embedding.embed_cohort``.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import custom
from custom.atlas import atlas_mask_path, landmark_locations
from custom.atomic_io import atomic_path
from custom.conditioning import check_conditioning
from custom.embedding import embed_patches
from custom.location import centre_to_location
from custom.network import DrasCLRNetwork
from custom.patch_dataset import prepared_patch_files

LOCATIONS = ("true", "random")
RANDOM_SOURCES = ("landmarks", "lung")


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    conditioning: str = "loc_condconv"
    global_queue: bool = False
    num_neighbours: int = 2
    location: str = "true"
    weights_from: str | None = None

    @property
    def trainable(self) -> bool:
        return self.weights_from is None


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("plain_moco", "MoCo on patches: no location, one global queue, local loss only (Tables 2-5 'MoCo', "
                "adapted to patches)", conditioning="none", global_queue=True, num_neighbours=0),
        Variant("conditioning_none", "Table 6 'No conditioning': standard CNN, per-landmark queues, local loss only",
                conditioning="none", num_neighbours=0),
        Variant("conditioning_concatenation", "Table 6 'Concatenation': last-layer feature + p fused by a fully "
                "connected layer, local loss only", conditioning="concatenation", num_neighbours=0),
        Variant("conditioning_hypernetwork", "Table 6 'HyperNetwork': an MLP of p generates every kernel, local "
                "loss only", conditioning="hypernetwork", num_neighbours=0),
        Variant("neighbours_0", "Table 6 'Loc-CondConv' and Table 8 'no neighbouring contrast': local loss only",
                num_neighbours=0),
        Variant("neighbours_1", "Table 8: neighbour loss with 1 neighbour", num_neighbours=1),
        Variant("neighbours_2", "Table 8 / the method (DrasCLR): neighbour loss with 2 neighbours", num_neighbours=2),
        Variant("neighbours_3", "Table 8: neighbour loss with 3 neighbours", num_neighbours=3),
        Variant("random_location", "Table 7: the DrasCLR weights (neighbours_2) embedding every patch at a random "
                "lung location", location="random", weights_from="neighbours_2"),
    )
}
ALIASES = {"drasclr": "neighbours_2", "conditioning_loc_condconv": "neighbours_0"}


def get_variant(name: str) -> Variant:
    """The variant called ``name`` (aliases resolve to their canonical variant)."""
    canonical = ALIASES.get(name, name)
    if canonical not in VARIANTS:
        raise ValueError(f"unknown ablation variant {name!r}; choose from {sorted(VARIANTS) + sorted(ALIASES)}")
    return VARIANTS[canonical]


def trainable_variant(name: str) -> Variant:
    """The variant called ``name``, refusing the inference-only ones (what ablation.yaml trains)."""
    variant = get_variant(name)
    if not variant.trainable:
        raise ValueError(f"variant {name!r} is not trained: it embeds the weights of {variant.weights_from!r} "
                         f"(train that variant, then embed with location='{variant.location}')")
    return variant


def ablation_config_files(paper: bool = False) -> list[str]:
    """train.yaml (+ paper.yaml for the paper's schedule) + ablation.yaml, in merge order."""
    configs = Path(custom.bundle_root()) / "configs"
    names = ["train.yaml"] + (["paper.yaml"] if paper else []) + ["ablation.yaml"]
    return [str(configs / n) for n in names]


def pretrain_variant(name: str, dataset_dir: str | Path, out_dir: str | Path, paper: bool = False,
                     **overrides) -> Path:
    """Pre-train variant ``name`` with the bundle's training workflow (train.yaml [+ paper.yaml] + ablation.yaml).

    Checkpoints go under ``out_dir/checkpoints``, the query encoder to ``out_dir/pretrained.pt`` (returned).
    A run stopped part-way resumes from its newest checkpoint. ``overrides`` are config ids (batch_size,
    max_epochs, epoch_length, num_workers, mlflow, tracking_uri, ...).
    """
    from monai.bundle import ConfigWorkflow

    from custom.checkpointing import latest_checkpoint

    variant = trainable_variant(name)
    out_dir = Path(out_dir)
    settings = {
        "variant": variant.name, "dataset_dir": str(dataset_dir), "output_dir": str(out_dir),
        "model_path": str(out_dir / "pretrained.pt"),
        "resume": latest_checkpoint(out_dir / "checkpoints") is not None,
    }
    settings.update(overrides)
    workflow = ConfigWorkflow(config_file=ablation_config_files(paper), workflow_type="train", run_id="training",
                              **settings)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return Path(settings["model_path"])


def load_variant_network(model_path: str | Path, conditioning: str = "loc_condconv",
                         device: str | torch.device = "cpu") -> DrasCLRNetwork:
    """The representation network of a variant (its conditioning) with the ``encoder.*`` weights of ``model_path``."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"model weights not found: {model_path} (pre-train the variant first)")
    state = {k: v for k, v in torch.load(model_path, map_location="cpu").items() if k.startswith("encoder.")}
    network = DrasCLRNetwork(conditioning=check_conditioning(conditioning))
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{model_path}: weights do not fit the {conditioning!r} encoder ({error})") from error
    return network.to(device).eval()


def random_locations(num: int, rng: np.random.Generator, source: str = "landmarks",
                     own: np.ndarray | None = None) -> np.ndarray:
    """(num, 3) float32 locations drawn at random in the atlas lung.

    ``source="landmarks"``: the location of a random landmark other than the patch's own (``own``: its index per
    row); ``"lung"``: the location of a patch centred on a uniformly drawn atlas lung voxel.
    """
    if source == "landmarks":
        table = landmark_locations()
        if own is None:
            return table[rng.integers(0, len(table), num)]
        # Draw from the J - 1 other landmarks: shift draws at or above the row's own index by one.
        draws = rng.integers(0, len(table) - 1, num)
        return table[draws + (draws >= np.asarray(own))]
    if source == "lung":
        shape, lung = _atlas_lung_voxels()
        centres = np.stack(np.unravel_index(lung[rng.integers(0, len(lung), num)], shape), axis=1)
        return centre_to_location(centres).astype(np.float32)
    raise ValueError(f"random location source must be one of {RANDOM_SOURCES}, got {source!r}")


_LUNG_VOXELS: tuple | None = None


def _atlas_lung_voxels() -> tuple:
    """(shape, flat indices) of the atlas lung mask's voxels, loaded once."""
    global _LUNG_VOXELS
    if _LUNG_VOXELS is None:
        mask = np.asarray(nib.load(str(atlas_mask_path())).dataobj) > 0
        _LUNG_VOXELS = (mask.shape, np.flatnonzero(mask))
    return _LUNG_VOXELS


def embed_cohort_variant(
    cache_dir: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    conditioning: str = "loc_condconv",
    location: str = "true",
    random_source: str = "landmarks",
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Embed every prepared subject with a variant's weights: ``out_dir/patch_embeddings/<id>.npy`` (J x 128)
    and ``out_dir/subject_embeddings.csv`` (subject_id, e0..e127), as ``custom.embedding.embed_cohort``.

    ``location="random"`` gives each patch a random lung location (seeded by ``seed`` and the subject's order).
    """
    if location not in LOCATIONS:
        raise ValueError(f"location must be one of {LOCATIONS}, got {location!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    network = load_variant_network(model_path, conditioning, device)
    true_locations = landmark_locations()
    out_dir = Path(out_dir)
    (out_dir / "patch_embeddings").mkdir(parents=True, exist_ok=True)
    rows = []
    files = prepared_patch_files(cache_dir)
    for index, patch_file in enumerate(tqdm(files, desc="embed", unit="subject", disable=not progress)):
        subject_id = patch_file.parent.name
        patches = np.load(patch_file, mmap_mode="r")
        if patches.ndim != 4 or len(patches) != len(true_locations):
            raise ValueError(f"{patch_file}: expected ({len(true_locations)}, S, S, S) patches, got {patches.shape}")
        locations = true_locations
        if location == "random":
            rng = np.random.default_rng([seed, index])
            locations = random_locations(len(true_locations), rng, random_source, own=np.arange(len(true_locations)))
        patch_embeddings = embed_patches(network, patches, locations, batch_size)
        with atomic_path(out_dir / "patch_embeddings" / f"{subject_id}.npy") as tmp:
            np.save(tmp, patch_embeddings.astype(np.float32))
        rows.append([subject_id] + patch_embeddings.mean(0).tolist())
    table = pd.DataFrame(rows, columns=["subject_id"] + [f"e{i}" for i in range(len(rows[0]) - 1)])
    with atomic_path(out_dir / "subject_embeddings.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (data-loader workers): unlike wall time,
    it does not grow when other jobs share the machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def variant_done(out_dir: str | Path) -> bool:
    """A variant folder is finished when its record (written last) and its embedding table exist."""
    out_dir = Path(out_dir)
    return (out_dir / "variant.json").is_file() and (out_dir / "subject_embeddings.csv").is_file()


def run_variant(name: str, dataset_dir: str | Path, out_root: str | Path, weights: str | Path | None = None,
                seed: int = 0, paper: bool = False, progress: bool = True, **train_overrides) -> dict:
    """Pre-train (unless the variant reuses other weights) and embed one variant into ``out_root/<name>``.

    ``weights`` (random-location variants only) replaces ``out_root/<weights_from>/pretrained.pt``. Returns the
    record also written to ``out_root/<name>/variant.json``: the variant's settings, the weights used, and the
    wall and CPU seconds spent training and embedding.
    """
    variant = get_variant(name)
    if weights is not None and variant.trainable:
        raise ValueError(f"variant {name!r} trains its own weights; 'weights' is for random-location variants")
    out_dir = Path(out_root) / variant.name
    record = {"variant": asdict(variant), "dataset_dir": str(dataset_dir), "paper_schedule": paper, "seed": seed,
              "train_settings": train_overrides}
    start, cpu = time.perf_counter(), _cpu_seconds()
    if variant.trainable:
        weights = pretrain_variant(variant.name, dataset_dir, out_dir, paper, seed=seed, **train_overrides)
    elif weights is None:
        weights = Path(out_root) / variant.weights_from / "pretrained.pt"
    record["weights"] = str(weights)
    record["train_seconds"] = round(time.perf_counter() - start, 1)
    record["train_cpu_seconds"] = round(_cpu_seconds() - cpu, 1)
    start, cpu = time.perf_counter(), _cpu_seconds()
    source = get_variant(variant.weights_from) if variant.weights_from else variant
    embed_cohort_variant(dataset_dir, weights, out_dir, conditioning=source.conditioning, location=variant.location,
                         seed=seed, progress=progress)
    record["embed_seconds"] = round(time.perf_counter() - start, 1)
    record["embed_cpu_seconds"] = round(_cpu_seconds() - cpu, 1)
    with atomic_path(out_dir / "variant.json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2))
    return record
