"""`lacuna prepare {pretrain,sft}`: a dataset becomes best-fit packed, memory-mapped shards (format: lacuna/shards.py).

Two phases, so that any number of processes gives byte-identical output:
1. Tokenize. Process r of W (torchrun's RANK/WORLD_SIZE, or --shard-index/--num-shards) tokenizes its contiguous
   slice of every source into OUT.partial/parts/part-r.*, a JSON marker last; --num-proc workers share the slice.
2. Merge. The last process to finish takes a lock file, orders documents by (source, position), holds out val,
   applies mixture weights, packs, shuffles rows, writes shards then the manifest, and renames OUT.partial to OUT.
"""

import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from itertools import chain
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from lacuna.chat_templates import RenderError, check_template, load_template, render_conversations
from lacuna.config import Config, PrepareConfig, load_config
from lacuna.errors import LacunaError, run_main
from lacuna.packing import best_fit_decreasing
from lacuna.shards import FORMAT, SPLITS, token_dtype, tokenizer_hash, write_atomically, write_shard

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
RUN_ONLY = {"num_proc", "out", "overwrite", "quiet", "shard_index", "num_shards", "streaming"}
KEPT, TRUNCATED, DROPPED, EMPTY = 0, 1, 2, 3  # per-document status
BATCH_SIZE = 1000


@dataclass
class Source:
    spec: str
    weight: float | None
    files: list[Path] | None  # None: a Hub dataset
    dataset: Any = None
    field: str = ""


# ----------------------------------------------------------------------------- sources


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
            options = {"sample_by": "document"} if builder == "text" else {}
            read = partial(load_dataset, builder, data_files=[str(file) for file in source.files], split="train",
                           streaming=settings.streaming, **options)
            # pyarrow's JSON reader alone is several times faster than datasets' per-line pre-scan for mixed types,
            # which only records that disagree on a field's type need (it then stores JSON text); a streamed
            # dataset would fail only later, while reading, so it keeps the pre-scan
            if builder == "json" and not settings.streaming:
                with suppress(Exception):
                    source.dataset = read(on_mixed_types=None)
            if source.dataset is None:
                source.dataset = read()
    except Exception as error:  # datasets raises many types; all mean "cannot read this source"
        raise read_error(source, error) from None
    source.field = settings.text_field if settings.mode == "pretrain" else settings.messages_field
    columns = source.dataset.column_names  # None for some streamed Hub datasets: checked per batch instead
    if columns is not None:
        if source.field == "messages" and "messages" not in columns and "conversations" in columns:
            source.field = "conversations"  # ShareGPT
        check_field(source, columns)
        source.dataset = source.dataset.select_columns([source.field])
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
            yield source_index, first, batch[source.field]
            first += len(batch[source.field])
    except LacunaError:
        raise
    except Exception as error:
        raise read_error(source, error) from None


# ----------------------------------------------------------------------------- tokenization


@dataclass
class Encoder:
    """Turns a batch of records into documents: tokens, loss mask (first token masked), status."""

    mode: str
    tokenizer: Any
    template: str | None
    seq_len: int
    overlong: str
    dtype: np.dtype
    specs: list[str]

    def conversation(self, record: Any, where: str) -> list[dict[str, str]]:
        if not isinstance(record, list) or not record:
            raise LacunaError(f"{where}: expected a list of messages, got {type(record).__name__}: fix the record")
        messages = []
        for message in record:
            message = message if isinstance(message, dict) else {}
            role = message.get("role") or message.get("from")
            content = message["content"] if message.get("content") is not None else message.get("value")
            if not isinstance(role, str) or role not in ROLES:
                raise LacunaError(f"{where}: unknown role {role!r}: use system/user/assistant (or ShareGPT human/gpt)")
            if not isinstance(content, str):
                raise LacunaError(f"{where}: a {role} message has no text content: fix or remove the record")
            messages.append({"role": ROLES[role], "content": content})
        if not any(message["role"] == "assistant" for message in messages):
            raise LacunaError(f"{where}: conversation has no assistant turn, so nothing to learn: remove it")
        return messages

    def pretrain_documents(self, records: list, where: str, first: int) -> tuple[np.ndarray, ...]:
        for index, record in enumerate(records):
            if not isinstance(record, str):
                raise LacunaError(f"{where.format(first + index + 1)}: text is {type(record).__name__}, not a "
                                  "string: fix or remove the record")
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the same encode_batch transformers calls, minus its offsets and Python wrapping
            ids = [encoding.ids for encoding in backend.encode_batch_fast(records, add_special_tokens=False)]
        else:
            ids = self.tokenizer(records, add_special_tokens=False, verbose=False)["input_ids"]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        lengths = np.array([len(sequence) for sequence in ids], np.int64) + 1 + (bos is not None)
        ends = np.cumsum(lengths)
        tokens = np.empty(int(lengths.sum()), self.dtype)
        is_text = np.ones(len(tokens), bool)  # the positions between the BOS and EOS of each document
        for position, token in ((ends - lengths, bos), (ends - 1, eos)):
            if token is not None:
                tokens[position], is_text[position] = token, False
        tokens[is_text] = np.fromiter(chain.from_iterable(ids), self.dtype, count=int(is_text.sum()))
        return tokens, np.ones(len(tokens), np.uint8), lengths

    def sft_documents(self, records: list, where: str, first: int) -> tuple[np.ndarray, ...]:
        """Chat-template rendering with assistant spans, one batched tokenization, and the spans mapped to tokens:
        a token is supervised when it covers a character of an assistant span (transformers' char_to_token rule)."""
        conversations = [self.conversation(record, where.format(first + index + 1))
                         for index, record in enumerate(records)]
        variables = {**self.tokenizer.special_tokens_map, "tools": None, "documents": None,
                     "add_generation_prompt": False}
        try:
            texts, spans = render_conversations(self.template, conversations, variables)
        except RenderError as error:
            raise LacunaError(f"{where.format(first + error.index + 1)}: {error}") from None
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        sequences = [encoding.ids for encoding in encodings]
        lengths = np.array([len(sequence) for sequence in sequences], np.int64)
        changes = np.zeros(lengths.sum() + 1, np.int32)  # +1 where a supervised run starts, -1 after it ends
        for offset, encoding, found in zip((np.cumsum(lengths) - lengths).tolist(), encodings, spans, strict=True):
            for start, end in found:
                first_token = covering_token(encoding, range(start, end))
                if first_token is not None:
                    changes[offset + first_token] += 1
                    changes[offset + covering_token(encoding, range(end - 1, start - 1, -1)) + 1] -= 1
        tokens = np.fromiter(chain.from_iterable(sequences), self.dtype, count=int(lengths.sum()))
        return tokens, (np.cumsum(changes[:-1]) > 0).astype(np.uint8), lengths

    def __call__(self, batch: tuple[int, int, list]) -> tuple[np.ndarray, ...]:
        source_index, first, records = batch
        where = f"dataset '{self.specs[source_index]}' record #{{}}"
        documents = self.pretrain_documents if self.mode == "pretrain" else self.sft_documents
        return self.finish(*documents(records, where, first))

    def finish(self, tokens: np.ndarray, masks: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
        """Mask each document's first token, apply --overlong, mark documents without targets; returns the kept
        tokens and masks (concatenated) with each document's kept length and status."""
        starts = np.cumsum(lengths) - lengths
        masks[starts[lengths > 0]] = 0  # no target across a document boundary
        status, kept = np.full(len(lengths), KEPT, np.int8), lengths.copy()
        if self.mode == "sft":
            overlong = lengths > self.seq_len
            status[overlong] = TRUNCATED if self.overlong == "truncate" else DROPPED
            kept[overlong] = self.seq_len if self.overlong == "truncate" else 0
        has_target, positive = np.zeros(len(lengths), bool), lengths > 0
        if positive.any():
            has_target[positive] = np.maximum.reduceat(masks, starts[positive]) > 0
        for index in np.flatnonzero((kept > 0) & (kept < lengths)):  # truncated: only the kept part counts
            has_target[index] = masks[starts[index]:starts[index] + kept[index]].any()
        empty = (status != DROPPED) & ~has_target
        status[empty], kept[empty] = EMPTY, 0
        if (kept == lengths).all():
            return tokens, masks, kept, status
        document = np.repeat(np.arange(len(lengths)), lengths)
        keep = np.arange(len(tokens)) - starts[document] < kept[document]
        return tokens[keep], masks[keep], kept, status


def covering_token(encoding: Any, characters: range) -> int | None:
    """The first token, in the order of `characters`, that covers one of them (None: none does)."""
    for character in characters:
        token = encoding.char_to_token(character)
        if token is not None:
            return token
    return None


ENCODER: Encoder | None = None  # set before forking --num-proc workers, which inherit it


def encode_in_worker(batch: tuple[int, int, list]) -> tuple[np.ndarray, ...]:
    assert ENCODER is not None
    return ENCODER(batch)


def in_order(pool: Any, batches: Iterator, window: int) -> Iterator[tuple[np.ndarray, ...]]:
    """The encoded batches, in order, with at most `window` in flight (`Pool.imap` would queue the whole dataset)."""
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(encode_in_worker, (batch,)))
        if len(pending) == window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def tokenize_part(sources: list[Source], encoder: Encoder, settings: PrepareConfig, rank: int, world: int,
                  parts: Path, fingerprint: str) -> None:
    """Tokenize this process's slice of every source into parts/part-{rank}.*; the JSON marker goes last."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    global ENCODER
    ENCODER = encoder
    stem = parts / f"part-{rank:05d}"
    per_document: list[list[np.ndarray]] = [[], []]
    counts = []
    shown = not settings.quiet and int(os.environ.get("LOCAL_RANK", 0)) == 0  # torchrun: one display per node
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
               TimeElapsedColumn())
    with (get_context("fork").Pool(settings.num_proc) if settings.num_proc > 1 else nullcontext() as pool,
          open(f"{stem}.tokens.bin", "wb") as tokens_file, open(f"{stem}.mask.bin", "wb") as mask_file,
          Progress(*columns, disable=not shown) as progress):
        for index, source in enumerate(sources):
            total = None if settings.streaming else -(-len(source.dataset) // world)
            task = progress.add_task(f"tokenize {source.spec}", total=total, speed="")
            start, documents, tokens, speed = time.perf_counter(), 0, 0, ""
            batches = record_batches(source, index, rank, world, settings.num_proc)
            for result in in_order(pool, batches, 2 * settings.num_proc) if pool else map(encoder, batches):
                tokens_file.write(result[0].tobytes()), mask_file.write(result[1].tobytes())
                per_document[0].append(result[2]), per_document[1].append(result[3])
                documents, tokens = documents + len(result[2]), tokens + len(result[0])
                elapsed = max(time.perf_counter() - start, 1e-9)
                speed = f"{documents / elapsed:,.0f} docs/s  {tokens / elapsed:,.0f} tokens/s"
                progress.update(task, completed=documents, speed=speed)
            counts.append(documents)
            if not settings.quiet:
                print(f"tokenized {source.spec}: {documents:,} documents, {speed}", flush=True)
    for name, column in zip(("lengths", "status"), per_document, strict=True):
        np.save(f"{stem}.{name}.npy", np.concatenate(column) if column else np.zeros(0, np.int64))
    write_atomically(Path(f"{stem}.json"), json.dumps({"fingerprint": fingerprint, "documents": counts}))


# ----------------------------------------------------------------------------- merge: plan, pack, write


@dataclass
class Documents:
    """Every tokenized document in global order (source, then position), pointing into the part files."""

    part: np.ndarray
    start: np.ndarray
    length: np.ndarray
    status: np.ndarray
    source: np.ndarray
    tokens: list[np.ndarray]
    masks: list[np.ndarray]


def map_file(path: str, dtype: type | np.dtype) -> np.ndarray:
    """The file memory-mapped as a plain ndarray (np.memmap's subclass overhead is paid on every slice)."""
    return np.asarray(np.memmap(path, dtype=dtype, mode="r")) if os.path.getsize(path) else np.zeros(0, dtype)


def load_parts(parts: Path, world: int, dtype: np.dtype) -> Documents:
    columns: dict[str, list[np.ndarray]] = {key: [] for key in ("part", "start", "length", "status", "source")}
    tokens, masks = [], []
    for rank in range(world):
        stem = parts / f"part-{rank:05d}"
        tokens.append(map_file(f"{stem}.tokens.bin", dtype)), masks.append(map_file(f"{stem}.mask.bin", np.uint8))
        lengths, counts = np.load(f"{stem}.lengths.npy"), json.loads(Path(f"{stem}.json").read_text())["documents"]
        columns["part"].append(np.full(len(lengths), rank)), columns["start"].append(np.cumsum(lengths) - lengths)
        columns["length"].append(lengths), columns["status"].append(np.load(f"{stem}.status.npy"))
        columns["source"].append(np.repeat(np.arange(len(counts)), counts))
    merged = {key: np.concatenate(values) for key, values in columns.items()}
    order = np.argsort(merged["source"], kind="stable")  # parts are in rank order: (source, rank, position)
    return Documents(**{key: values[order] for key, values in merged.items()}, tokens=tokens, masks=masks)


def plan_splits(documents: Documents, sources: list[Source], settings: PrepareConfig) -> tuple[dict, list[dict]]:
    """Document ids per split: a seeded val hold-out, then mixture sampling of the train documents per source."""
    usable = np.flatnonzero(documents.status <= TRUNCATED)
    if not len(usable):
        raise LacunaError("no documents left after filtering (all empty, or overlong and dropped): check the data, "
                          "--seq-len and --overlong")
    held_out = int(round(settings.val_fraction * len(usable)))
    held_out = min(max(held_out, 1 if settings.val_fraction > 0 else 0), len(usable) - 1)
    val = np.sort(np.random.default_rng([settings.seed, 0]).choice(usable, held_out, replace=False))
    train = np.setdiff1d(usable, val)
    if len({source.weight is None for source in sources}) > 1:
        raise LacunaError("give every --dataset a weight (e.g. a.jsonl:0.7 --dataset b.jsonl:0.3) or none")
    total_weight = sum(source.weight or 0.0 for source in sources)
    rng = np.random.default_rng([settings.seed, 1])
    selected, report = [], []
    for index, source in enumerate(sources):
        candidates = train[documents.source[train] == index]
        target = len(candidates)
        if source.weight is not None:
            target = int(round(source.weight / total_weight * len(train)))
        repeats, remainder = divmod(target, len(candidates)) if len(candidates) else (0, 0)
        extra = np.sort(rng.choice(candidates, remainder, replace=False)) if remainder else candidates[:0]
        selected.append(np.concatenate([np.tile(candidates, repeats), extra]))
        available, held = int(np.sum(documents.source == index)), int(np.sum(documents.source[val] == index))
        report.append({"dataset": source.spec, "weight": source.weight, "documents": available,
                       "train": len(selected[-1]), "val": held})
    return {"train": np.concatenate(selected), "val": val}, report


def segments(documents: Documents, ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(part, start, length) of each packing item: documents longer than seq_len (pretrain) become chunks that
    overlap by one token, so every token but the document's first is a target exactly once."""
    lengths = documents.length[ids]
    chunks = np.where(lengths > seq_len, -(-(lengths - 1) // (seq_len - 1)), 1)
    owner = np.repeat(ids, chunks)
    offset = (np.arange(chunks.sum()) - np.repeat(np.cumsum(chunks) - chunks, chunks)) * (seq_len - 1)
    return documents.part[owner], documents.start[owner] + offset, np.minimum(seq_len, documents.length[owner] - offset)


def build_shard(rows: list[list[int]], items: tuple[list, list, list], documents: Documents, seq_len: int,
                dtype: np.dtype, pad_id: int) -> dict[str, np.ndarray]:
    tokens = np.full((len(rows), seq_len), pad_id, dtype)
    loss_mask = np.zeros((len(rows), seq_len), np.uint8)
    boundaries, row_offsets, max_seqlen = [], [0], []
    parts, starts, lengths = items
    for index, row in enumerate(rows):
        bounds = [0]
        for item in row:
            part, start, length, position = parts[item], starts[item], lengths[item], bounds[-1]
            tokens[index, position:position + length] = documents.tokens[part][start:start + length]
            loss_mask[index, position + 1:position + length] = documents.masks[part][start + 1:start + length]
            bounds.append(position + length)
        if bounds[-1] < seq_len:
            bounds.append(seq_len)  # the padding tail: its own segment
        boundaries += bounds
        row_offsets.append(len(boundaries))
        max_seqlen.append(max(np.diff(bounds)))
    return {"tokens": tokens, "loss_mask": loss_mask, "cu_seqlens": np.array(boundaries, np.int32),
            "row_offsets": np.array(row_offsets, np.int64), "supervised": loss_mask.sum(axis=1, dtype=np.int64),
            "max_seqlen": np.array(max_seqlen, np.int32)}


def pack_and_write(documents: Documents, split: str, ids: np.ndarray, settings: PrepareConfig, out: Path,
                   dtype: np.dtype, pad_id: int) -> tuple[list[dict], dict, np.ndarray]:
    parts, starts, lengths = segments(documents, ids, settings.seq_len)
    rows = best_fit_decreasing(lengths, settings.seq_len) if len(lengths) else []
    order = np.random.default_rng([settings.seed, 2 + SPLITS.index(split)]).permutation(len(rows))
    rows = [rows[index] for index in order]
    items = (parts.tolist(), starts.tolist(), lengths.tolist())
    shards, supervised = [], 0
    for index, first in enumerate(range(0, len(rows), settings.rows_per_shard)):
        shard_rows = rows[first:first + settings.rows_per_shard]
        arrays = build_shard(shard_rows, items, documents, settings.seq_len, dtype, pad_id)
        supervised += int(arrays["supervised"].sum())
        shards.append(write_shard(out, f"{split}-{index:05d}", arrays))
    tokens = int(lengths.sum())
    stats = {"documents": len(ids), "tokens": tokens, "supervised_tokens": supervised, "rows": len(rows),
             "fill": round(tokens / max(len(rows) * settings.seq_len, 1), 6)}
    return shards, stats, lengths


def merge(sources: list[Source], settings: PrepareConfig, world: int, partial: Path, out: Path,
          header: dict[str, Any]) -> dict[str, Any]:
    """Plan, pack and write every split from all parts, then the manifest, then rename the folder into place."""
    dtype = np.dtype(header["token_dtype"])
    documents = load_parts(partial / "parts", world, dtype)
    splits, report = plan_splits(documents, sources, settings)
    manifest = {**header, "splits": {}}
    stats: dict[str, Any] = {"splits": {}}
    all_lengths = []
    for split, ids in splits.items():
        manifest["splits"][split], stats["splits"][split], lengths = pack_and_write(
            documents, split, ids, settings, partial, dtype, header["pad_id"])
        all_lengths.append(lengths)
    for key in ("documents", "tokens", "supervised_tokens", "rows"):
        stats[key] = sum(split_stats[key] for split_stats in stats["splits"].values())
    stats["fill"] = round(stats["tokens"] / max(stats["rows"] * settings.seq_len, 1), 6)
    planned = np.concatenate(list(splits.values()))
    stats |= {key: int(np.sum(documents.status == value)) for key, value in
              (("dropped", DROPPED), ("truncated", TRUNCATED), ("empty_mask", EMPTY))}
    stats["split"] = int(np.sum(documents.length[planned] > settings.seq_len))
    edges = [2**power for power in range(int(np.log2(settings.seq_len)) + 1)] + [settings.seq_len + 1]
    stats["length_histogram"] = {"edges": edges, "counts": np.histogram(np.concatenate(all_lengths), edges)[0].tolist()}
    stats["sources"] = report
    manifest["stats"] = stats
    shutil.rmtree(partial / "parts")
    (partial / "merge.lock").unlink()
    write_atomically(partial / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)  # only reached with --overwrite (checked at the start)
    os.replace(partial, out)
    return manifest


# ----------------------------------------------------------------------------- orchestration


def finished(marker: Path, fingerprint: str) -> bool:
    return marker.is_file() and json.loads(marker.read_text())["fingerprint"] == fingerprint


def process_slot(settings: PrepareConfig) -> tuple[int, int]:
    """(rank, world): --shard-index/--num-shards, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    index, count = settings.shard_index, settings.num_shards
    if index is not None or count is not None:
        if index is None or count is None or not 0 <= index < count:
            raise LacunaError("--shard-index I and --num-shards N go together, with 0 <= I < N")
        return index, count
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def recorded_settings(config: Config) -> dict[str, Any]:
    """The [prepare] settings a manifest records (those that shape the output), with the tokenizer resolved."""
    settings = config.prepare.model_copy(update={"tokenizer": config.prepare.tokenizer or config.model.name})
    return settings.model_dump(mode="json", exclude=RUN_ONLY)


def check_settings(config: Config) -> tuple[PrepareConfig, Path, list[Source]]:
    settings = config.prepare
    settings.tokenizer = settings.tokenizer or config.model.name
    out = Path(settings.out or config.data.path)
    if not settings.dataset:
        raise LacunaError("no dataset given: pass --dataset PATH_OR_NAME (or set dataset in [prepare])")
    if out.exists() and not settings.overwrite:
        raise LacunaError(f"output folder '{out}' already exists: pass --overwrite to replace it, or another --out")
    if out.exists() and not out.is_dir():
        raise LacunaError(f"--out '{out}' is a file, not a folder: pass another --out")
    return settings, out, [parse_source(spec) for spec in settings.dataset]


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer at `name` (a folder, or a Hub name while online), with one-line errors."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as error:  # OSError, ValueError, HTTP errors...: all mean "not available"
        raise LacunaError(f"cannot load tokenizer '{name}' ({type(error).__name__}): pass --tokenizer with a local "
                          "folder, or download it while online") from None
    if tokenizer.eos_token_id is None:
        raise LacunaError(f"tokenizer '{name}' defines no EOS token: set eos_token in its tokenizer_config.json")
    return tokenizer


def chat_template(settings: PrepareConfig, tokenizer: Any) -> str | None:
    if settings.mode == "pretrain":
        return None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise LacunaError(f"tokenizer '{settings.tokenizer}' has no fast (Rust `tokenizers`) backend, which SFT "
                          "masks need: pass a --tokenizer folder that has a tokenizer.json")
    template = load_template(settings.chat_template, tokenizer)
    check_template(template, settings.chat_template or "(default)")
    return template


def summary(manifest: dict[str, Any], out: Path, quiet: bool) -> None:
    stats = manifest["stats"]
    if not quiet:
        from lacuna.inspection import print_report

        return print_report(manifest, out, None, None, "train", False)
    keys = ("documents", "tokens", "supervised_tokens", "rows", "fill", "split", "truncated", "dropped", "empty_mask")
    print(f"wrote {out}: " + ", ".join(f"{key} {stats[key]:,}" for key in keys), flush=True)


def prepare(config: Config) -> dict[str, Any] | None:
    """Run this process's part of a prepare; the last process to finish merges and returns the manifest."""
    settings, out, sources = check_settings(config)
    rank, world = process_slot(settings)
    if settings.streaming and world > 1:
        raise LacunaError("a streaming prepare runs in one process: drop --streaming or the process split")
    if settings.num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the fork below would disable it anyway, with a warning
    if (local_processes := int(os.environ.get("LOCAL_WORLD_SIZE", 1))) > 1:  # torchrun: the node's processes share
        # its cores, or every process's tokenizer thread pool (rayon) would start a thread per core
        from lacuna.launch import machine_physical_cores, omp_threads

        os.environ.setdefault("RAYON_NUM_THREADS", str(omp_threads(local_processes, machine_physical_cores())))
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # read errors become one LacunaError line instead
    tokenizer = load_tokenizer(settings.tokenizer, config.model.trust_remote_code)
    template = chat_template(settings, tokenizer)
    dtype = token_dtype(len(tokenizer))
    sources = [load_source(source, settings) for source in sources]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    described = {"name": settings.tokenizer, "vocab_size": len(tokenizer), "hash": tokenizer_hash(tokenizer)}
    header = {**FORMAT, "seq_len": settings.seq_len, "token_dtype": dtype.name, "mode": settings.mode, "pad_id": pad_id,
              "tokenizer": described,
              "chat_template_hash": hashlib.sha256(template.encode()).hexdigest() if template else None,
              "config": recorded_settings(config)}
    inputs = [getattr(source.dataset, "_fingerprint", source.spec) for source in sources]
    fingerprint = hashlib.sha256(json.dumps([header, inputs, world]).encode()).hexdigest()
    partial = out.with_name(out.name + ".partial")
    if world == 1:
        shutil.rmtree(partial, ignore_errors=True)
    (partial / "parts").mkdir(parents=True, exist_ok=True)
    encoder = Encoder(settings.mode, tokenizer, template, settings.seq_len, settings.overlong, dtype,
                      [source.spec for source in sources])
    markers = [partial / "parts" / f"part-{index:05d}.json" for index in range(world)]
    try:
        if not finished(markers[rank], fingerprint):  # a finished part (same inputs) is kept: another may be merging it
            markers[rank].unlink(missing_ok=True)
            tokenize_part(sources, encoder, settings, rank, world, partial / "parts", fingerprint)
        if not all(finished(marker, fingerprint) for marker in markers):
            print(f"part {rank} of {world} done; the last process to finish writes {out}", flush=True)
            return None
        try:
            os.close(os.open(partial / "merge.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            print(f"part {rank} of {world} done; another process is merging (if none is, delete {partial})",
                  flush=True)
            return None
        manifest = merge(sources, settings, world, partial, out, header)
    except BaseException:
        if world == 1:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    summary(manifest, out, settings.quiet)
    return manifest


def main(arguments: list[str]) -> None:
    """`lacuna prepare MODE [config args]` and `python -m lacuna.prepare MODE ...` (also under torchrun)."""
    if not arguments or arguments[0] not in ("pretrain", "sft"):
        raise LacunaError("prepare needs pretrain or sft first, e.g. lacuna prepare sft --dataset chat.jsonl --out DIR")
    config = load_config(arguments[1:], command="prepare")
    config.prepare.mode = "pretrain" if arguments[0] == "pretrain" else "sft"
    prepare(config)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
