"""Issue 3 and 11 benchmarks: `lacuna prepare` throughput vs TRL (plain chat, tool-use/reasoning conversations,
pretraining text), and packing fill vs TRL bfd and greedy concatenation.

Worker (a fresh process and an empty datasets cache per run, so no side reuses another's cache):
    python pipelines/bench_prepare.py lacuna|lacuna-2|trl|trl-batched|tokenizer sft|pretrain DATASET SEQ_LEN OUT
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench import RESULT_PREFIX, ROOT, THREADS, TOKENIZER, WORK, figure, report, run_worker

SEQ_LEN = 2048
CORPUS = ROOT / "data" / "corpus"
# Synthetic SFT-like lengths: lognormal(mu, sigma) tokens, median e^6 = 403, draws over SEQ_LEN redrawn (as lacuna
# drops overlong conversations by default), mean ~516.
LOGNORMAL_MU, LOGNORMAL_SIGMA = 6.0, 1.0
PREPARERS = {"lacuna": "lacuna prepare", "lacuna-2": "lacuna prepare --num-proc 2",
             "trl": "TRL, per-example map as SFTTrainer", "trl-batched": "TRL, batched map"}


# ----------------------------------------------------------------------------- workers (timed after imports)


def prepare_with_lacuna(mode: str, dataset: str, seq_len: int, out: str, processes: int) -> dict[str, Any]:
    from lacuna.prepare import main

    started = time.perf_counter()
    main([mode, "--dataset", dataset, "--tokenizer", str(TOKENIZER), "--seq-len", str(seq_len), "--out", out,
          "--num-proc", str(processes), "--overwrite", "--quiet"])
    seconds = time.perf_counter() - started
    stats = json.loads((Path(out) / "manifest.json").read_text())["stats"]
    return {"seconds": seconds, "documents": stats["documents"], "tokens": stats["tokens"], "rows": stats["rows"]}


def prepare_with_trl(mode: str, dataset: str, seq_len: int, out: str, batched: bool) -> dict[str, Any]:
    """TRL's pipeline: `datasets.map` tokenization (per example, as SFTTrainer does, or `batched`), a labels map from
    the assistant masks (SFTTrainer's next step), `trl.pack_dataset(strategy="bfd")`, `save_to_disk`."""
    import pyarrow.compute as compute
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import pack_dataset

    from lacuna.chat_templates import choose_template

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    template = choose_template(None, tokenizer).source  # the generation-tagged ChatML template lacuna uses

    def wrap(ids: list[int]) -> list[int]:
        return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]  # as lacuna prepares pretraining documents

    def tokenize(records: dict[str, Any]) -> dict[str, Any]:
        if mode == "sft":  # as SFTTrainer's tokenize_fn: a record's own tools go with it
            tools = records.get("tools")
            encoded = tokenizer.apply_chat_template(records["messages"], chat_template=template, tokenize=True,
                                                    return_dict=True, return_assistant_tokens_mask=True,
                                                    tools=json.loads(tools) if isinstance(tools, str) else tools)
            return {"input_ids": encoded["input_ids"], "assistant_masks": encoded["assistant_masks"]}
        ids = tokenizer(records["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [wrap(row) for row in ids] if batched else wrap(ids)}

    def label(ids: list[int], mask: list[int]) -> list[int]:
        return [token if bit else -100 for token, bit in zip(ids, mask, strict=True)]

    def labels(records: dict[str, Any]) -> dict[str, Any]:
        if not batched:
            return {"labels": label(records["input_ids"], records["assistant_masks"])}
        pairs = zip(records["input_ids"], records["assistant_masks"], strict=True)
        return {"labels": [label(ids, mask) for ids, mask in pairs]}

    records = load_dataset("json", data_files=dataset, split="train")
    tokenized = records.map(tokenize, batched=batched, remove_columns=records.column_names)
    if mode == "sft":
        tokenized = tokenized.map(labels, batched=batched, remove_columns=["assistant_masks"])
    packed = pack_dataset(tokenized, seq_len, strategy="bfd")
    packed.save_to_disk(out)
    seconds = time.perf_counter() - started

    def tokens(dataset: Any) -> int:
        return compute.sum(compute.list_value_length(dataset.data.column("input_ids"))).as_py()

    return {"seconds": seconds, "documents": len(records), "tokens": tokens(packed), "rows": len(packed),
            "tokenized_tokens": tokens(tokenized)}


# ----------------------------------------------------------------------------- throughput


def tool_conversations() -> list[dict[str, Any]]:
    """Tool-use and reasoning conversations built from the real chat corpus: each conversation once with a tool call
    (arguments whose keys differ between records) and its result before the real reply, once with reasoning, and
    joined with the next one into a multi-turn conversation with a system prompt."""
    tools = [{"type": "function", "function": {"name": name, "description": f"The {name} tool.", "parameters": {
        "type": "object", "properties": {key: {"type": "string"} for key in keys}}}}
             for name, keys in (("search", ("query",)), ("weather", ("name", "units")))]
    chat = [json.loads(line)["messages"] for line in (CORPUS / "chat.jsonl").open()]
    records = []
    for index, (messages, following) in enumerate(zip(chat, chat[1:] + chat[:1], strict=True)):
        question, reply = messages[0], messages[-1]
        arguments = {"query": question["content"]} if index % 2 else {"name": f"city {index}", "units": "C"}
        call = {"type": "function", "function": {"name": "search" if index % 2 else "weather", "arguments": arguments}}
        records += [{"tools": tools, "messages": [question, {"role": "assistant", "content": "Let me check.",
                                                             "tool_calls": [call]},
                                                  {"role": "tool", "content": reply["content"]}, reply]},
                    {"messages": [question, {**reply, "reasoning_content": f"The user said: {question['content']}"}]},
                    {"messages": [{"role": "system", "content": "Answer briefly."}, *messages, *following]}]
    return records


def make_inputs(quick: bool) -> dict[str, tuple[str, Path, str]]:
    """Benchmark inputs: the real chat corpus repeated, tool-use/reasoning conversations built from it, and the real
    stdlib corpus (or its first files)."""
    WORK.mkdir(parents=True, exist_ok=True)
    repeats, files = (2, 200) if quick else (10, None)
    chat, tools, stdlib = (WORK / f"chat-x{repeats}.jsonl", WORK / f"tools-x{repeats // 2}.jsonl",
                           WORK / f"stdlib-{files or 'all'}.jsonl")
    chat.write_text((CORPUS / "chat.jsonl").read_text() * repeats)
    tools.write_text("".join(json.dumps(record) + "\n" for record in tool_conversations()) * (repeats // 2))
    stdlib.write_text("".join((CORPUS / "stdlib.jsonl").read_text().splitlines(keepends=True)[:files]))
    return {"chat": ("sft", chat, f"chat.jsonl ×{repeats} (real conversations, repeated)"),
            "tools": ("sft", tools, f"tool-use/reasoning conversations built from chat.jsonl ×{repeats // 2}: tool "
                                    "calls and results, reasoning, multi-turn with a system prompt"),
            "stdlib": ("pretrain", stdlib, f"stdlib.jsonl, {'first 200' if quick else 'all 731'} files")}


def tokenizer_alone(mode: str, dataset: str) -> dict[str, Any]:
    """The floor under any prepare with this tokenizer: its Rust batch encode of the same texts (chat: already
    rendered), on all cores, nothing else timed."""
    from transformers import AutoTokenizer

    from lacuna.chat_templates import choose_template

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    records = [json.loads(line) for line in Path(dataset).open()]
    template = choose_template(None, tokenizer).source
    texts = [record["text"] if mode == "pretrain" else tokenizer.apply_chat_template(
        record["messages"], tools=record.get("tools"), chat_template=template, tokenize=False) for record in records]
    started = time.perf_counter()
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return {"seconds": time.perf_counter() - started, "tokens": sum(len(encoding.ids) for encoding in encodings)}


def prepare_throughput(quick: bool, previous: dict[str, Any], only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Wall time from the .jsonl to packed rows on disk of lacuna vs TRL, same tokenizer and template; each run in
    a fresh process, runs interleaved, the median of each preparer's runs compared (`only`: these inputs)."""
    figures, raw, notes = [], {}, []
    repeats = 1 if quick else 3
    for name, (mode, dataset, description) in make_inputs(quick).items():
        if only and name not in only:
            continue
        # a batched apply_chat_template takes one `tools` for the whole batch, so TRL maps tool use per example
        preparers = ["lacuna", "trl"] + ["trl-batched"] * (name != "tools") + ([] if quick else ["lacuna-2"])
        for repeat in range(repeats):
            for preparer in preparers + ["tokenizer"]:
                cache = {"HF_DATASETS_CACHE": str(WORK / f"cache-{name}-{preparer}-{repeat}")}
                raw.setdefault(f"{name}/{preparer}", []).append(run_worker(
                    "bench_prepare.py", preparer, mode, str(dataset), str(SEQ_LEN),
                    str(WORK / f"{name}-{preparer}-{SEQ_LEN}"), environment=cache))
        seconds = {key.split("/")[1]: float(np.median([run["seconds"] for run in runs]))
                   for key, runs in raw.items() if key.startswith(f"{name}/")}
        lacuna, trl = raw[f"{name}/lacuna"][0], raw[f"{name}/trl"][0]
        on = (f"{description}: {lacuna['documents']:,} documents, {lacuna['tokens']:,} tokens, seq_len {SEQ_LEN}, "
              f"{mode}; median of {repeats} fresh-process run{'s' * (repeats > 1)} each")
        for mine, theirs in (("lacuna", "trl"), ("lacuna", "trl-batched"), ("lacuna-2", "trl")):
            if mine in seconds and theirs in seconds:
                ratio, target = seconds[theirs] / seconds[mine], mine == "lacuna" and theirs == "trl"
                figures.append(figure(f"{PREPARERS[mine]} speed-up vs {PREPARERS[theirs]} ({name})", ratio,
                                      f"{ratio:.2f}× ({seconds[mine]:.2f} s vs {seconds[theirs]:.2f} s)",
                                      "≥ 3×" if target else "", ratio >= 3 if target else None, on))
        floor = seconds["tokenizer"]
        figures.append(figure(f"tokenizer alone ({name})", floor,
                              f"{floor:.2f} s = {100 * floor / seconds['lacuna']:.0f} % of lacuna's time; caps the "
                              f"speed-up vs TRL at {seconds['trl'] / floor:.1f}×", "", None, on))
        if mode == "sft" and lacuna["tokens"] != trl["tokenized_tokens"]:
            notes.append(f"prepare: on {name}, lacuna kept {lacuna['tokens']:,} tokens and TRL tokenized "
                         f"{trl['tokenized_tokens']:,}: the same records should give the same tokens.")
        if trl["tokens"] < trl["tokenized_tokens"]:
            notes.append(f"prepare: TRL bfd truncates documents longer than seq_len: on {name} it kept "
                         f"{trl['tokens']:,} of {trl['tokenized_tokens']:,} tokens; lacuna splits them and keeps all.")
    notes.append("prepare: each run is a fresh process with an empty datasets cache, timed after imports: tokenizer "
                 "load, json reading, tokenization, packing and writing (lacuna: .npy shards + sha256; TRL: "
                 "`save_to_disk`), one process unless stated. The ≥ 3× target is against TRL's own pipeline "
                 "(SFTTrainer maps its tokenization per example); the batched map is a stronger baseline TRL does "
                 "not use. 'tokenizer alone' is the Rust batch encode of the same texts (2 threads) and nothing else: "
                 "no prepare with this tokenizer on this machine can be faster.")
    return {"figures": figures, "raw": raw, "notes": notes}


# ----------------------------------------------------------------------------- fill


def chat_lengths() -> np.ndarray:
    """Token lengths of the real chat conversations under the ChatML template (as `lacuna prepare sft` makes them)."""
    from transformers import AutoTokenizer

    from lacuna.chat_templates import choose_template

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    conversations = [json.loads(line)["messages"] for line in (CORPUS / "chat.jsonl").open()]
    ids = tokenizer.apply_chat_template(conversations, chat_template=choose_template(None, tokenizer).source,
                                        tokenize=True, return_dict=True)["input_ids"]
    return np.array([len(row) for row in ids])


def stdlib_lengths(seq_len: int) -> np.ndarray:
    """Packing items of the real stdlib corpus: BOS + file + EOS, cut into seq_len chunks overlapping by one token
    (as lacuna.writing.segments cuts pretraining documents)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    texts = [json.loads(line)["text"] for line in (CORPUS / "stdlib.jsonl").open()]
    lengths = np.array([len(row) + 2 for row in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    chunks = np.where(lengths > seq_len, -(-(lengths - 1) // (seq_len - 1)), 1)
    offsets = (np.arange(chunks.sum()) - np.repeat(np.cumsum(chunks) - chunks, chunks)) * (seq_len - 1)
    return np.minimum(seq_len, np.repeat(lengths, chunks) - offsets)


def lognormal_lengths(count: int, seq_len: int, seed: int = 0) -> np.ndarray:
    rng, lengths = np.random.default_rng(seed), np.empty(0, np.int64)
    while len(lengths) < count:
        draw = np.ceil(rng.lognormal(LOGNORMAL_MU, LOGNORMAL_SIGMA, count)).astype(np.int64)
        lengths = np.concatenate([lengths, draw[draw <= seq_len]])
    return lengths[:count]


def greedy_rows(lengths: np.ndarray, seq_len: int) -> int:
    """Greedy concatenation: documents in order, a new row whenever the next one does not fit (no splitting)."""
    rows, space = 0, 0
    for length in lengths.tolist():
        if length > space:
            rows, space = rows + 1, seq_len
        space -= length
    return rows


def trl_rows(lengths: np.ndarray, seq_len: int, batch_size: int | None) -> int:
    """Rows of `trl.pack_dataset(strategy="bfd")` on placeholder tokens of these lengths; it packs each batch of its
    `datasets.map` on its own (1000 documents: the datasets default; None: all at once)."""
    import pyarrow as pa
    from datasets import Dataset
    from trl import pack_dataset

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(offsets[-1], np.int8)))
    dataset = Dataset(pa.table({"input_ids": column}))
    return len(pack_dataset(dataset, seq_len, strategy="bfd", map_kwargs={"batch_size": batch_size}))


def row_bound(lengths: np.ndarray, seq_len: int) -> float:
    """Issue 3's bound on rows: max(1.002 × ⌈Σlen/L⌉, ⌈Σlen/L⌉ + 1)."""
    minimum = math.ceil(lengths.sum() / seq_len)
    return max(1.002 * minimum, minimum + 1)


def fill_figures(name: str, lengths: np.ndarray, rows: dict[str, int], on: str, fill_target: bool) -> list[dict]:
    fills = {key: lengths.sum() / (value * SEQ_LEN) for key, value in rows.items()}
    others = "; ".join(f"{key.replace('_', ' ')} {100 * fill:.3f} %" for key, fill in fills.items() if key != "lacuna")
    bound, minimum = row_bound(lengths, SEQ_LEN), math.ceil(lengths.sum() / SEQ_LEN)
    return [figure(f"fill ({name})", fills["lacuna"], f"{100 * fills['lacuna']:.3f} % ({others})",
                   "≥ 99.5 %" if fill_target else "", fills["lacuna"] >= 0.995 if fill_target else None, on),
            figure(f"rows ({name})", rows["lacuna"], f"{rows['lacuna']:,} (minimum {minimum:,}, bound {bound:,.1f})",
                   "≤ bound", rows["lacuna"] <= bound, on)]


def fill(quick: bool, previous: dict[str, Any]) -> dict[str, Any]:
    """Fill (tokens / (rows × seq_len)) of lacuna's best-fit decreasing vs TRL bfd and greedy, and its speed."""
    import datasets

    from lacuna.packing import best_fit_decreasing

    datasets.disable_progress_bars()
    synthetic = lognormal_lengths(1_000_000, SEQ_LEN)
    subset = synthetic[: 50_000 if quick else 200_000]
    chat = chat_lengths()
    sets = {"chat": (chat, "real chat.jsonl conversations (ChatML): real SFT, but small and short"),
            "chat ×10": (np.tile(chat, 10), "the real chat lengths ×10 (the throughput input): real SFT lengths, "
                                            "repeated to 20,260 documents"),
            "stdlib": (stdlib_lengths(SEQ_LEN), "real stdlib files as pretraining chunks of ≤ 2048 tokens"),
            "lognormal": (subset, f"the first {len(subset):,} of the 1M synthetic lengths below")}
    figures, raw = [], {}
    for name, (lengths, description) in sets.items():
        rows = {"lacuna": len(best_fit_decreasing(lengths, SEQ_LEN)), "TRL_bfd": trl_rows(lengths, SEQ_LEN, 1000),
                "TRL_bfd_one_batch": trl_rows(lengths, SEQ_LEN, None), "greedy": greedy_rows(lengths, SEQ_LEN)}
        raw[name] = {"items": len(lengths), "tokens": int(lengths.sum()), "rows": rows}
        on = f"{description}; {len(lengths):,} items, {lengths.sum():,} tokens, seq_len {SEQ_LEN}"
        figures += fill_figures(name, lengths, rows, on, fill_target=name != "chat")
    timings = []
    for _ in range(1 if quick else 3):
        started = time.perf_counter()
        rows_1m = len(best_fit_decreasing(synthetic, SEQ_LEN))
        timings.append(time.perf_counter() - started)
    raw["lognormal_1m"] = {"seconds": timings, "tokens": int(synthetic.sum()),
                           "rows": {"lacuna": rows_1m, "greedy": greedy_rows(synthetic, SEQ_LEN)}}
    on = (f"1,000,000 synthetic lognormal(μ={LOGNORMAL_MU}, σ={LOGNORMAL_SIGMA}) lengths ≤ {SEQ_LEN} "
          f"({synthetic.sum():,} tokens), seq_len {SEQ_LEN}")
    figures.append(figure("pack 1M lengths (best_fit_decreasing)", min(timings),
                          f"{min(timings):.2f} s (best of {len(timings)})", "< 5 s", min(timings) < 5, on))
    figures += fill_figures("1M lognormal", synthetic, raw["lognormal_1m"]["rows"], on, fill_target=True)
    notes = ["fill: no large real SFT set is available offline. `chat` is real SFT but only 2,026 short conversations "
             "(~37 rows, so the one partial last row bounds its fill), `stdlib` is real pretraining text, `lognormal` "
             f"is synthetic (μ={LOGNORMAL_MU}, σ={LOGNORMAL_SIGMA}: median 403 tokens, draws over {SEQ_LEN} redrawn). "
             "Greedy = documents in order, a new row when the next does not fit. TRL bfd packs each `datasets.map` "
             "batch (1000 documents by default) on its own; 'one batch' packs all at once."]
    return {"figures": figures, "raw": raw, "notes": notes}


# ----------------------------------------------------------------------------- scale (issue 12)


def scale_worker(dataset: str, out: str, rank: int, world: int) -> dict[str, Any]:
    """One `lacuna prepare pretrain` process (of `world`, --shard-index/--num-shards), timed by phase: tokenize (its
    part), wait (for the others' parts) and merge (its packing groups, and the manifest if it finishes last); peak
    RSS (all pages, file-backed ones of the memory-mapped data included) and peak anonymous RSS, sampled."""
    import resource
    import threading

    import lacuna.prepare as prepare

    phases: dict[str, float] = {"tokenizer": 0.0, "read": 0.0, "tokenize": 0.0, "wait": 0.0, "merge": 0.0}

    def timed(name: str, function: Any) -> Any:
        def run(*arguments: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*arguments)
            finally:
                phases[name] += time.perf_counter() - started
        return run

    for name, function in (("tokenizer", "load_tokenizer"), ("read", "load_source"), ("tokenize", "tokenize_part"),
                           ("wait", "wait_for_parts"), ("merge", "merge")):
        setattr(prepare, function, timed(name, getattr(prepare, function)))
    anonymous, running = [0], [True]

    def sample() -> None:  # RssAnon has no high-water mark of its own
        while running[0]:
            line = next(line for line in Path("/proc/self/status").open() if line.startswith("RssAnon:"))
            anonymous[0] = max(anonymous[0], int(line.split()[1]) * 1024)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    prepare.main(["pretrain", "--dataset", dataset, "--tokenizer", str(TOKENIZER), "--seq-len", str(SEQ_LEN),
                  "--out", out, "--quiet", "--shard-index", str(rank), "--num-shards", str(world)])
    seconds = time.perf_counter() - started
    running[0] = False
    sampler.join()
    return {"rank": rank, "seconds": seconds, **phases, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            * 1024, "peak_anonymous_rss": anonymous[0]}


def prepare_concurrently(dataset: Path, out: Path, processes: int) -> list[dict[str, Any]]:
    """`processes` scale workers started at once on this machine (as on the nodes of a shared filesystem), with
    their own empty datasets cache; each worker's result, by rank."""
    shutil.rmtree(out, ignore_errors=True)
    cache = out.with_name(out.name + "-cache")
    shutil.rmtree(cache, ignore_errors=True)
    environment = os.environ | {"OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(ROOT / "pipelines"),
                                "HF_DATASETS_CACHE": str(cache)}
    started = [subprocess.Popen([sys.executable, __file__, "scale", str(dataset), str(out), str(rank), str(processes)],
                                cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for rank in range(processes)]
    results = []
    for process in started:
        stdout, stderr = process.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if process.returncode or not lines:
            raise RuntimeError(f"scale worker failed ({process.returncode}):\n{stderr[-3000:]}")
        results.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
    shutil.rmtree(cache, ignore_errors=True)
    return results


def scale(quick: bool, previous: dict[str, Any]) -> dict[str, Any]:
    """Issue 12: `lacuna prepare pretrain` of the stdlib corpus ×1, ×10, ×30 in one process (time per token, merge
    share, peak memory, bytes per token on disk), and ×10 with 1, 2 and 4 concurrent processes (the slowest merge)."""
    WORK.mkdir(parents=True, exist_ok=True)
    text = (CORPUS / "stdlib.jsonl").read_text()
    repeats, multiple = ((1, 3), 3) if quick else ((1, 10, 30), 10)
    figures, raw, notes = [], {}, []
    for repeat in repeats:
        dataset = WORK / f"stdlib-x{repeat}.jsonl"
        dataset.write_text(text * repeat)
        out = WORK / f"scale-x{repeat}"
        (result,) = prepare_concurrently(dataset, out, 1)
        manifest = json.loads((out / "manifest.json").read_text())
        stats, size = manifest["stats"], sum(path.stat().st_size for path in out.glob("*.npy"))
        raw[f"x{repeat}"] = result | {"tokens": stats["tokens"], "rows": stats["rows"], "bytes": size,
                                      "groups": len({path.name.split("-")[1] for path in out.glob("train-*")})}
        if repeat != multiple:  # the ×multiple input and output serve the process runs below
            shutil.rmtree(out)
            dataset.unlink()
    per_token = {key: run["seconds"] / run["tokens"] for key, run in raw.items()}
    first, last = f"x{repeats[0]}", f"x{repeats[-1]}"
    change = per_token[last] / per_token[first] - 1
    on = "stdlib.jsonl repeated, pretrain, seq_len 2048, one process, its own empty datasets cache, timed after imports"
    figures.append(figure(f"time per token ×{repeats[0]} → ×{repeats[-1]}", change, ", ".join(
        f"{key}: {1e9 * value:,.0f} ns ({raw[key]['tokens'] / raw[key]['seconds'] / 1e6:.2f} M tokens/s)"
        for key, value in per_token.items()) + f"; {100 * change:+.1f} %", "flat within 10 %", abs(change) <= 0.10, on))
    for key, run in raw.items():
        share = run["merge"] / run["seconds"]
        figures.append(figure(f"merge share ({key})", share, f"{100 * share:.1f} % ({run['merge']:.2f} s of "
                              f"{run['seconds']:.1f} s; {run['groups']} packing group(s), {run['tokens']:,} tokens)",
                              "< 5 %", share < 0.05, on))
    for key, run in raw.items():
        figures.append(figure(f"peak memory ({key})", run["peak_anonymous_rss"],
                              f"{run['peak_anonymous_rss'] / 2**20:,.0f} MiB anonymous, {run['peak_rss'] / 2**20:,.0f}"
                              " MiB RSS with file-backed pages", "", None, on))
    for key, run in raw.items():
        per_token_bytes, per_position = run["bytes"] / run["tokens"], run["bytes"] / (run["rows"] * SEQ_LEN)
        figures.append(figure(f"bytes per token on disk ({key})", per_token_bytes, f"{per_token_bytes:.3f} "
                              f"({per_position:.3f} per stored position; uint16 tokens, no loss_mask)", "≤ 2.05",
                              per_token_bytes <= 2.05, on))
    dataset, reference = WORK / f"stdlib-x{multiple}.jsonl", WORK / f"scale-x{multiple}"
    merges = {1: raw[f"x{multiple}"]["merge"]}
    for processes in (2, 4):
        out = WORK / f"scale-x{multiple}-{processes}"
        runs = prepare_concurrently(dataset, out, processes)
        raw[f"x{multiple}/{processes} processes"] = runs
        merges[processes] = max(run["merge"] for run in runs)
        same = json.loads((out / "manifest.json").read_text())["splits"] == json.loads(
            (reference / "manifest.json").read_text())["splits"]
        notes.append(f"scale: ×{multiple} with {processes} processes: shards "
                     f"{'byte-identical' if same else 'DIFFERENT'} to one process's (the manifests' sha256 of every "
                     "file); wall "
                     f"{max(run['seconds'] for run in runs):.1f} s, each process's merge part "
                     + ", ".join(f"{run['merge']:.2f} s" for run in runs))
        shutil.rmtree(out)
    shutil.rmtree(reference), dataset.unlink()
    on = (f"stdlib.jsonl ×{multiple}, pretrain, seq_len 2048, --pack-group-tokens {2**23} (the default: "
          f"{raw[f'x{multiple}']['groups']} train groups), processes started at once with --shard-index/--num-shards")
    figures.append(figure("slowest process's merge part, 1 / 2 / 4 processes", merges[4] / merges[1], " / ".join(
        f"{merges[count]:.2f} s" for count in (1, 2, 4)) + f" ({merges[1] / merges[4]:.1f}× less with 4)",
                          "divides between processes", merges[4] < merges[1], on))
    notes.append("scale: the machine is shared and has 2 cores (4 concurrent processes share them, so their merges "
                 "overlap at most 2 at a time); the figures move with the other users' load (the load average is "
                 "recorded per worker in results.json). Merge = from every part tokenized to the process's groups "
                 "written (the last process also writes the manifest); datasets' JSON-to-Arrow conversion and the "
                 "tokenizer load count in the total, not in tokenize or merge. Anonymous RSS is sampled every 20 ms; "
                 "full RSS also counts the pages of the memory-mapped Arrow cache and parts that were read.")
    return {"figures": figures, "raw": raw, "notes": notes}


if __name__ == "__main__" and sys.argv[1] == "scale":  # bench_prepare.py scale DATASET OUT RANK WORLD
    import datasets  # noqa: F401  (imports are not timed)
    from transformers import AutoTokenizer

    import lacuna.prepare  # noqa: F401

    AutoTokenizer.from_pretrained(TOKENIZER)  # finishes transformers' lazy imports, as the throughput workers do
    report(scale_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    sys.exit()


if __name__ == "__main__":
    preparer, mode, dataset, seq_len, out = sys.argv[1:]
    import datasets  # noqa: F401  (imports are not timed)
    import trl  # noqa: F401
    from transformers import AutoTokenizer

    import lacuna.prepare  # noqa: F401

    AutoTokenizer.from_pretrained(TOKENIZER)  # finishes transformers' lazy imports (torch among them) for both sides
    if preparer == "tokenizer":
        report(tokenizer_alone(mode, dataset))
    elif preparer.startswith("lacuna"):
        report(prepare_with_lacuna(mode, dataset, int(seq_len), out, processes=2 if preparer == "lacuna-2" else 1))
    else:
        report(prepare_with_trl(mode, dataset, int(seq_len), out, batched=preparer == "trl-batched"))
