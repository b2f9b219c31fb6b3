"""`lacuna inspect DIR`: a prepared folder for people (stats, length histogram, a decoded row) and scripts (--json)."""

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from lacuna.prepare import load_tokenizer, print_report
from lacuna.shards import Row, open_shards, read_manifest


def row_segments(row: Row, tokenizer: Any) -> list[dict[str, Any]]:
    """Each segment of a row: its span, whether it is the padding tail, and its text as (text, supervised) runs."""
    bounds = row.cu_seqlens.tolist()
    segments = []
    for number, (start, end) in enumerate(pairwise(bounds)):
        mask = row.loss_mask[start:end].tolist()
        cuts = [start, *(start + np.flatnonzero(np.diff(mask)) + 1).tolist(), end]  # where the mask changes
        runs = [[tokenizer.decode(row.tokens[first:last].tolist()), bool(mask[first - start])]
                for first, last in pairwise(cuts)]
        padding = number == len(bounds) - 2 and not any(mask)  # documents always hold a supervised token
        segments.append({"start": start, "end": end, "padding": padding, "supervised": sum(mask), "runs": runs})
    return segments


def inspect(directory: Path, row: int | None = None, split: str = "train", as_json: bool = False,
            verify: bool = False) -> None:
    """Print a prepared folder's stats and length histogram; `row` decodes one row; `verify` rechecks sha256."""
    manifest = read_manifest(Path(directory))
    for name in manifest["splits"]:  # opening checks every file's size (`verify`: its sha256), so none is truncated
        open_shards(directory, name, verify=verify)
    segments = None
    if row is not None:
        segments = row_segments(open_shards(directory, split).row(row), load_tokenizer(manifest["tokenizer"]["name"]))
    if as_json:
        print(json.dumps({"manifest": manifest, "verified": verify, "split": split, "row": row, "segments": segments}))
    else:
        print_report(manifest, Path(directory), segments, row, split, verify)
