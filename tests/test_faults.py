"""Fault injection on the file-safety layer and prepare: two jobs on one folder, a kill at every step of a folder
swap and of a prepare, truncated and missing shard files, unwritable targets. Real processes and real files."""

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, TOKENIZER, materialize, write_jsonl

from lacuna.errors import LacunaError
from lacuna.files import check_writable, exclusive_lock, recover, replace_directory
from lacuna.prepare import main
from lacuna.shards import FORMAT, open_shards, write_shard

# Children come from a forkserver: forking this test process itself, which has run torch, tokenizers and gloo
# threads by then, can deadlock the child on a lock some other thread held at the fork.
CHILDREN = multiprocessing.get_context("forkserver")
CHILDREN.set_forkserver_preload(["test_faults"])

HOLD = """import sys
from lacuna.files import exclusive_lock
with exclusive_lock(sys.argv[1], "test folder", sys.argv[2] or None):
    print("held", flush=True)
    sys.stdin.readline()
"""


def holder(target: Path, job: str = "") -> subprocess.Popen:
    """A process holding the lock on `target` until its stdin closes (or it is killed)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(target), job], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def release(process: subprocess.Popen) -> None:
    process.stdin.close()
    assert process.wait(timeout=60) == 0


def test_faults_lock_refuses_another_job_naming_it_and_is_free_once_it_ends_or_is_killed(tmp_path: Path) -> None:
    target = tmp_path / "out"
    first = holder(target)
    with pytest.raises(LacunaError, match=rf"^test folder '{target}' is being written by process {first.pid} on "
                                          rf"{socket.gethostname()} \(.*\): wait for it to end or stop it"):
        with exclusive_lock(target, "test folder"):
            pass
    release(first)
    with exclusive_lock(target, "test folder"):  # free again after a normal end...
        assert not target.exists()  # (the lock lives beside the folder, which it does not create)
    killed = holder(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    with exclusive_lock(target, "test folder"):  # ...and after a kill: the kernel dropped it
        pass


def test_faults_lock_is_shared_by_the_processes_of_one_job(tmp_path: Path) -> None:
    target = tmp_path / "out"
    ranks = [holder(target, "job A"), holder(target, "job A")]  # e.g. prepare's --shard-index processes
    with exclusive_lock(target, "test folder", "job A"):
        pass
    with pytest.raises(LacunaError, match=rf"is being written by process {ranks[0].pid} "):
        with exclusive_lock(target, "test folder", "job B"):
            pass
    release(ranks[0])
    with pytest.raises(LacunaError, match=rf"process {ranks[0].pid} "):  # the first rank named while any rank holds
        with exclusive_lock(target, "test folder", "job B"):
            pass
    release(ranks[1])
    with exclusive_lock(target, "test folder", "job B"):
        pass


def die_at_call(number: int, names: tuple[str, ...]) -> None:
    """Patch os.`names` so that this (child) process is SIGKILLed at their `number`-th call, before it happens."""
    calls = [0]

    def patched(real: Callable) -> Callable:
        def call(*arguments, **keywords):
            calls[0] += 1
            if calls[0] == number:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*arguments, **keywords)
        return call

    for name in names:
        setattr(os, name, patched(getattr(os, name)))


def killed_at(number: int, names: tuple[str, ...], function: Callable, *arguments: object) -> bool:
    """Run `function` in a forked child killed at the `number`-th call of os.`names`; whether it was killed."""
    child = CHILDREN.Process(target=run_killed, args=(number, names, function, arguments))
    child.start()
    child.join(timeout=300)
    assert child.exitcode in (0, -signal.SIGKILL), child.exitcode
    return child.exitcode == -signal.SIGKILL


def run_killed(number: int, names: tuple[str, ...], function: Callable, arguments: tuple) -> None:
    die_at_call(number, names)
    function(*arguments)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def write_tree(folder: Path, files: dict[str, bytes]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def test_faults_replace_directory_killed_at_every_rename_and_unlink_leaves_old_or_new(tmp_path: Path) -> None:
    old = {"manifest.json": b"old", "a.npy": b"1", "b.npy": b"22", "sub/c.npy": b"333"}
    new = {"manifest.json": b"new", "a.npy": b"4", "d.npy": b"5"}
    outcomes = []
    for number in range(1, 20):
        write_tree(tmp_path / "out", old)
        write_tree(tmp_path / "out.partial", new)
        killed = killed_at(number, ("rename", "unlink", "rmdir"), replace_directory, tmp_path / "out.partial",
                           tmp_path / "out")
        recover(tmp_path / "out")  # what the next lock holder or replace does first
        found = tree(tmp_path / "out")
        assert found in (old, new), number
        assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "out.partial"][:1 + (found == old)]
        outcomes.append(found == new)
        if not killed:
            break
    assert outcomes[0] is False and outcomes[-1] is True and len(outcomes) >= 6  # two renames, then the removal
    shutil.rmtree(tmp_path / "out")
    write_tree(tmp_path / "out.partial", new)
    replace_directory(tmp_path / "out.partial", tmp_path / "out")  # nothing to replace
    assert tree(tmp_path / "out") == new and [path.name for path in tmp_path.iterdir()] == ["out"]


def as_unprivileged(function: Callable, *arguments: object) -> str:
    """The one-line LacunaError that `function` raises in a child process without root's rights ('' if none)."""
    receiving, sending = CHILDREN.Pipe(duplex=False)
    child = CHILDREN.Process(target=run_unprivileged, args=(sending, function, arguments))
    child.start()
    message = receiving.recv()
    child.join(timeout=60)
    return message


def run_unprivileged(sending: object, function: Callable, arguments: tuple) -> None:
    message = ""
    try:
        if os.geteuid() == 0:
            os.setgid(65534), os.setuid(65534)  # nobody: root writes into read-only folders
        function(*arguments)
    except LacunaError as error:
        message = str(error)
    finally:
        sending.send(message)


def lock_and_write(target: Path) -> None:
    with exclusive_lock(target, "prepare output"):
        target.mkdir()


def test_faults_unwritable_targets_are_refused_in_one_line(tmp_path: Path) -> None:
    read_only = Path(tempfile.mkdtemp())  # not under tmp_path, which only root may enter
    try:
        read_only.chmod(0o555)
        message = as_unprivileged(check_writable, read_only / "runs" / "run", "--run-dir")
        assert message == (f"--run-dir '{read_only}/runs/run' cannot be written ('{read_only}': Permission denied): "
                           "choose a writable place or fix its permissions")
        message = as_unprivileged(lock_and_write, read_only / "out")
        assert message.startswith(f"the folder of prepare output '{read_only}' cannot be written (")
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)
        shutil.rmtree(read_only)
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(LacunaError, match=r"/file': Not a directory\): choose a writable place"):
        lock_and_write(tmp_path / "file" / "out")
    check_writable(tmp_path / "new" / "folders", "--out")  # creatable is writable
    assert not (tmp_path / "new").exists()


def small_folder(directory: Path) -> Path:
    """A prepared folder (two shards of 3 rows of 8 tokens) written by the shard writer."""
    directory.mkdir()
    shards = []
    for index in range(2):
        tokens = np.arange(24, dtype=np.uint16).reshape(3, 8) + index
        arrays = {"tokens": tokens, "cu_seqlens": np.array([0, 8] * 3, np.int32), "row_offsets": np.arange(0, 7, 2),
                  "supervised": np.full(3, 7), "max_seqlen": np.full(3, 8, np.int32)}
        shards.append(write_shard(directory, f"train-00000-{index:05d}", arrays))
    (directory / "manifest.json").write_text(json.dumps({**FORMAT, "seq_len": 8, "splits": {"train": shards}}))
    return directory


def test_faults_truncated_and_missing_shard_files_are_named_in_one_line_at_open(tmp_path: Path) -> None:
    folder = small_folder(tmp_path / "data")
    assert open_shards(folder).row(4).tokens.tolist() == list(range(9, 17))
    tokens = folder / "train-00000-00001.tokens.npy"
    complete = tokens.read_bytes()
    for size in (len(complete) - 1, 130, 40, 5, 0):  # into the data, to the header's end, into the header, magic
        tokens.write_bytes(complete[:size])
        with pytest.raises(LacunaError, match=rf"^shard file '{tokens}' is truncated \({size} bytes, less than its "
                                              r"\.npy header says\): prepare the folder again$"):
            open_shards(folder)
    result = subprocess.run([Path(sys.executable).with_name("lacuna"), "inspect", str(folder), "--row", "0"],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: shard file '{tokens}' is truncated (0 bytes, less than its .npy header says): " \
                            "prepare the folder again\n"
    tokens.unlink()
    with pytest.raises(LacunaError, match=rf"^shard file '{tokens}' is missing: prepare the folder again$"):
        open_shards(folder)


def prepare_killed_at(number: int, arguments: list[str], root: Path) -> None:
    """Run prepare, SIGKILLed at its `number`-th rename of a file or folder under `root` (each is a commit point)."""
    calls = [0]

    def patched(real: Callable) -> Callable:
        def call(source: object, *arguments: object, **keywords: object) -> object:
            if str(source).startswith(str(root)):
                calls[0] += 1
                if calls[0] == number:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(source, *arguments, **keywords)
        return call

    os.rename, os.replace = patched(os.rename), patched(os.replace)
    main(arguments)


def test_faults_prepare_overwrite_killed_at_each_write_phase_then_rerun_ends_complete(tmp_path: Path) -> None:
    """Killed after its part, its shards, the merge's manifest, or between the swap's renames: OUT holds the old
    folder or the new one (the swap recovered by the next writer), and a rerun writes the new one, byte for byte."""
    materialize(DATA)
    write_jsonl(tmp_path / "code.jsonl", [{"text": f"def f{index}(x):\n    return x * {index}\n" * (index % 7 + 1)}
                                          for index in range(40)])
    out = tmp_path / "out"
    common = ["pretrain", "--dataset", str(tmp_path / "code.jsonl"), "--tokenizer", str(TOKENIZER), "--quiet",
              "--rows-per-shard", "2", "--out", str(out), "--overwrite"]
    main([*common, "--seq-len", "128"])
    new, old = tree(out), {"manifest.json": b"{}", "train-00000-00000.tokens.npy": b"old"}  # (any folder)
    phases = []
    for number in range(1, 10):
        write_tree(out, old)
        child = CHILDREN.Process(target=prepare_killed_at, args=(number, [*common, "--seq-len", "128"], tmp_path))
        child.start()
        child.join(timeout=300)
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL
        phases.append(sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("out")))
        recover(out)
        assert tree(out) in (old, new), number
        main([*common, "--seq-len", "128"])
        assert tree(out) == new, number
        assert sorted(path.name for path in tmp_path.iterdir()) == ["code.jsonl", "out"]  # the rerun's lock file too
    # killed before: the part's marker, the shards' marker, the parts' removal, the manifest, the old folder's
    # rename aside and the new one's rename in (the old one restored by the next writer)
    assert phases == [["out", "out.partial"]] * 5 + [["out.lacuna-replaced", "out.partial"]], phases


def prepare_paused_in_merge(arguments: list[str], reached: object, resume: object) -> None:
    """Run prepare in this (child) process; at the merge, set the `reached` event and wait for `resume`."""
    import lacuna.prepare

    real_merge = lacuna.prepare.merge

    def merge(*merge_arguments: object) -> object:
        reached.set()
        resume.wait(300)
        return real_merge(*merge_arguments)

    lacuna.prepare.merge = merge
    main(arguments)


def test_faults_a_second_prepare_on_one_out_is_refused_naming_the_first(tmp_path: Path,
                                                                         capfd: pytest.CaptureFixture) -> None:
    write_jsonl(tmp_path / "code.jsonl", [{"text": f"x = {index}\n" * (index % 5 + 1)} for index in range(30)])
    out = tmp_path / "out"
    arguments = ["pretrain", "--dataset", str(tmp_path / "code.jsonl"), "--tokenizer", str(TOKENIZER), "--quiet",
                 "--seq-len", "64", "--out", str(out)]
    reached, resume = CHILDREN.Event(), CHILDREN.Event()
    first = CHILDREN.Process(target=prepare_paused_in_merge, args=(arguments, reached, resume))
    first.start()
    assert reached.wait(300)  # the first prepare is merging: its parts are written
    with pytest.raises(LacunaError, match=rf"^prepare output '{out}' is being written by process {first.pid} on "
                                          rf"{socket.gethostname()} \(.*\): wait for it to end or stop it, or write "
                                          "elsewhere$"):
        main([*arguments, "--overwrite"])
    resume.set()
    first.join(timeout=300)
    assert first.exitcode == 0 and open_shards(out).num_rows > 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["code.jsonl", "out"]  # no lock file left


def test_faults_prepare_into_a_read_only_folder_fails_before_loading_anything(tmp_path: Path) -> None:
    read_only = Path(tempfile.mkdtemp())
    try:
        read_only.chmod(0o555)
        message = as_unprivileged(main, ["pretrain", "--dataset", str(tmp_path / "missing.jsonl"), "--out",
                                         str(read_only / "data" / "out")])  # the dataset would fail next
        assert message == (f"the folder of prepare output '{read_only}/data' cannot be written ('{read_only}': "
                           "Permission denied): choose a writable place or fix its permissions")
    finally:
        read_only.chmod(0o755)
        shutil.rmtree(read_only)
