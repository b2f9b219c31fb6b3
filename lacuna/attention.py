"""Per-document causal attention for packed rows, registered in transformers as `lacuna_varlen_sdpa`.

Attention cost follows document lengths: each document attends only to itself, with one causal
`scaled_dot_product_attention` call per distinct length, and no [total, total] mask is ever built.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "lacuna_varlen_sdpa"


def boundaries_from_positions(position_ids: Int[Tensor, "batch length"] | None, batch: int, length: int) -> Tensor:
    """Document boundaries over the flattened rows: a document starts wherever the position restarts at 0."""
    if position_ids is None:
        return torch.arange(0, batch * length + 1, length)
    flat = position_ids.expand(batch, length).flatten()
    starts = torch.nonzero((flat == 0) | (torch.arange(flat.numel(), device=flat.device) % length == 0)).flatten()
    return torch.cat([starts.cpu(), torch.tensor([flat.numel()])])


@torch.compiler.disable  # data-dependent segment loop: compiled layers run it eagerly
def varlen_attention(
    query: Float[Tensor, "total heads head_dim"],
    key: Float[Tensor, "total kv_heads head_dim"],
    value: Float[Tensor, "total kv_heads head_dim"],
    cu_seqlens: Int[Tensor, " segments_plus_one"],
    scale: float | None = None,
) -> Float[Tensor, "total heads head_dim"]:
    """Causal attention within each segment [cu_seqlens[i], cu_seqlens[i+1]); equal lengths share one batched call."""
    boundaries = cu_seqlens.tolist()
    if boundaries[0] != 0 or boundaries[-1] != query.shape[0] or boundaries != sorted(boundaries):
        raise ValueError(f"cu_seqlens {boundaries} must rise from 0 to the sequence length {query.shape[0]}")
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(boundaries[:-1], boundaries[1:], strict=True):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    outputs, token_order = [], []
    for length, starts in starts_by_length.items():
        index = (torch.tensor(starts)[:, None] + torch.arange(length)).to(query.device)  # [documents, length]
        q, k, v = (tensor[index].transpose(1, 2) for tensor in (query, key, value))  # [documents, heads, length, dim]
        output = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        outputs.append(output.transpose(1, 2).flatten(0, 1))
        token_order.append(index.flatten())
    return torch.cat(outputs)[torch.cat(token_order).argsort()]


def varlen_sdpa_forward(
    module: torch.nn.Module,
    query: Float[Tensor, "batch heads length head_dim"],
    key: Float[Tensor, "batch kv_heads length head_dim"],
    value: Float[Tensor, "batch kv_heads length head_dim"],
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Int[Tensor, " segments_plus_one"] | None = None,
    position_ids: Int[Tensor, "batch length"] | None = None,
    **kwargs: object,
) -> tuple[Float[Tensor, "batch length heads head_dim"], None]:
    """The transformers attention function: rows are flattened and split into documents by `cu_seq_lens_q`
    (or, without it, by position restarts); padded or cached calls (generation) use transformers' sdpa."""
    batch, _, length, _ = query.shape
    if attention_mask is not None or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    window = kwargs.get("sliding_window")
    if dropout or kwargs.get("softcap") or (window is not None and window < kwargs.get("max_length_q", length)):
        raise ValueError(f"{NAME} supports neither attention dropout, softcapping nor windows shorter than documents")
    if cu_seq_lens_q is None:
        cu_seq_lens_q = boundaries_from_positions(position_ids, batch, length)
    query, key, value = (tensor.transpose(1, 2).flatten(0, 1) for tensor in (query, key, value))
    output = varlen_attention(query, key, value, cu_seq_lens_q, scaling)
    return output.unflatten(0, (batch, length)), None


def varlen_sdpa_mask(*args: object, attention_mask: Tensor | None = None, **kwargs: object) -> Tensor | None:
    """No mask for packed training (boundaries come from cu_seq_lens); a padding mask for generation."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, varlen_sdpa_forward)
AttentionMaskInterface.register(NAME, varlen_sdpa_mask)
