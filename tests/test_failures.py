"""Failure handling end to end with real torchrun, FSDP2 over gloo and DCP on one machine.

Two "nodes" are two torchrun agents on 127.0.0.1 started by pipelines/slurm.sh (with `srun`/`scontrol` stand-ins
that start one copy of the command per node); ranks are SIGKILLed mid-run and mid-checkpoint, or SIGSTOPped.
Every process a test starts is bounded in time and killed at the end: only descendants of its own launcher.
"""

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY, materialize, read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LACUNA, PYTHON = str(REPO / ".venv" / "bin" / "lacuna"), str(REPO / ".venv" / "bin" / "python")
TINY_MODEL = """
[model]
name = "data/models/SmolLM2-config"
activation_checkpointing = false
dtype = "float32"
[data]
batch_size = 2
[schedule]
steps = 8
warmup_steps = 2
[checkpoint]
every = 3
export = false
[log]
every = 1
[model.config_overrides]
""" + "".join(f"{key} = {value}\n" for key, value in TINY.items())
FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: one copy of the command per node, each with its own --output file.
while [[ $1 == -* ]]; do [[ $1 == --output=* ]] && output=${1#--output=}; shift; done
for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do
    log=${output//%n/$node}; SLURM_NODEID=$node "$@" > "${log//%N/localhost}" 2>&1 &
done
status=0; for job in $(jobs -p); do wait "$job" || status=$?; done; exit $status
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Packed pretrain shards of a few stdlib files (seq 128) and a tiny random-init Llama config."""
    from lacuna.prepare import main as prepare

    materialize(REPO / "data")
    directory = tmp_path_factory.mktemp("failures")
    lines, size = [], 0
    with open(REPO / "data" / "corpus" / "stdlib.jsonl") as corpus:
        while size < 100_000:
            lines.append(corpus.readline())
            size += len(lines[-1])
    (directory / "corpus.jsonl").write_text("".join(lines))
    prepare(["pretrain", "--dataset", str(directory / "corpus.jsonl"), "--out", str(directory / "data"),
             "--seq-len", "128", "--tokenizer", str(REPO / "data/models/SmolLM2-config"), "--quiet"])
    (directory / "tiny.toml").write_text(TINY_MODEL)
    return directory


def children(pid: int) -> list[int]:
    """All descendants of `pid` (torchrun starts its workers in their own sessions, so no process group)."""
    direct = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            direct += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return direct + [grandchild for child in direct for grandchild in children(child)]


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """Rank -> pid of the `lacuna.train` worker processes under this launcher."""
    found = {}
    for pid in children(launcher.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environment = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                               if b"=" in item)
        except OSError:
            continue
        if b"lacuna.train" in command and b"RANK" in environment:
            found[int(environment[b"RANK"])] = pid
    return found


def start(command: list[str], log: Path, **environment: str) -> subprocess.Popen:
    with open(log, "w") as output:
        return subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **environment})


def stop(launcher: subprocess.Popen) -> None:
    """SIGKILL (after SIGCONT) the launcher and everything it started; a no-op once it exited (torchrun has then
    ended its workers, and the launcher's pid may belong to someone else)."""
    if launcher.poll() is not None:
        return
    for pid in [*children(launcher.pid), launcher.pid]:
        for signal_number in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, signal_number)
            except ProcessLookupError:
                pass
    launcher.wait(timeout=30)


def wait_for(condition: Callable[[], object], launcher: subprocess.Popen, log: Path, seconds: float = 120,
             poll: float = 0.05) -> object:
    """Poll until `condition()` is truthy; fail (with the log) if the launcher exits first or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := condition():
            return result
        if launcher.poll() is not None:
            pytest.fail(f"launcher exited with {launcher.returncode} while waiting:\n{log.read_text()[-3000:]}")
        time.sleep(poll)
    pytest.fail(f"timed out after {seconds} s while waiting:\n{log.read_text()[-3000:]}")


def finish(launcher: subprocess.Popen, log: Path, seconds: float = 180) -> int:
    try:
        return launcher.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launcher still running after {seconds} s:\n{log.read_text()[-3000:]}")


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def last_step(run_dir: Path) -> int:
    records = metrics(run_dir)
    return records[-1]["step"] if records else 0


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(record["step"], record["loss"], record["grad_norm"]) for record in metrics(run_dir)]


def config(workspace: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["@", str(workspace / "tiny.toml"), "--data", str(workspace / "data"), "--run-dir", str(run_dir), *overrides]


@pytest.fixture(scope="module")
def reference(workspace: Path) -> Path:
    """An uninterrupted 2-process run on one node."""
    run_dir, log = workspace / "reference", workspace / "reference.log"
    launcher = start([LACUNA, "train", *config(workspace, run_dir, "--nproc-per-node", "2")], log)
    try:
        assert finish(launcher, log) == 0, log.read_text()[-3000:]
    finally:
        stop(launcher)
    assert [step for step, _, _ in curve(run_dir)] == list(range(1, 9))
    return run_dir


def free_job_id() -> int:
    """A SLURM job id whose slurm.sh rendezvous port (20000 + id % 20000) is free now, below the ephemeral range."""
    for job_id in random.sample(range(1, 12768), 100):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", 20000 + job_id))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port in 20001-32767")


def slurm_job(workspace: Path, run_dir: Path, log: Path, *arguments: str) -> subprocess.Popen:
    """pipelines/slurm.sh on a fake two-node allocation of 127.0.0.1."""
    bin_dir = workspace / "fake-slurm"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf '127.0.0.1\\n127.0.0.1\\n'\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return start(["bash", "pipelines/slurm.sh", *config(workspace, run_dir, *arguments)], log,
                 PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NODELIST="node[1-2]",
                 SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID=str(free_job_id()), SLURM_CPUS_ON_NODE="1")


def test_two_nodes_resume_bit_identically_after_a_killed_rank_and_a_kill_during_a_checkpoint_write(
        workspace: Path, reference: Path) -> None:
    run_dir, log = workspace / "two-nodes", workspace / "two-nodes.log"
    checkpoints = run_dir / "checkpoints"
    launcher = slurm_job(workspace, run_dir, log)
    node_logs = lambda: "".join(path.read_text() for path in sorted((run_dir / "logs").glob("*.log")))  # noqa: E731
    try:
        # 1. SIGKILL rank 1 mid-run, after the step-3 checkpoint: both nodes restart and resume from step 3.
        wait_for(lambda: last_step(run_dir) >= 4 and len(workers(launcher)) == 2, launcher, log)
        assert not (checkpoints / "step-00000006").exists()
        killed = workers(launcher)[1]
        os.kill(killed, signal.SIGKILL)
        # 2. SIGKILL rank 1 while the step-6 checkpoint is being written: the resume must skip it.
        wait_for(lambda: node_logs().count("at step 3") == 1 and len(workers(launcher)) == 2
                 and killed not in workers(launcher).values(), launcher, log)
        rank_one = workers(launcher)[1]
        wait_for(lambda: (checkpoints / "step-00000006.tmp").is_dir(), launcher, log, poll=0.0005)
        os.kill(rank_one, signal.SIGKILL)
        assert not (checkpoints / "step-00000006").exists()
        assert finish(launcher, log) == 0, node_logs()[-3000:]
    finally:
        stop(launcher)
    output = node_logs()
    assert output.count(f"resumed from {checkpoints / 'step-00000003'} at step 3") == 2, output[-3000:]
    assert "at step 6" not in output
    assert curve(run_dir) == curve(reference)  # bit-identical loss and gradient norm at every step
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-00000006", "step-00000008"]
    assert len(list((run_dir / "logs").glob("job*-node0-localhost.log"))) == 1
    assert len(list((run_dir / "logs").glob("job*-node1-localhost.log"))) == 1


def test_resuming_on_fewer_ranks_continues_at_the_same_row_with_the_same_global_batch(
        workspace: Path, reference: Path) -> None:
    run_dir, log = workspace / "elastic", workspace / "elastic.log"
    (run_dir / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(reference / "checkpoints" / "step-00000006"), str(run_dir / "checkpoints")],
                   check=True)
    # One process without torchrun: 1 rank x grad_accum 2 (adapted from the checkpoint's 2 ranks x 1).
    launcher = start([PYTHON, "-m", "lacuna.train", *config(workspace, run_dir)], log)
    try:
        assert finish(launcher, log) == 0, log.read_text()[-3000:]
    finally:
        stop(launcher)
    resumed, expected = curve(run_dir), curve(reference)[6:]
    assert [step for step, _, _ in resumed] == [7, 8]
    for (_, loss, grad_norm), (_, expected_loss, expected_grad_norm) in zip(resumed, expected, strict=True):
        assert loss == pytest.approx(expected_loss, rel=1e-6)  # bit-identical here; allow reduction-order noise
        assert grad_norm == pytest.approx(expected_grad_norm, rel=1e-5)


def test_a_hung_rank_makes_the_others_fail_with_a_clear_timeout_message(workspace: Path) -> None:
    run_dir, log = workspace / "hang", workspace / "hang.log"
    launcher = start([LACUNA, "train", *config(workspace, run_dir, "--nproc-per-node", "2", "--steps", "1000",
                                                "--parallel.timeout-seconds", "10")], log)
    try:
        wait_for(lambda: last_step(run_dir) >= 2 and len(workers(launcher)) == 2, launcher, log)
        hung = workers(launcher)[1]
        os.kill(hung, signal.SIGSTOP)
        wait_for(lambda: "a collective timed out after 10 s" in log.read_text(), launcher, log, seconds=60)
        os.kill(hung, signal.SIGCONT)  # lets torchrun's SIGTERM end it now rather than SIGKILL it after 30 s
        assert finish(launcher, log, seconds=60) == 2
    finally:
        stop(launcher)
    assert "error: rank 0: a collective timed out after 10 s" in log.read_text()
    assert last_step(run_dir) < 1000
