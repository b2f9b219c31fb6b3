"""The launcher: torchrun command lines, thread counts, physical cores, one-line errors for bad launch settings."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lacuna import launch as launch_module
from lacuna.config import load_config
from lacuna.errors import LacunaError
from lacuna.launch import failure_exit_code, launch, omp_threads, processes_per_node, torchrun_arguments
from lacuna.machine import physical_cores

REPO = Path(__file__).resolve().parents[1]


def cpuinfo(cpus: list[tuple[int, int, int]], core_ids: bool = True) -> str:
    """/proc/cpuinfo text for (processor, physical id, core id) triples."""
    blocks = []
    for processor, package, core in cpus:
        lines = [f"processor\t: {processor}", "model name\t: Test CPU"]
        if core_ids:
            lines += [f"physical id\t: {package}", "siblings\t: 4", f"core id\t\t: {core}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n\n"


def test_physical_cores_count_hyperthread_siblings_once_per_socket() -> None:
    # Two sockets x two cores x two hyperthreads; core ids repeat across sockets.
    cpus = [(index, index // 4 % 2, index % 2) for index in range(8)]
    text = cpuinfo(cpus)
    assert physical_cores(text, set(range(8))) == 4
    assert physical_cores(text, {0, 2}) == 1  # hyperthread siblings: socket 0, core 0
    assert physical_cores(text, {0, 4}) == 2  # same core id on two sockets
    assert physical_cores(text, {0, 1, 2}) == 2
    assert physical_cores(cpuinfo(cpus, core_ids=False), {0, 1, 2}) == 3  # e.g. ARM: no core ids, count CPUs


def test_machine_cores_respect_cpu_affinity() -> None:
    code = "import os; os.sched_setaffinity(0, {0}); from lacuna.machine import machine_physical_cores as m; print(m())"
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert pinned.stdout.strip() == "1", pinned.stderr
    assert 1 <= launch_module.machine_physical_cores() <= len(os.sched_getaffinity(0))


def test_threads_split_physical_cores_between_processes() -> None:
    assert omp_threads(1, 16) == 16
    assert omp_threads(4, 16) == 4
    assert omp_threads(3, 16) == 5
    assert omp_threads(8, 2) == 1


def test_a_rank_killed_by_a_signal_exits_like_a_shell_reports_it() -> None:
    assert failure_exit_code(-9) == 137 and failure_exit_code(-15) == 143
    assert failure_exit_code(2) == 2


def test_single_node_uses_standalone_rendezvous_and_passes_config_arguments_through() -> None:
    arguments = ["@", "configs/pretrain.toml", "--steps", "5"]
    config = load_config([*arguments, "--nproc-per-node", "2"])
    command = torchrun_arguments(config.parallel, 2, arguments)
    assert command == ["--nnodes", "1", "--nproc-per-node", "2", "--standalone", "--max-restarts", "0",
                       "-m", "lacuna.train", *arguments]


def test_multi_node_command_is_accepted_by_torchrun() -> None:
    from torch.distributed.run import get_args_parser

    arguments = ["--nnodes", "2", "--parallel.rdzv-endpoint", "node001:29400", "--parallel.rdzv-id", "4242",
                 "--parallel.max-restarts", "3", "--parallel.timeout-seconds", "90"]
    config = load_config(arguments)
    parsed = get_args_parser().parse_args(torchrun_arguments(config.parallel, 4, arguments))
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.max_restarts) == ("2", "4", 3)
    assert (parsed.rdzv_backend, parsed.rdzv_endpoint, parsed.rdzv_id) == ("c10d", "node001:29400", "4242")
    assert parsed.rdzv_conf == "join_timeout=90" and not parsed.standalone
    assert parsed.module and parsed.training_script == "lacuna.train" and parsed.training_script_args == arguments


def test_auto_process_count_is_one_per_gpu_or_one_on_cpu() -> None:
    import torch

    expected = torch.cuda.device_count() or 1
    assert processes_per_node(load_config([]).parallel) == expected
    assert processes_per_node(load_config(["--nproc-per-node", "3"]).parallel) == 3


@pytest.mark.parametrize(("arguments", "message"), [
    (["--nnodes", "0"], "'parallel.nnodes' is invalid: Input should be greater than or equal to 1"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be at least 1"),
    (["--nnodes", "2"], "needs --parallel.rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--parallel.rdzv-endpoint", "node001"], "must be HOST:PORT"),
    (["--parallel.max-restarts", "-1"], "'parallel.max_restarts' is invalid: .* greater than or equal to 0"),
    (["--parallel.timeout-seconds", "0"], "'parallel.timeout_seconds' is invalid: .* greater than or equal to 1"),
])
def test_bad_launch_settings_fail_before_starting_anything(arguments: list[str], message: str) -> None:
    with pytest.raises(LacunaError, match=message):
        launch(["--nproc-per-node", "1", *arguments])


def test_cli_reports_a_bad_setting_as_one_line_and_exit_code_2() -> None:
    command = [sys.executable, "-c", "from lacuna.cli import main; main()", "train", "--nnodes", "2",
               "--nproc-per-node", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --nnodes 2 needs --parallel.rdzv-endpoint HOST:PORT (the first node, the same on every node); "
        "pipelines/slurm.sh sets it under SLURM"]


def test_launch_sets_threads_unless_the_user_did_and_exits_with_torchrun_code(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[list[str], str]] = []

    def fake_torchrun(arguments: list[str], parallel: object) -> int:  # stands in for torchrun only
        seen.append((arguments, os.environ["OMP_NUM_THREADS"]))
        return 137

    monkeypatch.setattr(launch_module, "run_torchrun", fake_torchrun)
    monkeypatch.setattr(launch_module, "machine_physical_cores", lambda: 6)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        launch(["--nproc-per-node", "2"])
    assert exit_info.value.code == 137 and seen[-1][1] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(SystemExit):
        launch(["--nproc-per-node", "2"])
    assert seen[-1][1] == "1"


def test_a_node_that_never_joins_fails_the_rendezvous_with_one_line() -> None:
    with socket.socket() as probe:  # a free port for the rendezvous store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from lacuna.cli import main; main()", "train", "--nnodes", "2",
               "--nproc-per-node", "1", "--parallel.rdzv-endpoint", f"127.0.0.1:{port}",
               "--parallel.timeout-seconds", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: not all 2 nodes joined the rendezvous at 127.0.0.1:{port} within 2 s: start the same "
        "`lacuna train` command on every node")
