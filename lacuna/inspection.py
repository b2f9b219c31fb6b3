"""`lacuna inspect DIR`: a prepared folder for people (stats, length histogram, a decoded row) and scripts (--json)."""

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

from lacuna.shards import SPLITS, Row, open_shards, read_manifest


def row_segments(row: Row, tokenizer: Any) -> list[dict[str, Any]]:
    """Each segment of a row: its span, whether it is the padding tail, and its text as (text, supervised) runs."""
    bounds = row.cu_seqlens.tolist()
    segments = []
    for number, (start, end) in enumerate(pairwise(bounds)):
        mask = row.loss_mask[start:end].tolist()
        runs, first = [], start
        for position in range(start + 1, end + 1):
            if position == end or mask[position - start] != mask[first - start]:
                runs.append([tokenizer.decode(row.tokens[first:position].tolist()), bool(mask[first - start])])
                first = position
        padding = number == len(bounds) - 2 and not any(mask)  # documents always hold a supervised token
        segments.append({"start": start, "end": end, "padding": padding, "supervised": sum(mask), "runs": runs})
    return segments


def histogram_lines(histogram: dict[str, list[int]], width: int = 40) -> list[str]:
    edges, counts = histogram["edges"], histogram["counts"]
    top = max(counts, default=0) or 1
    lines = []
    for (low, high), count in zip(pairwise(edges), counts, strict=True):
        label = f"{low}" if high == low + 1 else f"{low}-{high - 1}"
        lines.append(f"{label:>11} {'█' * round(width * count / top):<{width}} {count:,}")
    return lines


def print_report(manifest: dict[str, Any], directory: Path, segments: list[dict[str, Any]] | None, row: int | None,
                 split: str, verified: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    stats = manifest["stats"]
    table = Table(title=f"{directory}: {manifest['mode']}, seq_len {manifest['seq_len']}, {manifest['token_dtype']} "
                        f"tokens, tokenizer {manifest['tokenizer']['name']}")
    for column in ("split", "rows", "documents", "tokens", "supervised", "fill"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, values in [*stats["splits"].items(), ("total", stats)]:
        table.add_row(name, *(f"{values[key]:,}" for key in ("rows", "documents", "tokens", "supervised_tokens")),
                      f"{values['fill']:.2%}")
    console.print(table)
    console.print("overlong split {split:,}, truncated {truncated:,}, dropped {dropped:,}, empty masks {empty_mask:,}"
                  .format(**stats) + f", every turn left out {stats.get('all_turns_excluded', 0):,}")
    if counted := stats.get("conversations"):  # sft: by kind, and the turns left out of the loss
        console.print("conversations: " + ", ".join(f"{key.replace('_', ' ')} {n:,}" for key, n in counted.items()))
    for source in stats["sources"]:
        console.print(f"source {source['dataset']} (weight {source['weight']}): {source['documents']:,} documents, "
                      f"{source['train']:,} in train, {source['val']:,} in val")
    console.print("segment lengths (tokens):")
    for line in histogram_lines(stats["length_histogram"]):
        console.print(line, highlight=False)
    if verified:
        console.print("sha256 verified for every shard file", style="green")
    if segments is None:
        return
    console.print(f"\n{split} row {row}: [bold green]supervised[/] tokens highlighted, the rest is context")
    for number, segment in enumerate(segments):
        title = "padding" if segment["padding"] else f"document {number + 1}, {segment['supervised']} supervised"
        console.rule(f"{title} [{segment['start']}:{segment['end']}]")
        if not segment["padding"]:
            console.print(Text.assemble(*((text, "bold green" if supervised else "dim") for text, supervised
                                          in segment["runs"])))


def inspect(directory: Path, row: int | None = None, split: str = "train", as_json: bool = False,
            verify: bool = False) -> None:
    """Print a prepared folder's stats and length histogram; `row` decodes one row; `verify` rechecks sha256."""
    manifest = read_manifest(Path(directory))
    if verify:
        for name in SPLITS:
            open_shards(directory, name, verify=True)
    segments = None
    if row is not None:
        from lacuna.prepare import load_tokenizer

        segments = row_segments(open_shards(directory, split).row(row), load_tokenizer(manifest["tokenizer"]["name"]))
    if as_json:
        print(json.dumps({"manifest": manifest, "verified": verify, "split": split, "row": row, "segments": segments}))
    else:
        print_report(manifest, Path(directory), segments, row, split, verify)
