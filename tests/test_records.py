"""Real-world SFT records (tools, tool calls and results, reasoning, content parts, per-turn loss control) through
`lacuna prepare sft`, against transformers' own `apply_chat_template(..., return_assistant_tokens_mask=True)`, on
every packaged template with a real tokenizer of its family (SmolLM2's, given that family's special tokens)."""

import copy
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from test_prepare import segments, write_jsonl

from lacuna.assets import materialize
from lacuna.prepare import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[1] / "data"
SMOLLM2 = DATA / "models" / "SmolLM2-config"
FAMILIES = {  # template: (special tokens, added special tokens, added plain tokens)
    "chatml": ({}, [], []),
    "qwen3": ({}, [], ["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "llama3": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               ["<|start_header_id|>", "<|end_header_id|>"], []),
    "gemma3": ({"bos_token": "<bos>", "eos_token": "<eos>"}, ["<start_of_turn>", "<end_of_turn>"], []),
    "mistral": ({"bos_token": "<s>", "eos_token": "</s>"}, ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], []),
}
TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the web.", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "page": {"type": ["integer", "null"]}}}}},
         {"type": "function", "function": {"name": "weather", "description": "The weather in a city.", "parameters": {
             "type": "object", "properties": {"name": {"type": "string"}, "units": {"enum": ["C", "F"]}}}}}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tokenizer per template family: SmolLM2's vocabulary plus that family's special tokens."""
    materialize(DATA)
    from transformers import AutoTokenizer

    folders = {}
    for name, (special, added_special, added) in FAMILIES.items():
        tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
        tokenizer.add_special_tokens(special)
        tokenizer.add_tokens(added_special, special_tokens=True)
        tokenizer.add_tokens(added)
        folders[name] = tmp_path_factory.mktemp(name)
        tokenizer.save_pretrained(folders[name])
    return folders


def call(name: str, arguments: dict | str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_records(parallel_calls: bool = True) -> list[dict]:
    """Tool-use, reasoning, content-part and loss-control conversations built from the real chat conversations."""
    chat = [json.loads(line)["messages"] for line in (DATA / "corpus" / "chat.jsonl").read_text().splitlines()]
    chat = [messages for messages in chat if len(messages) == 2 and not messages[1]["content"][:1].isspace()][:16]
    records = []
    for index, ((user, reply), (next_user, next_reply)) in enumerate(zip(chat[::2], chat[1::2], strict=True)):
        question, answer = user["content"], reply["content"]
        records += [
            {"messages": [{"role": "system", "content": "You answer briefly."}, user, reply, next_user, next_reply]},
            {"tools": TOOLS, "messages": [  # arguments as a dict, with a real null
                user, {"role": "assistant", "tool_calls": [call("search", {"query": question, "page": None})]},
                {"role": "tool", "tool_call_id": f"call_{index}", "name": "search", "content": answer},
                {"role": "assistant", "content": answer}]},
            {"tools": json.dumps(TOOLS), "messages": [  # tools and arguments as JSON strings, other argument keys
                {"role": "system", "content": "Use tools."}, user,
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    call("weather", json.dumps({"name": f"city {index}", "units": "C"}))]},
                {"role": "tool", "content": f"{index} degrees"}, {"role": "assistant", "content": answer}]},
            {"messages": [user, {"role": "assistant", "reasoning_content": f"Asked: {question}", "content": answer},
                          next_user, {"role": "assistant", "thinking": "Short.", "content": next_reply["content"]}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "text",
                                                                                          "text": "?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": answer}]}]},
            {"messages": [user, {**reply, "train": False}, next_user, next_reply]},  # the first reply is context only
            {"messages": [user, {**reply, "weight": 0}]},  # nothing left to learn: skipped and counted
            {"chat_template_kwargs": {"enable_thinking": False}, "messages": [user, reply]},
        ]
        if parallel_calls:
            records.append({"tools": TOOLS, "messages": [user, {"role": "assistant", "tool_calls": [
                call("weather", {"name": "Oslo"}), call("search", {"query": question})]},
                {"role": "tool", "content": "3 degrees"}, {"role": "tool", "content": answer}, reply]})
    return records


def reference(tokenizer, template: str, record: dict, assistant_turns: str = "all") -> tuple[list[int], list[int]]:
    """transformers' tokens and assistant mask for a record, with the turns lacuna leaves out unmasked: a turn's
    tokens are those between the conversation rendered up to it and rendered up to its end."""
    messages = copy.deepcopy(record["messages"])
    for message in messages:  # lacuna's one normalisation: text parts joined
        if isinstance(message.get("content"), list):
            message["content"] = "".join(part["text"] for part in message["content"])
    tools = json.loads(record["tools"]) if isinstance(record.get("tools"), str) else record.get("tools")

    def encode(part: list[dict]) -> dict:
        return tokenizer.apply_chat_template(part, tools=tools, chat_template=template, return_dict=True,
                                             return_assistant_tokens_mask=True,
                                             **record.get("chat_template_kwargs", {}))

    encoded = encode(messages)
    ids, mask = encoded["input_ids"], list(encoded["assistant_masks"])
    assistants = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    for index in assistants:
        left_out = not messages[index].get("train", True) or messages[index].get("weight", 1) == 0
        if left_out or (assistant_turns == "last" and index != assistants[-1]):
            start, end = len(encode(messages[:index])["input_ids"]), len(encode(messages[:index + 1])["input_ids"])
            assert encode(messages[:index + 1])["input_ids"] == ids[:end]  # a turn's tokens are a prefix
            mask[start:end] = [0] * (end - start)
    return ids, mask


def prepare(out: Path, dataset: Path, tokenizer: Path, *arguments: str) -> dict:
    main(["sft", "--dataset", str(dataset), "--out", str(out), "--tokenizer", str(tokenizer), "--seq-len", "1024",
          "--quiet", *arguments])
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packaged_templates_equal_transformers_on_tool_and_reasoning_records(tmp_path: Path, tokenizers, family: str
                                                                              ) -> None:
    from transformers import AutoTokenizer

    from lacuna.chat_templates import load_template

    tokenizer = AutoTokenizer.from_pretrained(tokenizers[family])
    template = load_template(None, tokenizer)
    assert template == (Path(__file__).parents[1] / "lacuna" / "templates" / f"{family}.jinja").read_text()
    records = tool_records(parallel_calls=family != "llama3")
    dataset = write_jsonl(tmp_path / "tools.jsonl", records)
    # the hazard lacuna reads around: columnar reading gives one record's argument keys to another, as nulls
    from datasets import load_dataset

    hazard = write_jsonl(tmp_path / "hazard.jsonl", [records[1], {**records[1], "messages": [
        records[1]["messages"][0], {"role": "assistant", "tool_calls": [call("weather", {"name": "Oslo"})]}]}])
    columnar = load_dataset("json", data_files=str(hazard), split="train", on_mixed_types=None)
    assert columnar[1]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {
        "query": None, "page": None, "name": "Oslo"}
    for assistant_turns in ("all", "last"):
        manifest = prepare(tmp_path / assistant_turns, dataset, tokenizers[family], "--assistant-turns",
                           assistant_turns)
        expected = [reference(tokenizer, template, record, assistant_turns) for record in records]
        found = Counter((tuple(tokens.tolist()), tuple(mask.tolist())) for tokens, mask in segments(
            tmp_path / assistant_turns, "train"))
        wanted = Counter((tuple(ids), (0, *mask[1:])) for ids, mask in expected if any(mask[1:]))
        assert found == wanted  # every record once, token for token and mask for mask
        stats = manifest["stats"]
        skipped = len(records) - len(wanted)
        assert stats["all_turns_excluded"] == skipped > 0 and stats["documents"] == len(wanted)
        conversations = stats["conversations"]
        assert conversations["with_tools"] == sum("tools" in record for record in records)
        assert conversations["with_reasoning"] == 8
        assert conversations["turns_excluded_train_false"] == 16
        assert conversations["not_prefix_preserving"] == 0
        multi_turn = sum(sum(m["role"] == "assistant" for m in record["messages"]) > 1 for record in records)
        assert conversations["multi_turn"] == multi_turn
        assert conversations["turns_excluded_last"] == (0 if assistant_turns == "all" else multi_turn - 8)
