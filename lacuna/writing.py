"""The merge, divided among processes (README, "Scale"): split, cut into groups, pack group g in process g mod W."""

# Groups cost little fill: 2**23-token groups (the default) lose 0.012 % against one global best-fit at seq_len 2048
# on the stdlib corpus ×10 (34 M tokens, 5 groups) and nothing on the chat corpus ×10 (one group); 2**21: 0.06 %.

import json
import os
import shutil
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lacuna.config import PrepareConfig
from lacuna.encoding import DocumentStatus
from lacuna.errors import LacunaError
from lacuna.files import exclusive_lock, replace_directory, write_atomically
from lacuna.packing import best_fit_decreasing
from lacuna.shards import SPLITS, write_shard
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


class Items(NamedTuple):  # the packing items of a split (documents, chunks of those over seq_len), as columns
    part: np.ndarray
    start: np.ndarray
    length: np.ndarray


class Group(NamedTuple):  # a packing group: items [first, end) of one split, packed on their own by one process
    split: str
    index: int
    first: int
    end: int


def output_lock(out: Path, settings: PrepareConfig) -> AbstractContextManager[None]:
    """The lock on --out every process of a prepare takes: torchrun's, or --shard-index ones with the same settings."""
    shared = settings.model_dump_json(exclude={"shard_index", "num_proc", "quiet", "overwrite"})
    return exclusive_lock(out, "prepare output", None if settings.shard_index is None else f"prepare {shared}")


def finished(marker: Path, fingerprint: str) -> bool:
    """Whether a part's or group's JSON marker exists and was written for these inputs."""
    return marker.is_file() and json.loads(marker.read_text())["fingerprint"] == fingerprint


def map_file(path: str, dtype: type | np.dtype) -> np.ndarray:
    """The file memory-mapped as a plain ndarray (np.memmap's subclass overhead is paid on every slice)."""
    return np.asarray(np.memmap(path, dtype=dtype, mode="r")) if os.path.getsize(path) else np.zeros(0, dtype)


def load_parts(parts: Path, world: int, dtype: np.dtype) -> Documents:
    columns, tokens, masks = [], [], []
    for rank in range(world):
        stem = parts / f"part-{rank:05d}"
        tokens.append(map_file(f"{stem}.tokens.bin", dtype))
        masks.append(map_file(f"{stem}.mask.bin", np.uint8))  # empty for pretraining parts
        lengths, runs = np.load(f"{stem}.lengths.npy"), json.loads(Path(f"{stem}.json").read_text())["documents"]
        runs = np.array(runs, np.int64).reshape(-1, 3)  # [source, file, documents] in the order they were read
        source, file = np.repeat(runs[:, :2], runs[:, 2], axis=0).T
        columns.append({"part": np.full(len(lengths), rank), "start": np.cumsum(lengths) - lengths, "length": lengths,
                        "status": np.load(f"{stem}.status.npy"), "source": source, "file": file})
    merged = {key: np.concatenate([values[key] for values in columns]) for key in columns[0]}
    # stable, parts in rank order: (source, rank, position) for contiguous slices, (source, file, position) for files
    order = np.lexsort((merged.pop("file"), merged["source"]))
    return Documents(**{key: values[order] for key, values in merged.items()}, tokens=tokens, masks=masks)


def plan_splits(documents: Documents, sources: list[Source], settings: PrepareConfig) -> tuple[dict, list[dict]]:
    """Document ids per split: a seeded val hold-out, then mixture sampling of the train documents per source."""
    usable = np.flatnonzero(documents.status <= DocumentStatus.TRUNCATED)
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
        target = len(candidates) if source.weight is None else int(round(source.weight / total_weight * len(train)))
        repeats, remainder = divmod(target, len(candidates)) if len(candidates) else (0, 0)
        extra = np.sort(rng.choice(candidates, remainder, replace=False)) if remainder else candidates[:0]
        selected.append(np.concatenate([np.tile(candidates, repeats), extra]))
        available, held = int(np.sum(documents.source == index)), int(np.sum(documents.source[val] == index))
        report.append({"dataset": source.spec, "weight": source.weight, "documents": available,
                       "train": len(selected[-1]), "val": held})
    return {"train": np.concatenate(selected), "val": val}, report


def segments(documents: Documents, ids: np.ndarray, seq_len: int) -> Items:
    """The packing items of documents `ids`: a document over seq_len becomes chunks overlapping by one token."""
    lengths = documents.length[ids]
    chunks = np.where(lengths > seq_len, -(-(lengths - 1) // (seq_len - 1)), 1)
    owner = np.repeat(ids, chunks)
    offset = (np.arange(chunks.sum()) - np.repeat(np.cumsum(chunks) - chunks, chunks)) * (seq_len - 1)
    length = np.minimum(seq_len, documents.length[owner] - offset)
    return Items(documents.part[owner], documents.start[owner] + offset, length)


def build_shard(rows: list[list[int]], items: Items, documents: Documents, seq_len: int,
                dtype: np.dtype, pad_id: int, stored_masks: bool) -> dict[str, np.ndarray]:
    """One shard's arrays; without `stored_masks` (pretraining) every position but a segment's first is a target."""
    tokens = np.full((len(rows), seq_len), pad_id, dtype)
    loss_mask = np.zeros((len(rows), seq_len), np.uint8)
    boundaries, row_offsets, max_seqlen = [], [0], []
    for index, row in enumerate(rows):
        bounds = [0]
        for item in row:
            part, start, length, position = items.part[item], items.start[item], items.length[item], bounds[-1]
            tokens[index, position:position + length] = documents.tokens[part][start:start + length]
            loss_mask[index, position + 1:position + length] = (documents.masks[part][start + 1:start + length]
                                                                if stored_masks else 1)
            bounds.append(position + length)
        if bounds[-1] < seq_len:
            bounds.append(seq_len)  # the padding tail: its own segment
        boundaries += bounds
        row_offsets.append(len(boundaries))
        max_seqlen.append(max(np.diff(bounds)))
    return {"tokens": tokens, "loss_mask": loss_mask, "cu_seqlens": np.array(boundaries, np.int32),
            "row_offsets": np.array(row_offsets, np.int64), "supervised": loss_mask.sum(axis=1, dtype=np.int64),
            "max_seqlen": np.array(max_seqlen, np.int32)}


def plan_groups(items: dict[str, Items], group_tokens: int) -> list[Group]:
    """The packing groups of every split: an item starting at k × group_tokens opens group k."""
    groups = []
    for split, (_, _, lengths) in items.items():
        bounds = np.searchsorted(np.cumsum(lengths) - lengths, np.arange(0, lengths.sum(), group_tokens)).tolist()
        groups += [Group(split, index, *items) for index, items in enumerate(pairwise([*bounds, len(lengths)]))]
    return groups


def pack_group(documents: Documents, items: Items, split: str, index: int, settings: PrepareConfig,
               directory: Path, dtype: np.dtype, pad_id: int) -> dict[str, Any]:
    """Best-fit pack one group's items, shuffle the rows, write the shards; returns counts."""
    rows = best_fit_decreasing(items.length, settings.seq_len)
    # group 0 is seeded as the single global packing was (seeds 2 and 3), later groups after it
    order = np.random.default_rng([settings.seed, 2 + SPLITS.index(split) + 2 * index]).permutation(len(rows))
    rows = [rows[position] for position in order]
    items = Items(*(values.tolist() for values in items))
    shards, supervised = [], 0
    for number, row in enumerate(range(0, len(rows), settings.rows_per_shard)):
        arrays = build_shard(rows[row:row + settings.rows_per_shard], items, documents, settings.seq_len, dtype, pad_id,
                             stored_masks=settings.mode == "sft")
        supervised += int(arrays["supervised"].sum())
        if settings.mode == "pretrain":
            del arrays["loss_mask"]  # the reader derives it from cu_seqlens and supervised (lacuna/shards.py)
        shards.append(write_shard(directory, f"{split}-{index:05d}-{number:05d}", arrays))  # split-group-shard
    return {"shards": shards, "rows": len(rows), "supervised_tokens": supervised}


def merge(sources: list[Source], settings: PrepareConfig, rank: int, world: int, partial: Path, out: Path,
          header: dict[str, Any], fingerprint: str, dtype: np.dtype) -> dict[str, Any] | None:
    """Pack and write this process's groups; the last to finish puts the folder at `out` and returns the manifest."""
    documents = load_parts(partial / "parts", world, dtype)
    splits, report = plan_splits(documents, sources, settings)
    items = {split: segments(documents, ids, settings.seq_len) for split, ids in splits.items()}
    groups = plan_groups(items, settings.pack_group_tokens)
    markers = [partial / "parts" / f"packed-{index:05d}.json" for index in range(world)]  # every process, groups or not
    if not finished(markers[rank], fingerprint):  # else kept from an interrupted run of the same inputs
        results = {f"{group.split}-{group.index}": pack_group(
            documents, Items(*(values[group.first:group.end] for values in items[group.split])), group.split,
            group.index, settings, partial, dtype, header["pad_id"]) for group in groups[rank::world]}
        write_atomically(markers[rank], json.dumps({"fingerprint": fingerprint, "groups": results}))
    if not all(finished(marker, fingerprint) for marker in markers):
        return None
    results = {key: result for marker in markers for key, result in json.loads(marker.read_text())["groups"].items()}
    try:  # one process finishes: the one that moves the parts away (the others find them, or the folder, gone)
        os.rename(partial / "parts", partial / "packed")
    except FileNotFoundError:
        return None
    packed = {split: [results[f"{split}-{group.index}"] for group in groups if group.split == split]
              for split in splits}
    manifest = {**header, "splits": {split: [shard for result in own for shard in result["shards"]]
                                     for split, own in packed.items()}}
    manifest["stats"] = statistics(documents, splits, items, packed, settings) | {"sources": report}
    if settings.mode == "sft":  # conversations by kind and turns left out of the loss, counted by each part
        conversations = Counter()
        for marker in (partial / "packed").glob("part-*.json"):
            conversations.update(json.loads(marker.read_text())["conversations"])
        manifest["stats"]["conversations"] = dict(sorted(conversations.items()))
    shutil.rmtree(partial / "packed")
    write_atomically(partial / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    replace_directory(partial, out)  # an existing `out` is only reached with --overwrite (checked at the start)
    return manifest


def statistics(documents: Documents, splits: dict[str, np.ndarray], items: dict[str, Items],
               packed: dict[str, list[dict[str, Any]]], settings: PrepareConfig) -> dict[str, Any]:
    """The manifest's counts: per split and in all, what became of every document, the length histogram."""
    stats: dict[str, Any] = {"splits": {}}
    for split, ids in splits.items():
        counted = {key: sum(result[key] for result in packed[split]) for key in ("supervised_tokens", "rows")}
        stats["splits"][split] = {"documents": len(ids), "tokens": int(items[split].length.sum()), **counted}
    stats |= {key: sum(counts[key] for counts in stats["splits"].values()) for key in stats["splits"]["train"]}
    for counts in (*stats["splits"].values(), stats):
        counts["fill"] = round(counts["tokens"] / max(counts["rows"] * settings.seq_len, 1), 6)
    statuses = {"dropped": DocumentStatus.DROPPED, "truncated": DocumentStatus.TRUNCATED,
                "empty_mask": DocumentStatus.EMPTY, "all_turns_excluded": DocumentStatus.EXCLUDED}
    stats |= {key: int(np.sum(documents.status == value)) for key, value in statuses.items()}
    stats["split"] = sum(int(np.sum(documents.length[ids] > settings.seq_len)) for ids in splits.values())
    edges = [2**power for power in range(int(np.log2(settings.seq_len)) + 1)] + [settings.seq_len + 1]
    lengths = np.concatenate([split_items.length for split_items in items.values()])
    stats["length_histogram"] = {"edges": edges, "counts": np.histogram(lengths, edges)[0].tolist()}
    return stats
