"""Real-world SFT records (tools, tool calls and results, reasoning, content parts, per-turn loss control) through
`lacuna prepare sft`, against transformers' own `apply_chat_template(..., return_assistant_tokens_mask=True)`, on
every packaged template with a real tokenizer of its family (SmolLM2's, given that family's special tokens)."""

import copy
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, materialize, segments, write_jsonl

from lacuna.chat_templates import check_template
from lacuna.encoding import Encoder
from lacuna.errors import LacunaError
from lacuna.prepare import main

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
            {"messages": [{"role": "system", "content": "You answer briefly."}, user, reply,
                          {"role": "developer", "content": "Be exact."}, next_user, next_reply]},
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
    tokens are those between the conversation rendered up to it and the shortest longer history that is a prefix."""
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
            start = len(encode(messages[:index])["input_ids"])
            following = next((later for later in assistants if later > index), len(messages))
            ends = [len(part) for part in (encode(messages[:stop])["input_ids"] for stop in range(index + 1,
                    following + 1)) if part == ids[:len(part)]]  # the shortest history after it that is a prefix
            mask[start:ends[0]] = [0] * (ends[0] - start)
    return ids, mask


def prepare(out: Path, dataset: Path, tokenizer: Path, *arguments: str) -> dict:
    main(["sft", "--dataset", str(dataset), "--out", str(out), "--tokenizer", str(tokenizer), "--seq-len", "1024",
          "--quiet", *arguments])
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packaged_templates_equal_transformers_on_tool_and_reasoning_records(tmp_path: Path, tokenizers, family: str
                                                                              ) -> None:
    from transformers import AutoTokenizer

    from lacuna.chat_templates import choose_template

    tokenizer = AutoTokenizer.from_pretrained(tokenizers[family])
    template = choose_template(None, tokenizer).source
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


# Qwen3's own way with reasoning, generation-tagged: reasoning is rendered only after the last user query, so an
# earlier reply renders differently once a later user turn follows. Indented tags exercise trim/lstrip_blocks.
STOCK_QWEN3_STYLE = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- if tools %}
    {{- '<|im_start|>system\\n# Tools\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or message.role == "system" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content if message.content is string else '' %}
        {%- set reasoning_content = message.reasoning_content if message.reasoning_content is string else '' %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}
        {%- if loop.index0 > ns.last_query_index and reasoning_content %}
            {{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}{{- tool_call.arguments }}
            {%- else %}{{- tool_call.arguments | tojson(indent=2) }}{%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
"""


def test_any_generation_tagged_template_equals_transformers_and_prefix_warning(tmp_path: Path, tokenizers,
                                                                               capfd: pytest.CaptureFixture) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizers["chatml"])
    template = tmp_path / "qwen3-stock-style.jinja"
    template.write_text(STOCK_QWEN3_STYLE)
    records = tool_records()
    dataset = write_jsonl(tmp_path / "tools.jsonl", records)
    manifest = prepare(tmp_path / "out", dataset, tokenizers["chatml"], "--chat-template", str(template))
    expected = [reference(tokenizer, STOCK_QWEN3_STYLE, record) for record in records]
    found = Counter((tuple(tokens.tolist()), tuple(mask.tolist())) for tokens, mask in segments(tmp_path / "out",
                                                                                                "train"))
    assert found == Counter((tuple(ids), (0, *mask[1:])) for ids, mask in expected if any(mask[1:]))
    multi_turn = sum(sum(m["role"] == "assistant" for m in record["messages"]) > 1 for record in records)
    warning = capfd.readouterr().err
    assert f"qwen3-stock-style.jinja is not prefix-preserving: in 8 of the first {multi_turn} multi-turn" in warning
    assert manifest["stats"]["conversations"]["not_prefix_preserving"] == 8
    last = prepare(tmp_path / "last", dataset, tokenizers["chatml"], "--chat-template", str(template),
                   "--assistant-turns", "last", "--num-proc", "2")  # told apart by the history before the last
    assert last["stats"]["conversations"]["not_prefix_preserving"] == 8  # the same records checked, in any batches
    expected = [reference(tokenizer, STOCK_QWEN3_STYLE, record, "last") for record in records]
    found = Counter((tuple(tokens.tolist()), tuple(mask.tolist())) for tokens, mask in segments(tmp_path / "last",
                                                                                                "train"))
    assert found == Counter((tuple(ids), (0, *mask[1:])) for ids, mask in expected if any(mask[1:]))
    counting = tmp_path / "counting.jinja"  # a history that changes with every turn: turns cannot be told apart
    counting.write_text("{{ messages | length }}" + (Path(__file__).parents[1] / "lacuna/templates/chatml.jinja"
                                                     ).read_text())
    with pytest.raises(LacunaError, match=r"record #6: the chat template renders earlier turns differently"):
        prepare(tmp_path / "left-out", dataset, tokenizers["chatml"], "--chat-template", str(counting))


def test_end_of_turn_token_outside_the_generation_block_is_an_error(tmp_path: Path, tokenizers) -> None:
    from lacuna.chat_templates import choose_template

    chatml = choose_template(Path(__file__).parents[1] / "lacuna" / "templates" / "chatml.jinja", None).source
    outside = chatml.replace("{{- '<|im_end|>' -}}{%- endgeneration -%}", "{%- endgeneration -%}{{- '<|im_end|>' -}}")
    assert outside != chatml
    (tmp_path / "outside.jinja").write_text(outside)
    dataset = write_jsonl(tmp_path / "tools.jsonl", tool_records())
    with pytest.raises(LacunaError, match=r"chat template .*outside.jinja leaves the end-of-turn token <\|im_end\|> "
                                          r"after an assistant reply outside its \{% generation %\} block"):
        prepare(tmp_path / "out", dataset, tokenizers["chatml"], "--chat-template", str(tmp_path / "outside.jinja"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_sharegpt_function_calls_and_parquet_equal_openai_records(tmp_path: Path, tokenizers) -> None:
    import pyarrow as pa
    import pyarrow.parquet as parquet

    records = [record for record in tool_records() if "tools" in record and isinstance(record["tools"], str)]
    names = {"system": "system", "user": "human", "tool": "observation"}
    sharegpt = []
    for record in records:
        turns = []
        for message in record["messages"]:
            if message["role"] == "assistant" and "tool_calls" in message:
                turns.append({"from": "gpt", "value": message["content"]})
                function = message["tool_calls"][0]["function"]
                turns.append({"from": "function_call", "value": json.dumps(function)})
            else:
                turns.append({"from": names.get(message["role"], "gpt"), "value": message["content"]})
        sharegpt.append({"conversations": turns, "tools": record["tools"]})
    openai = []  # the same conversations as OpenAI messages: the call in its own assistant turn
    for record, converted in zip(records, sharegpt, strict=True):
        roles = {"human": "user", "gpt": "assistant", "observation": "tool", "system": "system"}
        messages = [{"role": "assistant", "tool_calls": [{"type": "function", "function": json.loads(turn["value"])}]}
                    if turn["from"] == "function_call" else {"role": roles[turn["from"]], "content": turn["value"]}
                    for turn in converted["conversations"]]
        openai.append({"messages": messages, "tools": record["tools"]})
    first = prepare(tmp_path / "openai", write_jsonl(tmp_path / "openai.jsonl", openai), tokenizers["chatml"])
    prepare(tmp_path / "sharegpt", write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt), tokenizers["chatml"])
    table = pa.Table.from_pylist([{"messages": record["messages"], "tools": record["tools"]} for record in openai])
    parquet.write_table(table, tmp_path / "openai.parquet")
    prepare(tmp_path / "parquet", tmp_path / "openai.parquet", tokenizers["chatml"])
    assert first["stats"]["documents"] == len(records) and first["stats"]["conversations"]["with_tools"] == len(records)
    for name in (path.name for path in (tmp_path / "openai").iterdir() if path.suffix == ".npy"):
        for other in ("sharegpt", "parquet"):
            assert (tmp_path / "openai" / name).read_bytes() == (tmp_path / other / name).read_bytes(), other


USER, REPLY = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
BAD_RECORDS = {
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                 REPLY]}, "a user message has a 'image_url' content part, but lacuna trains text"),
    "tool_calls not a list": ({"messages": [USER, {"role": "assistant", "tool_calls": {"name": "search"}}]},
                              "tool_calls must be a list of function calls"),
    "call without a name": ({"messages": [USER, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
                            "tool_calls must be a list of function calls"),
    "arguments not JSON": ({"messages": [USER, {"role": "assistant", "tool_calls": [call("weather", "{city: Paris")]}]},
                           "the arguments of tool call 'weather' are not JSON"),
    "function_call not JSON": ({"conversations": [{"from": "human", "value": "Hi"},
                                                  {"from": "function_call", "value": "search(x)"}]},
                               "tool_calls must be a list of function calls"),
    "tool result first": ({"messages": [USER, {"role": "tool", "content": "42"}, REPLY]},
                          r"the chat template fails on it \(TemplateError: a tool message must follow an assistant"),
    "tools not JSON": ({"tools": "[{not json", "messages": [USER, REPLY]}, "tools is neither a list of JSON schemas"),
    "tools an object": ({"tools": {"name": "search"}, "messages": [USER, REPLY]}, "tools is neither a list"),
    "train not a flag": ({"messages": [USER, {**REPLY, "train": "no"}]}, "a message.s train must be true or false"),
    "template variables": ({"chat_template_kwargs": "thinking", "messages": [USER, REPLY]},
                           "chat_template_kwargs must be an object"),
    "messages empty": ({"messages": []}, "expected a list of messages, got an empty list"),
    "prompt text, completion messages": ({"prompt": "Hi", "completion": [REPLY]},
                                         "prompt and completion must both be text or both lists of messages"),
    "completion without a reply": ({"prompt": [USER, REPLY], "completion": [USER]},
                                   "completion has no assistant turn, so nothing to learn"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_records_name_the_record_and_write_nothing(tmp_path: Path, tokenizers, case: str) -> None:
    record, message = BAD_RECORDS[case]
    dataset = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [USER, REPLY]}] * 3 + [record])
    with pytest.raises(LacunaError, match=rf"record #4: {message}"):
        prepare(tmp_path / "out", dataset, tokenizers["chatml"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chat.jsonl"]


def test_parallel_calls_on_llama3_and_every_turn_excluded_are_errors(tmp_path: Path, tokenizers) -> None:
    parallel = {"messages": [USER, {"role": "assistant", "tool_calls": [call("a", {}), call("b", {})]}]}
    dataset = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [USER, REPLY]}, parallel])
    with pytest.raises(LacunaError, match="record #2: .*Llama 3 writes one tool call per assistant turn"):
        prepare(tmp_path / "out", dataset, tokenizers["llama3"])
    dataset = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [USER, {**REPLY, "weight": 0}]}] * 3)
    with pytest.raises(LacunaError, match="no documents left .*every assistant turn left out"):
        prepare(tmp_path / "out", dataset, tokenizers["chatml"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chat.jsonl"]


# ----------------------------------------------------------------------------- TRL's training templates

TRL_TEMPLATES = Path(importlib.util.find_spec("trl").origin).parent / "chat_templates"  # trl: a pinned dev dependency
TRL_TRAINING = sorted(path.name for path in TRL_TEMPLATES.glob("*_training.jinja"))
# The special tokens the templates write: <|im_end|>, <|eot_id|>, <end_of_turn>, <｜end▁of▁sentence｜>, [INST], ...
SPECIAL_TOKEN = re.compile(r"<\|[^<>|' ]{1,40}\|>|<｜[^<>' ]{1,40}｜>|<[a-z_]+_of_turn>|\[/?[A-Z_]{3,}\]|<\|[a-z_]+>|"
                           r"<[a-z_]+\|>|<end_of_utterance>")


@pytest.fixture(scope="module")
def trl_tokenizer():
    """SmolLM2's vocabulary plus, as special tokens, every special token a TRL training template writes."""
    materialize(DATA)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    tokenizer.add_tokens(sorted({token for name in TRL_TRAINING for token in SPECIAL_TOKEN.findall(
        (TRL_TEMPLATES / name).read_text())}), special_tokens=True)
    return tokenizer


def test_trl_ships_the_training_templates_tested() -> None:
    assert len(TRL_TRAINING) == 31 and {"qwen3_training.jinja", "lfm2_training.jinja", "qwen2_5_training.jinja",
                                        "nemotron_3_nano_training.jinja", "llama3_training.jinja"} <= set(TRL_TRAINING)


@pytest.mark.parametrize("name", TRL_TRAINING)
def test_trl_training_templates_are_accepted_and_equal_transformers(trl_tokenizer, name: str) -> None:
    """Every record transformers renders with the template gives its tokens and masks; every record it cannot
    render is lacuna's one-line error naming the record; the template checks (end of turn included) pass."""
    template = (TRL_TEMPLATES / name).read_text()
    check_template(template, name)
    encoder = Encoder("sft", trl_tokenizer, template, 10**6, "drop", np.dtype(np.int32), template_name=name)
    rendered = []
    for number, record in enumerate(tool_records(), 1):
        try:
            expected = reference(trl_tokenizer, template, record)
        except IndexError:  # no history is a prefix of the whole (phi3 ends a conversation with EOS)
            with pytest.raises(LacunaError, match=rf"^record #{number}: the chat template renders earlier turns"):
                encoder.sft_documents([(number, record)], "record #{}")
            continue
        except Exception:  # the template raises (roles it refuses, arguments as JSON text, ...)
            with pytest.raises(LacunaError, match=rf"^record #{number}: the chat template fails on it"):
                encoder.sft_documents([(number, record)], "record #{}")
            continue
        tokens, masks, *_ = encoder.sft_documents([(number, record)], "record #{}")
        assert (tokens.tolist(), masks.tolist()) == expected, number
        rendered.append((number, record))
    if name != "llava_next_training.jinja":  # a vision template: it reads content as a list of parts only
        assert len(rendered) >= 40
    encoder.sft_documents(rendered, "record #{}", check=True)  # the end-of-turn and prefix checks accept it


@pytest.mark.parametrize(("name", "inside", "outside", "token"), [
    ("qwen3_training.jinja", "{{- '<|im_end|>\\n' }}\n        {%- endgeneration %}",
     "{%- endgeneration %}{{- '<|im_end|>\\n' }}", "<|im_end|>"),
    ("llama3_training.jinja", "{{- message['content'] | trim + '<|eot_id|>' }}\n        {%- endgeneration %}",
     "{{- message['content'] | trim }}{%- endgeneration %}{{- '<|eot_id|>' }}", "<|eot_id|>")])
def test_end_of_turn_token_left_outside_a_trl_block_is_named(trl_tokenizer, name: str, inside: str, outside: str,
                                                             token: str) -> None:
    template = (TRL_TEMPLATES / name).read_text()
    outside = template.replace(inside, outside)
    assert outside != template
    encoder = Encoder("sft", trl_tokenizer, outside, 10**6, "drop", np.dtype(np.int32), template_name=name)
    records = [(1, {"messages": [USER, REPLY, USER, REPLY]})]
    with pytest.raises(LacunaError, match=rf"{name} leaves the end-of-turn token {re.escape(token)} after an "
                                          rf"assistant reply outside its"):
        encoder.sft_documents(records, "record #{}", check=True)
    Encoder("sft", trl_tokenizer, template, 10**6, "drop", np.dtype(np.int32)).sft_documents(records, "#{}", check=True)


def test_the_tokenizers_own_tagged_template_is_the_default(tmp_path: Path, tokenizers, trl_tokenizer,
                                                           capfd: pytest.CaptureFixture) -> None:
    template = TRL_TEMPLATES / "qwen3_training.jinja"
    trl_tokenizer.chat_template = template.read_text()  # as a model saved by TRL (or exported by lacuna) carries it
    trl_tokenizer.save_pretrained(tmp_path / "tagged")
    dataset = write_jsonl(tmp_path / "tools.jsonl", tool_records())
    capfd.readouterr()
    main(["sft", "--dataset", str(dataset), "--out", str(tmp_path / "own"), "--tokenizer", str(tmp_path / "tagged"),
          "--seq-len", "1024"])
    assert "chat template: the tokenizer's own (it has {% generation %} tags)" in capfd.readouterr().out
    manifest = prepare(tmp_path / "given", dataset, tmp_path / "tagged", "--chat-template", str(template))
    assert manifest["chat_template"] == f"{template} (given by --chat-template)"
    own = json.loads((tmp_path / "own" / "manifest.json").read_text())
    assert own["chat_template"] == "the tokenizer's own (it has {% generation %} tags)"
    assert own["chat_template_hash"] == manifest["chat_template_hash"] and own["splits"] == manifest["splits"]
    main(["sft", "--dataset", str(dataset), "--out", str(tmp_path / "family"), "--tokenizer", str(tokenizers["chatml"]),
          "--seq-len", "1024"])  # SmolLM2's own template has no tags: the packaged ChatML one
    assert ("chat template: lacuna/templates/chatml.jinja (the tokenizer has no {% generation %} tags of its own and "
            "holds <|im_start|>)") in capfd.readouterr().out


# ----------------------------------------------------------------------------- TRL's prompt–completion datasets


def prompt_completion(record: dict, cut: str) -> tuple[dict, dict]:
    """A messages record as TRL's conversational prompt–completion (the prompt up to the first or the last assistant
    turn), and the messages record lacuna must read it as: the prompt's replies left out of the loss."""
    messages = record["messages"]
    assistants = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    split = assistants[0] if cut == "first" else assistants[-1]
    context = [{**message, "train": False} if message["role"] == "assistant" else message
               for message in messages[:split]]
    return ({**record, "prompt": messages[:split], "completion": messages[split:], "messages": None},
            {**record, "messages": context + messages[split:]})


def standard_records() -> list[dict]:
    chat = [json.loads(line)["messages"] for line in (DATA / "corpus" / "chat.jsonl").read_text().splitlines()][:40]
    records = [{"prompt": f"Question: {user['content']}\nAnswer:" + " " * (index % 2),
                "completion": " " * (1 - index % 2) + reply["content"]} for index, (user, reply, *_) in enumerate(chat)]
    return records + [{"prompt": "", "completion": "Already ends with EOS.<|im_end|>"}]


def trl_standard(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """TRL's SFTTrainer on a standard prompt–completion record: EOS appended to the completion unless there, prompt
    and prompt + completion tokenized as text, the completion from where they differ."""
    from trl.data_utils import common_prefix_length

    completion = record["completion"]
    completion += "" if completion.endswith(tokenizer.eos_token) else tokenizer.eos_token
    ids = tokenizer(text=record["prompt"] + completion)["input_ids"]
    start = common_prefix_length(tokenizer(text=record["prompt"])["input_ids"], ids)
    return ids, [0] * start + [1] * (len(ids) - start)


def test_prompt_completion_datasets_conversational_standard_and_mixed(tmp_path: Path, tokenizers) -> None:
    from transformers import AutoTokenizer

    pairs = [prompt_completion(record, cut) for index, record in enumerate(tool_records())
             for cut in ("first", "last")[:1 + index % 2]]
    for pair in pairs:
        del pair[0]["messages"]
    conversational = write_jsonl(tmp_path / "conversational.jsonl", [pair[0] for pair in pairs])
    as_messages = write_jsonl(tmp_path / "messages.jsonl", [pair[1] for pair in pairs])
    prepare(tmp_path / "conversational", conversational, tokenizers["chatml"])
    prepare(tmp_path / "as-messages", as_messages, tokenizers["chatml"])
    for path in (tmp_path / "conversational").glob("*.npy"):  # token for token and mask for mask
        assert path.read_bytes() == (tmp_path / "as-messages" / path.name).read_bytes(), path.name
    standard = write_jsonl(tmp_path / "standard.jsonl", standard_records())
    manifest = prepare(tmp_path / "standard", standard, tokenizers["chatml"], "--val-fraction", "0")
    tokenizer = AutoTokenizer.from_pretrained(tokenizers["chatml"])
    expected = [trl_standard(tokenizer, record) for record in standard_records()]
    found = Counter((tuple(tokens.tolist()), tuple(mask.tolist())) for tokens, mask in segments(
        tmp_path / "standard", "train"))
    assert found == Counter((tuple(ids), (0, *mask[1:])) for ids, mask in expected)
    assert manifest["stats"]["documents"] == len(expected)
    mixed = ["--dataset", str(as_messages), "--dataset", str(conversational), "--dataset", str(standard)]
    runs = {"one": [], "num-proc": ["--num-proc", "2"], "streaming": ["--streaming"]}
    for name, arguments in runs.items():
        main(["sft", *mixed, "--out", str(tmp_path / name), "--tokenizer", str(tokenizers["chatml"]), "--seq-len",
              "1024", "--quiet", *arguments])
    for path in (tmp_path / "one").glob("*.npy"):
        assert all(path.read_bytes() == (tmp_path / name / path.name).read_bytes() for name in runs), path.name


def test_a_record_in_a_streamed_file_is_named_the_same_whatever_the_process_count(tmp_path: Path, tokenizers) -> None:
    good = [{"messages": [USER, REPLY]}] * 3
    (tmp_path / "data").mkdir()
    for name in ("a", "b", "c"):
        write_jsonl(tmp_path / "data" / f"{name}.jsonl", good + [{"text": "x"}] * (name == "b") + good)
    message = rf"dataset '{tmp_path / 'data'}' file {tmp_path / 'data' / 'b.jsonl'} record #4 has neither 'messages'"
    for arguments in ([], ["--shard-index", "1", "--num-shards", "2"], ["--shard-index", "1", "--num-shards", "3"]):
        with pytest.raises(LacunaError, match=re.escape(message).replace(r"\#", "#")):
            prepare(tmp_path / "out", tmp_path / "data", tokenizers["chatml"], "--streaming", *arguments)
