"""Memory-mapped, deterministic, resumable batches of packed rows (owned by the train-loop engineer)."""

from dataclasses import dataclass

import torch
from jaxtyping import Int


@dataclass
class Batch:
    """One micro-batch: its rows flattened into a single packed sequence of `total` tokens."""

    input_ids: Int[torch.Tensor, "1 total"]
    position_ids: Int[torch.Tensor, "1 total"]
    labels: Int[torch.Tensor, "1 total"]
    """Already shifted: labels[t] is the target predicted at t (-100 = no target)."""
    cu_seqlens: Int[torch.Tensor, "segments_plus_one"]
    """int32 document boundaries over the flattened sequence (padding tails are their own segment)."""
    max_seqlen: int
    supervised_tokens: int
