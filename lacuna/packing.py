"""Best-fit decreasing packing of documents into fixed-length rows (Ding et al. 2024, "Fewer truncations")."""

from bisect import bisect_left, insort

import numpy as np
from jaxtyping import Int


def best_fit_decreasing(lengths: Int[np.ndarray, " items"], capacity: int) -> list[list[int]]:
    """Pack items (lengths <= capacity) into rows; returns each row's item indices in placement order. Items go
    longest first (ties: lower index first), each into the open row with the least space that fits it, else a new
    row; open rows are stacked per remaining space (last touched first), the spaces kept sorted: O(n log capacity)."""
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must lie in 1..{capacity}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    rows: list[list[int]] = []
    spaces: list[int] = []  # sorted distinct remaining spaces of open rows
    rows_with_space: dict[int, list[int]] = {}
    for item, length in zip(order.tolist(), np.asarray(lengths)[order].tolist(), strict=True):
        position = bisect_left(spaces, length)
        if position == len(spaces):
            row, space = len(rows), capacity
            rows.append([])
        else:
            space = spaces[position]
            stack = rows_with_space[space]
            row = stack.pop()
            if not stack:
                del spaces[position]
        rows[row].append(item)
        space -= length
        if space:
            stack = rows_with_space.setdefault(space, [])
            if not stack:
                insort(spaces, space)
            stack.append(row)
    return rows
