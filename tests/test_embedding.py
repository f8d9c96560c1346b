import numpy as np
import pandas as pd
import torch
from conftest import write_patch_cache

from custom.embed.cohort import embed_cohort, embed_patches, load_network
from custom.model.network import DrasCLRNetwork


def test_embed_cohort_writes_table_and_patch_arrays(tmp_path):
    cache = write_patch_cache(tmp_path / "cache", num_subjects=2)
    model_path = tmp_path / "model.pt"
    torch.save(DrasCLRNetwork().state_dict(), model_path)
    table = embed_cohort(cache, model_path, tmp_path / "out", progress=False)
    assert list(table["subject_id"]) == ["sub000", "sub001"]
    reread = pd.read_csv(tmp_path / "out" / "subject_embeddings.csv", dtype={"subject_id": str})
    assert reread.shape == (2, 129)
    patches = np.load(tmp_path / "out" / "patch_embeddings" / "sub001.npy")
    assert patches.shape == (581, 128)
    assert np.allclose(reread.iloc[1, 1:].to_numpy(dtype=float), patches.mean(0), atol=1e-5)
    # Eval-mode embeddings do not depend on how the patches are batched.
    network = load_network(model_path)
    hu = np.load(cache / "sub001" / "patches.npy", mmap_mode="r")[:10]
    from custom.data.atlas import landmark_locations

    loc = landmark_locations()[:10]
    assert np.allclose(embed_patches(network, hu, loc, batch_size=3), patches[:10], atol=1e-5)


def test_missing_model_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="model weights not found"):
        load_network(tmp_path / "nope.pt")
