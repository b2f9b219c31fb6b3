"""Train an HF causal LM on prepared shards under FSDP2 (`torchrun -m lacuna.train`, `python -m lacuna.train` or
`lacuna train`); the run folder, resume and start record are described in the README's Training section."""

import gc
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lacuna.checkpoint import Checkpointer, Start, data_identity, model_fingerprint
from lacuna.config import Config, DataConfig, ScheduleConfig, changed_settings, load_config, to_toml
from lacuna.errors import LacunaError, run_main
from lacuna.files import check_writable, exclusive_lock
from lacuna.loader import Batch, Loader, eval_batches
from lacuna.machine import nvidia_driver, unusable_gpu_message
from lacuna.metrics import Interval, MetricsLogger, choose_dtype, memory_gib, peak_flops, truncate_metrics
from lacuna.shards import ShardSet, open_shards


def process_group_backend(cuda: bool) -> str:
    """gloo beside NCCL: checkpointing and object collectives reduce CPU tensors, which NCCL refuses."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_distributed(timeout_seconds: int) -> torch.device:
    """Process group (torchrun's, or one process); stops when GPUs are visible but unusable by this torch."""
    cuda = torch.cuda.is_available()
    driver = None if cuda else nvidia_driver()
    if driver is not None:
        raise LacunaError(unusable_gpu_message(driver, torch.__version__, torch.version.cuda))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    options: dict[str, Any] = {"backend": process_group_backend(cuda), "timeout": timedelta(seconds=timeout_seconds),
                               "device_id": device if cuda else None}  # device_id: NCCL connects eagerly
    if "RANK" in os.environ:
        dist.init_process_group(**options)
    else:
        dist.init_process_group(**options, store=dist.HashStore(), rank=0, world_size=1)
    return device


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


def check_data(shards: ShardSet, model_config: Any, config: Config) -> None:
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


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm (squares summed per shard, fp64 on CPU), clipping to `max_norm` when positive."""
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


class StepResult(NamedTuple):
    loss_sum: torch.Tensor  # this rank's summed token losses (fp32)
    grad_norm: torch.Tensor  # before clipping; not finite: the update was skipped


def accumulate_gradients(model: torch.nn.Module, batches: list[Batch], supervised_total: int,
                         device: torch.device) -> torch.Tensor:
    """Forward/backward of every micro-batch, each loss over the global supervised-token count (FSDP sums)."""
    from lacuna.model import loss_sum

    local_sum = torch.zeros((), dtype=torch.float32, device=device)
    for batch in batches:
        loss = loss_sum(model, batch.to(device))
        (loss / max(supervised_total, 1)).backward()
        local_sum += loss.detach()
    return local_sum


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], supervised_total: int,
               grad_clip: float, device: torch.device) -> StepResult:
    """One optimizer step: gradients of the global batch, clipping, AdamW; a non-finite gradient skips the update."""
    local_sum = accumulate_gradients(model, batches, supervised_total, device)
    grad_norm = clip_gradients(model, grad_clip)
    if torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(local_sum, grad_norm)


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards: ShardSet, config: Config, device: torch.device) -> float:
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


def derive_grad_accum(data: DataConfig, world_size: int, start: Start) -> int:
    """Micro-batches per step: from data.global_batch_rows, or a resumed global batch on another world size."""
    rows = data.global_batch_rows or (start.global_batch_rows if start.world_size not in (None, world_size) else None)
    if rows is None:
        return data.grad_accum
    per_micro_step = data.batch_size * world_size
    if rows % per_micro_step:
        raise LacunaError(f"a global batch of {rows} rows does not divide by batch size {data.batch_size} × "
                          f"{world_size} ranks: pick a --batch-size (or --data.global-batch-rows) that divides it")
    return rows // per_micro_step


def rank_zero(action: Callable[[], Any]) -> Any:
    """`action`'s result on rank 0, or its LacunaError, given to every rank (so none is left waiting)."""
    outcome: list[Any] = [(None, None)]
    if dist.get_rank() == 0:
        try:
            outcome[0] = (action(), None)
        except LacunaError as error:
            outcome[0] = (None, str(error))
    dist.broadcast_object_list(outcome)
    if outcome[0][1]:
        raise LacunaError(outcome[0][1])
    return outcome[0][0]


def open_data(config: Config) -> tuple[ShardSet, ShardSet | None]:
    """The train split, and the val split when evaluation is on (one-line error when there is none)."""
    shards = open_shards(config.data.path, "train", verify=config.data.verify)
    if not config.eval.every:
        return shards, None
    has_val = "val" in shards.manifest["splits"]
    val_shards = open_shards(config.data.path, "val", verify=config.data.verify) if has_val else None
    if val_shards is None or val_shards.num_rows == 0:
        raise LacunaError(f"--eval-every {config.eval.every} needs a val split but '{config.data.path}' has "
                          "none: prepare it with --val-fraction > 0, or pass --eval-every 0")
    return shards, val_shards


def lock_run_folder(config: Config, stack: ExitStack) -> None:
    """Create the run folder and hold its lock until `stack` closes: a second run on it is refused in one line."""
    check_writable(config.run_dir, "run folder")
    stack.enter_context(exclusive_lock(config.run_dir, "training run"))
    config.run_dir.mkdir(parents=True, exist_ok=True)


class Trainer:
    """A run: set up in order (run folder, data, dtype, model, optimizer, resume, logger), then `fit`."""

    def __init__(self, config: Config, device: torch.device, stack: ExitStack) -> None:
        from lacuna.model import build_model

        self.config, self.device, world_size = config, device, dist.get_world_size()
        rank_zero(lambda: lock_run_folder(config, stack))
        self.shards, self.val_shards = open_data(config)
        # one decision for every rank: their probes could disagree
        config.model.dtype, dtype_reason = rank_zero(lambda: choose_dtype(config.model.dtype, device))
        torch.manual_seed(config.seed)
        self.model = build_model(config, device)
        check_data(self.shards, self.model.config, config)
        self.optimizer = build_optimizer(self.model, config)
        self.checkpointer = Checkpointer(config)
        start = self.checkpointer.restore(self.model, self.optimizer, data_identity(self.shards.manifest))
        config.data.grad_accum = derive_grad_accum(config.data, world_size, start)
        self.checkpointer.refuse_later(start.step)
        if dist.get_rank() == 0:
            (config.run_dir / "config.toml").write_text(to_toml(config))
            truncate_metrics(config.run_dir / "metrics.jsonl", start.step)
        self.logger = MetricsLogger(config.run_dir, dist.get_rank() == 0, config.log.wandb, config.log.wandb_project,
                                    config.model_dump(mode="json"), config.schedule.steps)
        self.loader = Loader(self.shards, config.data.batch_size, config.data.grad_accum, dist.get_rank(), world_size,
                             config.seed, start.position)
        self.step, self.tokens_per_step = start.step, self.loader.global_batch_rows * self.shards.seq_len
        self.announce(start, dtype_reason)

    def announce(self, start: Start, dtype_reason: str) -> None:
        """The start-up lines, and metrics.jsonl's start record of what this run decided."""
        config, model, world_size = self.config, self.model, dist.get_world_size()
        record = {"event": "start", "step": start.step, "dtype": config.model.dtype, "dtype_reason": dtype_reason,
                  "attention": model.config._attn_implementation, "liger": hasattr(model, "fused_loss"),
                  "compile": config.model.compile, "activation_checkpointing": config.model.activation_checkpointing,
                  "world_size": world_size, "replicate": config.parallel.replicate,
                  "batch_size": config.data.batch_size, "grad_accum": config.data.grad_accum,
                  "global_batch_rows": self.loader.global_batch_rows, "seq_len": self.shards.seq_len,
                  "tokens_per_step": self.tokens_per_step, "total_tokens": self.tokens_per_step * config.schedule.steps,
                  "resumed_from": str(start.checkpoint) if start.checkpoint else None, "torch": torch.__version__,
                  "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"}
        self.logger.record(record)
        self.logger.print(f"config (non-default; all of it in {config.run_dir / 'config.toml'}): "
                          f"{changed_settings(config)}", style="dim", markup=False)
        self.logger.print(f"compute dtype {record['dtype']} ({dtype_reason}), attention {record['attention']}"
                          f"{', liger' if record['liger'] else ''}; global batch {self.loader.global_batch_rows} rows "
                          f"(batch {config.data.batch_size} × grad_accum {config.data.grad_accum} × {world_size} "
                          f"ranks) = {self.tokens_per_step:,} tokens per step, {record['total_tokens']:,} in all")
        for note in start.notes:
            self.logger.print(f"resume: {note}", style="yellow")
        self.logger.print(f"resumed from {start.checkpoint} at step {start.step}" if start.checkpoint
                          else "starting from step 0")

    def fit(self) -> None:
        """The loop: one optimizer step after another, with logging, evaluation and checkpoints."""
        from lacuna.model import flops_per_token

        config, model, device = self.config, self.model, self.device
        peak = peak_flops(device, getattr(torch, config.model.dtype), config.log.peak_tflops)
        flops, interval = flops_per_token(model.config, self.shards.seq_len), Interval()
        if self.step >= config.schedule.steps:
            self.logger.print(f"nothing to do: the run is already at step {self.step} of {config.schedule.steps}")
        model.train()
        while self.step < config.schedule.steps:
            self.step += 1
            started = time.perf_counter()
            lr = learning_rate(self.step, config.optim.lr, config.schedule)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batches, supervised_total = self.loader.next_step()
            data_seconds = time.perf_counter() - started
            result = train_step(model, self.optimizer, batches, supervised_total, config.optim.grad_clip, device)
            if not torch.isfinite(result.grad_norm):
                raise LacunaError(f"loss or gradients became NaN/inf at step {self.step}; stopped without saving, the "
                                  f"last good checkpoint is {self.checkpointer.latest or 'none'}: lower --lr or check "
                                  "the data")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            interval.add(time.perf_counter() - started, data_seconds, supervised_total)
            last_step, eval_loss = self.step == config.schedule.steps, None
            if self.val_shards is not None and (self.step % config.eval.every == 0 or last_step):
                eval_loss = evaluate(model, self.val_shards, config, device)
            if self.step % config.log.every == 0 or last_step or eval_loss is not None:
                dist.all_reduce(result.loss_sum)
                self.logger.log({"step": self.step, "loss": result.loss_sum.item() / max(supervised_total, 1),
                                 "lr": lr, "grad_norm": result.grad_norm.item(),
                                 **interval.throughput(self.tokens_per_step, flops, peak, dist.get_world_size()),
                                 "memory_gib": memory_gib(device), "epoch": self.loader.position.epoch}
                                | ({"eval_loss": eval_loss} if eval_loss is not None else {}))
                interval = Interval()
            if self.checkpointer.due(self.step):
                self.checkpointer.save(self.step, model, self.optimizer, self.checkpoint_meta(eval_loss))

    def checkpoint_meta(self, eval_loss: float | None) -> dict[str, Any]:
        """What a checkpoint records beside the weights: the data position and what a resume checks."""
        manifest = self.shards.manifest
        return {"epoch": self.loader.position.epoch, "offset": self.loader.position.offset, "eval_loss": eval_loss,
                "global_batch_rows": self.loader.global_batch_rows, "world_size": dist.get_world_size(),
                "model_name": self.config.model.name, "fingerprint": model_fingerprint(self.model),
                "data": data_identity(manifest), "mode": manifest["mode"], "tokenizer": manifest["tokenizer"]["name"]}


def train(config: Config, device: torch.device) -> None:
    """Set up, train, export (all ranks); a stop by signal says which checkpoint was kept."""
    with ExitStack() as stack:
        trainer = Trainer(config, device, stack)
        try:
            trainer.fit()
        except KeyboardInterrupt:
            raise LacunaError(f"stopped by a signal during step {trainer.step}; the newest complete checkpoint is "
                              f"{trainer.checkpointer.latest or 'none'}: run the same command again to resume from it"
                              ) from None
        trainer.logger.close()
        exported = trainer.checkpointer.export(dist.get_rank())
        if exported is not None:
            trainer.logger.print(f"exported {trainer.checkpointer.latest} to {exported}")


def main(arguments: list[str]) -> None:
    """Entry point: `python -m lacuna.train [@ file.toml] [--key value ...]` (also under torchrun)."""
    config = load_config(arguments, command="train")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # torchrun's or SLURM's stop: say what was kept
    device = init_distributed(config.parallel.timeout_seconds)
    rank = dist.get_rank()
    try:
        train(config, device)
    except BaseException as error:
        gc.collect()  # FSDP's cycles hold the group: destroy it while the interpreter lives (gloo aborts at exit)
        dist.destroy_process_group()  # no barrier: a peer may be dead
        if isinstance(error, RuntimeError) and any(word in str(error).lower() for word in ("timed out", "timeout")):
            raise LacunaError(f"rank {rank}: a collective timed out after {config.parallel.timeout_seconds} s "
                              "(another rank died or hung; see its output): raise --parallel.timeout-seconds if "
                              "steps are legitimately that slow") from None
        raise
    gc.collect()
    dist.barrier()  # no rank tears its connections down while a peer still uses them
    dist.destroy_process_group()

if __name__ == "__main__":
    run_main(main, sys.argv[1:])
