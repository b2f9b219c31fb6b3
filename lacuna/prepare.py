"""`lacuna prepare {pretrain,sft}`: process r of W tokenizes its share into OUT.partial/parts/part-r.*, then packs its
share of the groups (lacuna/writing.py) into shards (lacuna/shards.py), byte-identical whatever W and --num-proc."""

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import nullcontext
from itertools import pairwise
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from lacuna.chat_templates import check_template, choose_template
from lacuna.config import Config, PrepareConfig, load_config
from lacuna.encoding import EncodedBatch, Encoder
from lacuna.errors import LacunaError, run_main
from lacuna.files import write_atomically
from lacuna.shards import FORMAT, token_dtype, tokenizer_hash
from lacuna.sources import RecordBatch, Source, load_source, parse_source, record_batches
from lacuna.writing import finished, merge, output_lock

RUN_ONLY = {"num_proc", "out", "overwrite", "quiet", "shard_index", "num_shards", "streaming"}
SUMMARY_KEYS = ("documents", "tokens", "supervised_tokens", "rows", "fill", "split", "truncated", "dropped",
                "empty_mask", "all_turns_excluded")


ENCODER: Encoder  # set before forking --num-proc workers, which inherit it


def encode_in_worker(batch: RecordBatch) -> EncodedBatch:
    return ENCODER(batch)


def in_order(pool: Any, batches: Iterator, window: int) -> Iterator[EncodedBatch]:
    """The encoded batches, in order, with at most `window` in flight (`Pool.imap` would queue the whole dataset)."""
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(encode_in_worker, (batch,)))
        if len(pending) == window:
            yield pending.popleft().get()
    yield from (result.get() for result in pending)


def tokenize_part(sources: list[Source], encoder: Encoder, settings: PrepareConfig, rank: int, world: int,
                  parts: Path, fingerprint: str) -> None:
    """Tokenize this process's slice of every source into parts/part-{rank}.*; the JSON marker goes last."""
    from rich.progress import MofNCompleteColumn, Progress, TextColumn

    global ENCODER
    ENCODER = encoder
    stem = parts / f"part-{rank:05d}"
    per_document: list[list[np.ndarray]] = [[], []]
    runs, conversations = [], Counter()  # runs: [source, file, documents] in reading order
    with (get_context("fork").Pool(settings.num_proc) if settings.num_proc > 1 else nullcontext() as pool,
          open(f"{stem}.tokens.bin", "wb") as tokens_file, open(f"{stem}.mask.bin", "wb") as mask_file,
          Progress(*Progress.get_default_columns()[:2], MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
                   disable=settings.quiet or int(os.environ.get("LOCAL_RANK", 0)) != 0) as progress):  # one per node
        for index, source in enumerate(sources):
            total = None if settings.streaming else -(-len(source.dataset) // world)
            task = progress.add_task(f"tokenize {source.spec}", total=total, speed="")
            start, documents, tokens, speed = time.perf_counter(), 0, 0, ""
            batches = record_batches(source, index, rank, world, settings.num_proc, runs)
            for result in in_order(pool, batches, 2 * settings.num_proc) if pool else map(encoder, batches):
                tokens_file.write(result.tokens.tobytes())
                if settings.mode == "sft":  # a pretraining mask is 1 but at document starts: the writer knows it
                    mask_file.write(result.masks.tobytes())
                per_document[0].append(result.lengths), per_document[1].append(result.status)
                conversations.update(result.counts)
                documents, tokens = documents + len(result.lengths), tokens + len(result.tokens)
                elapsed = max(time.perf_counter() - start, 1e-9)
                speed = f"{documents / elapsed:,.0f} docs/s  {tokens / elapsed:,.0f} tokens/s"
                progress.update(task, completed=documents, speed=speed)
            if not settings.quiet:
                print(f"tokenized {source.spec}: {documents:,} documents, {speed}", flush=True)
    if differing := conversations["not_prefix_preserving"]:
        print(f"warning: chat template {encoder.template_name} is not prefix-preserving: in {differing} of the first "
              f"{conversations['prefix_checked']} multi-turn conversations earlier turns render differently once later "
              "turns follow, so training sees another history than inference: use a template that renders every turn "
              "the same way (e.g. lacuna/templates/qwen3.jinja)", file=sys.stderr, flush=True)
    for name, column in zip(("lengths", "status"), per_document, strict=True):
        np.save(f"{stem}.{name}.npy", np.concatenate(column) if column else np.zeros(0, np.int64))
    write_atomically(Path(f"{stem}.json"), json.dumps({"fingerprint": fingerprint, "documents": runs,
                                                        "conversations": conversations}))


def wait_for_parts(markers: list[Path], fingerprint: str, patience: float = 600) -> None:
    """Poll until every part is tokenized; fail, naming the missing ones, once no part file grew for `patience` s."""
    started = time.time()
    while missing := [str(index) for index, marker in enumerate(markers) if not finished(marker, fingerprint)]:
        if time.time() - max([started] + [path.stat().st_mtime for path in markers[0].parent.glob("*.bin")]) > patience:
            raise LacunaError(f"parts {', '.join(missing)} of {len(markers)} are unfinished and no part grew for "
                              f"{patience:.0f} s: start (or rerun) the processes with those --shard-index values")
        time.sleep(1)


def recorded_settings(config: Config) -> dict[str, Any]:
    """The [prepare] settings a manifest records (those that shape the output), with the tokenizer resolved."""
    settings = config.prepare.model_copy(update={"tokenizer": config.prepare.tokenizer or config.model.name})
    return settings.model_dump(mode="json", exclude=RUN_ONLY)


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


def print_report(manifest: dict[str, Any], directory: Path, segments: list[dict[str, Any]] | None, row: int | None,
                 split: str, verified: bool) -> None:
    """A prepared folder's stats and length histogram for people, with one decoded row's `segments` if given."""
    from rich.console import Console
    from rich.text import Text

    console, stats = Console(highlight=False), {"all_turns_excluded": 0, **manifest["stats"]}
    console.print(f"{directory}: {manifest['mode']}, seq_len {manifest['seq_len']}, {manifest['token_dtype']} tokens, "
                  f"tokenizer {manifest['tokenizer']['name']}")
    for name, values in [*stats["splits"].items(), ("total", stats)]:
        console.print(f"{name:>5}: {values['rows']:,} rows, fill {values['fill']:.2%}, {values['documents']:,} "
                      f"documents, {values['tokens']:,} tokens, {values['supervised_tokens']:,} supervised")
    console.print("overlong split {split:,}, truncated {truncated:,}, dropped {dropped:,}, empty masks {empty_mask:,}, "
                  "every turn left out {all_turns_excluded:,}".format(**stats))
    if counted := stats.get("conversations"):  # sft: by kind, and the turns left out of the loss
        console.print("conversations: " + ", ".join(f"{key.replace('_', ' ')} {n:,}" for key, n in counted.items()))
    for source in stats["sources"]:
        console.print(f"source {source['dataset']} (weight {source['weight']}): {source['documents']:,} documents, "
                      f"{source['train']:,} in train, {source['val']:,} in val")
    edges, counts = stats["length_histogram"]["edges"], stats["length_histogram"]["counts"]
    bars = [f"{low:>5}-{high - 1:<5} {'█' * round(40 * count / (max(counts) or 1)):<40} {count:,}"
            for (low, high), count in zip(pairwise(edges), counts, strict=True)]
    console.print("segment lengths (tokens):", *bars, sep="\n")
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


def prepare(config: Config) -> dict[str, Any] | None:
    """Run this process's part of a prepare, holding the lock on --out; the last to finish returns the manifest."""
    with output_lock(Path(config.prepare.out or config.data.path), config.prepare):  # before any work
        return locked_prepare(config)


def place_process(settings: PrepareConfig, out: Path) -> tuple[list[Source], int, int]:
    """The settings checked before any work, the parsed --dataset specs, and this process's rank and count."""
    if not settings.dataset:
        raise LacunaError("no dataset given: pass --dataset PATH_OR_NAME (or set dataset in [prepare])")
    if out.exists() and not settings.overwrite:
        raise LacunaError(f"output folder '{out}' already exists: pass --overwrite to replace it, or another --out")
    if out.exists() and not out.is_dir():
        raise LacunaError(f"--out '{out}' is a file, not a folder: pass another --out")
    sources = [parse_source(spec) for spec in settings.dataset]
    rank, world = settings.shard_index, settings.num_shards  # else torchrun's RANK/WORLD_SIZE, else (0, 1)
    if rank is None and world is None:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    elif rank is None or world is None or not 0 <= rank < world:
        raise LacunaError("--shard-index I and --num-shards N go together, with 0 <= I < N")
    if settings.num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the fork below would disable it anyway, with a warning
    if (local_processes := int(os.environ.get("LOCAL_WORLD_SIZE", 1))) > 1:  # torchrun: the node's processes share
        # its cores, or every process's tokenizer thread pool (rayon) would start a thread per core
        from lacuna.launch import machine_physical_cores, omp_threads

        os.environ.setdefault("RAYON_NUM_THREADS", str(omp_threads(local_processes, machine_physical_cores())))
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # read errors become one LacunaError line instead
    return sources, rank, world


def locked_prepare(config: Config) -> dict[str, Any] | None:
    settings, out = config.prepare, Path(config.prepare.out or config.data.path)
    settings.tokenizer = settings.tokenizer or config.model.name
    sources, rank, world = place_process(settings, out)
    tokenizer = load_tokenizer(settings.tokenizer, config.model.trust_remote_code)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise LacunaError(f"tokenizer '{settings.tokenizer}' has no fast (Rust `tokenizers`) backend, which lacuna's "
                          "batched tokenization needs: pass a --tokenizer folder that has a tokenizer.json")
    chosen = None
    if settings.mode == "sft":
        chosen = choose_template(settings.chat_template, tokenizer)
        check_template(chosen.source, chosen.name)
        if not settings.quiet and rank == 0:
            print(f"chat template: {chosen.name} ({chosen.reason})", flush=True)
    dtype = token_dtype(len(tokenizer))
    sources = [load_source(source, settings) for source in sources]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    described = {"name": settings.tokenizer, "vocab_size": len(tokenizer), "hash": tokenizer_hash(tokenizer)}
    header = {**FORMAT, "seq_len": settings.seq_len, "token_dtype": dtype.name, "mode": settings.mode, "pad_id": pad_id,
              "tokenizer": described, "chat_template": f"{chosen.name} ({chosen.reason})" if chosen else None,
              "chat_template_hash": hashlib.sha256(chosen.source.encode()).hexdigest() if chosen else None,
              "config": recorded_settings(config)}  # the manifest's fields besides shards and stats
    inputs = [getattr(source.dataset, "_fingerprint", source.spec) for source in sources]
    fingerprint = hashlib.sha256(json.dumps([header, inputs, world]).encode()).hexdigest()
    partial = out.with_name(out.name + ".partial")
    if world == 1:
        shutil.rmtree(partial, ignore_errors=True)
    (partial / "parts").mkdir(parents=True, exist_ok=True)
    field = settings.text_field if settings.mode == "pretrain" else settings.messages_field
    encoder = Encoder(settings.mode, tokenizer, chosen and chosen.source, settings.seq_len, settings.overlong, dtype,
                      field, settings.assistant_turns, chosen.name if chosen else "")
    markers = [partial / "parts" / f"part-{index:05d}.json" for index in range(world)]
    try:
        if not finished(markers[rank], fingerprint):  # a finished part (same inputs) is kept: another may be merging it
            tokenize_part(sources, encoder, settings, rank, world, partial / "parts", fingerprint)
        wait_for_parts(markers, fingerprint)
        if (manifest := merge(sources, settings, rank, world, partial, out, header, fingerprint, dtype)) is None:
            print(f"part {rank} of {world} packed; the last process to finish writes {out}", flush=True)
            return None
    except BaseException:
        if world == 1:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if settings.quiet:
        print(f"wrote {out}: " + ", ".join(f"{key} {manifest['stats'][key]:,}" for key in SUMMARY_KEYS), flush=True)
    else:
        print_report(manifest, out, None, None, "train", False)
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
