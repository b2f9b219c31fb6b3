"""Train an HF causal LM on prepared shards under FSDP2.

    torchrun --nproc_per_node N -m lacuna.train --data DIR [@ configs/x.toml] [--overrides]
    python -m lacuna.train ...      (one process)     lacuna train ...      (launches torchrun)

Run folder:
    RUN_DIR/config.toml                        the resolved config
    RUN_DIR/metrics.jsonl                      one JSON object per logged step
    RUN_DIR/checkpoints/step-00000100/         DCP model + optimizer, rng-RANK.pt, meta.json, config.toml
    RUN_DIR/export/                            HF folder written at the end

A restarted run resumes from the newest complete checkpoint (`--resume latest`, the default) at the exact data
position (also on another world size: grad_accum then keeps the global batch in rows); metrics records after that
step, left by the interrupted run, are dropped.
"""

import math
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lacuna import checkpoint
from lacuna.config import Config, ScheduleConfig, changed_settings, load_config, to_toml
from lacuna.errors import LacunaError, run_main
from lacuna.loader import Batch, DataPosition, Loader, eval_batches
from lacuna.metrics import Interval, MetricsLogger, choose_dtype, memory_gib, peak_flops, truncate_metrics


def init_distributed(timeout_seconds: int) -> tuple[int, int, torch.device]:
    """Process group from torchrun's environment, or a one-process group without it; returns rank, world, device."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_seconds)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def learning_rate(step: int, peak: float, schedule: ScheduleConfig) -> float:
    """Linear warmup to `peak` over warmup_steps, then cosine decay to peak × min_lr_ratio at the last step."""
    if step <= schedule.warmup_steps:
        return peak * step / max(schedule.warmup_steps, 1)
    progress = (step - schedule.warmup_steps) / max(schedule.steps - schedule.warmup_steps, 1)
    minimum = peak * schedule.min_lr_ratio
    return minimum + (peak - minimum) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW, fused, over the model's decay / no-decay parameter groups."""
    from lacuna.model import parameter_groups

    return torch.optim.AdamW(parameter_groups(model, config.optim.weight_decay), lr=config.optim.lr,
                             betas=config.optim.betas, eps=config.optim.eps, fused=True)


def check_data(shards: Any, model_config: Any, config: Config) -> None:
    """One-line errors when the shards were not made for this model (tokenizer, vocabulary, context length)."""
    from transformers import AutoTokenizer

    from lacuna.shards import tokenizer_hash

    recorded, name, path = shards.manifest["tokenizer"], config.model.name, config.data.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None  # a model folder without a tokenizer: the vocabulary check below still applies
    if tokenizer is not None and tokenizer_hash(tokenizer) != recorded["hash"]:
        raise LacunaError(f"'{path}' was tokenized with {recorded['name']}, not with the tokenizer of {name}: "
                          f"prepare it again with --tokenizer {name}, or train the model it was made for")
    if recorded["vocab_size"] > model_config.vocab_size:
        raise LacunaError(f"'{path}' uses a vocabulary of {recorded['vocab_size']} tokens but {name} has "
                          f"{model_config.vocab_size} embeddings: prepare the data with this model's tokenizer")
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and shards.seq_len > context:
        raise LacunaError(f"'{path}' has rows of {shards.seq_len} tokens but {name} has a context of {context}: "
                          f"prepare it again with --seq-len {context} or less")


def train_step(model: torch.nn.Module, batches: list[Batch], supervised_total: int,
               device: torch.device) -> torch.Tensor:
    """Forward/backward every micro-batch. Each loss is divided by the global batch's supervised-token count and
    FSDP sums gradients over ranks, so the gradient is that of the mean loss over the whole optimizer step."""
    from lacuna.model import loss_sum

    local_sum = torch.zeros((), dtype=torch.float32, device=device)
    for batch in batches:
        loss = loss_sum(model, batch.to(device))
        (loss / max(supervised_total, 1)).backward()
        local_sum += loss.detach()
    return local_sum


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm, clipping gradients to `max_norm` when it is positive. Squares are summed per local
    shard, then over ranks; in fp64 on CPU, whose fp32 norm of a large embedding is off by ~1e-4 (differently for
    every sharding)."""
    parameters = [parameter for parameter in model.parameters() if parameter.grad is not None]
    local = [parameter.grad.to_local() if isinstance(parameter.grad, DTensor) else parameter.grad
             for parameter in parameters]
    dtype = torch.float64 if local[0].device.type == "cpu" else torch.float32
    squares = torch.stack([torch.linalg.vector_norm(grad, dtype=dtype) ** 2 for grad in local]).sum()
    mesh = next((grad.device_mesh for grad in (parameter.grad for parameter in parameters)
                 if isinstance(grad, DTensor)), None)
    if mesh is not None:  # FSDP2: each rank holds one shard; under HSDP the replicas hold equal copies of it
        dist.all_reduce(squares, group=mesh.get_group("shard"))
    norm = squares.sqrt().float()
    if max_norm > 0 and norm + 1e-6 > max_norm:  # otherwise the clip coefficient is exactly 1: skip the pass
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards: Any, config: Config, device: torch.device) -> float:
    """Mean loss per supervised token over the first eval.max_rows rows of the val split, across all ranks."""
    from lacuna.model import loss_sum

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in eval_batches(shards, config.data.batch_size, dist.get_rank(), dist.get_world_size(),
                              config.eval.max_rows):
        totals[0] += loss_sum(model, batch.to(device)).double()
        totals[1] += batch.supervised_tokens
    dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def adapt_grad_accum(config: Config, meta: dict[str, Any], world_size: int) -> str:
    """On a world-size change, keep the checkpoint's global batch in rows by adjusting grad_accum; returns a note."""
    rows, per_step = meta["global_batch_rows"], config.data.batch_size * world_size
    if meta["world_size"] == world_size or rows == per_step * config.data.grad_accum:
        return ""
    if rows % per_step:
        raise LacunaError(f"the checkpoint's global batch of {rows} rows does not divide by batch size "
                          f"{config.data.batch_size} × {world_size} ranks: pick a --batch-size that divides it")
    config.data.grad_accum = rows // per_step
    return f" (world size {meta['world_size']} → {world_size}: grad_accum {config.data.grad_accum} keeps {rows} rows)"


def check_run_dir(config: Config, step: int) -> None:
    """Refuse to start at `step` in a run folder holding checkpoints from later steps (they would be mixed up)."""
    later = [path for path in checkpoint.complete_checkpoints(config.run_dir / "checkpoints")
             if int(path.name.split("-")[1]) > step]
    if later:
        raise LacunaError(f"run folder '{config.run_dir}' holds checkpoints after step {step} (newest {later[-1]}): "
                          "pass a new --run-dir, or --resume latest to continue it")


def prepare_run_dir(config: Config, step: int) -> None:
    """Rank 0: write config.toml, drop metrics records after `step` (written after the last checkpoint)."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "config.toml").write_text(to_toml(config))
    truncate_metrics(config.run_dir / "metrics.jsonl", step)


def train(config: Config, rank: int, world_size: int, device: torch.device) -> None:
    """The training loop (all ranks)."""
    from lacuna.model import build_model, flops_per_token
    from lacuna.shards import open_shards

    shards = open_shards(config.data.path, "train", verify=config.data.verify)
    val_shards = None
    if config.eval.every:
        has_val = "val" in shards.manifest["splits"]
        val_shards = open_shards(config.data.path, "val", verify=config.data.verify) if has_val else None
        if val_shards is None or val_shards.num_rows == 0:
            raise LacunaError(f"--eval-every {config.eval.every} needs a val split but '{config.data.path}' has "
                              "none: prepare it with --val-fraction > 0, or pass --eval-every 0")
    decision = [choose_dtype(config.model.dtype, device) if rank == 0 else None]
    dist.broadcast_object_list(decision)  # one probe decides for every rank: their timings could disagree
    config.model.dtype, dtype_reason = decision[0]
    torch.manual_seed(config.seed)
    model = build_model(config, device)
    check_data(shards, model.config, config)
    optimizer = build_optimizer(model, config)
    step, position, resume = 0, DataPosition(), checkpoint.resume_path(config.checkpoint.resume, config.run_dir)
    note = ""
    if resume is not None:
        meta = checkpoint.load(resume, model, optimizer)
        step, position = meta["step"], DataPosition(meta["epoch"], meta["offset"])
        note = adapt_grad_accum(config, meta, world_size)
    check_run_dir(config, step)
    if rank == 0:
        prepare_run_dir(config, step)
    logger = MetricsLogger(config.run_dir, rank == 0, config.log.wandb, config.log.wandb_project,
                           config.model_dump(mode="json"), config.schedule.steps)
    logger.print(f"config (non-default; all of it in {config.run_dir / 'config.toml'}): {changed_settings(config)}",
                 style="dim", markup=False)
    logger.print(f"compute dtype {config.model.dtype} ({dtype_reason}), attention {model.config._attn_implementation}"
                 f"{', liger' if hasattr(model, 'fused_loss') else ''}")
    logger.print(f"resumed from {resume} at step {step}{note}" if resume else "starting from step 0")
    loader = Loader(shards, config.data.batch_size, config.data.grad_accum, rank, world_size, config.seed, position)
    peak = peak_flops(device, getattr(torch, config.model.dtype), config.log.peak_tflops)
    flops = flops_per_token(model.config, shards.seq_len)
    tokens_per_step = loader.global_batch_rows * shards.seq_len
    last_checkpoint, interval = resume, Interval()
    if step >= config.schedule.steps:
        logger.print(f"nothing to do: the run is already at step {step} of {config.schedule.steps}")
    model.train()
    while step < config.schedule.steps:
        step += 1
        started = time.perf_counter()
        lr = learning_rate(step, config.optim.lr, config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches, supervised_total = loader.next_step()
        data_seconds = time.perf_counter() - started
        local_sum = train_step(model, batches, supervised_total, device)
        grad_norm = clip_gradients(model, config.optim.grad_clip)
        if not torch.isfinite(grad_norm):
            raise LacunaError(f"loss or gradients became NaN/inf at step {step}; stopped without saving, the last good "
                              f"checkpoint is {last_checkpoint or 'none'}: lower --lr or check the data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        interval.add(time.perf_counter() - started, data_seconds, supervised_total)
        last_step = step == config.schedule.steps
        eval_loss = None
        if val_shards is not None and (step % config.eval.every == 0 or last_step):
            eval_loss = evaluate(model, val_shards, config, device)
        if step % config.log.every == 0 or last_step or eval_loss is not None:
            dist.all_reduce(local_sum)
            record = {"step": step, "loss": local_sum.item() / max(supervised_total, 1), "lr": lr,
                      "grad_norm": grad_norm.item(), **interval.throughput(tokens_per_step, flops, peak, world_size),
                      "memory_gib": memory_gib(device), "epoch": loader.position.epoch}
            logger.log(record | ({"eval_loss": eval_loss} if eval_loss is not None else {}))
            interval = Interval()
        if (config.checkpoint.every and step % config.checkpoint.every == 0) or last_step:
            meta = {"epoch": loader.position.epoch, "offset": loader.position.offset, "eval_loss": eval_loss,
                    "global_batch_rows": loader.global_batch_rows, "world_size": world_size,
                    "model_name": config.model.name, "fingerprint": checkpoint.model_fingerprint(model),
                    "mode": shards.manifest["mode"], "tokenizer": shards.manifest["tokenizer"]["name"]}
            last_checkpoint = checkpoint.save(config.run_dir / "checkpoints", step, model, optimizer, meta,
                                              to_toml(config), config.checkpoint.keep)
    logger.close()
    export_dir = config.run_dir / "export"
    if rank == 0 and config.checkpoint.export and last_checkpoint is not None and last_checkpoint != resume:
        checkpoint.export(last_checkpoint, export_dir)
        logger.print(f"exported {last_checkpoint} to {export_dir}")


def main(arguments: list[str]) -> None:
    """Entry point: `python -m lacuna.train [@ file.toml] [--key value ...]` (also under torchrun)."""
    config = load_config(arguments, command="train")
    rank, world_size, device = init_distributed(config.parallel.timeout_seconds)
    try:
        train(config, rank, world_size, device)
    except RuntimeError as error:
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            raise LacunaError(f"rank {rank}: a collective timed out after {config.parallel.timeout_seconds} s (another "
                              "rank died or hung; see its output): raise --parallel.timeout-seconds if steps are "
                              "legitimately that slow") from None
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
