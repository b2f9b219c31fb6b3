"""Best-fit decreasing: every item exactly once, rows within capacity, the best-fit choice at every step, fill."""

import numpy as np
import pytest

from lacuna.packing import best_fit_decreasing

CAPACITY = 512


def distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "lognormal": np.clip(rng.lognormal(4.5, 1.0, 20_000).astype(np.int64), 1, CAPACITY),
        "uniform": rng.integers(1, CAPACITY + 1, 20_000),
        "bimodal": np.concatenate([rng.integers(300, CAPACITY + 1, 3_000), rng.integers(1, 40, 30_000)]),
        "full_and_tiny": np.array([CAPACITY] * 50 + [1] * 7 + [CAPACITY - 1] * 3),
    }


def replay_and_check(lengths: np.ndarray, rows: list[list[int]]) -> None:
    """Replay the placements in packing order, checking each went to the tightest row that fit it."""
    row_of = {item: row for row, items in enumerate(rows) for item in items}
    order = sorted(range(len(lengths)), key=lambda item: (-lengths[item], item))
    spaces: list[int] = []
    for item in order:
        length, row = int(lengths[item]), row_of[item]
        fitting = [space for space in spaces if space >= length]
        if row == len(spaces):
            assert not fitting, "opened a new row although an open row had room"
            spaces.append(CAPACITY)
        else:
            assert spaces[row] == min(fitting), "not the best-fitting row"
        spaces[row] -= length
    assert [sorted(items, key=lambda item: (-lengths[item], item)) for items in rows] == rows


@pytest.mark.parametrize("name", ["lognormal", "uniform", "bimodal", "full_and_tiny"])
def test_every_item_once_within_capacity_and_tight(name: str) -> None:
    lengths = distributions()[name]
    rows = best_fit_decreasing(lengths, CAPACITY)
    placed = np.concatenate([np.array(row) for row in rows])
    assert np.array_equal(np.sort(placed), np.arange(len(lengths)))
    assert max(int(lengths[row].sum()) for row in rows) <= CAPACITY
    lower_bound = -(-int(lengths.sum()) // CAPACITY)
    fill = lengths.sum() / (len(rows) * CAPACITY)
    assert len(rows) <= lower_bound * 1.005 + 1, f"{name}: {len(rows)} rows, lower bound {lower_bound}"
    assert fill >= {"uniform": 0.99, "full_and_tiny": 0.98}.get(name, 0.995)
    assert best_fit_decreasing(lengths, CAPACITY) == rows  # deterministic


def test_best_fit_choice_at_every_step() -> None:
    rng = np.random.default_rng(1)
    skewed = np.clip(rng.lognormal(4.0, 1.2, 1500).astype(int), 1, CAPACITY)
    for lengths in (rng.integers(1, CAPACITY + 1, 400), skewed):
        replay_and_check(lengths, best_fit_decreasing(lengths, CAPACITY))


def test_known_small_packing() -> None:
    # Decreasing order 6, 5, 4, 3, 2, 2 into rows of 8: 6 | 5 | 4; then 3 -> row of 5 (space 3, exact),
    # 2 -> row of 6 (space 2), 2 -> row of 4 (space 4: the only one left with room).
    assert best_fit_decreasing(np.array([2, 5, 4, 6, 3, 2]), 8) == [[3, 0], [1, 4], [2, 5]]
    assert best_fit_decreasing(np.array([], dtype=np.int64), 8) == []


@pytest.mark.parametrize("lengths", [[0, 3], [9]])
def test_rejects_lengths_outside_capacity(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match="1..8"):
        best_fit_decreasing(np.array(lengths), 8)
