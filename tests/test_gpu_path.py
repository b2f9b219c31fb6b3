"""The CUDA path of issue 17, wherever a CPU can express it: torch's varlen_attn on each of its signatures (2.10,
2.11, 2.12+) with grouped key/value heads left unrepeated, the real installed one on the meta device; no host read
of a tensor in `loss_sum` (the meta device refuses every one); a compiled layer compiles once per run; zero
supervised rows never reach liger's kernel."""

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, packed_batch, tiny_model
from torch._dynamo.utils import counters
from transformers import Qwen3Config

from lacuna import attention
from lacuna.loader import Batch
from lacuna.model import ChunkedCrossEntropy, apply_compile, loss_sum

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
SCALE = 0.3  # not 1/sqrt(HEAD_DIM): a kernel that ignored it would fail
seen_key_heads: list[int] = []


def flash_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, boundaries: torch.Tensor,
               scale: float | None = None) -> torch.Tensor:
    """What the flash kernel computes: causal attention per document, grouped heads as given, 1/sqrt(d) by default."""
    seen_key_heads.append(key.shape[1])
    outputs = [F.scaled_dot_product_attention(*(tensor[start:end].transpose(0, 1) for tensor in (query, key, value)),
                                              is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
               for start, end in pairwise(boundaries.tolist())]
    return torch.cat(outputs)


# torch's varlen_attn signatures, as torch/nn/attention/varlen.py of each release declares them
def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):  # noqa: ANN001, ANN201
    assert is_causal and cu_seq_k is cu_seq_q and max_q == max_k
    return flash_math(query, key, value, cu_seq_q)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,  # noqa: ANN001, ANN201
                window_size=(-1, -1)):
    assert window_size == (-1, 0)
    return flash_math(query, key, value, cu_seq_q, scale)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,  # noqa: ANN001, ANN201
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    if not enable_gqa and query.size(1) != key.size(1):  # 2.12's own check before the kernel
        raise ValueError("Expect query and key/value to have the same number of heads")
    assert window_size == (-1, 0)
    return flash_math(query, key, value, cu_seq_q, scale)


def attention_inputs(device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], torch.Tensor]:
    """query, key and value as transformers hands them over ([1, heads, total, dim]) and the document boundaries."""
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 9, 16]
    tensors = [torch.randn(1, heads, sum(lengths), HEAD_DIM, generator=generator).to(device, dtype)
               for heads in (HEADS, KV_HEADS, KV_HEADS)]
    return tensors, torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


@pytest.mark.parametrize("varlen_attn", [varlen_2_10, varlen_2_11, varlen_2_12])
def test_every_varlen_attn_signature_gets_causal_scaled_grouped_attention(varlen_attn: object) -> None:
    (query, key, value), boundaries = attention_inputs()
    seen_key_heads.clear()
    output, _ = attention.packed_forward(attention.bind_varlen(varlen_attn), torch.nn.Module(), query, key, value,
                                         None, scaling=SCALE, cu_seq_lens_q=boundaries, max_length_q=16)
    expected = flash_math(*(tensor[0].transpose(0, 1) for tensor in (query, key, value)), boundaries, SCALE)
    assert seen_key_heads[0] == KV_HEADS  # grouped heads reach the kernel unrepeated
    assert (output[0] - expected).abs().max() < 1e-5


def test_causal_options_of_each_signature() -> None:
    assert attention.causal_options({"query", "is_causal", "return_aux"}) == {"is_causal": True}  # 2.10
    assert attention.causal_options({"query", "scale", "window_size"}) == {"window_size": (-1, 0)}  # 2.11
    assert attention.causal_options({"scale", "window_size", "enable_gqa"}) == {"window_size": (-1, 0),
                                                                                 "enable_gqa": True}  # 2.12+


def test_installed_varlen_attn_takes_grouped_heads_forward_and_backward_on_meta() -> None:
    if attention.VARLEN_ATTN is None:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn (added in 2.10)")
    (query, key, value), boundaries = attention_inputs("meta", torch.bfloat16)
    leaves = [tensor.requires_grad_() for tensor in (query, key, value)]
    output, _ = attention.torch_varlen_forward(torch.nn.Module(), *leaves, None, scaling=SCALE,
                                               cu_seq_lens_q=boundaries, max_length_q=16)
    output.sum().backward()
    assert output.shape == (1, query.shape[2], HEADS, HEAD_DIM) and key.grad.shape == key.shape


def meta_model() -> torch.nn.Module:
    """The tiny Qwen3 (grouped heads) in bf16 on the meta device with torch's varlen_attn: any host read fails."""
    if attention.VARLEN_ATTN is None:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn (added in 2.10)")
    model_config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
                               num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=VOCAB)
    return tiny_model(attention.TORCH_VARLEN_NAME, model_config).to("meta", torch.bfloat16).train()


def document_batch(lengths: list[int], rows: int = 1) -> Batch:
    """`rows` rows of documents of `lengths`; every token supervised but the last of each document."""
    lengths = lengths * rows
    labels = torch.cat([torch.cat([torch.ones(length - 1, dtype=torch.long), torch.tensor([-100])])
                        for length in lengths])[None]
    boundaries = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    return Batch(torch.ones_like(labels), positions, labels, boundaries, max(lengths), int((labels != -100).sum()))


def test_loss_sum_reads_no_tensor_on_the_host_forward_and_backward() -> None:
    model = meta_model()
    for batch in (document_batch([10, 20, 34]), packed_batch(supervised=False)[0]):
        loss = loss_sum(model, batch.to(torch.device("meta")))
        loss.backward()
        assert loss.shape == () and model.get_output_embeddings().weight.grad is not None


def test_compiled_layers_compile_once_for_every_document_count_length_and_row_count() -> None:
    torch._dynamo.reset()
    counters.clear()
    model = meta_model()
    batches = [document_batch([10, 20, 34]), document_batch([30, 34]), document_batch([5, 5, 5, 49]),
               document_batch([1, 2, 3, 58]), document_batch([64], rows=3)]
    graphs = []
    try:
        apply_compile(model, backend="eager")  # the guards decide recompiles, whatever the backend
        for batch in batches:
            loss_sum(model, batch.to(torch.device("meta"))).backward()
            graphs.append(counters["stats"]["unique_graphs"])
    finally:  # apply_compile's process-wide setting, back to torch's default for the other tests
        torch.fx.experimental._config.use_duck_shape = True
        torch._dynamo.reset()
    assert graphs == [graphs[0]] * len(batches) and graphs[0] >= 1


def test_zero_supervised_rows_never_reach_the_fused_loss_and_still_reach_every_parameter() -> None:
    model = tiny_model()
    calls = []

    def fused_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not len(targets):
            raise ZeroDivisionError("integer division or modulo by zero")  # liger-kernel 0.8.5 on zero rows
        calls.append(len(targets))
        return ChunkedCrossEntropy.apply(hidden, weight, targets, torch.is_grad_enabled())

    model.fused_loss = fused_loss
    loss = loss_sum(model, packed_batch(supervised=False)[0])
    loss.backward()
    assert loss.item() == 0.0 and not calls
    assert all(parameter.grad is not None and not parameter.grad.any() for parameter in model.parameters())
    batch = packed_batch()[0]
    assert loss_sum(model, batch).item() > 0 and calls == [batch.supervised_tokens]
