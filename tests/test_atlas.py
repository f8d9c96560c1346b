from pathlib import Path

import numpy as np
import pytest

from custom.data.atlas import (
    DIRECTIONS,
    NUM_LANDMARKS,
    landmark_centres,
    landmark_corners,
    landmark_locations,
    landmark_neighbours,
    nearest_neighbours,
    neighbour_direction_histogram,
    resources_dir,
)


def _distances(centres):
    centres = np.asarray(centres, dtype=np.float64)
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    return dist


def test_shipped_landmarks_are_the_canonical_581():
    corners = landmark_corners()
    assert corners.shape == (NUM_LANDMARKS, 3)
    assert corners.max(0).tolist() == [312, 286, 286]
    assert corners.min(0).tolist() == [26, 78, 0]
    assert np.array_equal(landmark_centres(), corners + 16)
    loc = landmark_locations()
    assert loc.min() >= -1 and loc.max() <= 1 and np.allclose(loc.max(0), 1.0)


def test_neighbours_are_nearest_other_landmarks():
    centres = landmark_centres().astype(float)
    table = landmark_neighbours(2)
    assert table.shape == (NUM_LANDMARKS, 2)
    for j in (0, 100, 580):
        d = np.linalg.norm(centres - centres[j], axis=1)
        d[j] = np.inf
        assert j not in table[j]
        assert np.isclose(d[table[j]], np.sort(d)[:2]).all()


def test_the_shipped_grid_is_full_of_ties():
    dist = np.sort(_distances(landmark_centres()), axis=1)
    assert int(np.sum(np.abs(dist[:, 1] - dist[:, 2]) < 1e-6)) == 564


@pytest.mark.parametrize("num", [1, 2, 3])
def test_every_chosen_neighbour_is_at_a_true_nearest_distance(num):
    centres = landmark_centres()
    dist = _distances(centres)
    smallest = np.sort(dist, axis=1)[:, :num]
    for seed in (0, 7):
        table = nearest_neighbours(centres, num, seed=seed)
        assert table.shape == (NUM_LANDMARKS, num) and table.dtype == np.int64
        assert all(len(set(row)) == num for row in table.tolist())
        assert not np.any(table == np.arange(NUM_LANDMARKS)[:, None])
        chosen = np.sort(np.take_along_axis(dist, table, axis=1), axis=1)
        np.testing.assert_allclose(chosen, smallest, atol=1e-9)


@pytest.mark.parametrize("num", [1, 2, 3])
def test_random_ties_use_every_direction(num):
    centres = landmark_centres()
    counts = neighbour_direction_histogram(centres, landmark_neighbours(num))
    assert set(counts) == set(DIRECTIONS) and sum(counts.values()) == num * NUM_LANDMARKS
    mean = num * NUM_LANDMARKS / 6
    assert min(counts.values()) >= mean / 2, counts


def test_index_ties_are_one_sided():
    counts = neighbour_direction_histogram(landmark_centres(), landmark_neighbours(2, ties="index"))
    assert counts == {"+x": 4, "-x": 457, "+y": 23, "-y": 458, "+z": 65, "-z": 155}


@pytest.mark.parametrize("num", [0, 1, 2, 3, 5])
def test_index_ties_reproduce_the_reference_argsort(num):
    centres = landmark_centres()
    diff = centres[:, None, :].astype(np.float64) - centres[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    old = np.argsort(dist, axis=1, kind="stable")[:, :num].astype(np.int64)
    new = nearest_neighbours(centres, num, ties="index")
    assert new.shape == old.shape and np.array_equal(new, old)
    assert np.array_equal(nearest_neighbours(centres, num, seed=3, ties="index"), old)  # seed is ignored


def test_random_ties_are_reproducible_per_seed():
    centres = landmark_centres()
    a = nearest_neighbours(centres, 2, seed=0)
    assert np.array_equal(a, nearest_neighbours(centres, 2, seed=0))
    assert np.array_equal(a, landmark_neighbours(2, None, 0))
    b = nearest_neighbours(centres, 2, seed=1)
    assert not np.array_equal(a, b)
    # Only tied slots can differ: every row keeps the same multiset of distances.
    dist = _distances(centres)
    np.testing.assert_allclose(np.sort(np.take_along_axis(dist, a, 1), 1), np.sort(np.take_along_axis(dist, b, 1), 1))
    # Landmark j's draw uses its own generator (seed, j): dropping landmarks that are not among its candidates
    # (strictly nearer or tied) leaves its row unchanged.
    sub = nearest_neighbours(centres[:300], 2, seed=0)
    kth = np.sort(dist, axis=1)[:, 1:2]
    candidates = dist <= kth + 1e-6
    unaffected = ~candidates[:300, 300:].any(axis=1)
    assert unaffected.sum() > 200
    assert np.array_equal(sub[unaffected], a[:300][unaffected])


def test_strictly_nearer_candidates_are_kept_and_ties_are_drawn_within_tolerance():
    # Landmark 0 at the origin; 1 strictly nearest; 2-5 tied at distance 2 (with float noise below the tolerance).
    centres = np.array(
        [[0, 0, 0], [1, 0, 0], [-2, 0, 0], [0, 2 + 1e-9, 0], [0, -2, 0], [0, 0, 2 - 1e-9], [5, 5, 5]], float
    )
    picked = set()
    for seed in range(40):
        row = nearest_neighbours(centres, 2, seed=seed)[0]
        assert row[0] == 1 and row[1] in (2, 3, 4, 5)
        picked.add(int(row[1]))
    assert picked == {2, 3, 4, 5}
    # The index rule is the reference's exact argsort: no tolerance, so the 1e-9 mm nearer landmark 5 wins.
    assert nearest_neighbours(centres, 2, ties="index")[0].tolist() == [1, 5]
    # With a zero tolerance the float noise breaks the tie (only the exact distance 2 ties).
    assert {int(nearest_neighbours(centres, 2, seed=s, tol=0.0)[0, 1]) for s in range(40)} == {5}


def test_landmark_neighbours_is_cached_and_hashable():
    a = landmark_neighbours(2, str(resources_dir()), 0, "random")
    assert a is landmark_neighbours(2, str(resources_dir()), 0, "random")
    assert np.array_equal(a, landmark_neighbours(2, Path(resources_dir())))
    assert np.array_equal(a, landmark_neighbours(2))
    assert landmark_neighbours(0).shape == (NUM_LANDMARKS, 0)


def test_direction_histogram():
    centres = np.array([[0, 0, 0], [1, 0, 0], [0, -3, 0], [0, 0, 2]], float)
    table = np.array([[1, 2], [0, 3], [0, 1], [0, 2]])
    # offsets: +x, -y | -x, (-1, 0, 2) -> +z | +y, (1, 3, 0) -> +y | -z, (0, -3, -2) -> -y
    assert neighbour_direction_histogram(centres, table) == {"+x": 1, "-x": 1, "+y": 2, "-y": 2, "+z": 1, "-z": 1}
    assert neighbour_direction_histogram(centres, np.zeros((4, 0), int)) == dict.fromkeys(DIRECTIONS, 0)
    with pytest.raises(ValueError, match="table"):
        neighbour_direction_histogram(centres, table[:2])


def test_arguments_are_validated():
    centres = landmark_centres()
    with pytest.raises(ValueError, match="num_neighbours"):
        nearest_neighbours(centres, -1)
    with pytest.raises(ValueError, match="ties"):
        nearest_neighbours(centres, 2, ties="lowest")
    with pytest.raises(ValueError, match="seed"):
        nearest_neighbours(centres, 2, seed=-1)
    with pytest.raises(TypeError, match="num_neighbours"):
        nearest_neighbours(centres, 2.0)
    with pytest.raises(ValueError, match="581 landmarks"):
        nearest_neighbours(centres, NUM_LANDMARKS)
    with pytest.raises(ValueError, match="centres"):
        nearest_neighbours(centres[:, :2], 2)
    with pytest.raises(ValueError, match="tol"):
        nearest_neighbours(centres, 2, tol=-1.0)
    with pytest.raises(ValueError, match="ties"):
        landmark_neighbours(2, None, 0, "nearest")
