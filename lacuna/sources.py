"""Where records come from: `--dataset` specs (local files, globs, folders, Hub names) read with datasets, and
each process's contiguous slice of them in batches."""

import glob
import json
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lacuna.config import PrepareConfig
from lacuna.errors import LacunaError

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
BATCH_SIZE = 1000


@dataclass
class Source:
    spec: str
    weight: float | None
    files: list[Path] | None  # None: a Hub dataset
    dataset: Any = None
    field: str = ""
    columns: list[str] | None = None  # sft: records are dicts of these columns (None: JSON lines, or pretrain text)



def parse_source(text: str) -> Source:
    """`path_or_name[:weight]` -> a Source with its local files resolved (None: a Hub dataset)."""
    name, colon, tail = text.rpartition(":")
    try:
        weight = float(tail) if colon and name else None
    except ValueError:
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


def malformed_json_line(files: list[Path]) -> str | None:
    """`file:line: reason` for the first JSON line that does not parse (datasets' own error names neither)."""
    for file in files:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".json":
            try:
                json.loads(text)
                continue
            except json.JSONDecodeError as error:
                if error.msg != "Extra data":  # "Extra data": JSON Lines, checked below
                    return f"{file}:{error.lineno}: malformed JSON ({error.msg})"
        for number, line in enumerate(text.splitlines(), 1):
            try:
                json.loads(line) if line.strip() else None
            except json.JSONDecodeError as error:
                return f"{file}:{number}: malformed JSON ({error.msg})"
    return None


def read_error(source: Source, error: Exception) -> LacunaError:
    json_files = source.files and source.files[0].suffix in (".json", ".jsonl")
    if json_files and (where := malformed_json_line(source.files)):
        return LacunaError(f"{where}: fix or remove that line")
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    hint = "check the files" if source.files else "check the name, --subset, --split (offline: cached datasets only)"
    return LacunaError(f"cannot read dataset '{source.spec}' ({reason}): {hint}")


def load_source(source: Source, settings: PrepareConfig) -> Source:
    from datasets import load_dataset

    try:
        if source.files is None:
            source.dataset = load_dataset(source.spec, settings.subset, split=settings.split,
                                          streaming=settings.streaming)
        else:
            builder = LOCAL_BUILDERS[source.files[0].suffix]
            if json_lines := builder == "json" and settings.mode == "sft" and all(
                    file.suffix == ".jsonl" for file in source.files):
                # each record is parsed from its own line (lacuna/encoding.py): pyarrow's columnar reading unifies
                # struct types across records, adding the keys of one record's tool-call arguments to another's
                # (as nulls) and reordering them, which a template would render
                builder = "text"
            options = {"sample_by": "document"} if builder == "text" and not json_lines else {}
            read = partial(load_dataset, builder, data_files=[str(file) for file in source.files], split="train",
                           streaming=settings.streaming, **options)
            # pyarrow's JSON reader alone is several times faster than datasets' per-line pre-scan for mixed types,
            # which only records that disagree on a field's type need (it then stores JSON text); a streamed
            # dataset would fail only later, while reading, so it keeps the pre-scan, and so do chat records, whose
            # structs it keeps apart
            if builder == "json" and not settings.streaming and settings.mode == "pretrain":
                with suppress(Exception):
                    source.dataset = read(on_mixed_types=None)
            if source.dataset is None:
                source.dataset = read()
            if json_lines:
                source.field = "text"
                return source
    except Exception as error:  # datasets raises many types; all mean "cannot read this source"
        raise read_error(source, error) from None
    source.field = settings.text_field if settings.mode == "pretrain" else settings.messages_field
    columns = source.dataset.column_names  # None for some streamed Hub datasets: checked per batch instead
    source.columns = [] if settings.mode == "sft" else None  # [] (columns unknown): records hold every column
    if columns is not None:
        if source.field == "messages" and "messages" not in columns and "conversations" in columns:
            source.field = "conversations"  # ShareGPT
        check_field(source, columns)
        if settings.mode == "sft":  # a conversation's own template inputs come with it
            source.columns = [source.field] + [name for name in ("tools", "chat_template_kwargs") if name in columns]
        source.dataset = source.dataset.select_columns(source.columns or [source.field])
    return source


def check_field(source: Source, columns: list[str]) -> None:
    if source.field not in columns:
        raise LacunaError(f"dataset '{source.spec}' has no field '{source.field}' (fields: {', '.join(columns)}): "
                          "pass --text-field NAME (pretrain) or --messages-field NAME (sft)")


def record_batches(source: Source, source_index: int, rank: int, world: int, workers: int
                   ) -> Iterator[tuple[int, int, list]]:
    """(source index, number of the batch's first record, records) for this process's contiguous slice, in batches
    small enough to give each of the `workers` several (a few long documents must not all land on one)."""
    from datasets.distributed import split_dataset_by_node

    dataset = split_dataset_by_node(source.dataset, rank=rank, world_size=world)
    first = 0 if world == 1 else rank * (len(source.dataset) // world) + min(rank, len(source.dataset) % world)
    size = BATCH_SIZE
    if workers > 1 and hasattr(dataset, "__len__"):  # a streamed dataset has no length
        size = max(1, min(BATCH_SIZE, len(dataset) // (4 * workers)))
    try:
        for batch in dataset.iter(batch_size=size):
            check_field(source, list(batch))
            records = batch[source.field]
            if source.columns is not None:
                records = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            yield source_index, first, records
            first += len(records)
    except LacunaError:
        raise
    except Exception as error:
        raise read_error(source, error) from None
