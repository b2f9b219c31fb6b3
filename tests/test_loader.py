"""Loader: label shifting, document positions, the computed epoch order, across world sizes and resumes."""

import tracemalloc

import numpy as np
import pytest

from lacuna.errors import LacunaError
from lacuna.loader import Batch, DataPosition, Loader, collate, epoch_rows, eval_batches
from lacuna.shards import Row


class Rows:
    """Rows in the layout of shards.ShardSet: row i holds documents of lengths 3 and 4 plus a padding tail of 1."""

    seq_len = 8

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.tokens = np.arange(num_rows * 8, dtype=np.uint32).reshape(num_rows, 8) + 1000
        self.loss_mask = np.tile(np.array([0, 0, 1, 0, 0, 1, 1, 0], dtype=np.uint8), (num_rows, 1))
        self.loss_mask[::3] = 0  # every third row has nothing supervised
        self.supervised_counts = self.loss_mask.sum(axis=1).astype(np.int64)

    def supervised_at(self, indices: np.ndarray) -> np.ndarray:
        return self.supervised_counts[indices]

    def row(self, index: int) -> Row:
        return Row(self.tokens[index], self.loss_mask[index], np.array([0, 3, 7, 8], dtype=np.int32),
                   int(self.supervised_counts[index]), 4)


def test_collate_shifts_labels_restarts_positions_and_offsets_boundaries() -> None:
    rows = Rows(2)
    batch = collate([rows.row(1), rows.row(0)])
    first, second = rows.tokens[1], rows.tokens[0]
    # Row 1: targets are the supervised tokens at positions 2, 5, 6, predicted from 1, 4, 5. Position 2's token
    # (last of document 1) never predicts position 3's (first of document 2): the mask there is 0.
    expected = [-100, first[2], -100, -100, first[5], first[6], -100, -100] + [-100] * 8
    assert batch.labels.tolist() == [expected]
    assert batch.input_ids.tolist() == [first.tolist() + second.tolist()]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0] * 2]
    assert batch.cu_seqlens.tolist() == [0, 3, 7, 8, 11, 15, 16]
    assert batch.supervised_tokens == 3 and batch.max_seqlen == 4
    assert (batch.labels != -100).sum().item() == batch.supervised_tokens
    # found on the host, so that the trainer selects them on the GPU without a sync; derived when not given
    assert batch.supervised_positions.tolist() == [1, 4, 5]
    fields = ("input_ids", "position_ids", "labels", "cu_seqlens", "max_seqlen", "supervised_tokens")
    assert Batch(*(getattr(batch, name) for name in fields)).supervised_positions.tolist() == [1, 4, 5]


def global_rows(loader: Loader) -> tuple[list[int], int]:
    """The tokens' row indices a loader's rank reads in one step, and the step's global supervised count."""
    batches, supervised = loader.next_step()
    return [int(batch.input_ids[0, index * 8].item() - 1000) // 8 for batch in batches
            for index in range(batch.input_ids.shape[1] // 8)], supervised


def test_ranks_split_the_global_batch_and_agree_on_the_supervised_count() -> None:
    rows = Rows(40)
    single = Loader(rows, batch_size=2, grad_accum=4, rank=0, world_size=1, seed=3)
    pair = [Loader(rows, batch_size=1, grad_accum=4, rank=rank, world_size=2, seed=3) for rank in range(2)]
    for _ in range(12):  # crosses two epoch boundaries: 40 rows = 5 global batches of 8
        expected, supervised = global_rows(single)
        halves = [global_rows(loader) for loader in pair]
        assert halves[0][0] + halves[1][0] == expected
        assert halves[0][1] == halves[1][1] == supervised == rows.supervised_counts[expected].sum()
    assert single.position == DataPosition(epoch=2, offset=16)


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return epoch_rows(np.arange(num_rows), num_rows, seed, epoch)


@pytest.mark.parametrize("num_rows", [1, 2, 3, 5, 1000, 2**10, 2**10 + 1, 2**13 - 1, 2**13, 2**13 + 1, 2**17 + 3])
def test_the_epoch_order_is_a_permutation_for_any_row_count(num_rows: int) -> None:
    for seed, epoch in ((0, 0), (0, 1), (5, 0)):
        assert np.array_equal(np.sort(epoch_order(num_rows, seed, epoch)), np.arange(num_rows))


def test_the_epoch_order_differs_between_epochs_and_seeds_and_is_computed_per_position() -> None:
    for num_rows in (10, 1000, 2**10 + 1):
        orders = [epoch_order(num_rows, seed, epoch).tolist() for seed, epoch in ((0, 0), (0, 1), (1, 0), (0, 2))]
        assert len({tuple(order) for order in orders}) == len(orders)
    assert len({tuple(epoch_order(3, seed, 0).tolist()) for seed in range(100)}) == 6  # every order of 3 rows occurs
    order = epoch_order(1000, 4, 3)
    picked = np.array([999, 0, 512, 7, 7])
    assert epoch_rows(picked, 1000, 4, 3).tolist() == order[picked].tolist()
    assert abs(np.corrcoef(np.arange(1000), order)[0, 1]) < 0.1  # shuffled, not a near-identity


def test_epochs_follow_the_order_and_a_partial_tail_is_skipped() -> None:
    rows = Rows(10)
    loader = Loader(rows, batch_size=3, grad_accum=1, rank=0, world_size=1, seed=0)
    seen = [global_rows(loader)[0] for _ in range(4)]
    assert sum(seen[:3], []) == epoch_order(10, 0, 0)[:9].tolist()
    assert seen[3] == epoch_order(10, 0, 1)[:3].tolist()


class Huge:
    """A trillion rows of 8 tokens (one document) made up from the index: nothing per row is stored anywhere."""

    seq_len, num_rows = 8, 10**12

    def supervised_at(self, indices: np.ndarray) -> np.ndarray:
        return np.full(len(indices), 7, np.int64)

    def row(self, index: int) -> Row:
        return Row(np.full(8, index % 49152, np.uint32), np.array([0] + [1] * 7, np.uint8),
                   np.array([0, 8], np.int32), 7, 8)


def test_a_trillion_rows_need_no_per_row_memory_and_resume_mid_epoch() -> None:
    tracemalloc.start()
    loader = Loader(Huge(), batch_size=4, grad_accum=2, rank=1, world_size=2, seed=1,
                    position=DataPosition(epoch=3, offset=10**12 - 80))
    steps = [loader.next_step() for _ in range(6)]  # 5 steps end epoch 3, the sixth starts epoch 4
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20  # a stored order would be 8 TB
    assert loader.position == DataPosition(epoch=4, offset=16)
    first = epoch_rows(np.arange(10**12 - 80 + 8, 10**12 - 80 + 16), 10**12, 1, 3) % 49152  # rank 1's half
    assert [row for batch in steps[0][0] for row in batch.input_ids[0, ::8].tolist()] == first.tolist()
    assert all(supervised == 16 * 7 for _, supervised in steps)


def test_resume_from_a_position_continues_with_the_exact_next_rows_at_another_world_size() -> None:
    rows = Rows(64)
    uninterrupted = Loader(rows, batch_size=2, grad_accum=2, rank=0, world_size=2, seed=7)
    for _ in range(5):
        uninterrupted.next_step()
    saved = uninterrupted.position
    resumed = Loader(rows, batch_size=4, grad_accum=2, rank=0, world_size=1, seed=7, position=saved)
    partner = Loader(rows, batch_size=2, grad_accum=2, rank=1, world_size=2, seed=7, position=saved)
    for step in range(6):  # crosses into epoch 1 after three steps
        expected = epoch_order(64, 7, (5 + step) // 8)[(5 + step) % 8 * 8:][:8].tolist()
        assert global_rows(resumed)[0] == global_rows(uninterrupted)[0] + global_rows(partner)[0] == expected


def test_global_batch_larger_than_the_data_is_a_clear_error() -> None:
    with pytest.raises(LacunaError, match="global batch of 12 rows .* exceeds the 10 rows"):
        Loader(Rows(10), batch_size=3, grad_accum=2, rank=0, world_size=2, seed=0)


def test_eval_batches_cover_each_row_once_with_equal_counts_per_rank() -> None:
    rows = Rows(7)
    per_rank = [list(eval_batches(rows, batch_size=2, rank=rank, world_size=2, max_rows=5)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    first_rows = [[int(token - 1000) // 8 for token in batch.input_ids[0, ::8].tolist()] for batch in sum(per_rank, [])]
    assert first_rows == [[0, 1], [4], [2, 3], [0]]
    padding = per_rank[1][1]  # rank 1 has no row left in the second round: a masked stand-in
    assert padding.supervised_tokens == 0 and (padding.labels == -100).all()
    assert padding.supervised_positions.numel() == 0
