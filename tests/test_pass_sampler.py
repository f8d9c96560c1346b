"""The training order: landmark-synchronous global batches over DDP ranks, and a stream of passes that a resumed
run re-enters at any iteration."""

import numpy as np
import pytest

from custom.data.patch_dataset import PassSampler


def _rank_batches(sampler: PassSampler, steps: int) -> np.ndarray:
    """(steps, batch) item indices of the stream from the sampler's position, across pass boundaries."""
    out = []
    while len(out) < steps:
        out.extend(np.asarray(list(iter(sampler))).reshape(-1, sampler.batch_size).tolist())
    return np.asarray(out[:steps])


def test_landmark_order_puts_one_landmark_on_every_rank_at_every_step():
    subjects, landmarks, batch, world = 9, 5, 2, 3
    streams = [
        _rank_batches(PassSampler(subjects, landmarks, batch, "landmark", seed=4, num_replicas=world, rank=r), 12)
        for r in range(world)
    ]
    total = subjects * landmarks
    for step in range(12):
        items = np.concatenate([s[step] for s in streams]) % total
        landmark_ids, subject_ids = items % landmarks, items // landmarks
        assert len(set(landmark_ids.tolist())) == 1, (step, landmark_ids)  # one landmark on all ranks
        assert len(set(subject_ids.tolist())) == batch * world  # different subjects, no repeats
    # A pass visits every landmark the same number of times (9 // 6 = 1 global batch each).
    first_pass = np.concatenate([s[:5] for s in streams], axis=1) % total
    assert sorted((first_pass[:, 0] % landmarks).tolist()) == list(range(landmarks))


def test_mixed_order_splits_one_global_permutation_over_ranks():
    ranks = [PassSampler(4, 6, 3, "mixed", seed=1, num_replicas=2, rank=r) for r in range(2)]
    first = [list(iter(r)) for r in ranks]
    assert len(first[0]) == len(first[1]) == len(ranks[0])
    together = np.concatenate(first)
    assert len(set(together.tolist())) == len(together) == 24  # no item twice within a pass, none lost


def test_stream_resumes_at_any_iteration_across_pass_boundaries():
    def fresh():
        return PassSampler(5, 4, 2, "mixed", seed=7)

    straight = _rank_batches(fresh(), 25)  # a pass here is 10 batches: crosses two boundaries
    for start in (0, 3, 10, 13, 21):
        resumed = fresh()
        resumed.set_position(start)
        assert np.array_equal(_rank_batches(resumed, 25 - start), straight[start:]), start
    # Passes differ from each other (a new permutation and new view seeds: the pass index is encoded).
    assert not np.array_equal(straight[:10] % 20, straight[10:20] % 20)
    assert (straight[10:20] // 20 == 1).all()


def test_landmark_order_needs_enough_subjects_for_the_global_batch():
    with pytest.raises(ValueError, match="needs at least 8 subjects"):
        PassSampler(6, 581, 4, "landmark", num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="order must be one of"):
        PassSampler(6, 581, 4, "random")


def test_subject_ids_with_leading_zeros_reach_the_training_file_list(tmp_path):
    """'00', '0001' and '12345' are folder names, not numbers: none may be dropped or renamed."""
    import pandas as pd

    from custom.data.patch_dataset import prepared_patch_files

    for sid in ("00", "0001", "12345"):
        (tmp_path / sid).mkdir()
        np.save(tmp_path / sid / "patches.npy", np.zeros((2, 2, 2, 2), np.int16))
    pd.DataFrame({"subject_id": ["00", "0001", "12345"], "status": "ok", "path": ["00", "0001", "12345"]}).to_csv(
        tmp_path / "manifest.csv", index=False
    )
    assert [f.parent.name for f in prepared_patch_files(tmp_path)] == ["00", "0001", "12345"]
