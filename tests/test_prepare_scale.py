"""Prepare at scale: packing groups, the merge divided among concurrent processes, streamed files split between
processes, and the wait for the other processes' parts; real tokenizer and data."""

import json
import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, materialize

from lacuna.errors import LacunaError
from lacuna.packing import best_fit_decreasing
from lacuna.prepare import main, wait_for_parts
from lacuna.writing import Documents, plan_groups, segments

TOKENIZER = DATA / "models" / "SmolLM2-config"


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def prepare(mode: str, out: Path, processes: int, *arguments: str) -> dict:
    """One process, or `processes` started at once with --shard-index/--num-shards (as torchrun or SLURM would)."""
    command = [mode, "--out", str(out), "--tokenizer", str(TOKENIZER), "--quiet", *arguments]
    if processes == 1:
        main(command)
    else:
        context = multiprocessing.get_context("forkserver")  # a fork of this threaded process could deadlock
        started = [context.Process(target=main, args=([*command, "--shard-index", str(index), "--num-shards",
                                                       str(processes)],), daemon=True)  # none outlives a failure
                   for index in range(processes)]
        for process in started:
            process.start()
        for process in started:
            process.join(timeout=300)
        assert [process.exitcode for process in started] == [0] * processes
    assert not out.with_name(out.name + ".partial").exists()
    return json.loads((out / "manifest.json").read_text())


def chat_records(count: int) -> list[str]:
    lines = (DATA / "corpus" / "chat.jsonl").read_text().splitlines()
    return [lines[index % len(lines)] for index in range(count)]


def test_sft_byte_identical_for_1_2_and_4_processes(tmp_path: Path) -> None:
    materialize(DATA)
    (tmp_path / "chat.jsonl").write_text("\n".join(chat_records(900)) + "\n")
    common = ["--dataset", str(tmp_path / "chat.jsonl"), "--seq-len", "256", "--val-fraction", "0.05",
              "--rows-per-shard", "8", "--pack-group-tokens", "6000"]
    manifest = prepare("sft", tmp_path / "one", 1, *common)
    reference = files(tmp_path / "one")
    assert len({name.split("-")[1] for name in reference if name.startswith("train")}) >= 4  # groups
    for processes in (2, 4):
        prepare("sft", tmp_path / f"processes-{processes}", processes, *common)
        assert files(tmp_path / f"processes-{processes}") == reference
    stats = manifest["stats"]  # merged from the groups' counts: complete
    assert stats["documents"] + stats["dropped"] == 900 and stats["dropped"] > 0
    assert stats["rows"] == sum(shard["rows"] for split in manifest["splits"].values() for shard in split)


def test_streamed_files_split_between_processes_equal_one_process(tmp_path: Path) -> None:
    """Whole files per process (4 files: 2 each for 2 processes; 2, 1, 1 for 3), in (file, position) order; with 3
    processes and 2 packing groups (train, val), one process packs nothing and must still not be left waiting."""
    materialize(DATA)
    lines = (DATA / "corpus" / "stdlib.jsonl").read_text().splitlines()[:24]
    lines += [json.dumps({"text": f"x = {index}\n" * (index % 9 + 1)}) for index in range(60)]
    (tmp_path / "code").mkdir()
    for index in range(4):  # files of different lengths, so that a process's records are not a fixed stride
        (tmp_path / "code" / f"{index}.jsonl").write_text("\n".join(lines[index * index * 4:(index + 1) ** 2 * 4 + 4]))
    common = ["--dataset", str(tmp_path / "code"), "--seq-len", "512", "--val-fraction", "0.1",
              "--rows-per-shard", "16", "--pack-group-tokens", "1000000"]  # 2 groups: a process without any
    prepare("pretrain", tmp_path / "table", 1, *common)
    reference = files(tmp_path / "table")
    assert len([name for name in reference if name.endswith("tokens.npy")]) > 3
    for processes in (1, 2, 3):
        prepare("pretrain", tmp_path / f"streamed-{processes}", processes, *common, "--streaming")
        assert files(tmp_path / f"streamed-{processes}") == reference, processes


def test_grouped_packing_keeps_fill_within_0_1_percent_on_the_embedded_sets_x10() -> None:
    """The default --pack-group-tokens against one global best-fit, on the real chat and stdlib sets ×10."""
    from transformers import AutoTokenizer

    from lacuna.chat_templates import choose_template
    from lacuna.config import PrepareConfig

    materialize(DATA)
    tokenizer = AutoTokenizer.from_pretrained(DATA / "models" / "SmolLM2-135M-Instruct")
    chats = [json.loads(line)["messages"] for line in (DATA / "corpus" / "chat.jsonl").open()]
    texts = [json.loads(line)["text"] for line in (DATA / "corpus" / "stdlib.jsonl").open()]
    chat = tokenizer.apply_chat_template(chats, chat_template=choose_template(None, tokenizer).source, return_dict=True)
    sets = {"chat": [len(ids) for ids in chat["input_ids"]],
            "stdlib": [len(ids) + 2 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]}  # BOS, EOS
    seq_len, group_tokens = 2048, PrepareConfig().pack_group_tokens
    for name, lengths in sets.items():
        lengths = np.tile(lengths, 10)
        documents = Documents(np.zeros_like(lengths), np.cumsum(lengths) - lengths, lengths, np.zeros_like(lengths),
                              np.zeros_like(lengths), [], [])
        items = {"train": segments(documents, np.arange(len(lengths)), seq_len)}
        item_lengths = items["train"].length
        grouped = sum(len(best_fit_decreasing(item_lengths[group.first:group.end], seq_len))
                      for group in plan_groups(items, group_tokens))
        whole = len(best_fit_decreasing(item_lengths, seq_len))
        assert whole <= grouped <= whole * 1.001, (name, whole, grouped)
        if name == "stdlib":
            assert len(plan_groups(items, group_tokens)) > 2  # 34 M tokens: several groups, no measurable loss


def test_waiting_for_the_other_parts(tmp_path: Path) -> None:
    """A process waits for the others' parts, and fails in one line naming them once none grows."""
    markers = [tmp_path / f"part-{index:05d}.json" for index in range(3)]
    (tmp_path / "part-00000.tokens.bin").write_bytes(b"12")
    markers[0].write_text(json.dumps({"fingerprint": "inputs"}))

    def finish_the_others() -> None:
        time.sleep(1.5)
        for marker in markers[1:]:
            marker.write_text(json.dumps({"fingerprint": "inputs"}))

    writer = threading.Thread(target=finish_the_others)
    writer.start()
    wait_for_parts(markers, "inputs", patience=30)
    writer.join()
    markers[2].write_text(json.dumps({"fingerprint": "other inputs"}))  # a part of an earlier run does not count
    started = time.monotonic()
    with pytest.raises(LacunaError, match=r"^parts 2 of 3 are unfinished and no part grew for 1 s: start \(or rerun\)"):
        wait_for_parts(markers, "inputs", patience=1)
    assert time.monotonic() - started < 10
