"""`lacuna train`: torchrun (in this process) with the right process count, threads and rendezvous, one node or
many (`--nnodes N --parallel.rdzv-endpoint HOST:PORT`; pipelines/slurm.sh)."""

import os
import re
import sys

from lacuna.config import Config, ParallelConfig, load_config
from lacuna.errors import LacunaError
from lacuna.machine import machine_physical_cores


def processes_per_node(parallel: ParallelConfig) -> int:
    """`auto`: one process per visible CUDA GPU, else one (a CPU process uses all cores through OMP threads)."""
    if parallel.nproc_per_node != "auto":
        return parallel.nproc_per_node
    import torch

    return torch.cuda.device_count() or 1


def check_parallel(parallel: ParallelConfig, nproc: int) -> None:
    """One-line errors for launch settings torchrun would reject with a traceback (or accept and then hang)."""
    if nproc < 1:
        raise LacunaError(f"--nproc-per-node must be at least 1 or 'auto' (got {nproc}): pass processes per machine")
    endpoint = parallel.rdzv_endpoint
    if endpoint is None and parallel.nnodes > 1:
        raise LacunaError(f"--nnodes {parallel.nnodes} needs --parallel.rdzv-endpoint HOST:PORT (the first node, the "
                          "same on every node); pipelines/slurm.sh sets it under SLURM")
    if endpoint is not None and not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", endpoint):
        raise LacunaError(f"--parallel.rdzv-endpoint must be HOST:PORT, e.g. node001:29500 (got '{endpoint}')")


def torchrun_arguments(parallel: ParallelConfig, nproc: int, train_arguments: list[str]) -> list[str]:
    """The torchrun command line (without `torchrun` itself) that runs `python -m lacuna.train` on this node."""
    if parallel.rdzv_endpoint is None:
        rendezvous = ["--standalone"]
    else:
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", parallel.rdzv_endpoint,
                      "--rdzv-id", parallel.rdzv_id, "--rdzv-conf", f"join_timeout={parallel.timeout_seconds}"]
    return ["--nnodes", str(parallel.nnodes), "--nproc-per-node", str(nproc), *rendezvous,
            "--max-restarts", str(parallel.max_restarts), "-m", "lacuna.train", *train_arguments]


def omp_threads(nproc: int, cores: int) -> int:
    """Physical cores split evenly between the processes of a node: more threads than cores only thrash."""
    return max(1, cores // nproc)


def failure_exit_code(exitcode: int) -> int:
    """A rank's exit code as a shell would report it (-9, killed by SIGKILL, becomes 137)."""
    return exitcode if exitcode > 0 else 128 - exitcode


def run_torchrun(arguments: list[str], parallel: ParallelConfig) -> int:
    """torchrun's main in this process; returns the exit code of the first failed rank (0 on success)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import main

    try:
        main(arguments)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = failure_exit_code(failure.exitcode)
        if code != 2:  # 2 is a LacunaError, already printed by the rank as one line
            how = failure.signal_name() if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(f"error: rank {rank} failed ({how}); its output is above", file=sys.stderr)
        return code
    except RendezvousTimeoutError:
        raise LacunaError(f"not all {parallel.nnodes} nodes joined the rendezvous at {parallel.rdzv_endpoint} "
                          f"within {parallel.timeout_seconds} s: start the same `lacuna train` command on every node"
                          ) from None
    except RendezvousError as error:
        raise LacunaError(f"rendezvous at {parallel.rdzv_endpoint} failed ({type(error).__name__}: {error}): check "
                          "that every node can reach it") from None
    except SignalException as error:
        return 128 + int(error.sigval)
    return 0


def launch(arguments: list[str]) -> None:
    """Validate the config, set OMP_NUM_THREADS, run torchrun on `lacuna.train`; exits with its exit code."""
    config: Config = load_config(arguments, "train")
    nproc = processes_per_node(config.parallel)
    check_parallel(config.parallel, nproc)
    threads = int(os.environ.get("OMP_NUM_THREADS") or omp_threads(nproc, machine_physical_cores()))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # torchrun's rendezvous store, shared with the ranks by default, keeps the previous attempt's keys after a
    # restart, so new ranks can read dead peers' addresses (pytorch/pytorch#135712): a fresh store per attempt.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    print(f"lacuna: {config.parallel.nnodes} node(s) x {nproc} process(es), OMP_NUM_THREADS={threads}", file=sys.stderr)
    raise SystemExit(run_torchrun(torchrun_arguments(config.parallel, nproc, arguments), config.parallel))
