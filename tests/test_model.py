"""Model build, per-document attention and loss on tiny real transformers models (CPU, fp32 unless stated)."""

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import TINY, VOCAB, free_port, packed_batch, save_folder, spawn_ranks, tiny_llama, tiny_model
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, Qwen2Config

from lacuna import attention
from lacuna import model as model_module
from lacuna.config import Config
from lacuna.errors import LacunaError
from lacuna.loader import Batch
from lacuna.model import (
    ChunkedCrossEntropy,
    apply_liger,
    build_model,
    count_parameters,
    flops_per_token,
    load_model,
    loss_sum,
    parameter_groups,
    resolve_attention,
)


@pytest.fixture(autouse=True)
def pinned_threads() -> None:
    torch.set_num_threads(1)


def per_document_logits(model: PreTrainedModel, batch: Batch, segments: list[tuple[int, int]]) -> torch.Tensor:
    model.set_attn_implementation("eager")  # an independent reference: each document alone, plain causal attention
    logits = torch.cat([model(input_ids=batch.input_ids[:, start:end], use_cache=False).logits
                        for start, end in segments], dim=1)
    model.set_attn_implementation(attention.NAME)
    return logits


def packed_logits(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False,
                 cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens, max_length_q=batch.max_seqlen,
                 max_length_k=batch.max_seqlen).logits


@pytest.mark.parametrize("implementation", [attention.NAME, "sdpa"])
def test_packed_logits_equal_per_document_logits(implementation: str) -> None:
    model = tiny_model()
    batch, segments = packed_batch()
    with torch.no_grad():
        expected = per_document_logits(model, batch, segments)
        model.set_attn_implementation(implementation)
        packed = packed_logits(model, batch)
        assert (packed - expected).abs().max() < 1e-5
        if implementation == attention.NAME:  # without cu_seq_lens the boundaries come from position restarts
            unpacked_call = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
            assert (unpacked_call - expected).abs().max() < 1e-5


@pytest.mark.parametrize("implementation", [attention.NAME, "sdpa"])
def test_loss_sum_and_gradients_match_per_document(implementation: str) -> None:
    model = tiny_model().double()  # float64 weights: the comparison measures packing, not fp32 summation order
    batch, segments = packed_batch()
    reference = F.cross_entropy(per_document_logits(model, batch, segments).flatten(0, 1).float(),
                                batch.labels.flatten(), reduction="sum")
    reference.backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation(implementation)
    loss = loss_sum(model, batch)
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - reference.item()) < 1e-4
    for name, parameter in model.named_parameters():
        assert (parameter.grad - expected[name]).abs().max() <= 1e-6, name


def test_chunked_cross_entropy_matches_cross_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "LOSS_CHUNK_TOKENS", 7)  # several chunks and a partial last one
    generator = torch.Generator().manual_seed(0)
    hidden, weight = (torch.randn(shape, dtype=torch.float64, generator=generator).requires_grad_()
                      for shape in ((30, 16), (50, 16)))
    targets = torch.randint(0, 50, (30,), generator=generator)
    expected_loss = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (expected_loss * 0.5).backward()
    expected = [hidden.grad.clone(), weight.grad.clone()]
    hidden.grad = weight.grad = None
    loss = ChunkedCrossEntropy.apply(hidden, weight, targets, True)
    (loss * 0.5).backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - expected_loss.item()) < 1e-4
    assert (hidden.grad - expected[0]).abs().max() < 1e-6 and (weight.grad - expected[1]).abs().max() < 1e-6
    with torch.no_grad():
        assert ChunkedCrossEntropy.apply(hidden, weight, targets, False).item() == loss.item()


def test_varlen_attention_handles_gqa_and_rejects_bad_boundaries() -> None:
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(12, heads, 8, generator=generator) for heads in (4, 2, 2))
    output = attention.varlen_attention(query, key, value, torch.tensor([0, 5, 12], dtype=torch.int32))
    repeated_key, repeated_value = (tensor[5:].repeat_interleave(2, 1).transpose(0, 1) for tensor in (key, value))
    expected = F.scaled_dot_product_attention(query[5:].transpose(0, 1), repeated_key, repeated_value, is_causal=True)
    assert (output[5:] - expected.transpose(0, 1)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention.varlen_attention(query, key, value, torch.tensor([0, 5, 10], dtype=torch.int32))


def test_generation_with_padding_matches_sdpa() -> None:
    model = tiny_model()
    prompts = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # left padding: falls back to transformers' masked sdpa
    arguments = dict(input_ids=prompts, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ours = model.generate(**arguments)
    model.set_attn_implementation("sdpa")
    assert torch.equal(ours, model.generate(**arguments))


def test_zero_supervised_tokens_still_reach_every_parameter() -> None:
    model = tiny_model()
    batch, _ = packed_batch(supervised=False)
    loss = loss_sum(model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(parameter.grad is not None and not parameter.grad.any() for parameter in model.parameters())


def test_parameter_groups_split_by_module_type() -> None:
    model_config = Qwen2Config(**TINY, vocab_size=VOCAB, tie_word_embeddings=True)
    model = tiny_model("sdpa", model_config)
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert not decay_ids & no_decay_ids
    assert decay_ids | no_decay_ids == {id(p) for p in model.parameters()}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert any(names[key].endswith("q_proj.bias") for key in no_decay_ids)
    for key in no_decay_ids:
        assert names[key].endswith(("bias", "norm.weight", "embed_tokens.weight")), names[key]
    linear_weights = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Linear)}
    assert decay_ids == linear_weights - {id(model.lm_head.weight)}


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    model_config = tiny_llama()
    hidden, kv_width, mlp, layers = 64, 32, 128, 2
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * mlp + 2 * hidden
    matmul_parameters = layers * per_layer + hidden + VOCAB * hidden  # + final norm + untied lm_head
    assert count_parameters(tiny_model()) == matmul_parameters + VOCAB * hidden
    expected = 6 * matmul_parameters + 12 * layers * hidden * 256
    assert flops_per_token(model_config, seq_len=256) == expected


def test_attention_choice_and_liger_need_their_hardware() -> None:
    assert resolve_attention(Config()) == attention.NAME  # CPU: neither torch's varlen_attn nor flash-attn
    bf16 = {"dtype": "bfloat16"}
    if attention.torch_varlen_attention() is not None:  # torch >= 2.10: the CUDA default in bf16, never in fp32
        assert resolve_attention(Config.model_validate({"model": bf16}), "cuda") == attention.TORCH_VARLEN_NAME
        assert resolve_attention(Config.model_validate({"model": {"dtype": "float32"}}), "cuda") == attention.NAME
    with pytest.raises(LacunaError, match="varlen_attn' needs CUDA"):
        resolve_attention(Config.model_validate({"model": bf16 | {"attention": "varlen_attn"}}), "cpu")
    assert resolve_attention(Config.model_validate({"model": {"attention": "sdpa"}})) == "sdpa"
    with pytest.raises(LacunaError, match="flash-attn"):
        resolve_attention(Config.model_validate({"model": {"attention": "flash_attention_2"}}))
    with pytest.raises(LacunaError, match="liger-kernel"):
        apply_liger(tiny_model(), Config.model_validate({"model": {"liger": "on"}}), torch.device("cpu"))


def test_load_model_random_init_is_seeded_and_applies_overrides(tmp_path: Path) -> None:
    folder = save_folder(tmp_path / "config-only", with_weights=False)
    config = Config.model_validate({"model": {"name": str(folder), "config_overrides": {
        "hidden_size": 96, "num_attention_heads": 2, "num_hidden_layers": 1}}})
    first, second = load_model(config), load_model(config)
    assert (first.config.hidden_size, first.config.head_dim, len(first.model.layers)) == (96, 48, 1)
    assert first.config.use_cache is False and first.config._attn_implementation == attention.NAME
    assert all(p.dtype == torch.float32 for p in first.parameters())
    second_weights = second.state_dict()
    assert all(torch.equal(weight, second_weights[name]) for name, weight in first.state_dict().items())
    other_seed = load_model(config.model_copy(update={"seed": 1}))
    assert not torch.equal(first.lm_head.weight, other_seed.lm_head.weight)
    weights = save_folder(tmp_path / "weights", with_weights=True)  # random_init: the architecture only
    pretrained = load_model(Config.model_validate({"model": {"name": str(weights)}, "seed": 1}))
    scratch = load_model(Config.model_validate({"model": {"name": str(weights), "random_init": True}, "seed": 1}))
    assert torch.equal(pretrained.lm_head.weight, tiny_model().lm_head.weight)
    assert not torch.equal(scratch.lm_head.weight, pretrained.lm_head.weight)
    with pytest.raises(LacunaError, match="hidden_sise"):
        load_model(Config.model_validate({"model": {"name": str(folder), "config_overrides": {"hidden_sise": 8}}}))
    for overrides in ({"hidden_size": 100, "num_attention_heads": 3}, {"num_key_value_heads": 3}):
        with pytest.raises(LacunaError, match="cannot be built: hidden_size .* must divide by num_attention_heads"):
            load_model(Config.model_validate({"model": {"name": str(folder), "config_overrides": overrides}}))
    with pytest.raises(LacunaError, match="cannot load model config '.*missing'.*HF folder with config.json"):
        load_model(Config.model_validate({"model": {"name": str(tmp_path / "missing")}}))


@pytest.fixture
def process_group() -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_build_model_shards_checkpoints_and_matches_unwrapped(tmp_path: Path, process_group: None) -> None:
    folder = save_folder(tmp_path / "weights", with_weights=True)
    settings = {"name": str(folder), "activation_checkpointing": True, "dtype": "float32"}
    config = Config.model_validate({"model": settings})
    batch, _ = packed_batch()
    reference = load_model(config)
    expected_loss = loss_sum(reference, batch)
    expected_loss.backward()
    expected = {name: parameter.grad for name, parameter in reference.named_parameters()}

    model = build_model(config, torch.device("cpu"))
    assert all(isinstance(parameter, DTensor) for parameter in model.parameters())
    assert all(isinstance(layer, CheckpointWrapper) for layer in model.model.layers)
    loss = loss_sum(model, batch)
    loss.backward()
    assert abs(loss.item() - expected_loss.item()) < 1e-4
    for name, parameter in model.named_parameters():
        reference_name = name.replace("._checkpoint_wrapped_module", "")
        assert (parameter.grad.full_tensor() - expected[reference_name]).abs().max() <= 1e-6, name
    model.zero_grad()
    loss_sum(model, packed_batch(supervised=False)[0]).backward()
    assert all(not parameter.grad.full_tensor().any() for parameter in model.parameters())

    mixed = build_model(Config.model_validate({"model": settings | {"dtype": "bfloat16"}}), torch.device("cpu"))
    head_dtypes = []  # the head projects bf16 hidden states with the bf16 weight (its fp32 loss is computed there)
    mixed.lm_head.register_forward_hook(lambda module, inputs, output: head_dtypes.append((inputs[0].dtype,
                                                                                          module.weight.dtype)))
    mixed_loss = loss_sum(mixed, batch)
    mixed_loss.backward()
    assert head_dtypes == [(torch.bfloat16, torch.bfloat16)] and mixed_loss.dtype == torch.float32
    assert abs(mixed_loss.item() - expected_loss.item()) < 2e-2 * expected_loss.item()
    assert all(parameter.dtype == torch.float32 and parameter.grad is not None for parameter in mixed.parameters())


def assert_gradients_equal(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        difference = parameter.grad.full_tensor() - expected[name.replace("._checkpoint_wrapped_module", "")].grad
        assert difference.abs().max() <= 1e-5, name


def two_rank_worker(rank: int, folder: str) -> None:
    config = Config.model_validate({"model": {"name": folder, "dtype": "float32"}})
    batches = [packed_batch(seed=1)[0], packed_batch(seed=2)[0]]
    model = build_model(config, torch.device("cpu"))
    loss_sum(model, batches[rank]).backward()
    reference = load_model(config)
    for batch in batches:  # gradients accumulate: the reference holds the sum over both ranks' batches
        loss_sum(reference, batch).backward()
    assert_gradients_equal(model, reference)
    model.zero_grad()
    reference.zero_grad()
    # a rank without supervised tokens still joins every collective (a mismatch would hang, not pass)
    loss_sum(model, batches[0] if rank == 0 else packed_batch(supervised=False)[0]).backward()
    loss_sum(reference, batches[0]).backward()
    assert_gradients_equal(model, reference)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_ranks_sum_their_gradients(tmp_path: Path) -> None:
    folder = save_folder(tmp_path / "weights", with_weights=True)
    spawn_ranks(2, two_rank_worker, str(folder))


def test_gradient_reduction_is_an_fp32_forced_sum(process_group: None) -> None:
    """The policy NCCL needs: bf16 PREMUL_SUM with factor 1.0 returns all-zero gradients (pytorch#190745)."""
    from torch.distributed.fsdp import FSDPModule

    config = Config.model_validate({"model": {"name": str(save_folder_once()), "dtype": "bfloat16"}})
    model = build_model(config, torch.device("cpu"))
    groups = [module._get_fsdp_state()._fsdp_param_group for module in model.modules()
              if isinstance(module, FSDPModule)]
    assert len(groups) == tiny_llama().num_hidden_layers + 1
    for group in groups:
        assert group.mp_policy.param_dtype == torch.bfloat16 and group.mp_policy.reduce_dtype == torch.float32
        assert group.gradient_divide_factor == 1.0 and group.force_sum_reduction_for_comms


@functools.cache
def save_folder_once() -> Path:
    import tempfile

    return save_folder(Path(tempfile.mkdtemp()) / "weights", with_weights=True)


def test_cpu_dtype_follows_the_feature_flags_or_the_matmul_probe() -> None:
    from lacuna.metrics import choose_cpu_dtype, choose_dtype, cpu_dtype_from_flags

    amx = choose_cpu_dtype(bfloat16_flops=900e9, float32_flops=400e9, capability="AVX512")  # native bf16 (AMX)
    avx2 = choose_cpu_dtype(bfloat16_flops=1.4e9, float32_flops=72e9, capability="AVX2")  # emulated bf16 (EPYC)
    assert amx[0] == "bfloat16" and avx2[0] == "float32"
    assert avx2[1] == "CPU (AVX2) matmul: bf16 1 vs fp32 72 GFLOP/s per process"
    assert cpu_dtype_from_flags({"amx_bf16", "avx512_bf16"}, "AVX512") == (
        "bfloat16", "CPU (AVX512), native bf16 (amx_bf16, avx512_bf16)")
    assert cpu_dtype_from_flags(set(), "AVX2") == ("float32", "CPU (AVX2), bf16 only emulated (slow)")
    assert choose_dtype("float32", torch.device("cpu")) == ("float32", "model.dtype")
    chosen, reason = choose_dtype("auto", torch.device("cpu"))  # the real probe on this machine
    assert chosen in ("bfloat16", "float32") and torch.backends.cpu.get_cpu_capability() in reason
