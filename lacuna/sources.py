"""`--dataset` specs (local files, globs, folders, Hub names) read with datasets; each process's share in batches."""

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lacuna.config import PrepareConfig
from lacuna.errors import LacunaError, first_line

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
BATCH_SIZE = 1000


@dataclass
class Source:
    spec: str
    weight: float | None
    files: list[Path] | None  # None: a Hub dataset
    dataset: Any = None
    lines: bool = False  # JSON Lines: records are the lines, parsed one by one (lacuna/encoding.py)


class RecordBatch(NamedTuple):
    """Records of one file of a source (file 0: a whole table) from record number `first` + 1, named in errors as
    `origin` record #N: numbered per file when a stream's files are shared out, so whatever the process count."""

    source: int
    file: int
    first: int
    records: list
    origin: str


def parse_source(text: str) -> Source:
    """`path_or_name[:weight]` -> a Source with its local files resolved (None: a Hub dataset)."""
    name, colon, tail = text.rpartition(":")
    try:
        weight = float(tail) if colon and name else None
    except ValueError:
        if Path(name).suffix in LOCAL_BUILDERS or Path(name).exists():  # else a path or name with a colon
            raise LacunaError(f"dataset weight in '{text}' is not a number: give one, e.g. --dataset {name}:0.5"
                              ) from None
        name, weight = text, None
    if weight is not None and not weight > 0:
        raise LacunaError(f"dataset weight in '{text}' must be > 0, e.g. --dataset {name}:0.5")
    name = name if weight is not None else text
    return Source(name, weight, local_files(name))


def local_files(spec: str) -> list[Path] | None:
    """The files a local dataset spec (file, glob, folder) names, or None for a Hub name."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.suffix in LOCAL_BUILDERS)
    elif any(character in spec for character in "*?["):
        files = sorted(Path(match) for match in glob.glob(spec, recursive=True))
    elif path.suffix in LOCAL_BUILDERS or path.exists():
        files = [path] if path.is_file() else []
    else:
        return None
    if not files:
        raise LacunaError(f"dataset '{spec}' not found (no .jsonl/.json/.parquet/.txt files there): check --dataset")
    if len({LOCAL_BUILDERS.get(file.suffix) for file in files}) != 1 or files[0].suffix not in LOCAL_BUILDERS:
        raise LacunaError(f"dataset '{spec}' mixes file types: use one of .jsonl/.json, .parquet, .txt per --dataset")
    return files


def read_error(source: Source, error: Exception) -> LacunaError:
    for file in source.files if source.files and source.files[0].suffix != ".parquet" else []:
        with file.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    line.decode()
                except UnicodeDecodeError as undecodable:
                    return LacunaError(f"dataset '{source.spec}' file {file} line {number} is not UTF-8 (byte "
                                       f"0x{line[undecodable.start]:02x}): save the file as UTF-8")
    hint = "check the files" if source.files else "check the name, --subset, --split (offline: cached datasets only)"
    return LacunaError(f"cannot read dataset '{source.spec}' ({first_line(error)}): {hint}")


def load_source(source: Source, settings: PrepareConfig) -> Source:
    from datasets import load_dataset

    try:
        if source.files is None:
            source.dataset = load_dataset(source.spec, settings.subset, split=settings.split,
                                          streaming=settings.streaming)
        else:
            # JSON Lines are read as lines, each record parsed on its own: pyarrow's columnar reading unifies struct
            # types across records, adding the keys of one record's tool-call arguments to another's (as nulls) and
            # reordering them, which a chat template would render
            source.lines = all(file.suffix == ".jsonl" for file in source.files)
            builder = "text" if source.lines else LOCAL_BUILDERS[source.files[0].suffix]
            options = {"sample_by": "document"} if builder == "text" else {}
            if source.lines:  # utf-8-sig: a byte order mark that starts a file is not part of its first record
                options = {"encoding": "utf-8-sig"}
            source.dataset = load_dataset(builder, data_files=[str(file) for file in source.files], split="train",
                                          streaming=settings.streaming, **options)
    except Exception as error:  # datasets raises many types; all mean "cannot read this source"
        raise read_error(source, error) from None
    columns = source.dataset.column_names  # None for some streamed Hub datasets: records hold every column
    if columns is not None and not source.lines:  # the record's field, and a conversation's own template inputs
        field = settings.text_field if settings.mode == "pretrain" else settings.messages_field
        wanted = [name for name in columns if name in (field, "conversations", "prompt", "completion", "tools",
                                                       "chat_template_kwargs")]
        source.dataset = source.dataset.select_columns(wanted or columns)
    return source


def record_batches(source: Source, source_index: int, rank: int, world: int, workers: int, runs: list[list[int]]
                   ) -> Iterator[RecordBatch]:
    """This process's share of a source in batches; `runs` gets [source index, file, records] per file read."""
    from datasets.distributed import split_dataset_by_node

    size, first, several_files = BATCH_SIZE, 0, False
    if hasattr(source.dataset, "__len__"):
        pieces = [(0, split_dataset_by_node(source.dataset, rank=rank, world_size=world))]
        first = rank * (len(source.dataset) // world) + min(rank, len(source.dataset) % world)
        size = max(1, min(BATCH_SIZE, len(pieces[0][1]) // (4 * workers))) if workers > 1 else size
    else:  # a stream: whole files, file f to process f mod W, each read on its own so its records' file is known
        count, several_files = source.dataset.num_shards, source.dataset.num_shards > 1
        pieces = [(file, source.dataset.shard(num_shards=count, index=file)) for file in range(rank, count, world)]
    try:
        for file, dataset in pieces:
            runs.append([source_index, file, 0])
            origin = f"dataset '{source.spec}'"
            if several_files:
                first, origin = 0, f"{origin} file {source.files[file] if source.files else f'#{file}'}"
            for batch in dataset.iter(batch_size=size):
                records = batch["text"] if source.lines else [dict(zip(batch, values, strict=True))
                                                              for values in zip(*batch.values(), strict=True)]
                runs[-1][2] += len(records)
                yield RecordBatch(source_index, file, first, records, origin)
                first += len(records)
    except Exception as error:
        raise read_error(source, error) from None
