"""`lacuna inspect` and the shard reader's checks, on a folder prepared from real conversations."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, materialize

from lacuna.errors import LacunaError
from lacuna.inspection import inspect
from lacuna.prepare import main
from lacuna.shards import open_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONVERSATIONS = [
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Grass?"},
     {"role": "assistant", "content": "Green."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
] * 20


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    materialize(DATA)
    root = tmp_path_factory.mktemp("inspect")
    dataset = root / "chat.jsonl"
    dataset.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in CONVERSATIONS))
    main(["sft", "--dataset", str(dataset), "--out", str(root / "out"), "--tokenizer",
          str(DATA / "models" / "SmolLM2-config"), "--seq-len", "128", "--val-fraction", "0.1", "--quiet"])
    return root / "out"


def test_report_shows_stats_histogram_and_a_decoded_row(prepared: Path, capsys: pytest.CaptureFixture) -> None:
    inspect(prepared, row=0, split="train", as_json=False, verify=True)
    output = capsys.readouterr().out
    for expected in ("train", "val", "fill", "segment lengths", "sha256 verified", "document 1", "Hello!<|im_end|>"):
        assert expected in output
    row = open_shards(prepared).row(0)
    assert ("padding [" in output) == (not row.loss_mask[row.cu_seqlens[-2]:].any())


def test_json_row_has_segments_with_supervised_runs(prepared: Path, capsys: pytest.CaptureFixture) -> None:
    shards = open_shards(prepared, "val")
    inspect(prepared, row=shards.num_rows - 1, split="val", as_json=True, verify=False)
    report = json.loads(capsys.readouterr().out)
    assert report["manifest"]["stats"]["splits"]["val"]["documents"] == 4
    segments = report["segments"]
    documents = [segment for segment in segments if not segment["padding"]]
    assert [segment["start"] for segment in segments] == shards.row(shards.num_rows - 1).cu_seqlens[:-1].tolist()
    for segment in documents:
        supervised = [text for text, flag in segment["runs"] if flag]
        assert supervised in (["Blue.<|im_end|>", "Green.<|im_end|>"], ["Hello!<|im_end|>"])
        assert segment["runs"][0][0].startswith("<|im_start|>") and not segment["runs"][0][1]
    assert sum(segment["supervised"] for segment in segments) == shards.supervised_counts[-1]


def test_reader_rejects_what_training_must_not_use(prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shards = open_shards(copy)
    assert shards.supervised_counts.dtype == np.int64 and shards.supervised_counts.sum() > 0
    tokens = next(copy.glob("train-00000-00000.tokens.npy"))
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 1
    tokens.write_bytes(bytes(data))
    open_shards(copy)  # a flipped bit goes unnoticed without verification...
    with pytest.raises(LacunaError, match="train-00000-00000.tokens.npy' fails its sha256 check"):
        inspect(copy, row=None, split="train", as_json=True, verify=True)  # ...and is caught with it
    val_tokens = next(copy.glob("val-*.tokens.npy"))
    val_tokens.write_bytes(val_tokens.read_bytes()[:-1])
    with pytest.raises(LacunaError, match=r"val-.*\.tokens\.npy' is truncated"):  # every split's files are opened
        inspect(copy, row=None, split="train", as_json=False, verify=False)
    with pytest.raises(LacunaError, match="row 99999 is out of range"):
        shards.row(99999)
    with pytest.raises(LacunaError, match="split 'test' is not in"):
        open_shards(copy, "test")
    tokens.unlink()
    with pytest.raises(LacunaError, match="tokens.npy' is missing"):
        open_shards(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))  # an older folder
    with pytest.raises(LacunaError, match="version 2, not 'lacuna-packed' version 3: prepare it again"):
        open_shards(copy)
    (copy / "manifest.json").write_text("{truncated")
    with pytest.raises(LacunaError, match="holds format None"):
        open_shards(copy)
    (copy / "manifest.json").unlink()  # what an interrupted prepare would leave
    with pytest.raises(LacunaError, match="no manifest.json .*interrupted"):
        inspect(copy, row=None, split="train", as_json=False, verify=False)
    with pytest.raises(LacunaError, match="does not exist"):
        open_shards(tmp_path / "nowhere")


def test_row_shows_tool_calls_results_and_reasoning_with_supervised_spans(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    call = {"type": "function", "function": {"name": "search", "arguments": {"query": "sky"}}}
    messages = [{"role": "user", "content": "Sky colour?"},
                {"role": "assistant", "reasoning_content": "Look it up.", "tool_calls": [call]},
                {"role": "tool", "content": "blue"}, {"role": "assistant", "content": "Blue.", "train": False},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    dataset = tmp_path / "tools.jsonl"
    dataset.write_text(json.dumps({"messages": messages, "tools": [{"type": "function", "function": {
        "name": "search", "parameters": {"type": "object"}}}]}) + "\n")
    main(["sft", "--dataset", str(dataset), "--out", str(tmp_path / "out"), "--tokenizer",
          str(DATA / "models" / "SmolLM2-config"), "--seq-len", "512", "--quiet"])
    capsys.readouterr()
    inspect(tmp_path / "out", row=0, split="train", as_json=True, verify=False)
    report = json.loads(capsys.readouterr().out)
    runs = report["segments"][0]["runs"]
    assert [text for text, supervised in runs if supervised] == [
        '<think>\nLook it up.\n</think>\n\n<tool_call>\n{"name": "search", "arguments": {"query": "sky"}}\n'
        "</tool_call><|im_end|>", "Yes.<|im_end|>"]  # the reply marked train: false is context only
    context = "".join(text for text, supervised in runs if not supervised)
    assert "<tools>" in context and "<tool_response>\nblue\n</tool_response>" in context and "Blue." in context
    counted = report["manifest"]["stats"]["conversations"]
    assert (counted["with_tools"], counted["with_reasoning"], counted["multi_turn"]) == (1, 1, 1)
    assert counted["turns_excluded_train_false"] == 1
    inspect(tmp_path / "out", row=0, split="train", as_json=False, verify=False)
    output = capsys.readouterr().out
    assert "conversations: multi turn 1" in output and "turns excluded train false 1" in output
