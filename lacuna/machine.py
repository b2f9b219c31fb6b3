"""Facts about this machine that decide how to run: CPU model and features, physical cores, usable GPUs."""

import os
import subprocess
from pathlib import Path


def cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where the OS has none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The processor's name as the OS reports it (benchmarks record it: CPU results differ between machines)."""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo().splitlines() if line.startswith("model name")]
    return names[0] if names else "unknown CPU"


def native_bfloat16_flags() -> set[str] | None:
    """The CPU's native-bf16 flags (amx_bf16, avx512_bf16, Arm bf16); None where the OS lists no flags."""
    flags = {flag for line in cpuinfo().splitlines() if line.startswith(("flags", "Features")) for flag in line.split()}
    return flags & {"amx_bf16", "avx512_bf16", "bf16"} if flags else None


def physical_cores(text: str, allowed_cpus: set[int]) -> int:
    """Distinct (socket, core) pairs among the allowed CPUs of cpuinfo `text` (else the allowed count)."""
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "core id" in fields and int(fields.get("processor", -1)) in allowed_cpus:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or len(allowed_cpus)


def machine_physical_cores() -> int:
    """Physical cores this process may run on (respects the CPU affinity set by SLURM, taskset, containers)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    return physical_cores(cpuinfo(), allowed)


def nvidia_driver() -> str | None:
    """The NVIDIA driver version when `nvidia-smi` sees a GPU this process may use, else None."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return None
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    versions = result.stdout.split() if result.returncode == 0 else []
    return versions[0] if versions else None


def unusable_gpu_message(driver: str, torch_version: str, torch_cuda: str | None) -> str:
    """The one-line error for GPUs that are visible but that this torch cannot use."""
    build = f"its CUDA {torch_cuda} build" if torch_cuda else "it is a CPU-only build"
    need = " (CUDA 13 needs driver >= 580, CUDA 12.x >= 525)" if torch_cuda else ""
    return (f"a GPU is visible (NVIDIA driver {driver}) but torch {torch_version} cannot use it: {build}{need}; "
            "install a torch build that matches the driver (README: GPU builds and drivers), or hide the GPUs with "
            "CUDA_VISIBLE_DEVICES= to run on the CPU")
