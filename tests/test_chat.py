"""`lacuna chat --model`: a real `transformers serve` on 127.0.0.1 for the tiny model (real SmolLM2 tokenizer, ChatML
template) and a real `transformers chat` driven through its stdin; one-line errors. --base-url: test_serve.py."""

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, greedy
from transformers.utils.import_utils import is_serve_available

from lacuna.chat import chat
from lacuna.errors import LacunaError

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process
needs_serve = pytest.mark.skipif(not is_serve_available(), reason="no serve extra: pip install -e '.[serve]'")


def dcp_checkpoint(export: Path, root: Path) -> Path:
    """The tiny model as a DCP checkpoint folder, as lacuna.checkpoint writes it (model state, config, meta)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from lacuna.config import Config, to_toml

    checkpoint = root / "checkpoints" / "step-00000001"
    dcp.save({"model": AutoModelForCausalLM.from_pretrained(export).state_dict()}, checkpoint_id=checkpoint,
             no_dist=True)
    config = Config.model_validate({"model": {"name": str(export), "dtype": "float32"}, "prepare": {"mode": "sft"}})
    (checkpoint / "config.toml").write_text(to_toml(config))
    (checkpoint / "meta.json").write_text(json.dumps({"step": 1, "mode": "sft"}))
    return checkpoint


def lacuna_chat(options: list[str], script: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """`lacuna chat OPTIONS` in `directory` (where `transformers chat` saves), reading `script`; bounded in time."""
    return subprocess.run([BIN / "lacuna", "chat", *options], input=script, cwd=directory, capture_output=True,
                          text=True, timeout=300)


def saved_chat(directory: Path) -> dict:
    """The one conversation that `!save` wrote under `directory`: its settings and chat history."""
    [path] = (directory / "chat_history").glob("*/chat_*.json")
    return json.loads(path.read_text())


@needs_serve
def test_a_checkpoint_is_exported_served_and_chatted_with_then_the_server_stops(export: Path, tmp_path: Path):
    checkpoint = dcp_checkpoint(export, tmp_path)
    # each reply runs to the token limit, and `transformers chat` then asks whether to go on: "n"
    script = "hello\nn\nwhat is 2+2?\nn\n!save\n!exit\n"
    options = ["--model", str(checkpoint), "--system", "Be brief.", "--temperature", "0", "--max-tokens", "5"]
    result = lacuna_chat(options, script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Generation stopped after reaching the token limit.") == 2
    saved = saved_chat(tmp_path)
    settings, history = saved["settings"], saved["chat_history"]
    assert settings["model_id"] == "step-00000001"  # served under its folder's name: saved in ./chat_history/NAME
    assert (settings["config"]["do_sample"], settings["config"]["max_new_tokens"]) == (False, 5)
    assert [message["role"] for message in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[0] == {"role": "system", "content": "Be brief."}
    assert history[2]["content"] == greedy(export, history[:2], 5)  # transformers' greedy generate, on the history
    assert history[4]["content"] == greedy(export, history[:4], 5) != history[2]["content"]
    assert history[2]["content"] != greedy(export, history[1:2], 5)  # the system prompt reached the model
    with pytest.raises(urllib.error.URLError):  # the server stopped with the chat
        urllib.request.urlopen(f"{settings['base_url']}/models", timeout=10)


@pytest.mark.parametrize(("options", "message"), [
    ({"temperature": -0.1}, r"^--temperature -0.1 --top-p 0.9 --max-tokens 512 out of range: use temperature >= 0"),
    ({"top_p": 0.0}, "out of range: use temperature >= 0 .0 is greedy., 0 < top-p <= 1, max-tokens >= 1$"),
    ({"top_p": 1.5}, "--top-p 1.5 "),
    ({"max_tokens": 0}, "--max-tokens 0 out of range"),
])
def test_options_out_of_range_are_one_line_errors_before_any_work(options: dict, message: str) -> None:
    with pytest.raises(LacunaError, match=message):
        chat(model="/no/such/folder", **options)  # the range, not the missing folder, is the error


def test_missing_models_and_servers_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(LacunaError, match="model folder None not found: pass an HF export folder .* or the --base-url"):
        chat()
    with pytest.raises(LacunaError, match=r"model folder '.*missing' not found: .*`make sft` writes data/runs/sft/exp"):
        chat(model=str(tmp_path / "missing"))
    unreachable = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LacunaError, match=f"^{unreachable}/models: <urlopen error .*>: is the server up"):
        chat(base_url=unreachable)


@needs_serve
def test_a_folder_that_is_not_a_model_is_a_server_that_does_not_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = lacuna_chat(["--model", str(empty)], "", tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: `transformers serve` did not start for '{empty}': ValueError: ")
    assert result.stderr.endswith(": pass an HF export folder (RUN_DIR/export) or a DCP checkpoint "
                                  "(RUN_DIR/checkpoints/step-N)\n") and result.stderr.count("\n") == 1
