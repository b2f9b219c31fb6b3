"""The console scripts (`pretrain`, `sft`, `chat`, `count_lines`), uv.lock, and the Qwen configs, offline."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lacuna.config import load_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = {"pretrain": "pretrain", "sft": "sft", "chat": "chat", "count_lines": "count-lines"}
ISSUE_COMMAND = ["@", "configs/pretrain_qwen.toml", "--model-name", "Qwen/Qwen2.5-0.5B", "--batch-size", "4",
                 "--steps", "100"]


def run(command: list[str | Path], cwd: Path = REPO, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **environment})


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_is_its_lacuna_subcommand(script: str) -> None:
    own, subcommand = run([BIN / script, "--help"]), run([BIN / "lacuna", SCRIPTS[script], "--help"])
    assert own.returncode == subcommand.returncode == 0, own.stderr + subcommand.stderr
    assert f"Usage: {script} [OPTIONS]" in own.stdout
    assert " ".join(own.stdout.split("[OPTIONS]", 1)[1].split()) == " ".join(
        subcommand.stdout.split("[OPTIONS]", 1)[1].split())  # the same docstring and options, laid out alike


def test_count_lines_prints_the_package_count_under_the_budget() -> None:
    own, subcommand = run([BIN / "count_lines"]), run([BIN / "lacuna", "count-lines"])
    assert own.returncode == 0 and own.stdout == subcommand.stdout
    count, text = own.stdout.split(" ", 1)
    assert int(count) < 3000 and text == "lines of code in lacuna/ (budget 3000)\n"


def test_uv_run_finds_the_scripts() -> None:
    """`uv run pretrain ...` in this environment (--no-sync: syncing would swap the CPU torch for the CUDA one)."""
    result = run([sys.executable, "-m", "uv", "run", "--no-sync", "--offline", "pretrain", "--help"],
                 UV_PROJECT_ENVIRONMENT=sys.prefix)
    assert result.returncode == 0, result.stderr
    assert "Usage: pretrain [OPTIONS]" in result.stdout


def test_uv_lock_matches_pyproject(tmp_path: Path) -> None:
    check = [sys.executable, "-m", "uv", "lock", "--check", "--offline"]
    result = run(check)
    assert result.returncode == 0, f"uv.lock is out of date with pyproject.toml: run `uv lock`, commit uv.lock\n" \
                                   f"{result.stderr}"
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"numpy",', '"numpy",\n    "lacuna-no-such-package",', 1))
    assert run(check, cwd=tmp_path).returncode != 0  # a dependency added without `uv lock` fails the check


@pytest.mark.parametrize("name", ["pretrain_qwen", "sft_qwen"])
def test_qwen_configs_parse_and_validate(name: str) -> None:
    file = REPO / "configs" / f"{name}.toml"
    config = load_config(["@", str(file)])
    mode = name.removesuffix("_qwen")
    assert config.prepare.mode == mode and config.run_dir == Path(f"data/runs/{name}")
    assert config.data.path == Path(f"data/{name}") and config.prepare.seq_len == 4096
    assert "dtype" not in tomllib.loads(file.read_text())["model"]  # the default (auto) decides
    if mode == "pretrain":
        assert config.prepare.dataset == ["HuggingFaceFW/fineweb-edu"] and config.prepare.subset == "sample-10BT"
        assert config.data.global_batch_rows * config.prepare.seq_len == 524288  # on any number of GPUs
        assert config.prepare.tokenizer == "Qwen/Qwen2.5-0.5B"
    else:
        assert config.data.global_batch_rows * config.prepare.seq_len == 131072
        assert config.prepare.dataset == ["allenai/tulu-3-sft-mixture"]
        assert config.model.name == "Qwen/Qwen2.5-0.5B-Instruct" and config.optim.lr == 1e-5


def test_pretrain_qwen_trains_the_qwen2_5_0_5b_architecture_from_random_weights() -> None:
    config = load_config(["@", str(REPO / "configs" / "pretrain_qwen.toml"), *ISSUE_COMMAND[2:]])
    assert config.model.name == "Qwen/Qwen2.5-0.5B" and config.model.random_init  # its architecture, not its weights


@pytest.mark.parametrize(("command", "cwd", "names"), [
    ([BIN / "pretrain", *ISSUE_COMMAND], REPO, "tokenizer 'Qwen/Qwen2.5-0.5B'"),
    ([BIN / "lacuna", "pretrain", *ISSUE_COMMAND], REPO, "tokenizer 'Qwen/Qwen2.5-0.5B'"),
    ([BIN / "sft", "@", REPO / "configs" / "sft_qwen.toml"], None, "tokenizer 'Qwen/Qwen2.5-0.5B-Instruct'"),
    ([BIN / "sft", "@", "configs/sft_qwen.toml", "--prepare.tokenizer", "data/models/SmolLM2-135M-Instruct"], REPO,
     "dataset 'allenai/tulu-3-sft-mixture'"),
], ids=["pretrain-script", "lacuna-pretrain", "sft-elsewhere", "sft-dataset"])
def test_a_qwen_recipe_without_the_hub_is_one_line(command: list, cwd: Path | None, names: str,
                                                     tmp_path: Path) -> None:
    """Offline and never downloaded: one line naming what to download; nothing written, no embedded assets."""
    written = [REPO / "data" / name for name in ("pretrain_qwen", "sft_qwen", "pretrain_qwen.partial",
                                                  "sft_qwen.partial", "runs/pretrain_qwen", "runs/sft_qwen")]
    before = [path.exists() for path in written]
    result = run(command, cwd=cwd or tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: cannot ") and names in result.stderr, result.stderr
    assert "download" in result.stderr or "offline" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert [path.exists() for path in written] == before and not list(tmp_path.iterdir())


def test_recipes_check_the_mode_and_need_a_config(tmp_path: Path) -> None:
    wrong = run([BIN / "pretrain", "@", "configs/sft_qwen.toml"])
    assert wrong.returncode == 2
    assert wrong.stderr == "error: the config sets prepare.mode = 'sft', so it is not a pretrain config: run `sft` " \
                           "with it, or set [prepare] mode = 'pretrain'\n"
    elsewhere = run([BIN / "sft"], cwd=tmp_path)
    assert elsewhere.returncode == 2 and not list(tmp_path.iterdir())
    assert elsewhere.stderr == "error: 'configs/sft.toml' not found: run `lacuna sft` from the lacuna repository " \
                               "root or pass your own config with `@ file.toml`\n"
    sft_data = tmp_path / "sft-data"  # a folder of SFT shards given to the pretraining recipe
    sft_data.mkdir()
    (sft_data / "manifest.json").write_text(json.dumps({"mode": "sft"}))
    wrong_data = run([BIN / "pretrain", "--data", str(sft_data)])
    assert wrong_data.returncode == 2 and wrong_data.stderr == (
        f"error: '{sft_data}' holds sft data, not pretrain data: pass a folder prepared with `lacuna prepare "
        "pretrain` as --data, or run `lacuna sft`\n")


def test_a_recipe_uses_the_users_config_instead_of_the_embedded_default(tmp_path: Path) -> None:
    """`pretrain @ my.toml` from another folder: prepares and trains what my.toml says; no embedded assets there."""
    lines = (REPO / "data" / "corpus" / "stdlib.jsonl").read_text().splitlines()[:12]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "my.toml").write_text(f"""run_dir = "run"
[model]
name = "{REPO / "data" / "models" / "SmolLM2-config"}"
activation_checkpointing = false
config_overrides = {{ hidden_size = 64, intermediate_size = 128, num_hidden_layers = 2, num_attention_heads = 2, \
num_key_value_heads = 1 }}
[data]
path = "shards"
batch_size = 2
[schedule]
steps = 2
warmup_steps = 1
[parallel]
nproc_per_node = 1
[prepare]
mode = "pretrain"
dataset = ["corpus.jsonl"]
seq_len = 64
""")
    result = run([BIN / "pretrain", "@", "my.toml", "--log-every", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "step 2/2 loss" in result.stdout + result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.jsonl", "my.toml", "run", "shards"]
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["seq_len"] == 64
    generation = json.loads((tmp_path / "run" / "export" / "generation_config.json").read_text())
    assert generation["do_sample"] is True  # the end-of-run export samples, as `lacuna export` does
