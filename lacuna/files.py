"""File safety for every command that writes: whole files or none, one job per folder, folders replaced atomically."""

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from lacuna.errors import LacunaError


def write_atomically(path: Path, text: str) -> None:
    """Write a synced temporary file beside `path`, then rename: a reader, or a rerun after a kill or a crash, finds
    the old file or the whole new one."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with temporary.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def check_writable(path: Path, what: str) -> None:
    """Refuse in one line a `path` that cannot be written: its nearest existing folder must take a new file."""
    existing = next(folder for folder in (Path(path), *Path(path).parents) if os.path.exists(folder))
    try:
        tempfile.NamedTemporaryFile(dir=existing, prefix=".lacuna-check").close()
    except OSError as error:
        raise LacunaError(f"{what} '{path}' cannot be written ('{existing}': {error.strerror}): choose a writable "
                          "place or fix its permissions") from None


def replace_directory(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`: the old one renamed aside, the new one renamed in, the old one
    removed last. Killed at any moment, `recover(target)` leaves the old or the new folder complete at `target`."""
    recover(target)
    if target.exists():
        os.rename(target, target.with_name(f"{target.name}.lacuna-replaced"))
    os.rename(new, target)
    recover(target)


def recover(target: Path) -> None:
    """Finish a killed replace_directory: the old folder back if the new one is not in place, else the old removed."""
    replaced = target.with_name(f"{target.name}.lacuna-replaced")
    if replaced.exists() and target.exists():
        shutil.rmtree(replaced)
    elif replaced.exists():
        os.rename(replaced, target)


def job_identity() -> str:
    """This process's job: torchrun's (the same on every rank of every node), else this process alone."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun {MASTER_ADDR}:{MASTER_PORT} {TORCHELASTIC_RUN_ID}".format_map(os.environ)
    return f"{socket.gethostname()} {os.getpid()}"


@contextmanager
def exclusive_lock(target: Path, what: str, job: str | None = None) -> Iterator[None]:
    """Hold the lock on folder `target` (an flock on `.NAME.lock` beside it, freed by the kernel when its holder
    dies) shared by one job's processes (`job`, else job_identity()); another job is refused in one line."""
    target = Path(target)
    check_writable(target.parent, f"the folder of {what}")
    created = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.with_name(f".{target.name}.lock")
    holder = {"job": job or job_identity(), "pid": os.getpid(), "host": socket.gethostname(),
              "command": " ".join(sys.argv)[:120]}
    file = join(path, holder, target)
    try:
        file.seek(0)
        found = json.loads(file.read() or "{}")
        if found.get("job") != holder["job"]:
            raise LacunaError(f"{what} '{target}' is being written by process {found.get('pid')} on "
                              f"{found.get('host')} ({found.get('command')}): wait for it to end or stop it, or "
                              "write elsewhere")
        yield
    finally:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the job's last process (or a refused one, alone)
            path.unlink()
            for folder in created:
                folder.rmdir()  # OSError once one is not empty
        except OSError:
            pass
        file.close()


def join(path: Path, holder: dict, target: Path) -> TextIO:
    """The lock file at `path`, share-locked; the first holder writes `holder` in. Opened again when its last holder
    removed it meanwhile (a lock on a removed file would protect nothing)."""
    while True:
        file = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it: this job becomes the holder
            file.truncate(0)
            file.write(json.dumps(holder))
            file.flush()
            recover(target)
        except BlockingIOError:
            pass
        fcntl.flock(file, fcntl.LOCK_SH)  # shared by the job's processes; while one holds it, nobody rewrites it
        try:
            if os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
                return file
        except FileNotFoundError:
            pass
        file.close()
