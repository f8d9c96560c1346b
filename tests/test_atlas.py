import numpy as np

from custom.atlas import NUM_LANDMARKS, landmark_centres, landmark_corners, landmark_locations, landmark_neighbours


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
