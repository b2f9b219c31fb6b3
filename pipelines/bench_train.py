"""Issue 4 benchmarks: train throughput vs HF Trainer and TRL SFTTrainer, MFU, data wait, loader RSS.

Workers (each a fresh process with 2 threads, run by `bench.run_worker`):
    python pipelines/bench_train.py lacuna|lacuna-compiled|hf|trl|trl-packed DATA MODEL_JSON WARMUP STEPS RUN_DIR
    python pipelines/bench_train.py rss DATA STEPS
"""

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench import ROOT, THREADS, TOKENIZER, WORK, figure, report, run_worker

MODEL_FOLDER = ROOT / "data" / "models" / "SmolLM2-config"  # config.json + tokenizer: random init, real vocabulary
SMALL_MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2}
MFU_MODEL = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 4}
TRAIN_SEQ_LEN, MFU_SEQ_LEN = 512, 2048
FRAMEWORKS = {"lacuna": "lacuna (packed rows, varlen attention, FSDP2)",
              "hf": "HF Trainer, dynamic padding per batch",
              "trl": "TRL SFTTrainer, padding_free=True",
              "trl-packed": "TRL SFTTrainer, packing=True (bfd, padding-free)",
              "lacuna-compiled": "lacuna with --model.compile true (regional torch.compile)"}


# ----------------------------------------------------------------------------- peak


def compute_dtype() -> tuple[str, str]:
    """The dtype lacuna's `model.dtype = "auto"` picks on this CPU, and why: every framework computes in it."""
    import torch

    from lacuna.metrics import choose_dtype

    return choose_dtype("auto", torch.device("cpu"))


def matmul_flops(dtype: Any, size: int, repeats: int) -> float:
    """Best-of matmul flops up to `size` (lacuna's own measurement, as the trainer uses for MFU), best of `repeats`
    runs of it; sizes that would take over ~20 s (emulated bf16) are not reached."""
    from lacuna.metrics import measure_matmul_flops

    return max(measure_matmul_flops(dtype, seconds=20.0, largest=size) for _ in range(max(1, repeats // 3)))


def peak(quick: bool, previous: dict[str, Any]) -> dict[str, Any]:
    """The machine's matmul peak: the best square matmuls up to 4096² at 2 threads, bf16 and fp32."""
    import torch

    repeats = 3 if quick else 6
    raw = {name: matmul_flops(dtype, 4096, repeats) for name, dtype in (("bf16", torch.bfloat16),
                                                                         ("fp32", torch.float32))}
    on = f"square matmuls of 256 to 4096 (within ~20 s a size), best of {repeats} each, {THREADS} threads"
    figures = [figure(f"matmul peak {name}", value, f"{value / 1e12:.3f} TFLOPS", "", None, on)
               for name, value in raw.items()]
    return {"figures": figures, "raw": raw}


# ----------------------------------------------------------------------------- workers


def real_tokens(row: Any) -> int:
    """Non-padding tokens of a packed row: all but a padding tail (the one segment without a supervised position)."""
    last = int(row.cu_seqlens[-2])
    return last if not np.asarray(row.loss_mask[last:]).any() else len(row.tokens)


def train_with_lacuna(data: str, model: dict, warmup: int, steps: int, run_dir: str,
                      compile: bool = False) -> dict[str, Any]:
    """`python -m lacuna.train` in this process (one rank); step times and data wait from its metrics.jsonl."""
    import tomli_w
    import torch

    from lacuna.loader import epoch_rows
    from lacuna.shards import open_shards
    from lacuna.train import main

    config = Path(run_dir).with_suffix(".toml")
    config.write_text(tomli_w.dumps({"model": {"name": str(MODEL_FOLDER), "activation_checkpointing": False,
                                               "compile": compile, "config_overrides": model}}))
    main(["@", str(config), "--data", data, "--run-dir", run_dir, "--steps", str(warmup + steps), "--batch-size", "1",
          "--warmup-steps", "1", "--log-every", "1", "--checkpoint.export", "false", "--resume", "none"])
    records = [record for record in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
               if "event" not in record][warmup:]  # step records: the start record is an event
    shards = open_shards(Path(data))
    epochs = -(-(warmup + steps) // shards.num_rows)  # the run's row order (seed 0, one row per step), replayed
    everything = np.arange(shards.num_rows)
    order = np.concatenate([epoch_rows(everything, shards.num_rows, 0, epoch) for epoch in range(epochs)])
    tokens = [real_tokens(shards.row(int(index))) for index in order[warmup:warmup + steps]]
    seconds = sum(record["step_seconds"] for record in records)
    # The peak again, right after training: the load on the shared cores may have changed since the peak section.
    peak_now = matmul_flops(getattr(torch, compute_dtype()[0]), 4096, 6)
    return {"seconds": seconds, "real_tokens": sum(tokens), "row_tokens": steps * shards.seq_len, "peak": peak_now,
            "data_seconds": sum(record["data_wait_share"] * record["step_seconds"] for record in records),
            "logged_mfu": [record["mfu"] for record in records], "step_seconds": [r["step_seconds"] for r in records]}


def chat_dataset() -> Any:
    """The chat corpus tokenized exactly as `lacuna prepare sft` does (overlong conversations dropped, as there);
    labels = tokens of assistant turns."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from lacuna.chat_templates import choose_template

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    conversations = [json.loads(line)["messages"] for line in (ROOT / "data/corpus/chat.jsonl").open()]
    encoded = tokenizer.apply_chat_template(conversations, chat_template=choose_template(None, tokenizer).source,
                                            tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    pairs = zip(encoded["input_ids"], encoded["assistant_masks"], strict=True)
    kept = [(ids, mask) for ids, mask in pairs if len(ids) <= TRAIN_SEQ_LEN]
    labels = [[token if bit else -100 for token, bit in zip(ids, mask, strict=True)] for ids, mask in kept]
    return tokenizer, Dataset.from_dict({"input_ids": [ids for ids, _ in kept], "labels": labels})


def train_with_hf(framework: str, data: str, model_overrides: dict, warmup: int, steps: int,
                  run_dir: str) -> dict[str, Any]:
    """HF Trainer (padding) or TRL SFTTrainer on the same documents, model, init, optimizer and compute dtype (bf16
    autocast where lacuna computes in bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from lacuna.config import load_config
    from lacuna.model import model_configuration
    from lacuna.shards import open_shards

    manifest = open_shards(Path(data)).manifest["stats"]
    # As many documents per optimizer step as one packed lacuna row holds on average, so tokens per step match.
    batch = round(manifest["documents"] / manifest["rows"]) if framework != "trl-packed" else 1
    tokenizer, dataset = chat_dataset()
    config = load_config(["--model-name", str(MODEL_FOLDER)])
    config.model.config_overrides = model_overrides
    torch.manual_seed(0)  # lacuna's init: seed 0, fp32 weights from the same config
    model = AutoModelForCausalLM.from_config(model_configuration(config), dtype=torch.float32,
                                             attn_implementation="sdpa")
    counts: list[tuple[int, int]] = []  # (real, computed) tokens of each batch, in the order the trainer takes them
    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *arguments: Any, **keywords: Any) -> None:
            stamps.append(time.perf_counter())

    def counting(collate: Any) -> Any:
        def wrapped(features: list[dict]) -> dict:
            output = collate(features)
            real = output["attention_mask"].sum() if "attention_mask" in output else output["input_ids"].numel()
            counts.append((int(real), output["input_ids"].numel()))
            return output
        return wrapped

    common = dict(output_dir=run_dir, max_steps=warmup + steps, per_device_train_batch_size=batch, learning_rate=3e-4,
                  lr_scheduler_type="constant", weight_decay=0.1, adam_beta2=0.95, use_cpu=True,
                  bf16=compute_dtype()[0] == "bfloat16",
                  logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                  dataloader_num_workers=0)
    if framework == "hf":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    else:
        from trl import SFTConfig, SFTTrainer

        packing = framework == "trl-packed"
        arguments = SFTConfig(**common, padding_free=True, packing=packing,
                              max_length=TRAIN_SEQ_LEN if packing else None)
        trainer = SFTTrainer(model=model, args=arguments, train_dataset=dataset, processing_class=tokenizer)
    trainer.data_collator = counting(trainer.data_collator)
    trainer.add_callback(StepTimes())
    trainer.train()
    measured = counts[warmup:warmup + steps]
    return {"seconds": stamps[warmup + steps - 1] - stamps[warmup - 1], "real_tokens": sum(c[0] for c in measured),
            "computed_tokens": sum(c[1] for c in measured), "batch_documents": batch}


def loader_rss(data: str, steps: int) -> dict[str, Any]:
    """Peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent) of a fresh process that opens a shard set
    and takes `steps` batches of 8 rows from lacuna's Loader; RssAnon/RssFile split the current RSS; the seconds
    each next_step took (the data wait a training step would see)."""
    from lacuna.loader import Loader
    from lacuna.shards import open_shards

    def memory() -> dict[str, float]:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return {key: int(status[key].split()[0]) / 1024 for key in ("VmHWM", "RssAnon", "RssFile")}

    before = memory()
    loader = Loader(open_shards(Path(data)), 8, 1, 0, 1, 0)
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        loader.next_step()
        seconds.append(time.perf_counter() - started)
    return {"before": before, "after": memory(), "step_seconds": seconds}


# ----------------------------------------------------------------------------- sections


def prepared(name: str, mode: str, dataset: Path, seq_len: int) -> Path:
    """A lacuna-prepared folder under the bench work area (reused if a section already made it)."""
    from lacuna.prepare import main

    out = WORK / f"{name}-lacuna-{seq_len}"
    if not (out / "manifest.json").is_file():
        main([mode, "--dataset", str(dataset), "--tokenizer", str(TOKENIZER), "--seq-len", str(seq_len), "--out",
              str(out), "--overwrite", "--quiet"])
    return out


def run_trainer(framework: str, data: Path, model: dict, warmup: int, steps: int) -> dict[str, Any]:
    run_dir = WORK / f"run-{framework}-{model['hidden_size']}"
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_worker("bench_train.py", framework, str(data), json.dumps(model), str(warmup), str(steps), str(run_dir))


def train_throughput(quick: bool, previous: dict[str, Any]) -> dict[str, Any]:
    """Real (non-padding) tokens per second of lacuna vs HF Trainer vs TRL on the same model, data and steps."""
    data = prepared("chat", "sft", ROOT / "data/corpus/chat.jsonl", TRAIN_SEQ_LEN)
    warmup, steps = (1, 3) if quick else (2, 12)
    frameworks = ("lacuna", "hf", "trl") + (() if quick else ("trl-packed",))
    raw = {framework: run_trainer(framework, data, SMALL_MODEL, warmup, steps) for framework in frameworks}
    speed = {framework: result["real_tokens"] / result["seconds"] for framework, result in raw.items()}
    layers, hidden = SMALL_MODEL["num_hidden_layers"], SMALL_MODEL["hidden_size"]
    on = (f"chat.jsonl (2,026 real conversations, ChatML, assistant-only loss); Llama {layers}×{hidden} with the "
          f"SmolLM2 vocabulary, random init; {steps} optimizer steps after {warmup} warm-up, "
          f"~{raw['lacuna']['real_tokens'] // steps:,} real tokens per step; {compute_dtype()[0]}, {THREADS} threads")
    figures = [figure(f"train tokens/s: {FRAMEWORKS[framework]}", value, f"{value:,.0f} (supervised + context, no "
                      "padding)", "", None, on)
               for framework, value in speed.items()]
    for framework, target in (("hf", 1.5), ("trl", 1.2), ("trl-packed", None)):
        if framework in speed:
            ratio = speed["lacuna"] / speed[framework]
            figures.append(figure(f"lacuna speed-up vs {FRAMEWORKS[framework]}", ratio, f"{ratio:.2f}×",
                                  f"≥ {target}×" if target else "", ratio >= target if target else None, on))
    share = raw["lacuna"]["data_seconds"] / raw["lacuna"]["seconds"]
    figures.append(figure("data wait share (lacuna)", share, f"{100 * share:.3f} %", "< 1 %", share < 0.01, on))
    if "hf" in raw:
        padding = 1 - raw["hf"]["real_tokens"] / raw["hf"]["computed_tokens"]
        figures.append(figure("HF Trainer padding share", padding, f"{100 * padding:.1f} % of computed tokens", "",
                              None, f"batches of {raw['hf']['batch_documents']} random documents"))
    notes = ["train: each framework runs in its own fresh process with torch at 2 threads; all start from the same "
             f"seeded fp32 init and use fused AdamW computing in {compute_dtype()[0]} ({compute_dtype()[1]}; lacuna: "
             "model.dtype auto, FSDP2 mixed precision; HF/TRL: `bf16=True` autocast when that is bf16) and grad "
             "clipping 1.0. HF/TRL use transformers' sdpa attention (TRL padding-free "
             "gets its per-document mask from position_ids), lacuna its varlen sdpa. Tokens/s counts real, "
             "non-padding tokens; step times are wall time of steps after the warm-up. 1-minute load average at "
             "the end of each run (~2 = alone on the 2 cores): "
             + ", ".join(f"{framework} {result['load_average']:.1f}" for framework, result in raw.items()) + "."]
    return {"figures": figures, "raw": raw, "notes": notes}


def mfu(quick: bool, previous: dict[str, Any]) -> dict[str, Any]:
    """lacuna's MFU against the measured matmul peak of the dtype it computes in, on a ~50 M model at seq_len 2048,
    eager and compiled."""
    from bench_prepare import make_inputs

    from lacuna.config import load_config
    from lacuna.model import flops_per_token, model_configuration

    dtype = compute_dtype()[0]
    peak_flops = previous["peak"]["raw"][{"bfloat16": "bf16", "float32": "fp32"}[dtype]] if "peak" in previous else 0.0
    data = prepared("stdlib", "pretrain", make_inputs(quick)["stdlib"][1], MFU_SEQ_LEN)
    config = load_config(["--model-name", str(MODEL_FOLDER)])
    config.model.config_overrides = MFU_MODEL
    flops = flops_per_token(model_configuration(config), MFU_SEQ_LEN)
    parameters = (flops - 12 * MFU_MODEL["num_hidden_layers"] * MFU_MODEL["hidden_size"] * MFU_SEQ_LEN) / 6
    runs = {"lacuna": (1, 2)} if quick else {"lacuna": (1, 4), "lacuna-compiled": (2, 6)}
    figures, raw, notes = [], {"flops_per_token": flops}, []
    for framework, (warmup, steps) in runs.items():
        result = raw[framework] = run_trainer(framework, data, MFU_MODEL, warmup, steps)
        peak_flops = max(peak_flops, result["peak"])  # the best measured so far: a conservative MFU
        tokens_per_second = result["row_tokens"] / result["seconds"]
        value, share = flops * tokens_per_second / peak_flops, result["data_seconds"] / result["seconds"]
        on = (f"{FRAMEWORKS[framework]}; Llama {MFU_MODEL['num_hidden_layers']}×{MFU_MODEL['hidden_size']} "
              f"({parameters / 1e6:.1f} M matmul parameters incl. the tied 49,152-token head), stdlib pretrain rows "
              f"of {MFU_SEQ_LEN}, 1 row per step, {steps} steps after {warmup} warm-up, {dtype}, {THREADS} threads")
        label = "compiled" if framework == "lacuna-compiled" else "eager, the default"
        achieved = f"{flops * tokens_per_second / 1e12:.3f} of {peak_flops / 1e12:.3f} TFLOPS"
        figures += [figure(f"MFU ({label})", value, f"{100 * value:.1f} % ({tokens_per_second:,.0f} tokens/s, "
                           f"{achieved})", "≥ 50 %", value >= 0.5, on),
                    figure(f"data wait share (MFU run, {label})", share, f"{100 * share:.3f} %", "< 1 %",
                           share < 0.01, on)]
        notes.append(f"mfu ({label}): lacuna's own logged MFU for the same steps is "
                     f"{100 * float(np.mean(result['logged_mfu'])):.1f} % (against its own peak, "
                     "metrics.measure_matmul_flops, measured in the training process); 1-minute load average at the "
                     f"end of the run {result['load_average']:.1f} (~2 = alone on the 2 cores).")
    notes.append(f"mfu: the peak is the best {dtype} matmul rate measured in this bench run (peak section, and again "
                 "in each MFU process right after its training), so contention lowers MFU rather than inflating it.")
    notes.append(f"mfu: FLOPs/token = 6·N + 12·layers·hidden·seq_len = {flops / 1e6:.0f} M (lacuna.model."
                 "flops_per_token, PaLM convention: attention over the full seq_len, overcounting causal attention).")
    return {"figures": figures, "raw": raw | {"peak": peak_flops}, "notes": notes}


def write_shard_set(directory: Path, megabytes: int, seq_len: int = MFU_SEQ_LEN, rows_per_shard: int = 16384) -> None:
    """A synthetic pretraining shard set in lacuna's format (shards.write_shard + manifest), without loss_mask files
    (the loader derives the mask): rows of 4 documents of seq_len/4."""
    from lacuna.shards import FORMAT_NAME, FORMAT_VERSION, write_shard

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rows = megabytes * 2**20 // (2 * seq_len)  # uint16 tokens per position
    document = seq_len // 4
    rng, entries = np.random.default_rng(0), []
    for index, first in enumerate(range(0, rows, rows_per_shard)):
        count = min(rows_per_shard, rows - first)
        arrays = {"tokens": rng.integers(0, 49152, (count, seq_len), dtype=np.uint16),
                  "cu_seqlens": np.tile(np.arange(0, seq_len + 1, document, dtype=np.int32), count),
                  "row_offsets": np.arange(count + 1, dtype=np.int64) * 5,
                  "supervised": np.full(count, seq_len - 4, np.int64),
                  "max_seqlen": np.full(count, document, np.int32)}
        entries.append(write_shard(directory, f"train-{index:05d}", arrays))
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "seq_len": seq_len, "token_dtype": "uint16",
                "mode": "pretrain", "pad_id": 2, "tokenizer": {"name": "synthetic", "vocab_size": 49152,
                "hash": hashlib.sha256(b"synthetic").hexdigest()}, "chat_template_hash": None, "config": {},
                "stats": {"rows": rows}, "splits": {"train": entries, "val": []}}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def rss(quick: bool, previous: dict[str, Any]) -> dict[str, Any]:
    """Loader peak RSS on a ~10 MB and a ~2 GB (quick: ~512 MB) shard set, each in a fresh process; sets deleted."""
    sizes = {"small": 10, "large": 512 if quick else 2048}
    steps = 100 if quick else 200
    raw = {}
    for name, megabytes in sizes.items():
        directory = WORK / f"shards-{name}"
        write_shard_set(directory, megabytes)
        size = sum(path.stat().st_size for path in directory.iterdir())
        raw[name] = run_worker("bench_train.py", "rss", str(directory), str(steps)) | {"bytes": size}
        shutil.rmtree(directory)
    growth = raw["large"]["after"]["VmHWM"] - raw["small"]["after"]["VmHWM"]
    anonymous, mapped = (raw["large"]["after"][key] - raw["small"]["after"][key] for key in ("RssAnon", "RssFile"))
    on = (f"synthetic shard sets of {raw['small']['bytes'] / 2**20:.0f} MB and {raw['large']['bytes'] / 2**30:.2f} GB "
          f"(lacuna format, seq_len {MFU_SEQ_LEN}), Loader: {steps} steps of 8 random rows, fresh process each")
    peaks = f"{raw['small']['after']['VmHWM']:.0f} → {raw['large']['after']['VmHWM']:.0f} MB"
    figures = [figure("loader peak RSS growth, small → large set", growth, f"{growth:+.1f} MB (peak {peaks}; "
                      f"anonymous {anonymous:+.1f} MB, file-mapped {mapped:+.1f} MB)", "< 50 MB", growth < 50, on)]
    step = float(np.median(raw["large"]["step_seconds"][1:]))
    train_step = float(np.mean(previous["mfu"]["raw"]["lacuna"]["step_seconds"])) if "mfu" in previous else None
    share = step / train_step if train_step else None
    shown = f"{1e3 * step:.2f} ms" + (f" = {100 * share:.3f} % of the {train_step:.1f} s MFU step" if share else "")
    figures.append(figure("loader time per step, large set (median)", step, shown, "< 1 % of a step",
                          share < 0.01 if share else None, on))
    notes = ["rss: file-mapped = pages of the memory-mapped shard files that the loader touched. On this machine "
             "(Linux 6.x, ext4 with large page-cache folios: see FileHugePages in /proc/meminfo) a page fault maps a "
             "whole folio, far more than the 4 KB row read; lacuna's ShardSet therefore drops the 2 MB blocks around "
             "everything it reads (tokens, boundaries, per-row counts) from the mapping (madvise DONTNEED) after "
             "copying it out: page cache, not RSS. The epoch order is computed per position (loader.epoch_rows) and "
             "the step's supervised counts are read per batch, so nothing per row is held in RAM either.",
             "rss: the sets have no loss_mask files (pretraining from format version 3): the loader derives the mask."]
    return {"figures": figures, "raw": raw, "notes": notes}


if __name__ == "__main__":
    import torch

    torch.set_num_threads(THREADS)
    if sys.argv[1] == "rss":
        report(loader_rss(sys.argv[2], int(sys.argv[3])))
    else:
        framework, data, model, warmup, steps, run_dir = sys.argv[1:]
        arguments = (data, json.loads(model), int(warmup), int(steps), run_dir)
        if framework.startswith("lacuna"):
            report(train_with_lacuna(*arguments, compile=framework == "lacuna-compiled"))
        else:
            report(train_with_hf(framework, *arguments))
