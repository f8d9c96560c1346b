"""Accuracy and 1-off accuracy for ordinal grades (GOLD stage, CLE and paraseptal visual scores).

1-off accuracy counts a prediction as right when it falls within one grade of the truth; the paper reports it
beside plain accuracy to allow for reader variability between neighbouring grades.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(y_true, y_pred) -> float:
    """Share of predictions equal to the truth."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"accuracy needs two equal-length, non-empty arrays, got {y_true.shape} and {y_pred.shape}")
    return float(np.mean(y_true == y_pred))


def grade_ranks(values, order: Sequence | None = None) -> np.ndarray:
    """Position of each grade on the ordinal scale: its index in ``order`` (lowest first), or the grade itself
    when ``order`` is None (integer grades such as GOLD 0-4 or CLE 0-5)."""
    values = np.asarray(values)
    if order is None:
        return values.astype(np.float64)
    position = {grade: i for i, grade in enumerate(order)}
    unknown = sorted({v for v in values.tolist() if v not in position}, key=str)
    if unknown:
        raise ValueError(f"grades {unknown} are not on the ordinal scale {list(order)}")
    return np.array([position[v] for v in values.tolist()], dtype=np.float64)


def one_off_accuracy(y_true, y_pred, order: Sequence | None = None) -> float:
    """Share of predictions at most one grade away from the truth on the ordinal scale."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"1-off accuracy needs two equal-length, non-empty arrays, got {y_true.shape}, {y_pred.shape}")
    return float(np.mean(np.abs(grade_ranks(y_true, order) - grade_ranks(y_pred, order)) <= 1))
