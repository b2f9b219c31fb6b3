"""`lacuna chat` on a tiny random Llama with the real SmolLM2 tokenizer and ChatML template (servers: test_serve.py)."""

import io
import json
import sys
from pathlib import Path

import pytest
from conftest import SCRIPT, check_conversations, free_port, greedy, saved

from lacuna.chat import LocalModel, chat, load_local
from lacuna.errors import LacunaError


def test_local_chat_streams_keeps_history_and_saves(export: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "chat.jsonl"
    monkeypatch.setattr(sys, "stdin", io.StringIO("/system Be brief.\n" + SCRIPT.format(out=out)))
    chat(model=str(export), temperature=0, max_tokens=6)
    check_conversations(saved(out), export, 6)
    assert "(system prompt set)" in capsys.readouterr().out


def test_closing_a_local_stream_stops_generation(export: Path) -> None:
    import torch

    local = LocalModel(export)
    steps = []
    local.model.register_forward_hook(lambda *_: steps.append(1))
    pieces = local.stream([{"role": "user", "content": "hello"}], 0, 1, 400)
    next(pieces)
    pieces.close()  # what Ctrl-C does to a reply
    assert len(steps) < 50
    steps.clear()
    torch.manual_seed(1)  # a sampled reply that runs to max tokens (one forward each) without meeting EOS
    assert "".join(local.stream([{"role": "user", "content": "hello"}], 1.0, 0.9, 7))  # the next reply still works
    assert len(steps) == 7


def test_bad_model_folders_are_one_line_errors(export: Path, tmp_path: Path) -> None:
    from transformers import ViTConfig

    with pytest.raises(LacunaError, match="model folder '.*missing' not found: pass an HF export"):
        load_local(str(tmp_path / "missing"))
    with pytest.raises(LacunaError, match="has no config.json"):
        load_local(str(tmp_path))
    vision = tmp_path / "vision"
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(vision)
    with pytest.raises(LacunaError, match="no usable tokenizer"):
        load_local(str(vision))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (vision / name).write_bytes((export / name).read_bytes())
    with pytest.raises(LacunaError, match=r"is not a loadable causal LM \(Unrecognized configuration class") as error:
        load_local(str(vision))
    assert "\n" not in str(error.value)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_dcp_checkpoint_is_exported_on_the_fly(export: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A checkpoint folder as lacuna.checkpoint writes it (DCP model state, config.toml, meta.json) chats directly."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from lacuna.config import Config, to_toml

    checkpoint = tmp_path / "checkpoints" / "step-00000001"
    model = AutoModelForCausalLM.from_pretrained(export)
    dcp.save({"model": model.state_dict()}, checkpoint_id=checkpoint, no_dist=True)
    config = Config.model_validate({"model": {"name": str(export), "dtype": "float32"}, "prepare": {"mode": "sft"}})
    (checkpoint / "config.toml").write_text(to_toml(config))
    (checkpoint / "meta.json").write_text(json.dumps({"step": 1, "mode": "sft"}))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    chat(model=str(checkpoint), temperature=0, max_tokens=6)
    assert greedy(export, [{"role": "user", "content": "hello"}], 6) in capsys.readouterr().out


def test_unreachable_server_is_an_error_and_a_transient_one_keeps_the_chat(tmp_path: Path, capsys, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LacunaError, match=f"cannot reach {url}: is the server running"):
        chat(base_url=url)  # no --model: the model list is needed before chatting
    out = tmp_path / "chat.jsonl"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"hello\n/save {out}\n/exit\n"))
    chat(base_url=url, model="any", system="Be brief.")
    assert f"error: cannot reach {url}" in capsys.readouterr().out
    assert saved(out) == [[{"role": "system", "content": "Be brief."}]]
