"""The merge: every process's tokenized parts are ordered, split (val hold-out, mixture weights), best-fit packed
into rows and written as shards (lacuna/shards.py), then the manifest, then the folder is renamed into place."""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lacuna.config import PrepareConfig
from lacuna.encoding import DROPPED, EMPTY, EXCLUDED, TRUNCATED
from lacuna.errors import LacunaError
from lacuna.packing import best_fit_decreasing
from lacuna.shards import SPLITS, write_atomically, write_shard
from lacuna.sources import Source


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
        raise LacunaError("no documents left after filtering (all empty, overlong and dropped, or every assistant "
                          "turn left out): check the data, --seq-len, --overlong and --assistant-turns")
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
              (("dropped", DROPPED), ("truncated", TRUNCATED), ("empty_mask", EMPTY), ("all_turns_excluded", EXCLUDED))}
    stats["split"] = int(np.sum(documents.length[planned] > settings.seq_len))
    edges = [2**power for power in range(int(np.log2(settings.seq_len)) + 1)] + [settings.seq_len + 1]
    stats["length_histogram"] = {"edges": edges, "counts": np.histogram(np.concatenate(all_lengths), edges)[0].tolist()}
    stats["sources"] = report
    if settings.mode == "sft":  # conversations by kind and turns left out of the loss, counted by each part
        counted = [json.loads((partial / "parts" / f"part-{rank:05d}.json").read_text())["conversations"]
                   for rank in range(world)]
        stats["conversations"] = {key: sum(part.get(key, 0) for part in counted)
                                  for key in sorted(set().union(*counted))}
    manifest["stats"] = stats
    shutil.rmtree(partial / "parts")
    (partial / "merge.lock").unlink()
    write_atomically(partial / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)  # only reached with --overwrite (checked at the start)
    os.replace(partial, out)
    return manifest
