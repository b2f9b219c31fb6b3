"""The GPU check of issue #17: one CUDA GPU, at most 5 minutes, one table, one JSON file (README: "GPU check").

Parts (each catches its own failure and reports it in the table; the JSON is rewritten after every part):
  a  `lacuna.attention.torch_varlen_forward` (torch's `varlen_attn`) against causal SDPA run per document, forward
     and backward, bf16, mixed document lengths, grouped key/value heads passed unrepeated; on each kernel torch has
     (flash; from torch 2.15 also cuDNN), with the CUDA kernels that ran; plus torch.compile's graph breaks in it.
     Pass: the largest error against SDPA in fp32 is at most twice bf16 SDPA's, plus bf16's epsilon times the
     largest fp32 value (after flash-attention's own tests).
  b  liger's `liger_fused_linear_cross_entropy` against `lacuna.model.ChunkedCrossEntropy` on the supervised rows
     (loss, hidden and weight gradients, same rule as a), and an all-masked batch through `lacuna.model.loss_sum`
     with liger on: a zero loss and zero gradients on every parameter, no error.
  c  steps of random-init Qwen3-0.6B and Qwen3-1.7B shapes (vocabulary 49,152 = the SmolLM2 tokenizer) at seq_len
     4096 on the packed stdlib corpus through lacuna's real trainer (`python -m lacuna.train`), eager and with
     `--model.compile true`: tokens/s, MFU, peak memory, and what the trainer decided (its start record in
     metrics.jsonl), and the eager-vs-compiled loss gap (liger's kernels patched in eager layers only).
  d  a small model's run SIGKILLed once its first checkpoint is complete, then resumed: its losses against the same
     run uninterrupted (pass: every step within 1e-3).
"""

import argparse
import contextlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # lacuna from this checkout: the device machine has no editable install

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DATA = ROOT / "data" / "gpu_check"  # travels to the device machine: model/ (config.json + tokenizer), shards/
WORK = ROOT / "data" / "gpu_check_runs"  # run folders and the smoke data: never carried
TOKENIZER_SOURCE = ROOT / "data" / "models" / "SmolLM2-config"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CORPUS = ROOT / "data" / "corpus" / "stdlib.jsonl"

# Qwen3-0.6B's architecture (its config.json), with the SmolLM2 tokenizer's vocabulary and special tokens.
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "attention_bias": False,
    "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
    "tie_word_embeddings": True, "initializer_range": 0.02, "vocab_size": 49152, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 2, "use_cache": False,
}
QWEN3_1_7B = QWEN3_0_6B | {"hidden_size": 2048, "intermediate_size": 6144}  # Qwen3-1.7B's config.json otherwise
SMALL_QWEN3 = QWEN3_0_6B | {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_window_layers": 4}
TINY_QWEN3 = QWEN3_0_6B | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_window_layers": 2}


@dataclass(frozen=True)
class Shape:
    """One model the trainer runs: its config.json, rows per micro-batch, steps, and the most seconds a run may take
    (eager; a compiled run gets `compile_seconds` more)."""

    name: str
    model: dict[str, Any]
    batch_size: int
    steps: int
    seconds: float
    compile_seconds: float = 0.0


@dataclass(frozen=True)
class Scale:
    """Sizes of one kind of run: the real check on a GPU, or the CPU smoke run of the same code."""

    name: str
    data: Path
    seq_len: int
    documents: int | None  # corpus documents to prepare (None: all)
    benchmarks: tuple[Shape, ...]  # part c, in the order they run
    resume: Shape  # part d
    checkpoint_every: int
    attention_shapes: tuple[tuple[int, int, int], ...]  # (heads, key/value heads, head_dim)
    document_lengths: tuple[int, ...]
    loss_tokens: int
    loss_hidden: int
    loss_vocabulary: int
    trainer_options: tuple[str, ...] = ()


GPU = Scale("gpu", DATA, seq_len=4096, documents=None,
            benchmarks=(Shape("qwen3-0.6b", QWEN3_0_6B, batch_size=4, steps=10, seconds=60, compile_seconds=60),
                        Shape("qwen3-1.7b", QWEN3_1_7B, batch_size=2, steps=10, seconds=75, compile_seconds=60)),
            resume=Shape("small", SMALL_QWEN3, batch_size=1, steps=8, seconds=40), checkpoint_every=4,
            attention_shapes=((16, 8, 128), (14, 2, 64)),  # Qwen3-0.6B/1.7B and Qwen2.5-0.5B's grouping
            document_lengths=(1, 2, 17, 64, 128, 128, 255, 513, 1000, 1988),  # 4096: odd, equal, single tokens
            loss_tokens=8192, loss_hidden=1024, loss_vocabulary=49152)
SMOKE = Scale("cpu-smoke", WORK / "smoke-data", seq_len=256, documents=120,
              benchmarks=(Shape("tiny", TINY_QWEN3, batch_size=2, steps=6, seconds=180, compile_seconds=300),),
              resume=Shape("tiny", TINY_QWEN3, batch_size=2, steps=8, seconds=180), checkpoint_every=4,
              attention_shapes=((4, 2, 16),), document_lengths=(1, 2, 17, 64, 64, 108),
              loss_tokens=256, loss_hidden=64, loss_vocabulary=1000,
              trainer_options=("--model.dtype", "float32", "--log.peak-tflops", "1"))  # no 2 s matmul probe


class Skip(Exception):
    """A part that cannot run here; its message is the reason."""


@dataclass
class Row:
    """One line of the table."""

    part: str
    check: str
    result: str
    limit: str = ""
    status: str = "info"  # pass, fail, info, skip or error


@dataclass
class Report:
    """Everything measured, written to JSON after every part and printed as one table at the end."""

    path: Path
    environment: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    parts: dict[str, Any] = field(default_factory=dict)

    def write(self) -> None:
        """Rewrite the JSON file (atomically: a run cut short still leaves the parts done so far)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        document = {"environment": self.environment, "status": self.status(),
                    "rows": [asdict(row) for row in self.rows], "parts": self.parts}
        temporary.write_text(json.dumps(document, indent=2, default=str) + "\n")
        os.replace(temporary, self.path)

    def status(self) -> str:
        """fail if any check failed or errored, else pass (skipped parts do not count)."""
        return "fail" if any(row.status in ("fail", "error") for row in self.rows) else "pass"

    def print_table(self) -> None:
        """The table, with rich where it is installed."""
        headers = ("part", "check", "result", "limit", "status")
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            widths = [max(len(header), *(len(str(getattr(row, header))) for row in self.rows)) for header in headers]
            for values in [headers, *((getattr(row, header) for header in headers) for row in self.rows)]:
                print("  ".join(str(value).ljust(width) for value, width in zip(values, widths, strict=True)))
            return
        table = Table(title=f"lacuna GPU check ({self.environment.get('device')}): {self.status()}")
        for header in headers:
            table.add_column(header, overflow="fold")
        colours = {"pass": "green", "fail": "red", "error": "red", "skip": "yellow", "info": ""}
        for row in self.rows:
            table.add_row(row.part, row.check, row.result, row.limit,
                          f"[{colours[row.status]}]{row.status}[/]" if colours[row.status] else row.status)
        Console(width=200).print(table)  # one line a row: the device tool returns the output's last 12,000 chars


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- data and model folders


def write_model_folder(folder: Path, model_config: dict[str, Any], with_tokenizer: bool = True) -> Path:
    """A config-only model folder (random init in the trainer), with the SmolLM2 tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if with_tokenizer:
            shutil.copy(TOKENIZER_SOURCE / name, folder / name)
        else:
            (folder / name).unlink(missing_ok=True)
    return folder


def shapes(scale: Scale) -> dict[str, Shape]:
    return {shape.name: shape for shape in (*scale.benchmarks, scale.resume)}


def prepare(scale: Scale) -> None:
    """`scale.data`/models/NAME (one per shape) and `scale.data`/shards (`lacuna prepare pretrain --seq-len N`),
    written anew."""
    folders = [write_model_folder(scale.data / "models" / name, shape.model) for name, shape in shapes(scale).items()]
    shards = scale.data / "shards"
    from lacuna.prepare import main as prepare_main  # needs `datasets`: this runs on the CPU machine

    dataset = CORPUS
    if scale.documents is not None:  # the smoke run: the first documents only
        dataset = scale.data / "corpus.jsonl"
        with CORPUS.open() as source:
            dataset.write_text("".join(line for _, line in zip(range(scale.documents), source, strict=False)))
    log(f"preparing {shards} from {dataset} (seq_len {scale.seq_len})")
    prepare_main(["pretrain", "--dataset", str(dataset), "--tokenizer", str(folders[0]), "--seq-len",
                  str(scale.seq_len), "--out", str(shards), "--overwrite", "--quiet"])


def trainer_model_folders(scale: Scale, notes: list[str]) -> dict[str, Path]:
    """The model folder of each shape for the trainer. Where this machine's tokenizers library serialises the
    tokenizer differently from the one that prepared the shards (their recorded hash then differs), copies without
    the tokenizer files: the trainer then checks the vocabulary size only."""
    from transformers import AutoTokenizer

    from lacuna.shards import tokenizer_hash

    folders = {name: scale.data / "models" / name for name in shapes(scale)}
    recorded = json.loads((scale.data / "shards" / "manifest.json").read_text())["tokenizer"]["hash"]
    if tokenizer_hash(AutoTokenizer.from_pretrained(str(next(iter(folders.values()))))) == recorded:
        return folders
    notes.append("the tokenizer hash differs from the shards' (another tokenizers version): model folders without "
                 "tokenizer files, vocabulary check only")
    return {name: write_model_folder(WORK / "models-without-tokenizer" / name, shape.model, with_tokenizer=False)
            for name, shape in shapes(scale).items()}


# ----------------------------------------------------------------------------- comparisons


def maximum_error(left: torch.Tensor, right: torch.Tensor) -> float:
    return (left.float() - right.float()).abs().max().item()


def compare(part: str, check: str, tested: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor,
            ulp_dtype: torch.dtype, reference_name: str) -> tuple[Row, dict[str, float]]:
    """Row for one tensor: pass when max |tested − truth| ≤ 2 · max |reference − truth| + `ulp_dtype`'s epsilon times
    max |truth|, the truth being the reference computed in a higher dtype."""
    tested_error, reference_error = maximum_error(tested, truth), maximum_error(reference, truth)
    limit = 2 * reference_error + torch.finfo(ulp_dtype).eps * truth.float().abs().max().item()
    figures = {"vs_reference": maximum_error(tested, reference), "tested_vs_truth": tested_error,
               "reference_vs_truth": reference_error, "limit_vs_truth": limit, "truth_dtype": str(truth.dtype)}
    truth_name = dtype_name(truth.dtype)
    row = Row(part, check, f"{figures['vs_reference']:.1e} vs {reference_name} (vs {truth_name}: this "
              f"{tested_error:.1e}, {reference_name} {reference_error:.1e})", f"≤ {limit:.1e} vs {truth_name}",
              "pass" if math.isfinite(tested_error) and tested_error <= limit else "fail")
    return row, figures


def forward_backward(function: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
                     grad_output: torch.Tensor | None) -> list[torch.Tensor]:
    """The output of `function` on fresh leaf copies of `inputs`, then the gradients of those inputs."""
    leaves = [tensor.detach().clone().requires_grad_(True) for tensor in inputs]
    output = function(*leaves)
    output.backward(None if grad_output is None else grad_output.to(output.dtype))
    return [output.detach(), *(leaf.grad for leaf in leaves)]


# ----------------------------------------------------------------------------- part a: attention


def per_document_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: tuple[int, ...],
                      scale: float) -> torch.Tensor:
    """The reference: causal SDPA on every document alone; [1, heads, total, dim] in, [1, total, heads, dim] out."""
    outputs, start = [], 0
    for length in lengths:
        window = slice(start, start + length)
        outputs.append(F.scaled_dot_product_attention(query[:, :, window], key[:, :, window], value[:, :, window],
                                                      is_causal=True, scale=scale, enable_gqa=True))
        start += length
    return torch.cat(outputs, dim=2).transpose(1, 2)


def graph_breaks(device: torch.device) -> tuple[int, list[str]]:
    """Graph breaks torch.compile finds in `torch_varlen_forward` (on the meta device where there is no CUDA: the
    op's fake implementation stands in for the kernel, so this runs on a CPU too)."""
    from lacuna.attention import torch_varlen_forward

    device = device if device.type == "cuda" else torch.device("meta")
    module = torch.nn.Module()

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, boundaries: torch.Tensor,
               longest: int) -> torch.Tensor:
        return torch_varlen_forward(module, query, key, value, None, scaling=0.125, cu_seq_lens_q=boundaries,
                                    max_length_q=longest)[0]

    query = torch.randn(1, 16, 256, 64, device=device, dtype=torch.bfloat16)
    key = torch.randn(1, 8, 256, 64, device=device, dtype=torch.bfloat16)
    boundaries = torch.tensor([0, 100, 256], dtype=torch.int32, device=device)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(attend)(query, key, key, boundaries, 156)
    torch._dynamo.reset()
    return explanation.graph_break_count, [str(reason.reason)[:300] for reason in explanation.break_reasons]


def attention_case(function: Callable, name: str, dtype: torch.dtype, device: torch.device, lengths: tuple[int, ...],
                   heads: int, kv_heads: int, head_dim: int,
                   layout_of_projections: bool) -> tuple[list[Row], dict[str, Any]]:
    """Output and q/k/v gradients of one attention function on one packed row of documents, against SDPA run per
    document in the same dtype and in a higher one (the truth)."""
    total, cuda = sum(lengths), device.type == "cuda"
    boundaries = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)
    generator = torch.Generator().manual_seed(heads * 1000 + head_dim)
    # [1, heads, total, dim] as transformers hands them over: views of [1, total, heads, dim] projections, or
    # (the second shape) contiguous, as after a kernel that wrote them so
    if layout_of_projections:
        inputs = [torch.randn(1, total, count, head_dim, generator=generator).to(device).transpose(1, 2)
                  for count in (heads, kv_heads, kv_heads)]
    else:
        inputs = [torch.randn(1, count, total, head_dim, generator=generator).to(device)
                  for count in (heads, kv_heads, kv_heads)]
    grad_output = torch.randn(1, total, heads, head_dim, generator=generator).to(device)
    softmax_scale, module = head_dim**-0.5, torch.nn.Module()

    def tested(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return function(module, query, key, value, None, scaling=softmax_scale, dropout=0.0,
                        cu_seq_lens_q=boundaries, max_length_q=max(lengths))[0]

    def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return per_document_sdpa(query, key, value, lengths, softmax_scale)

    low = [tensor.to(dtype) for tensor in inputs]
    results = forward_backward(tested, low, grad_output)
    references = forward_backward(reference, low, grad_output)
    truths = forward_backward(reference, inputs if cuda else [tensor.double() for tensor in inputs], grad_output)
    rows, details = [], {}
    for label, result, expected, truth in zip(("output", "grad q", "grad k", "grad v"), results, references, truths,
                                              strict=True):
        row, details[label] = compare("a", f"{name}: {label} ({heads}/{kv_heads} heads, dim {head_dim})", result,
                                      expected, truth, dtype, f"{dtype_name(dtype)} SDPA")
        rows.append(row)
    return rows, details


def attention_kernels() -> dict[str, Callable[[], Any]]:
    """The kernels torch's varlen_attn can run here, each as a context that forces it: flash, and from torch 2.15
    (which picks cuDNN where eligible, e.g. on Hopper with cuDNN >= 9.18) cuDNN too; before 2.15, flash only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lacuna import attention

    if "_select_backend" not in inspect.getmodule(attention.VARLEN_ATTN).__dict__:
        return {"flash (the only one)": contextlib.nullcontext}
    return {"default": contextlib.nullcontext, "flash": lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
            "cuDNN": lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])}


def cuda_kernel_names(function: Callable[[], Any]) -> list[str]:
    """The attention kernels (flash, cuDNN, fmha) the GPU ran for `function`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        function()
        torch.cuda.synchronize()
    names = {event.key for event in profiler.key_averages()}
    return sorted(name[:60] for name in names if any(word in name.lower() for word in ("flash", "cudnn", "fmha")))


def part_attention(scale: Scale, device: torch.device) -> tuple[list[Row], dict[str, Any]]:
    """Part a. On CPU (the smoke run) lacuna's `varlen_sdpa_forward` stands in for varlen_attn, in fp32."""
    from lacuna import attention

    details: dict[str, Any] = {}
    rows: list[Row] = []
    cuda = device.type == "cuda"
    kernels: dict[str, Callable[[], Any]] = {"CPU": contextlib.nullcontext}
    if cuda:
        if attention.VARLEN_ATTN is None:
            raise Skip(f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)")
        function, name, dtype = attention.torch_varlen_forward, "torch_varlen_forward", torch.bfloat16
        options = attention.causal_options(set(inspect.signature(attention.VARLEN_ATTN).parameters))
        details["varlen_attn_options"] = {key: str(value) for key, value in options.items()}
        call = f"{options}, key/value heads unrepeated"
        kernels = attention_kernels()
    else:
        function, name, dtype = attention.varlen_sdpa_forward, "varlen_sdpa_forward (CPU stand-in)", torch.float32
        call = "lacuna's CPU attention"
    rows.append(Row("a", "under test", f"{name}: {call}, {dtype_name(dtype)}, documents of "
                    f"{', '.join(map(str, scale.document_lengths))} tokens"))
    for kernel, context in kernels.items():
        try:
            for index, (heads, kv_heads, head_dim) in enumerate(scale.attention_shapes):
                with context():
                    shape_rows, figures = attention_case(function, kernel, dtype, device, scale.document_lengths,
                                                         heads, kv_heads, head_dim, layout_of_projections=index == 0)
                rows += shape_rows
                details[f"{kernel}: {heads}/{kv_heads} heads, dim {head_dim}"] = figures
            if cuda:
                heads, kv_heads, head_dim = scale.attention_shapes[0]
                with context():
                    ran = cuda_kernel_names(partial(attention_case, function, kernel, dtype, device,
                                                    scale.document_lengths, heads, kv_heads, head_dim, True))
                details[f"{kernel}: CUDA kernels"] = ran
                rows.append(Row("a", f"{kernel}: CUDA kernels that ran", ", ".join(ran) or "none matched"))
        except RuntimeError as error:  # a kernel this GPU, dtype or shape is not eligible for
            rows.append(Row("a", f"{kernel}", f"not run: {str(error).splitlines()[0][:150]}", status="skip"))
    details["document_lengths"] = list(scale.document_lengths)
    count, reasons = graph_breaks(device)
    details["graph_breaks"] = {"count": count, "reasons": reasons}
    rows.append(Row("a", "torch.compile graph breaks in torch_varlen_forward" + ("" if cuda else " (meta device)"),
                    str(count) + (f": {reasons[0][:80]}" if reasons else ""), "0", "pass" if count == 0 else "fail"))
    return rows, details


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}.get(dtype, str(dtype))


# ----------------------------------------------------------------------------- part b: fused cross-entropy


def part_cross_entropy(scale: Scale, device: torch.device) -> tuple[list[Row], dict[str, Any]]:
    """Part b. On CPU (the smoke run) an unfused fp32 cross-entropy stands in for liger's."""
    if device.type == "cuda":
        if importlib.util.find_spec("liger_kernel") is None:
            raise Skip("liger-kernel is not installed: carry liger_kernel-0.8.5-py3-none-any.whl (this docstring)")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum",
                                                    accum_dtype=torch.float32, ignore_index=-100).float()

        name, dtype = f"liger {importlib.metadata.version('liger-kernel')}", torch.bfloat16
    else:
        def fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum", ignore_index=-100)

        name, dtype = "unfused CE (CPU stand-in)", torch.float32
    rows, details = cross_entropy_case(fused, name, dtype, device, scale.loss_tokens, scale.loss_hidden,
                                       scale.loss_vocabulary)
    row, details["all_masked"] = all_masked_case(device)
    return [*rows, row], details


def all_masked_case(device: torch.device) -> tuple[Row, dict[str, Any]]:
    """A batch without one supervised token through `loss_sum`, liger on where it is installed (its kernel divides by
    zero on zero rows): a zero loss, and a zero gradient on every parameter (FSDP's collectives need them all)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from lacuna import attention
    from lacuna.config import Config
    from lacuna.loader import Batch
    from lacuna.model import apply_liger, loss_sum

    torch.manual_seed(0)
    fields = {key: value for key, value in TINY_QWEN3.items() if key not in ("architectures", "model_type")}
    model = AutoModelForCausalLM.from_config(Qwen3Config(**fields), attn_implementation=attention.NAME).to(device)
    apply_liger(model, Config(), device)
    tokens = torch.randint(3, 1000, (1, 40))
    batch = Batch(tokens, torch.cat([torch.arange(15), torch.arange(25)])[None], torch.full_like(tokens, -100),
                  torch.tensor([0, 15, 40], dtype=torch.int32), 25, 0)
    loss = loss_sum(model, batch.to(device))
    loss.backward()
    zero = all(parameter.grad is not None and not parameter.grad.any() for parameter in model.parameters())
    liger = hasattr(model, "fused_loss")
    return Row("b", f"all-masked batch through loss_sum ({'liger on' if liger else 'no liger'})",
               f"loss {loss.item():.1e}, zero gradient on every parameter: {zero}", "0, True",
               "pass" if loss.item() == 0 and zero else "fail"), {"loss": loss.item(), "liger": liger, "zero": zero}


def cross_entropy_case(fused: Callable, name: str, dtype: torch.dtype, device: torch.device, tokens: int,
                       hidden_size: int, vocabulary: int) -> tuple[list[Row], dict[str, Any]]:
    """Loss and gradients of one fused linear cross-entropy against ChunkedCrossEntropy on the supervised rows (as
    lacuna.model.loss_sum calls it) and against an unfused one in a higher dtype (the truth)."""
    from lacuna.model import ChunkedCrossEntropy

    cuda = device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    weight = torch.randn(vocabulary, hidden_size, generator=generator) * hidden_size**-0.5 * 2  # logits ~ N(0, 4)
    targets = torch.randint(vocabulary, (tokens,), generator=generator)
    targets[torch.rand(tokens, generator=generator) < 0.25] = -100  # a quarter not supervised
    targets = targets.to(device)
    supervised = targets != -100

    def chunked(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # as lacuna.model.loss_sum calls it
        return ChunkedCrossEntropy.apply(hidden[supervised], weight, targets[supervised], True)

    def exact(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(hidden @ weight.T, targets, reduction="sum", ignore_index=-100)

    low = [tensor.to(device, dtype) for tensor in (hidden, weight)]
    results = forward_backward(lambda hidden, weight: fused(hidden, weight, targets), low, None)
    references = forward_backward(chunked, low, None)
    truth_dtype = torch.float32 if cuda else torch.float64
    truths = forward_backward(exact, [tensor.to(device, truth_dtype) for tensor in (hidden, weight)], None)
    rows = [Row("b", "under test", f"{name}, {dtype_name(dtype)}, {tokens} tokens ({int(supervised.sum())} "
                f"supervised) × hidden {hidden_size} × vocabulary {vocabulary}")]
    details = {"tokens": tokens, "supervised": int(supervised.sum()), "hidden": hidden_size, "vocabulary": vocabulary}
    for label, result, expected, truth in zip(("loss (sum)", "grad hidden", "grad weight"), results, references,
                                              truths, strict=True):
        ulp = torch.float32 if label.startswith("loss") else dtype  # the loss is accumulated in fp32
        row, figures = compare("b", label, result, expected, truth, ulp, "ChunkedCrossEntropy")
        rows.append(row)
        details[label] = figures
    ignored = results[1][~supervised].abs().max().item() if (~supervised).any() else 0.0
    rows.append(Row("b", "grad hidden at ignored (-100) rows", f"{ignored:.1e}", "0",
                    "pass" if ignored == 0 else "fail"))
    details["loss"] = {"tested": results[0].item(), "reference": references[0].item(), "fp32": truths[0].item()}
    return rows, details


# ----------------------------------------------------------------------------- parts c and d: the trainer

MFU_FORMULA = ("MFU = tokens/s × (6·N + 12·layers·heads·head_dim·seq_len) / peak, N the matmul parameters "
               "(lacuna.model.flops_per_token, PaLM's convention)")
MFU_TARGETS = {"qwen3-0.6b": 0.35, "qwen3-1.7b": 0.50}  # issue 17's bar for the compiled runs on one H100


@dataclass
class TrainerRun:
    """One `python -m lacuna.train` subprocess and what it left."""

    name: str
    run_dir: Path
    log_path: Path
    return_code: int | None = None
    wall_seconds: float = 0.0
    killed_at_step: int | None = None

    def all_records(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []

    @property
    def records(self) -> list[dict[str, Any]]:
        """The step records."""
        return [record for record in self.all_records() if "event" not in record]

    def start_record(self) -> dict[str, Any]:
        """What the trainer decided at its (latest) start: metrics.jsonl's start record."""
        return ([record for record in self.all_records() if record.get("event") == "start"] or [{}])[-1]

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def failure(self) -> str:
        """Why the run did not finish (its last error line), or ''."""
        if self.return_code == 0:
            return ""
        lines = [line for line in self.output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        cause = (errors or lines or ["no output"])[-1].strip()[:300]
        return f"exit code {self.return_code}: {cause} (log {self.log_path})"

    def summary(self, steady_after: int) -> dict[str, Any]:
        """Throughput and memory over the steady steps (after compilation and warm-up), and the loss curve."""
        records = self.records
        steady = [record for record in records if record["step"] > steady_after] or records
        median = lambda key: statistics.median(record[key] for record in steady) if steady else None  # noqa: E731
        return {"return_code": self.return_code, "wall_seconds": round(self.wall_seconds, 1),
                "steps_logged": len(records), "tokens_per_second": median("tokens_per_second"),
                "mfu": median("mfu"), "step_seconds": median("step_seconds"),
                "first_step_seconds": records[0]["step_seconds"] if records else None,
                "memory_gib": max((record["memory_gib"] for record in records), default=None),
                "losses": {record["step"]: record["loss"] for record in records}, "start": self.start_record(),
                "log_tail": self.output[-3000:]}


class Trainer:
    """Runs lacuna's trainer in subprocesses for parts c and d, within the check's time budget."""

    def __init__(self, scale: Scale, models: dict[str, Path], logs: Path, deadline: float) -> None:
        self.scale, self.models, self.logs, self.deadline = scale, models, logs, deadline
        self.runs: dict[str, TrainerRun] = {}
        self.environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
            part for part in (str(ROOT), os.environ.get("PYTHONPATH", "")) if part),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": ""} if scale is SMOKE else {})}

    def arguments(self, shape: Shape, run_dir: Path, compiled: bool, checkpoints: bool) -> list[str]:
        """The same run each time; `checkpoints`: every checkpoint_every steps (the run part d kills), else only at
        the last step (checkpointing changes no loss)."""
        scale = self.scale
        return ["--data", str(scale.data / "shards"), "--model-name", str(self.models[shape.name]),
                "--run-dir", str(run_dir), "--steps", str(shape.steps), "--warmup-steps", str(max(shape.steps // 6, 1)),
                "--batch-size", str(shape.batch_size), "--log-every", "1",
                "--checkpoint-every", str(scale.checkpoint_every if checkpoints else 0), "--checkpoint.keep", "1",
                "--checkpoint.export", "false", *scale.trainer_options,
                *(["--model.compile", "true"] if compiled else [])]

    def seconds_left(self, name: str, most: float) -> float:
        left = self.deadline - time.monotonic()
        if left < 20:
            raise Skip(f"the time budget (--budget) is spent: no time left for the {name} run")
        return min(left, most)

    def start(self, name: str, shape: Shape, run_dir: Path, compiled: bool, resume: bool,
              checkpoints: bool) -> tuple[TrainerRun, subprocess.Popen]:
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: `--resume latest` must find nothing
        self.logs.mkdir(parents=True, exist_ok=True)
        run = TrainerRun(name, run_dir, self.logs / f"{name}.log")
        command = [sys.executable, "-m", "lacuna.train", *self.arguments(shape, run_dir, compiled, checkpoints)]
        log(f"trainer {name}: {' '.join(command[1:])}")
        with run.log_path.open("w") as output:
            process = subprocess.Popen(command, cwd=ROOT, env=self.environment, stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return run, process

    def finish(self, run: TrainerRun, process: subprocess.Popen, started: float, seconds: float) -> TrainerRun:
        try:
            run.return_code = process.wait(timeout=max(seconds - (time.monotonic() - started), 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            run.return_code = -signal.SIGKILL
            with run.log_path.open("a") as output:
                output.write(f"\nerror: gpu_check stopped this run after its {seconds:.0f} s limit\n")
        run.wall_seconds = time.monotonic() - started
        self.runs[run.name] = run
        if run.name != "killed":  # the resumed run needs the killed one's checkpoint; no other is read again
            shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)
        log(f"trainer {run.name}: exit code {run.return_code} after {run.wall_seconds:.0f} s")
        return run

    def run(self, name: str, shape: Shape, compiled: bool = False, resume_from: TrainerRun | None = None,
            checkpoints: bool = False) -> TrainerRun:
        """One whole trainer run, or the rest of `resume_from`'s (in its run folder)."""
        seconds = self.seconds_left(name, shape.seconds + (shape.compile_seconds if compiled else 0))
        started = time.monotonic()
        run_dir = resume_from.run_dir if resume_from else WORK / "runs" / name
        run, process = self.start(name, shape, run_dir, compiled, resume_from is not None, checkpoints)
        return self.finish(run, process, started, seconds)

    def killed(self, shape: Shape) -> TrainerRun:
        """A run SIGKILLed (with everything it started) once its first checkpoint is complete."""
        seconds = self.seconds_left("killed", shape.seconds)
        started = time.monotonic()
        run, process = self.start("killed", shape, WORK / "runs" / "killed", False, resume=False, checkpoints=True)
        checkpoint = run.run_dir / "checkpoints" / f"step-{self.scale.checkpoint_every:08d}" / "meta.json"
        while process.poll() is None and not checkpoint.is_file() and time.monotonic() - started < seconds:
            time.sleep(0.02)
        if process.poll() is not None:
            self.finish(run, process, started, seconds)
            raise RuntimeError(f"the run ended (exit code {run.return_code}) before its step-"
                               f"{self.scale.checkpoint_every} checkpoint could be killed: {run.failure()}")
        os.killpg(process.pid, signal.SIGKILL)
        run = self.finish(run, process, started, seconds)
        if not checkpoint.is_file():
            raise RuntimeError(f"no complete step-{self.scale.checkpoint_every} checkpoint within {seconds:.0f} s "
                               f"(log {run.log_path})")
        run.killed_at_step = max((record["step"] for record in run.records), default=0)
        return run


def peak_note(device: torch.device) -> str:
    """The peak the trainer's MFU is relative to."""
    if device.type != "cuda":
        return "of the smoke run's configured 1 TFLOPS"
    from lacuna.metrics import GPU_PEAK_TFLOPS

    name = torch.cuda.get_device_name(device)
    key = next((key for key in GPU_PEAK_TFLOPS if key in name), None)
    return f"of {GPU_PEAK_TFLOPS[key]:.0f} TFLOPS (GPU_PEAK_TFLOPS['{key}'])" if key else "(GPU not in the table)"


def run_rows(label: str, summary: dict[str, Any], expected: dict[str, Any], shape: Shape, peak: str) -> list[Row]:
    """Rows for one finished trainer run of part c."""
    complete = summary["steps_logged"] == shape.steps
    rows = [Row("c", f"{label}: steps", f"{summary['steps_logged']} in {summary['wall_seconds']:.0f} s "
                f"(first step {summary['first_step_seconds'] or 0:.1f} s)", str(shape.steps),
                "pass" if complete else "fail")]
    if summary["tokens_per_second"] is not None:
        target = MFU_TARGETS.get(shape.name) if expected["compile"] else None
        verdict = "met" if target is not None and summary["mfu"] >= target else "NOT met"
        met = "" if target is None else f"; target ≥ {100 * target:.0f} %: {verdict}"
        rows += [Row("c", f"{label}: tokens/s (median of steps after {shape.steps // 3})",
                     f"{summary['tokens_per_second']:,.0f} ({summary['step_seconds']:.3f} s/step, "
                     f"{shape.batch_size} × {summary['start'].get('seq_len')} tokens)"),
                 Row("c", f"{label}: MFU", f"{100 * summary['mfu']:.1f} % {peak}{met}"),
                 Row("c", f"{label}: peak memory", f"{summary['memory_gib']:.2f} GiB")]
    used = {key: summary["start"].get(key) for key in expected}
    rows.append(Row("c", f"{label}: " + " / ".join(expected), " / ".join(str(value) for value in used.values()),
                    " / ".join(str(value) for value in expected.values()), "pass" if used == expected else "fail"))
    losses = summary["losses"]
    if 1 in losses:  # random init: nearly uniform predictions, so the first loss is about ln(vocabulary)
        first, uniform = losses[1], math.log(shape.model["vocab_size"])
        rows.append(Row("c", f"{label}: step-1 loss vs ln(vocabulary)", f"{first:.4f} vs {uniform:.4f}",
                        "within 1.0", "pass" if abs(first - uniform) <= 1.0 else "fail"))
    return rows


def expected_start(device: torch.device, compiled: bool) -> dict[str, Any]:
    """The dtype, attention, liger use and compile that lacuna should pick by itself on this device."""
    from lacuna import attention

    if device.type != "cuda":
        return {"dtype": "float32", "attention": attention.NAME, "liger": False, "compile": compiled}
    return {"dtype": "bfloat16", "attention": attention.TORCH_VARLEN_NAME if attention.VARLEN_ATTN else attention.NAME,
            "liger": importlib.util.find_spec("liger_kernel") is not None, "compile": compiled}


def part_training(trainer: Trainer, device: torch.device, shape: Shape,
                  compiled: bool) -> tuple[list[Row], dict[str, Any]]:
    """Part c: one trainer run of `shape`, eager or compiled; a compiled run is compared with the eager one."""
    name = f"{shape.name}-{'compiled' if compiled else 'eager'}"
    run = trainer.run(name, shape, compiled=compiled)
    summary = run.summary(steady_after=shape.steps // 3)
    rows = [Row("c", f"{name} run", run.failure(), status="error")] if run.return_code != 0 else []
    rows += run_rows(name, summary, expected_start(device, compiled), shape, peak_note(device))
    other = trainer.runs.get(f"{shape.name}-{'eager' if compiled else 'compiled'}")
    if other is not None:  # liger's kernels run in eager layers only; inductor's fusions in compiled ones
        losses = {record["step"]: record["loss"] for record in other.records}
        shared = set(losses) & set(summary["losses"])
        if shared:
            gap = max(abs(losses[step] - summary["losses"][step]) / abs(losses[step]) for step in shared)
            rows.append(Row("c", f"{shape.name}: max relative |loss eager − loss compiled|",
                            f"{gap:.2e} over {len(shared)} steps", "≤ 1e-2 (bf16 noise)",
                            "pass" if gap <= 1e-2 else "fail"))
    return rows, summary


def part_resume(trainer: Trainer) -> tuple[list[Row], dict[str, Any]]:
    """Part d: kill after the first checkpoint, resume, compare every step's loss with the uninterrupted run."""
    scale, shape = trainer.scale, trainer.scale.resume
    reference = trainer.run("uninterrupted", shape)
    if reference.return_code != 0:
        raise RuntimeError(f"no uninterrupted reference: {reference.failure()}")
    killed = trainer.killed(shape)
    resumed = trainer.run("resumed", shape, resume_from=killed)
    if resumed.return_code != 0:
        raise RuntimeError(f"the resumed run failed: {resumed.failure()}")
    start = resumed.start_record()
    expected_losses = {record["step"]: record["loss"] for record in reference.records}
    losses = {record["step"]: record["loss"] for record in resumed.records}
    every = scale.checkpoint_every
    before = [abs(losses[step] - expected_losses[step]) for step in range(1, every + 1) if step in losses]
    after = [abs(losses[step] - expected_losses[step]) for step in range(every + 1, shape.steps + 1)
             if step in losses and step in expected_losses]
    complete = len(after) == shape.steps - every
    gap = max(after, default=math.inf)
    rows = [Row("d", "SIGKILL after the first checkpoint", f"at step {killed.killed_at_step} (checkpoint {every})"),
            Row("d", "resumed from step (start record)", f"{start.get('step')} ({start.get('resumed_from')})",
                str(every), "pass" if start.get("step") == every and start.get("resumed_from") else "fail"),
            Row("d", f"max |Δ loss| steps {every + 1}–{shape.steps}, resumed vs uninterrupted",
                f"{gap:.2e} over {len(after)} steps", "≤ 1e-3", "pass" if complete and gap <= 1e-3 else "fail"),
            Row("d", f"max |Δ loss| steps 1–{every}, before the kill (run-to-run noise)",
                f"{max(before, default=math.nan):.2e}")]
    details = {"killed_at_step": killed.killed_at_step, "start": start, "max_loss_gap_after_resume": gap,
               "max_loss_gap_before_kill": max(before, default=None), "losses": losses,
               "reference_losses": expected_losses}
    return rows, details


# ----------------------------------------------------------------------------- main


def cpu_name() -> str:
    from lacuna.machine import cpu_model

    return f"CPU {cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


def describe_environment(device: torch.device, scale: Scale) -> dict[str, Any]:
    from lacuna.metrics import GPU_PEAK_TFLOPS

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    environment: dict[str, Any] = {
        "scale": scale.name, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, **{name: version(name) for name in ("transformers", "tokenizers", "liger-kernel",
                                                                         "triton", "pydantic")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "models": {name: {key: shape.model[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                            "num_key_value_heads", "head_dim", "intermediate_size",
                                                            "vocab_size")} | {"batch_size": shape.batch_size,
                                                                              "steps": shape.steps}
                   for name, shape in shapes(scale).items()},
        "seq_len": scale.seq_len, "mfu": MFU_FORMULA,
    }
    if device.type == "cuda":
        name = environment["device"]
        environment["peak_tflops"] = next((tflops for key, tflops in GPU_PEAK_TFLOPS.items() if key in name), None)
    return environment


def run_part(report: Report, part: str, key: str, title: str,
             function: Callable[[], tuple[list[Row], dict[str, Any]]]) -> None:
    """Run one part (its details go to the JSON under `key`); a skip or an exception becomes its row in the table
    instead of ending the check."""
    log(f"part {part}: {title}")
    started = time.monotonic()
    try:
        rows, details = function()
        status = "fail" if any(row.status in ("fail", "error") for row in rows) else "pass"
    except Skip as reason:
        rows, details, status = [Row(part, title, str(reason), status="skip")], {}, "skip"
    except Exception as error:  # noqa: BLE001 (any failure of one part is reported, and the next part runs)
        message = (str(error).strip().splitlines() or [""])[0][:300]
        rows, status = [Row(part, title, f"{type(error).__name__}: {message}", status="error")], "error"
        details = {"traceback": traceback.format_exc()}
        print(details["traceback"], file=sys.stderr, flush=True)
    if device_is_cuda():
        torch.cuda.empty_cache()
    report.rows += rows
    seconds = round(time.monotonic() - started, 1)
    report.parts[key] = {"part": part, "title": title, "status": status, "seconds": seconds, **details}
    report.write()
    log(f"part {part}: {status} in {time.monotonic() - started:.0f} s")


def device_is_cuda() -> bool:
    return torch.cuda.is_available()


def parse_arguments(arguments: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "bench" / "gpu_check.json")
    parser.add_argument("--logs", type=Path, default=None, help="trainer logs (default: gpu_check_logs/ by --out)")
    parser.add_argument("--parts", default="abcd", help="which parts to run, e.g. ab or cd")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for all parts (the trainer runs stop)")
    parser.add_argument("--prepare-only", action="store_true", help="write data/gpu_check (model folders, shards)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code paths at a tiny size on CPU")
    parser.add_argument("--no-compile", action="store_true", help="part c without its compiled runs")
    return parser.parse_args(arguments)


def main(arguments: list[str] | None = None) -> int:
    options = parse_arguments(arguments)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if options.prepare_only:
        prepare(GPU)
        return 0
    scale = SMOKE if options.cpu_smoke else GPU
    cuda = torch.cuda.is_available() and not options.cpu_smoke
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    deadline = time.monotonic() + options.budget
    report = Report(options.out, describe_environment(device, scale))
    log(f"{scale.name} check on {report.environment['device']}: torch {torch.__version__}, "
        f"transformers {report.environment['transformers']}, liger {report.environment['liger-kernel']}")
    if not cuda and not options.cpu_smoke:
        for part in options.parts:
            report.rows.append(Row(part, "part", "no CUDA device here: run on a GPU, or pass --cpu-smoke",
                                   status="skip"))
        report.write()
        report.print_table()
        return 0
    if "a" in options.parts:
        run_part(report, "a", "a", "varlen_attn vs per-document SDPA", lambda: part_attention(scale, device))
    if "b" in options.parts:
        run_part(report, "b", "b", "liger fused linear cross-entropy vs ChunkedCrossEntropy",
                 lambda: part_cross_entropy(scale, device))
    trainer: Trainer | None = None

    def setup() -> tuple[list[Row], dict[str, Any]]:
        nonlocal trainer
        shards = scale.data / "shards"
        if options.cpu_smoke or not (shards / "manifest.json").is_file():
            if importlib.util.find_spec("datasets") is None or not TOKENIZER_SOURCE.is_dir():
                raise RuntimeError(f"{shards} is missing: run `pipelines/gpu_check.py --prepare-only` on the CPU "
                                   f"machine and carry {DATA.relative_to(ROOT)}")
            prepare(scale)
        notes: list[str] = []
        models = trainer_model_folders(scale, notes)
        trainer = Trainer(scale, models, options.logs or options.out.with_name(options.out.stem + "_logs"), deadline)
        manifest = json.loads((shards / "manifest.json").read_text())
        return [Row("c", "data and model folders", f"{manifest['stats']['rows']} rows × {manifest['seq_len']} tokens; "
                    f"{', '.join(models)}" + "".join(f"; {note}" for note in notes))], {}

    if {"c", "d"} & set(options.parts):
        run_part(report, "c", "setup", "prepared data and model folders", setup)
    if trainer is not None:
        # the headline figures first, the cheap correctness check before the last (slowest) benchmark
        order = [(scale.benchmarks[0], False), (scale.benchmarks[0], True), *((shape, True) for shape in
                 scale.benchmarks[1:]), None, *((shape, False) for shape in scale.benchmarks[1:])]
        for entry in order:
            if entry is None:
                if "d" in options.parts:
                    run_part(report, "d", "d", "kill at the first checkpoint and resume", lambda: part_resume(trainer))
                continue
            shape, compiled = entry
            if "c" in options.parts and not (compiled and options.no_compile):
                mode = "compiled" if compiled else "eager"
                run_part(report, "c", f"c_{shape.name}_{mode}", f"trainer, {shape.name}, {mode}",
                         lambda shape=shape, compiled=compiled: part_training(trainer, device, shape, compiled))
    report.rows.append(Row("c", "MFU formula", MFU_FORMULA))
    report.print_table()
    log(f"wrote {options.out}")
    return 0 if report.status() == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
