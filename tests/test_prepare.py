"""`lacuna prepare` end to end on the real SmolLM2 tokenizer, the packaged ChatML template and real data."""

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, REPOSITORY, TOKENIZER, materialize, segments, torchrun, write_jsonl

from lacuna.encoding import DocumentStatus, Encoder
from lacuna.errors import LacunaError
from lacuna.prepare import main
from lacuna.shards import open_shards, token_dtype, tokenizer_hash

END_OF_TURN = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    materialize(DATA)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def template(tokenizer) -> str:
    from lacuna.chat_templates import choose_template

    return choose_template(None, tokenizer).source


def chat_records(count: int) -> list[dict]:
    """Real conversations, plus multi-turn ones with a system prompt. (Contents that begin with whitespace are
    left out: their first BPE token can merge with the role header's newline, see the report.)"""
    records = [json.loads(line) for line in (DATA / "corpus" / "chat.jsonl").read_text().splitlines()]
    records = [record for record in records if not any(m["content"][:1].isspace() for m in record["messages"])]
    turns = [("system", "You are terse ({})."), ("user", "Name a prime."), ("assistant", "Seven."),
             ("user", "Another?"), ("assistant", "{}.")]
    extra = [{"messages": [{"role": role, "content": text.format(index)} for role, text in turns]}
             for index in range(20)]
    return records[:count] + extra


def prepare(mode: str, out: Path, *arguments: str) -> dict:
    main([mode, "--out", str(out), "--tokenizer", str(TOKENIZER), "--quiet", *arguments])
    return json.loads((out / "manifest.json").read_text())


def supervised_runs(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [tokenizer.decode(tokens[start:end].tolist()) for start, end in zip(edges[::2], edges[1::2], strict=True)]


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_sft_round_trip_is_exact(tmp_path: Path, tokenizer, template: str) -> None:
    records = chat_records(600)
    overlong = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    dataset = write_jsonl(tmp_path / "chat.jsonl", records + [overlong])
    manifest = prepare("sft", tmp_path / "out", "--dataset", str(dataset), "--seq-len", "256", "--val-fraction", "0.1")
    found = segments(tmp_path / "out", "train") + segments(tmp_path / "out", "val")
    encoded = [tokenizer.apply_chat_template(record["messages"], chat_template=template, return_dict=True)["input_ids"]
               for record in records + [overlong]]
    kept = [record for record, ids in zip(records, encoded, strict=False) if len(ids) <= 256]
    packed = Counter(tuple(tokens.tolist()) for tokens, _ in found)
    assert packed == Counter(tuple(ids) for ids in encoded if len(ids) <= 256)
    runs = Counter(text for tokens, mask in found for text in supervised_runs(tokenizer, tokens, mask))
    assert runs == Counter(m["content"] + END_OF_TURN for r in kept for m in r["messages"] if m["role"] == "assistant")
    stats = manifest["stats"]
    assert stats["dropped"] == len(records) + 1 - len(kept) > 1
    assert (stats["documents"], stats["truncated"], stats["empty_mask"]) == (len(kept), 0, 0)
    assert stats["splits"]["val"]["documents"] == round(0.1 * len(kept))
    assert stats["supervised_tokens"] == sum(int(mask.sum()) for _, mask in found)
    assert stats["tokens"] == sum(len(tokens) for tokens, _ in found)
    for split in ("train", "val"):  # best-fit: at most one row over the lower bound
        split_stats = stats["splits"][split]
        assert split_stats["rows"] <= -(-split_stats["tokens"] // 256) + 1
    assert manifest["token_dtype"] == "uint16" and open_shards(tmp_path / "out").row(0).tokens.dtype == np.uint16
    assert manifest["tokenizer"]["vocab_size"] == 49152 and manifest["chat_template_hash"]


def test_sft_tokens_and_masks_equal_transformers_apply_chat_template(tokenizer, template: str) -> None:
    """lacuna renders and masks conversations itself (batched, fast); transformers' apply_chat_template with
    return_assistant_tokens_mask is the reference it must agree with, token for token."""
    records = [json.loads(line) for line in (DATA / "corpus" / "chat.jsonl").read_text().splitlines()]
    records += chat_records(0) + [{"messages": [{"role": "user", "content": "Émoji 🚀 — ok?"},
                                                {"role": "assistant", "content": "日本語 🚀\n\n  indented\tcode"},
                                                {"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}]
    records += [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]}
                for reply in (" Hello", "  Two spaces", "\nNewline", "\t tab")]
    conversations = [record["messages"] for record in records]
    encoder = Encoder("sft", tokenizer, template, 4096, "drop", np.dtype(np.uint16))
    tokens, masks, lengths, excluded, counts = encoder.sft_documents(list(enumerate(records, 1)), "record #{}")
    expected = tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    sequences, masks = (np.split(values, np.cumsum(lengths)[:-1]) for values in (tokens, masks))
    assert [sequence.tolist() for sequence in sequences] == expected["input_ids"]
    assert [mask.tolist() for mask in masks] == expected["assistant_masks"]
    assert not excluded.any() and counts["multi_turn"] == sum(len(messages) > 2 for messages in conversations) > 20
    for tokens, mask, messages in zip(sequences, masks, conversations, strict=True):
        replies = [m["content"] + END_OF_TURN for m in messages if m["role"] == "assistant"]
        runs = supervised_runs(tokenizer, tokens, mask)  # a reply that starts with whitespace may take its newline
        assert all(run.endswith(reply) and len(run) - len(reply) <= 1 for run, reply in zip(runs, replies, strict=True))


def test_document_status_kept_truncated_dropped_empty() -> None:
    lengths = np.array([3, 0, 6, 2, 5])
    masks = [[1, 1, 1], [], [1, 0, 0, 0, 1, 1], [1, 0], [1, 1, 0, 0, 0]]  # first tokens get masked out
    tokens = np.arange(lengths.sum(), dtype=np.uint16)
    KEPT, TRUNCATED, DROPPED, EMPTY, _ = DocumentStatus
    for overlong, status, kept in (("truncate", [KEPT, EMPTY, EMPTY, EMPTY, TRUNCATED], [3, 0, 0, 0, 4]),
                                   ("drop", [KEPT, EMPTY, DROPPED, EMPTY, DROPPED], [3, 0, 0, 0, 0])):
        encoder = Encoder("sft", None, None, 4, overlong, np.dtype(np.uint16))
        flat = np.array([bit for mask in masks for bit in mask], np.uint8)
        kept_tokens, kept_masks, kept_lengths, states = encoder.finish(tokens.copy(), flat, lengths,
                                                                       np.zeros(len(lengths), bool))
        assert states.tolist() == status and kept_lengths.tolist() == kept
        expected = [0, 1, 2] + ([11, 12, 13, 14] if overlong == "truncate" else [])
        assert kept_tokens.tolist() == expected
        assert kept_masks.tolist() == [0, 1, 1] + ([0, 1, 0, 0] if overlong == "truncate" else [])


def test_template_failures_name_the_record(tmp_path: Path, template: str) -> None:
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% if messages[0].content == 'taboo' %}{{ raise_exception('no taboo') }}{% endif %}" + template)
    records = chat_records(0)[:2]
    records.insert(1, {"messages": [{"role": "user", "content": "taboo"}, {"role": "assistant", "content": "b"}]})
    dataset = write_jsonl(tmp_path / "chat.jsonl", records)
    with pytest.raises(LacunaError, match=r"record #2: the chat template fails on it \(TemplateError: no taboo"):
        prepare("sft", tmp_path / "out", "--dataset", str(dataset), "--chat-template", str(strict))
    unbalanced = tmp_path / "unbalanced.jinja"
    for tag in ("generation", "endgeneration"):
        template = template.replace(f"{{%- {tag} -%}}", f"{{%- {tag} -%}}" * 2)  # nested blocks
    unbalanced.write_text(template)
    with pytest.raises(LacunaError, match="generation %} blocks are nested or unbalanced"):
        prepare("sft", tmp_path / "out", "--dataset", str(dataset), "--chat-template", str(unbalanced))
    unbalanced.write_text(template.replace("{%- endgeneration -%}", "", 1))
    with pytest.raises(LacunaError, match=r"chat template .*unbalanced.jinja does not compile \(line \d+: Encountered"):
        prepare("sft", tmp_path / "out", "--dataset", str(dataset), "--chat-template", str(unbalanced))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chat.jsonl", "strict.jinja", "unbalanced.jinja"]


def test_pretrain_round_trip_splits_overlong_documents(tmp_path: Path, tokenizer) -> None:
    texts = [json.loads(line)["text"] for line in (DATA / "corpus" / "stdlib.jsonl").read_text().splitlines()[:40]]
    texts += ["", "x"]
    dataset = write_jsonl(tmp_path / "code.jsonl", [{"body": text} for text in texts])
    seq_len = 512
    manifest = prepare("pretrain", tmp_path / "out", "--dataset", str(dataset), "--text-field", "body",
                       "--seq-len", str(seq_len))
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    documents = [[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] for ids in encoded]
    chunks = Counter()  # overlapping by one token, so every token but the first is a target exactly once
    for document in documents:
        for start in range(0, max(len(document) - 1, 1), seq_len - 1):
            chunks[tuple(document[start:start + seq_len])] += 1
    found = segments(tmp_path / "out", "train")
    assert Counter(tuple(tokens.tolist()) for tokens, _ in found) == chunks
    assert all(mask[1:].all() for _, mask in found)
    stats = manifest["stats"]
    assert stats["supervised_tokens"] == sum(len(document) - 1 for document in documents)
    assert stats["split"] == sum(len(document) > seq_len for document in documents) > 0
    assert stats["fill"] > 0.99


def test_sharegpt_matches_openai_messages(tmp_path: Path) -> None:
    openai = chat_records(0)[:5]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]}
                for r in openai]
    first = prepare("sft", tmp_path / "a", "--dataset", str(write_jsonl(tmp_path / "a.jsonl", openai)))
    second = prepare("sft", tmp_path / "b", "--dataset", str(write_jsonl(tmp_path / "b.jsonl", sharegpt)))
    assert files(tmp_path / "a").keys() == files(tmp_path / "b").keys()
    for name in files(tmp_path / "a"):
        if name != "manifest.json":
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["stats"]["supervised_tokens"] == second["stats"]["supervised_tokens"]
    # records that disagree on a field's type: pyarrow's reader fails, datasets' mixed-type reading takes over
    mixed = [{**record, "meta": {"id": 1} if index % 2 else "plain"} for index, record in enumerate(openai)]
    prepare("sft", tmp_path / "c", "--dataset", str(write_jsonl(tmp_path / "c.jsonl", mixed)))
    prepare("sft", tmp_path / "d", "--dataset", str(tmp_path / "c.jsonl"), "--streaming")
    for name in files(tmp_path / "a"):
        if name != "manifest.json":
            for other in ("c", "d"):
                assert (tmp_path / "a" / name).read_bytes() == (tmp_path / other / name).read_bytes()


def test_parquet_and_text_folders(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as parquet

    (tmp_path / "texts").mkdir()
    for index in range(3):
        (tmp_path / "texts" / f"{index}.txt").write_text(f"document {index}\nline two\n\nparagraph")
    parquet.write_table(pa.table({"text": ["alpha beta", "gamma"]}), tmp_path / "table.parquet")
    manifest = prepare("pretrain", tmp_path / "out", "--dataset", str(tmp_path / "texts"),
                       "--dataset", str(tmp_path / "table.parquet"), "--seq-len", "64")
    assert [source["documents"] for source in manifest["stats"]["sources"]] == [3, 2]  # one .txt file = one document


def test_mixture_weights_resample_documents(tmp_path: Path) -> None:
    alpha = write_jsonl(tmp_path / "alpha.jsonl", [{"text": f"alpha {index}"} for index in range(100)])
    beta = write_jsonl(tmp_path / "beta.jsonl", [{"text": f"beta {index}"} for index in range(50)])
    manifest = prepare("pretrain", tmp_path / "out", "--dataset", f"{alpha}:0.25", "--dataset", f"{beta}:0.75",
                       "--seq-len", "64")
    assert [(s["documents"], s["train"]) for s in manifest["stats"]["sources"]] == [(100, 38), (50, 112)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    texts = Counter(tokenizer.decode(tokens[1:-1].tolist()) for tokens, _ in segments(tmp_path / "out", "train"))
    assert sum(count for text, count in texts.items() if text.startswith("beta")) == 112
    assert set(texts) >= {f"beta {index}" for index in range(50)}  # 2 full copies + 12 drawn without repetition
    assert max(texts.values()) == 3 and sum(texts[f"alpha {index}"] for index in range(100)) == 38


def test_tokenizer_hash_follows_content_not_path(tmp_path: Path, tokenizer) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "copy")
    copy = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert tokenizer_hash(copy) == tokenizer_hash(tokenizer)
    copy.add_tokens(["<|new|>"])
    assert tokenizer_hash(copy) != tokenizer_hash(tokenizer)


def test_byte_identical_across_num_proc_and_streaming(tmp_path: Path) -> None:
    dataset = str(write_jsonl(tmp_path / "chat.jsonl", chat_records(700)))
    common = ["--dataset", dataset, "--seq-len", "256", "--val-fraction", "0.05", "--rows-per-shard", "16"]
    prepare("sft", tmp_path / "one", *common)
    prepare("sft", tmp_path / "pool", *common, "--num-proc", "2")
    prepare("sft", tmp_path / "streamed", *common, "--streaming")
    reference = files(tmp_path / "one")
    assert len(reference) > 13  # several train shards
    assert files(tmp_path / "pool") == reference
    assert files(tmp_path / "streamed") == reference
    assert not list(tmp_path.glob("*.partial"))  # process splits: tests/test_prepare_scale.py


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path: Path, tokenizer) -> None:
    texts = [json.loads(line) for line in (DATA / "corpus" / "stdlib.jsonl").read_text().splitlines()[:30]]
    dataset = str(write_jsonl(tmp_path / "code.jsonl", texts))
    common = ["--dataset", dataset, "--seq-len", "1024", "--val-fraction", "0.1"]
    prepare("pretrain", tmp_path / "one", *common)
    common += ["--tokenizer", str(TOKENIZER), "--quiet"]
    torchrun(2, "lacuna.prepare", ["pretrain", "--out", str(tmp_path / "two"), *common])
    assert files(tmp_path / "two") == files(tmp_path / "one")


BAD_CHAT = {
    "unknown role": ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
    "role not a string": ([{"role": ["user"], "content": "hi"}], "unknown role \\['user'\\]"),
    "no assistant": ([{"role": "user", "content": "hi"}], "conversation has no assistant turn"),
    "no content": ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], "a user message"),
    "noncharacter": ([{"role": "user", "content": "a\ufdd0b"}, {"role": "assistant", "content": "x"}],
                     "a message contains U\\+FDD0"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT))
def test_bad_conversations_name_the_record_and_write_nothing(tmp_path: Path, case: str) -> None:
    messages, message = BAD_CHAT[case]
    records = chat_records(1500)  # the bad record comes after the first batch was written
    dataset = write_jsonl(tmp_path / "chat.jsonl", records + [{"messages": messages}])
    with pytest.raises(LacunaError, match=rf"record #{len(records) + 1}: {message}"):
        prepare("sft", tmp_path / "out", "--dataset", str(dataset))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chat.jsonl"]


def test_bad_inputs_fail_with_one_clear_line(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", chat_records(0)[:3])
    lines = [json.dumps(record) for record in chat_records(0)[:3]]
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text("\n".join([lines[0], lines[1], lines[2][:-5], ""]))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes("\n".join([lines[0], lines[1].replace("prime", "prim\u00e9")]).encode("latin-1"))
    untagged = DATA / "models" / "SmolLM2-config" / "chat_template.jinja"
    (tmp_path / "exists").mkdir()
    (tmp_path / "a-file").write_text("")
    cases = [
        (["sft", "--dataset", "missing.jsonl"], "dataset 'missing.jsonl' not found"),
        (["pretrain", "--dataset", str(good)], "has no field 'text'.*--text-field"),
        (["sft", "--dataset", str(good), "--messages-field", "chat"],
         "has neither 'chat' nor 'prompt' and 'completion'.*--messages-field"),
        (["sft", "--dataset", str(malformed)], "malformed.jsonl' record #3: malformed JSON"),
        (["sft", "--dataset", str(latin)], "latin.jsonl line 2 is not UTF-8 \\(byte 0xe9\\): save the file as UTF-8"),
        (["sft", "--dataset", str(latin), "--streaming"], "latin.jsonl line 2 is not UTF-8"),
        (["sft", "--dataset", f"{good}:abc"], "weight in .*good.jsonl:abc' is not a number: .*good.jsonl:0.5"),
        (["sft", "--dataset", str(good), "--chat-template", str(untagged)], "no {% generation %} tags"),
        (["sft", "--dataset", str(good), "--tokenizer", "no-such-org/no-such-tokenizer"], "cannot load tokenizer"),
        (["sft", "--dataset", "no-such-org/no-such-dataset"], "cannot read dataset 'no-such-org/no-such-dataset'"),
        (["sft", "--dataset", str(good), "--seq-len", "1"], "'prepare.seq_len' is invalid: .* or equal to 2"),
        (["sft", "--dataset", str(good), "--val-fraction", "1"], "'prepare.val_fraction' is invalid"),
        (["sft", "--dataset", str(good), "--out", str(tmp_path / "exists")], "already exists: pass --overwrite"),
        (["sft", "--dataset", str(good), "--out", str(tmp_path / "a-file"), "--overwrite"], "is a file, not a folder"),
        (["sft", "--dataset", str(good), "--seq-len", "8", "--overlong", "truncate"], "no documents left"),
        (["sft", "--dataset", f"{good}:0.5", "--dataset", str(good)], "give every --dataset a weight"),
        (["pretrain"], "no dataset given"),
    ]
    for arguments, message in cases:
        extra = [] if "--out" in arguments else ["--out", str(tmp_path / "out")]
        extra += [] if "--tokenizer" in arguments else ["--tokenizer", str(TOKENIZER)]
        with pytest.raises(LacunaError, match=message):
            main([*arguments, *extra, "--quiet"])
        assert capfd.readouterr().err == "", arguments  # the LacunaError line is all the user sees
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(LacunaError, match="does not fit in uint32"):
        token_dtype(2**32 + 1)
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


def test_a_byte_order_mark_starting_a_file_is_not_part_of_its_first_record(tmp_path: Path) -> None:
    text = "".join(json.dumps(record) + "\n" for record in chat_records(0)[:3])
    (tmp_path / "plain.jsonl").write_text(text, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text(text, encoding="utf-8-sig")
    for name in ("plain", "bom"):
        prepare("sft", tmp_path / name, "--dataset", str(tmp_path / f"{name}.jsonl"))
    assert {name: data for name, data in files(tmp_path / "bom").items() if name != "manifest.json"} == {
        name: data for name, data in files(tmp_path / "plain").items() if name != "manifest.json"}


def test_overwrite_replaces_and_cli_error_is_one_line(tmp_path: Path) -> None:
    dataset = str(write_jsonl(tmp_path / "chat.jsonl", chat_records(0)[:3]))
    prepare("sft", tmp_path / "out", "--dataset", dataset)
    shutil.copy(tmp_path / "out" / "manifest.json", tmp_path / "old.json")
    prepare("sft", tmp_path / "out", "--dataset", dataset, "--seq-len", "128", "--overwrite")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["seq_len"] == 128
    result = subprocess.run([sys.executable, "-m", "lacuna.prepare", "sft", "--dataset", dataset, "--seq-len", "1"],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: config key 'prepare.seq_len'")
