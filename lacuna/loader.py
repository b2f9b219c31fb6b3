"""Memory-mapped, deterministic, resumable batches of packed rows (README: Training, Data): each epoch a seeded
permutation computed per position, rank r the r-th slice of each global batch, the position (epoch, row offset)."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Int

from lacuna.errors import LacunaError


@dataclass
class Batch:
    """One micro-batch: its rows flattened into a single packed sequence of `total` tokens."""

    input_ids: Int[torch.Tensor, "1 total"]
    position_ids: Int[torch.Tensor, "1 total"]
    labels: Int[torch.Tensor, "1 total"]
    """Already shifted: labels[t] is the target predicted at t (-100 = no target)."""
    cu_seqlens: Int[torch.Tensor, "segments_plus_one"]  # noqa: F821 (a jaxtyping dimension, not a name)
    """int32 document boundaries over the flattened sequence (padding tails are their own segment)."""
    max_seqlen: int
    supervised_tokens: int
    supervised_positions: Int[torch.Tensor, " supervised"] | None = None
    """Where labels != -100, found on the host (by the GPU, it would be a sync); from `labels` when not given."""

    def __post_init__(self) -> None:
        if self.supervised_positions is None:
            self.supervised_positions = torch.nonzero(self.labels[0] != -100).flatten()

    def to(self, device: torch.device) -> "Batch":
        """This batch with its tensors on `device` (copies that overlap the GPU's work where the batch is pinned)."""
        move = lambda tensor: tensor.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.position_ids), move(self.labels), move(self.cu_seqlens),
                     self.max_seqlen, self.supervised_tokens, move(self.supervised_positions))


class StepBatches(NamedTuple):
    batches: list[Batch]  # this rank's micro-batches of one optimizer step
    supervised_total: int  # supervised tokens of the whole global batch (all ranks): the loss's denominator


@dataclass
class DataPosition:
    epoch: int = 0
    offset: int = 0
    """Rows of this epoch's permutation already consumed."""


def _mix(values: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser, the Feistel round function: every input bit flips about half the output bits.
    values = (values ^ (values >> 30)) * 0xBF58476D1CE4E5B9
    values = (values ^ (values >> 27)) * 0x94D049BB133111EB
    return values ^ (values >> 31)


def epoch_rows(positions: np.ndarray, num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The rows at `positions` (in [0, num_rows)) of an epoch's seeded order, a bijection computed per position: a
    Feistel network over the next power of two, reapplied (cycle walking) until it lands inside [0, num_rows)."""
    keys = np.random.default_rng([seed, epoch]).integers(0, 2**64, 6, dtype=np.uint64)  # 6 rounds, 6 keys
    bits, values = max((num_rows - 1).bit_length(), 1), np.array(positions, dtype=np.uint64)
    walking = np.ones(len(values), bool)
    while walking.any():
        state, high_bits = values[walking], bits // 2
        for key in keys:  # unbalanced rounds: (high, low) -> (low, high ^ F(low)), the halves swapping widths
            low_bits = bits - high_bits
            high, low = state >> low_bits, state & ((1 << low_bits) - 1)
            state = (low << high_bits) | (high ^ (_mix(low ^ key) & ((1 << high_bits) - 1)))
            high_bits = low_bits
        values[walking] = state
        walking = values >= num_rows
    return values.astype(np.int64)


def shifted_labels(tokens: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """labels[t] = tokens[t+1] where that token is supervised, else -100; the last position has no target."""
    labels = np.full(len(tokens), -100, dtype=np.int64)
    labels[:-1] = np.where(loss_mask[1:] == 1, tokens[1:], -100)
    return labels


def position_ids(cu_seqlens: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 at every document boundary."""
    starts = np.repeat(cu_seqlens[:-1], np.diff(cu_seqlens))
    return np.arange(cu_seqlens[-1], dtype=np.int64) - starts


def _host_tensor(array: np.ndarray) -> torch.Tensor:
    # pinned where there is a GPU: a non_blocking copy from there returns at once (from pageable memory it waits), so
    # the next micro-batch's copy overlaps the compute queued before it
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if torch.cuda.is_available() else tensor


def collate(rows: list[Any], supervised: bool = True) -> Batch:
    """Flatten packed rows (shards.Row) into one sequence with row-offset document boundaries; `supervised` False:
    every label -100."""
    seq_len = len(rows[0].tokens)
    boundaries = [row.cu_seqlens[:-1].astype(np.int64) + index * seq_len for index, row in enumerate(rows)]
    cu_seqlens = np.concatenate([*boundaries, [len(rows) * seq_len]])
    row_tokens = [np.asarray(row.tokens, dtype=np.int64) for row in rows]
    tokens = np.concatenate(row_tokens)
    masks = [np.asarray(row.loss_mask) * supervised for row in rows]
    labels = np.concatenate([shifted_labels(each, mask) for each, mask in zip(row_tokens, masks, strict=True)])
    return Batch(
        input_ids=_host_tensor(tokens)[None],
        position_ids=_host_tensor(position_ids(cu_seqlens))[None],
        labels=_host_tensor(labels)[None],
        cu_seqlens=_host_tensor(cu_seqlens.astype(np.int32)),
        max_seqlen=max(int(row.max_seqlen) for row in rows),
        supervised_tokens=sum(int(row.supervised) for row in rows) if supervised else 0,
        supervised_positions=_host_tensor(np.flatnonzero(labels != -100)),
    )


class Loader:
    """Yields each optimizer step's micro-batches for one rank, plus the step's global supervised-token count."""

    def __init__(self, shards: Any, batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int,
                 position: DataPosition | None = None) -> None:
        self.shards, self.batch_size, self.grad_accum = shards, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.position = position or DataPosition()
        self.global_batch_rows = batch_size * grad_accum * world_size
        if self.global_batch_rows > shards.num_rows:
            raise LacunaError(f"a global batch of {self.global_batch_rows} rows (batch size {batch_size} × grad accum "
                              f"{grad_accum} × {world_size} ranks) exceeds the {shards.num_rows} rows of the data: "
                              "lower --batch-size or --grad-accum, or prepare more data")

    def next_step(self) -> "StepBatches":
        """This rank's micro-batches of the next global batch, and the supervised tokens of the whole global batch."""
        if self.position.offset + self.global_batch_rows > self.shards.num_rows:
            self.position = DataPosition(self.position.epoch + 1, 0)
        start = self.position.offset
        positions = np.arange(start, start + self.global_batch_rows)
        indices = epoch_rows(positions, self.shards.num_rows, self.seed, self.position.epoch)
        self.position = DataPosition(self.position.epoch, start + self.global_batch_rows)
        supervised_total = int(self.shards.supervised_at(indices).sum())
        rank_rows = self.batch_size * self.grad_accum
        mine = indices[self.rank * rank_rows:(self.rank + 1) * rank_rows]
        batches = [collate([self.shards.row(int(index)) for index in mine[first:first + self.batch_size]])
                   for first in range(0, rank_rows, self.batch_size)]
        return StepBatches(batches, supervised_total)


def eval_batches(shards: Any, batch_size: int, rank: int, world_size: int, max_rows: int) -> Iterator[Batch]:
    """This rank's share of the first `max_rows` rows; every rank yields the same number of batches (FSDP needs
    matching collectives), a rank past the end gets row 0 with all labels masked."""
    rows = min(max_rows, shards.num_rows)
    for first in range(0, rows, batch_size * world_size):
        mine = range(first + rank * batch_size, min(first + (rank + 1) * batch_size, rows))
        yield collate([shards.row(index) for index in mine] or [shards.row(0)], supervised=bool(mine))
