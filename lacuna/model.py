"""Build the model (load → liger → activation checkpointing → compile → FSDP2) and compute its loss."""

import importlib.util
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from lacuna import attention
from lacuna.config import Config
from lacuna.errors import LacunaError, first_line
from lacuna.loader import Batch

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
LOSS_CHUNK_TOKENS = 1024
# config fields of models that transform the logits after lm_head: those take the unfused cross-entropy
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def resolve_attention(config: Config, device_type: str = "cuda" if torch.cuda.is_available() else "cpu") -> str:
    """The transformers attention implementation for `model.attention` (`model.dtype` already resolved)."""
    choice, half = config.model.attention, config.model.dtype == "bfloat16"
    torch_varlen = device_type == "cuda" and attention.torch_varlen_attention() is not None
    if choice == "auto":
        return attention.TORCH_VARLEN_NAME if torch_varlen and half else attention.NAME
    if choice == "varlen_attn" and not (torch_varlen and half):
        raise LacunaError("model.attention 'varlen_attn' needs CUDA, torch >= 2.10 and bf16: use --model.attention "
                          "varlen_sdpa")
    if choice == "flash_attention_2" and not (device_type == "cuda" and importlib.util.find_spec("flash_attn")):
        raise LacunaError("model.attention 'flash_attention_2' needs CUDA and flash-attn (`pip install flash-attn "
                          "--no-build-isolation`, a source build): or use --model.attention auto")
    return {"varlen_sdpa": attention.NAME, "varlen_attn": attention.TORCH_VARLEN_NAME}.get(choice, choice)


def model_configuration(config: Config) -> PreTrainedConfig:
    """The AutoConfig of `model.name` with `model.config_overrides` applied."""
    name, overrides = config.model.name, config.model.config_overrides
    try:
        model_config = AutoConfig.from_pretrained(name, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise LacunaError(f"cannot load model config '{name}' ({first_line(error)}): set model.name to an HF folder "
                          "with config.json (`make setup` builds the defaults in data/) or a Hub name") from None
    heads = getattr(model_config, "num_attention_heads", 0)
    derived_head_dim = heads and getattr(model_config, "head_dim", None) == model_config.hidden_size // heads
    for key, value in overrides.items():
        if not hasattr(model_config, key):
            raise LacunaError(f"model.config_overrides key '{key}' is not a field of {type(model_config).__name__}: "
                              "fix its spelling (see the model's config.json)")
        setattr(model_config, key, value)
    if derived_head_dim and "head_dim" not in overrides:  # config.json stores the derived head_dim: recompute it
        model_config.head_dim = model_config.hidden_size // model_config.num_attention_heads
    heads = getattr(model_config, "num_attention_heads", 0)
    key_value_heads = getattr(model_config, "num_key_value_heads", None) or heads
    if heads and ((derived_head_dim and model_config.hidden_size % heads) or heads % key_value_heads):
        raise LacunaError(f"{name} with model.config_overrides {overrides} cannot be built: hidden_size "
                          f"{model_config.hidden_size} must divide by num_attention_heads {heads}, and that by "
                          f"num_key_value_heads {key_value_heads}: fix the overrides")
    model_config.use_cache = False
    return model_config


def load_model(config: Config) -> PreTrainedModel:
    """fp32 HF causal LM: pretrained weights if `model.name` has them (and `model.random_init` is off), else a seeded
    random init from its config."""
    model_config = model_configuration(config)
    options = dict(attn_implementation=resolve_attention(config), dtype=torch.float32,
                   trust_remote_code=config.model.trust_remote_code)
    folder = Path(config.model.name)
    torch.manual_seed(config.seed)  # every rank must build identical weights before sharding
    weights = any(path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern))
    if config.model.random_init or (folder.is_dir() and not weights):
        return AutoModelForCausalLM.from_config(model_config, **options)
    try:
        return AutoModelForCausalLM.from_pretrained(config.model.name, config=model_config, **options)
    except (OSError, ValueError, RuntimeError) as error:
        raise LacunaError(f"cannot load model weights from '{config.model.name}' ({first_line(error)}): "
                          "check model.name and that model.config_overrides keeps the weight shapes") from None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (possibly already wrapped for activation checkpointing)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
            isinstance(getattr(layer, "_checkpoint_wrapped_module", layer), GradientCheckpointingLayer)
            for layer in module
        ):
            return module
    raise LacunaError(f"{type(model).__name__} has no list of decoder layers lacuna can shard: use a transformers "
                      "causal LM whose blocks are GradientCheckpointingLayer modules (Llama, Qwen2, Mistral, ...)")


def apply_liger(model: nn.Module, config: Config, device: torch.device) -> None:
    """Liger's fused linear cross-entropy for `loss_sum` and (not in compiled layers, where inductor fuses them itself
    and liger's are a known risk, Liger-Kernel#174) its RMSNorm, SwiGLU and RoPE kernels; CUDA only."""
    if config.model.liger == "off":
        return
    if device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        if config.model.liger == "on":
            raise LacunaError("model.liger 'on' needs CUDA and liger-kernel: `pip install liger-kernel` "
                              "or use --model.liger auto")
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    eager = not config.model.compile
    _apply_liger_kernel_to_instance(model=model, rope=eager, rms_norm=eager, swiglu=eager, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    # fp32 accumulation of the weight gradient, as ChunkedCrossEntropy does; the trainer divides the sum itself
    model.fused_loss = partial(liger_fused_linear_cross_entropy, ignore_index=-100, reduction="sum",
                               accum_dtype=torch.float32)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Regional compile: each decoder layer compiled on its own (identical layers reuse the compiled code), once per
    run: dynamic, as the number of documents and the longest one vary from batch to batch (and the rows in eval)."""
    # without duck shapes: a size equal by chance to a fixed one (tokens = hidden size) would be fixed with it
    torch.fx.experimental._config.use_duck_shape = False
    for layer in decoder_layers(model):
        layer.compile(backend=backend, dynamic=True)


def apply_fsdp(model: nn.Module, config: Config, device: torch.device) -> None:
    """FSDP2 over all ranks: one shard group per decoder layer, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.device_mesh import init_device_mesh

    world, replicas = dist.get_world_size(), config.parallel.replicate
    if world % replicas:
        raise LacunaError(f"--parallel.replicate {replicas} does not divide the {world} ranks: pick a divisor "
                          "(e.g. the node count)")
    # HSDP: shard within each group of world/replicas ranks (a node), all-reduce gradients across the replicas
    shape, names = ((replicas, world // replicas), ("replicate", "shard")) if replicas > 1 else ((world,), ("shard",))
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    compute_dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # one rank: resharding would only free the bf16 copies to cast them again in backward
    reshard = config.parallel.reshard_after_forward and dist.get_world_size() > 1
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the root stays unsharded between forward and backward
    for module in model.modules():
        if isinstance(module, FSDPModule):  # sum over ranks: the trainer divides by the global token count
            module.set_gradient_divide_factor(1.0)  # forced SUM: gloo has no PREMUL_SUM (the op for factor 1.0)
            module.set_force_sum_reduction_for_comms(True)


def build_model(config: Config, device: torch.device) -> nn.Module:
    """The training model on `device`, sharded over the initialized process group."""
    model = load_model(config)
    apply_liger(model, config, device)
    if config.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if config.model.compile:
        apply_compile(model)
    apply_fsdp(model, config, device)
    return model


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weightᵀ` over token chunks, gradients computed in the same pass: the fp32
    [tokens, vocabulary] logits never exist whole, and neither a log-softmax backward nor its zero fill runs."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, needs_grad: bool) -> Tensor:
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
            rows = slice(start, start + LOSS_CHUNK_TOKENS)
            chunk, chunk_targets = hidden[rows], targets[rows, None]
            log_probabilities = torch.log_softmax((chunk @ weight.T).float(), -1)
            loss -= log_probabilities.gather(1, chunk_targets).sum()
            if needs_grad:  # d loss / d logits = softmax − one-hot(target)
                probabilities = log_probabilities.exp_()
                probabilities.scatter_add_(1, chunk_targets, probabilities.new_full(chunk_targets.shape, -1.0))
                grad_logits = probabilities.to(hidden.dtype)
                grad_hidden[rows] = grad_logits @ weight
                grad_weight += grad_logits.T @ chunk
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if needs_grad else None)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def loss_sum(model: nn.Module, batch: Batch) -> Tensor:
    """fp32 scalar: summed token cross-entropy over the supervised positions of one packed batch, with no host sync."""
    positions = batch.supervised_positions
    targets = batch.labels[0, positions]
    head = model.get_output_embeddings()
    transformed = any(hasattr(model.config, key) for key in LOGIT_TRANSFORMS)
    fused = isinstance(head, nn.Linear) and head.bias is None and not transformed

    def supervised_rows(output: Tensor) -> Tensor:  # a model that ignores logits_to_keep returns every position
        output = output.flatten(0, -2)
        return output if output.shape[0] == targets.shape[0] else output[positions]

    # liger's kernel divides by zero on zero rows: ChunkedCrossEntropy returns their graph-connected zero instead
    liger = getattr(model, "fused_loss", None) if targets.shape[0] else None
    if fused:  # the head returns the loss, computed inside the model's forward while FSDP holds its weight unsharded
        head.forward = lambda hidden: (liger(supervised_rows(hidden), head.weight, targets).float() if liger else
                                       ChunkedCrossEntropy.apply(supervised_rows(hidden), head.weight, targets,
                                                                 torch.is_grad_enabled()))
    packed = model.config._attn_implementation in (attention.NAME, attention.TORCH_VARLEN_NAME)
    try:
        output = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
            attention_mask=attention.packed_rows_mask(batch.input_ids.device) if packed else None,
            logits_to_keep=positions,  # project only supervised positions onto the vocabulary
            cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen,
        ).logits
    finally:
        head.__dict__.pop("forward", None)
    # an empty selection still yields a graph-connected zero, so FSDP's collectives run on every rank
    return output if fused else F.cross_entropy(supervised_rows(output).float(), targets, reduction="sum")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on embeddings (tied lm_head included), norms and biases."""
    embeddings = {id(parameter) for module in model.modules() if isinstance(module, nn.Embedding)
                  for parameter in module.parameters(recurse=False)}
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or id(parameter) in embeddings else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def count_parameters(model: nn.Module, matmul_only: bool = False) -> int:
    """Unique parameters (global sizes under FSDP); `matmul_only`: without embedding lookups, plus a tied lm_head."""
    total = sum(parameter.numel() for parameter in model.parameters())
    if not matmul_only:
        return total
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - embedding.numel() + (head.numel() if head is embedding else 0)


def flops_per_token(model_config: PreTrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·(matmul parameters) + 12·layers·heads·head_dim·seq_len (PaLM's attention term)."""
    with torch.device("meta"):  # trust_remote_code: the config object already came from code the user trusted
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=True)
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    attention_flops = 12.0 * model_config.num_hidden_layers * model_config.num_attention_heads * head_dim * seq_len
    return 6.0 * count_parameters(model, matmul_only=True) + attention_flops
