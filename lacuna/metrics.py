"""Training observability: peak flops for MFU, memory, and the rank-0 logger (console, metrics.jsonl, wandb)."""

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lacuna.files import write_atomically
from lacuna.machine import native_bfloat16_flags

# Dense bf16 tensor-core peak in TFLOPS, matched as a substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0, "A100": 312.0,
                   "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
                   "RTX 4090": 165.0, "RTX 3090": 71.0, "MI300X": 1307.0}


def measure_matmul_flops(dtype: torch.dtype, seconds: float = 1.0, largest: int = 2048, device: str = "cpu") -> float:
    """Best square-matmul flops on `device` within about `seconds`, sizes doubling from 256 to `largest`."""
    deadline, size, best = time.perf_counter() + seconds, 256, 0.0
    while True:
        left, right = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        for _ in range(3):
            start = time.perf_counter()
            (left @ right).sum().item()  # .item() waits for a GPU to finish
            elapsed = time.perf_counter() - start
            best = max(best, 2 * size**3 / elapsed)
        if size >= largest or time.perf_counter() + 3 * 8 * elapsed > deadline:  # the next size costs ~8× more
            return best
        size *= 2


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float | None) -> float:
    """Per-device peak flops of `dtype`, the compute dtype in use: configured, else the GPU table (dense bf16
    tensor-core peaks), else measured on this CPU in about 2 s."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return measure_matmul_flops(torch.bfloat16, seconds=2.0, largest=8192, device=device.type)  # not in the table
    return measure_matmul_flops(dtype, seconds=2.0)


class DtypeChoice(NamedTuple):
    dtype: str  # "bfloat16" or "float32"
    reason: str  # printed at start


def choose_cpu_dtype(bfloat16_flops: float, float32_flops: float, capability: str) -> DtypeChoice:
    """bf16 where this CPU computes it at least as fast as fp32 (native bf16: AMX, AVX512-BF16), else fp32 (emulated
    bf16 is several to ~50× slower); returns the dtype name and the reason to print."""
    choice = "bfloat16" if bfloat16_flops >= float32_flops else "float32"
    return DtypeChoice(choice, f"CPU ({capability}) matmul: bf16 {bfloat16_flops / 1e9:.0f} vs fp32 "
                       f"{float32_flops / 1e9:.0f} GFLOP/s per process")


def cpu_dtype_from_flags(native_flags: set[str], capability: str) -> DtypeChoice:
    """bf16 where the CPU has a native-bf16 instruction set, else fp32; with the reason to print."""
    native = f"native bf16 ({', '.join(sorted(native_flags))})" if native_flags else "bf16 only emulated (slow)"
    return DtypeChoice("bfloat16" if native_flags else "float32", f"CPU ({capability}), {native}")


def choose_dtype(choice: str, device: torch.device) -> DtypeChoice:
    """`model.dtype` resolved (auto: bf16 where the device computes it natively, by CPU flags, else a matmul probe)."""
    if choice != "auto":
        return DtypeChoice(choice, "model.dtype")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return DtypeChoice("bfloat16" if supported else "float32", f"{torch.cuda.get_device_name(device)} bf16 support")
    capability = torch.backends.cpu.get_cpu_capability()
    flags = native_bfloat16_flags()
    if flags is not None:
        return cpu_dtype_from_flags(flags, capability)
    probes = [measure_matmul_flops(dtype, seconds=0.15, largest=512) for dtype in (torch.bfloat16, torch.float32)]
    return choose_cpu_dtype(*probes, capability)


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@dataclass
class Interval:
    """Time and work since the last logged step."""

    steps: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    supervised_tokens: int = 0

    def add(self, seconds: float, data_seconds: float, supervised_tokens: int) -> None:
        """Account one optimizer step."""
        self.steps += 1
        self.seconds += seconds
        self.data_seconds += data_seconds
        self.supervised_tokens += supervised_tokens

    def throughput(self, tokens_per_step: int, flops_per_token: float, peak: float, world_size: int) -> dict:
        """Tokens/s (all and supervised, whole job), MFU, step time and data-wait share over the interval."""
        tokens_per_second = self.steps * tokens_per_step / self.seconds
        return {"tokens_per_second": tokens_per_second,
                "supervised_tokens_per_second": self.supervised_tokens / self.seconds,
                "mfu": flops_per_token * tokens_per_second / (peak * world_size),
                "step_seconds": self.seconds / self.steps, "data_wait_share": self.data_seconds / self.seconds}


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run that died after its last checkpoint)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
        write_atomically(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    """Writes records to RUN_DIR/metrics.jsonl, a console line and wandb; a no-op except on rank 0."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_mode: str, wandb_project: str,
                 config: dict[str, Any], total_steps: int) -> None:
        from rich.console import Console

        self.enabled, self.total_steps, self.console = enabled, total_steps, Console(highlight=False, soft_wrap=True)
        self.file = (run_dir / "metrics.jsonl").open("a") if enabled else None
        self.wandb: Any = None
        if enabled and wandb_mode != "off":
            import wandb

            self.wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(run_dir), config=config,
                                    name=run_dir.name, resume="allow")

    def print(self, message: str, **options: Any) -> None:
        """A console message on rank 0 (`options` go to rich's Console.print)."""
        if self.enabled:
            self.console.print(message, **options)

    def record(self, record: dict[str, Any]) -> None:
        """One record to metrics.jsonl only (the start record)."""
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def log(self, record: dict[str, Any]) -> None:
        """One step's record (must hold `step`) to every sink."""
        if not self.enabled:
            return
        self.record(record)
        if self.wandb is not None:
            self.wandb.log({key: value for key, value in record.items() if key != "step"}, step=record["step"])
        self.console.print(format_record(record, self.total_steps))

    def close(self) -> None:
        """Flush and close the sinks."""
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_record(record: dict[str, Any], total_steps: int) -> str:
    """The console line for one logged step."""
    line = (f"[bold]step {record['step']:>{len(str(total_steps))}}/{total_steps}[/] "
            f"loss [cyan]{record['loss']:.4f}[/] lr {record['lr']:.2e} grad {record['grad_norm']:.3f} "
            f"| {record['tokens_per_second']:,.0f} tok/s ({record['supervised_tokens_per_second']:,.0f} sup) "
            f"MFU {100 * record['mfu']:.2f}% | {record['step_seconds']:.3f} s/step "
            f"(data {100 * record['data_wait_share']:.0f}%) | mem {record['memory_gib']:.2f} GiB")
    if "eval_loss" in record:
        line += f" | [green]eval {record['eval_loss']:.4f}[/]"
    return line
