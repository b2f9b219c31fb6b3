"""The packed-shard format (`lacuna-packed`, version 3): what `lacuna prepare` writes and training reads.

The README's "The shard format" is the contract: per split, packing group and shard, plain `.npy` files
`DIR/{split}-{group:05d}-{shard:05d}.{kind}.npy` (tokens, loss_mask in SFT only, cu_seqlens, row_offsets,
supervised, max_seqlen) and `DIR/manifest.json`, written last, with their sha256; a file shorter than its header
says is refused at open.
"""

import hashlib
import json
import math
import mmap
import os
from bisect import bisect_right
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import read_array_header_1_0, read_array_header_2_0, read_magic

from lacuna.errors import LacunaError

FORMAT_NAME = "lacuna-packed"
FORMAT_VERSION = 3
FORMAT = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
FILE_KINDS = ("tokens", "loss_mask", "cu_seqlens", "row_offsets", "supervised", "max_seqlen")
SPLITS = ("train", "val")


@dataclass
class Row:
    """One packed row; `cu_seqlens` is relative to the row and ends at seq_len."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    cu_seqlens: np.ndarray
    supervised: int
    max_seqlen: int


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise LacunaError(f"vocabulary of {vocab_size} tokens does not fit in uint32 token ids: use a smaller tokenizer")


def tokenizer_hash(tokenizer: Any) -> str:
    """A content hash of a tokenizer (vocabulary, merges, normalisation, special tokens), not of its path.

    Hashing content rather than files means a re-saved copy of the same tokenizer (an export) still matches.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:  # runtime settings, not the tokenizer
            backend = type(backend).from_str(backend.to_str())
            backend.no_truncation(), backend.no_padding()
        description = backend.to_str()  # serialised in a fixed order: no need to parse and sort it
    else:
        description = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(f"{description}{special}".encode()).hexdigest()


def file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest of a prepared folder, with one-line errors for anything that is not one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LacunaError(f"data folder '{directory}' does not exist: run `lacuna prepare` first or fix --data")
    path = directory / "manifest.json"
    if not path.is_file():
        raise LacunaError(f"'{directory}' has no manifest.json (not a prepared folder, or its prepare was "
                          "interrupted): rerun `lacuna prepare ... --out DIR --overwrite`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise LacunaError(f"'{directory}' holds format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                          f"not {FORMAT_NAME!r} version {FORMAT_VERSION}: prepare it again with this lacuna")
    return manifest


def map_array(path: Path) -> tuple[np.ndarray, tuple[mmap.mmap, int]]:
    """A read-only memory map of one .npy file, as `np.load(mmap_mode="r")` gives, plus its mmap and data offset;
    a file shorter than its header says (truncated: a full disk, a copy cut short) is refused in one line."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        try:
            version = read_magic(file)
            shape, fortran_order, dtype = (read_array_header_1_0 if version == (1, 0) else read_array_header_2_0)(file)
            offset, count = file.tell(), math.prod(shape)
            complete = size >= offset + count * dtype.itemsize
        except ValueError:  # a header cut short
            complete = False
        if not complete:
            raise LacunaError(f"shard file '{path}' is truncated ({size:,} bytes, less than its .npy header says): "
                              "prepare the folder again")
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    array = np.frombuffer(mapped, dtype, count=count, offset=offset) if count else np.zeros(0, dtype)
    return array.reshape(shape, order="F" if fortran_order else "C"), (mapped, offset)


class ShardSet:
    """All shards of one split, memory-mapped (never copied into RAM); rows are indexed globally."""

    def __init__(self, directory: Path, manifest: dict[str, Any], split: str, verify: bool) -> None:
        self.manifest = manifest
        self.seq_len: int = manifest["seq_len"]
        self.shards: list[dict[str, np.ndarray]] = []
        self.mappings: list[dict[str, tuple[mmap.mmap, int]]] = []
        for shard in manifest["splits"][split]:
            arrays, mappings = {}, {}
            for name, sha256 in shard["files"].items():
                path = directory / name
                if not path.is_file():
                    raise LacunaError(f"shard file '{path}' is missing: prepare the folder again")
                if verify and file_sha256(path) != sha256:
                    raise LacunaError(f"shard file '{path}' fails its sha256 check (corrupt or changed): prepare again")
                kind = name.split(".")[-2]
                arrays[kind], mappings[kind] = map_array(path)
            self.shards.append(arrays)
            self.mappings.append(mappings)
        self.row_starts = np.cumsum([0] + [shard["rows"] for shard in manifest["splits"][split]]).tolist()
        self.num_rows: int = self.row_starts[-1]

    def _read(self, shard_index: int, kind: str, start: int, count: int = 1) -> np.ndarray:
        """Copy entries [start, start + count) of one array out, then drop their pages from this process's mapping."""
        # They stay in the page cache, but RSS no longer grows with every row ever read (2 GB of shards would count).
        array, (mapped, offset) = self.shards[shard_index][kind], self.mappings[shard_index][kind]
        copied = np.array(array[start:start + count])
        first, end = offset + start * array.strides[0], offset + (start + count) * array.strides[0]
        block = 2**21  # a fault can map a whole large page-cache folio (up to 2 MB), not just the row's pages
        aligned = first - first % block
        mapped.madvise(mmap.MADV_DONTNEED, aligned, min(len(mapped), end + (-end) % block) - aligned)
        return copied

    def supervised_at(self, indices: np.ndarray) -> np.ndarray:
        """The supervised-token counts of the rows at global `indices`, read from the shards, not kept in RAM."""
        shard_of = np.searchsorted(self.row_starts, indices, side="right") - 1
        counts = np.zeros(len(indices), np.int64)
        for shard_index in np.unique(shard_of).tolist():
            chosen = shard_of == shard_index
            counts[chosen] = self.shards[shard_index]["supervised"][indices[chosen] - self.row_starts[shard_index]]
            self.mappings[shard_index]["supervised"][0].madvise(mmap.MADV_DONTNEED)  # as in _read
        return counts

    @property
    def supervised_counts(self) -> np.ndarray:
        """Every row's supervised-token count (8 bytes × rows in RAM: for tools; the loader uses supervised_at)."""
        return self.supervised_at(np.arange(self.num_rows))

    def row(self, index: int) -> Row:
        if not 0 <= index < self.num_rows:
            raise LacunaError(f"row {index} is out of range: this split has {self.num_rows} rows")
        shard_index = bisect_right(self.row_starts, index) - 1
        local, read = index - self.row_starts[shard_index], partial(self._read, shard_index)
        first, last = read("row_offsets", local, 2).tolist()
        cu_seqlens, supervised = read("cu_seqlens", first, last - first), int(read("supervised", local)[0])
        stored = "loss_mask" in self.shards[shard_index]
        mask = read("loss_mask", local)[0] if stored else derived_loss_mask(cu_seqlens, supervised)
        return Row(read("tokens", local)[0], mask, cu_seqlens, supervised, int(read("max_seqlen", local)[0]))


def derived_loss_mask(cu_seqlens: np.ndarray, supervised: int) -> np.ndarray:
    """A pretraining row's loss mask, not stored: 1 but at segment starts and over a padding tail, which the
    supervised count tells (module docstring); a count that does not match means a corrupt or non-pretraining row."""
    mask = np.ones(int(cu_seqlens[-1]), np.uint8)
    mask[cu_seqlens[:-1]] = 0
    if supervised < len(mask) - (len(cu_seqlens) - 1):
        mask[cu_seqlens[-2]:] = 0
    if mask.sum() != supervised:
        raise LacunaError(f"a row without a stored loss_mask has {supervised} supervised tokens, not a pretraining "
                          f"mask's {mask.sum()}: the shard is corrupt or not pretraining data; prepare it again")
    return mask


def open_shards(directory: Path, split: str = "train", verify: bool = False) -> ShardSet:
    """Open one split of a prepared folder (`verify`: recheck every file's sha256 first)."""
    manifest = read_manifest(Path(directory))
    if split not in manifest["splits"]:
        raise LacunaError(f"split {split!r} is not in '{directory}' (it has {', '.join(manifest['splits'])})")
    return ShardSet(Path(directory), manifest, split, verify)


def write_shard(directory: Path, name: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Save one shard's arrays (those given: pretraining leaves loss_mask out) as `{name}.{kind}.npy`; returns its
    manifest entry (rows, file hashes)."""
    files = {}
    for kind in (kind for kind in FILE_KINDS if kind in arrays):
        path = directory / f"{name}.{kind}.npy"
        np.save(path, arrays[kind], allow_pickle=False)
        files[path.name] = file_sha256(path)
    return {"name": name, "rows": len(arrays["tokens"]), "files": files}
