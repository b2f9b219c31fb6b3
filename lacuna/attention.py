"""Per-document causal attention for packed rows (no [total, total] mask), registered in transformers as
`lacuna_varlen_sdpa` (any device: one causal SDPA call per distinct document length) and `lacuna_varlen_attn` (CUDA,
bf16: torch's `varlen_attn`, torch >= 2.10, fed the stored boundaries: no host sync, no graph break; torch 2.15
runs it on cuDNN where eligible, as on Hopper with cuDNN >= 9.18, else on its flash kernel)."""

import importlib.util
import inspect
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "lacuna_varlen_sdpa"
TORCH_VARLEN_NAME = "lacuna_varlen_attn"


def boundaries_from_positions(position_ids: Int[Tensor, "batch length"] | None, batch: int, length: int) -> Tensor:
    """Document boundaries over the flattened rows: a document starts wherever the position restarts at 0."""
    if position_ids is None:
        return torch.arange(0, batch * length + 1, length)
    flat = position_ids.expand(batch, length).flatten()
    starts = torch.nonzero((flat == 0) | (torch.arange(flat.numel(), device=flat.device) % length == 0)).flatten()
    return torch.cat([starts.cpu(), torch.tensor([flat.numel()])])


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


def torch_varlen_attention() -> Callable | None:
    """torch's `varlen_attn`, or None where this torch has none (< 2.10)."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return None
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def causal_options(parameters: set[str]) -> dict[str, object]:
    """Keywords making `varlen_attn` causal (2.10 is_causal, 2.11+ window_size) with grouped K/V (2.12+)."""
    options: dict[str, object] = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    return options | ({"enable_gqa": True} if "enable_gqa" in parameters else {})


def bind_varlen(varlen_attn: Callable) -> Callable:
    """Causal attention per segment through `varlen_attn`, whichever its signature (read once, not in compiled code);
    torch 2.10's takes no `scale`: the query is scaled so that the kernel's 1/sqrt(head_dim) gives the one asked."""
    parameters = set(inspect.signature(varlen_attn).parameters)
    options, takes_scale = causal_options(parameters), "scale" in parameters

    def attend(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, max_seqlen: int | None,
               scale: float | None) -> Tensor:
        if scale is not None and not takes_scale:
            query = query * (scale * query.shape[-1] ** 0.5)
        max_seqlen = max_seqlen or int(cu_seqlens.diff().max())  # a host sync, only without the stored max_seqlen
        return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **options,
                           **({"scale": scale} if takes_scale else {}))

    return attend


def packed_rows_mask(device: torch.device) -> Tensor:
    """The `attention_mask` for packed rows: transformers hands a 4-D mask to the attention function as it is,
    skipping its own detection of packed documents from position_ids (a host sync before every forward)."""
    return torch.ones(0, 0, 0, 0, dtype=torch.bool, device=device)


def packed_forward(
    kernel: Callable,
    module: torch.nn.Module,
    query: Float[Tensor, "batch heads length head_dim"],
    key: Float[Tensor, "batch kv_heads length head_dim"],
    value: Float[Tensor, "batch kv_heads length head_dim"],
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Int[Tensor, " segments_plus_one"] | None = None,
    max_length_q: int | None = None,
    position_ids: Int[Tensor, "batch length"] | None = None,
    **kwargs: object,
) -> tuple[Float[Tensor, "batch length heads head_dim"], None]:
    """A transformers attention function: rows are flattened and split into documents by `cu_seq_lens_q` (or,
    without it, by position restarts) for `kernel`; padded or cached calls (generation) use transformers' sdpa."""
    batch, _, length, _ = query.shape
    if (attention_mask is not None and attention_mask.numel()) or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    window = kwargs.get("sliding_window")
    if dropout or kwargs.get("softcap") or (window is not None and window < (max_length_q or length)):
        raise ValueError("lacuna's varlen attention supports neither attention dropout, softcapping nor windows "
                         "shorter than documents")
    if cu_seq_lens_q is None:
        cu_seq_lens_q = boundaries_from_positions(position_ids, batch, length).to(query.device, torch.int32)
    query, key, value = (tensor.transpose(1, 2).flatten(0, 1) for tensor in (query, key, value))
    output = kernel(query, key, value, cu_seq_lens_q, max_length_q, scaling)
    return output.unflatten(0, (batch, length)), None


# data-dependent segment loop: compiled layers run all of it eagerly, so that no compiled frame sees its tensors
varlen_sdpa_forward = torch.compiler.disable(partial(packed_forward, lambda query, key, value, cu_seqlens, _, scale:
                                                     varlen_attention(query, key, value, cu_seqlens, scale)))
VARLEN_ATTN = torch_varlen_attention()
torch_varlen_forward = partial(packed_forward, bind_varlen(VARLEN_ATTN) if VARLEN_ATTN else None)


def varlen_sdpa_mask(*args: object, attention_mask: Tensor | None = None, **kwargs: object) -> Tensor | None:
    """No mask for packed training (boundaries come from cu_seq_lens); a padding mask for generation."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


for name, function in ((NAME, varlen_sdpa_forward), (TORCH_VARLEN_NAME, torch_varlen_forward)):
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, varlen_sdpa_mask)
