"""Format 3: pretraining folders without loss_mask files read, train and inspect as format 2's stored mask did."""

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DATA, materialize

from lacuna import writing
from lacuna.errors import LacunaError
from lacuna.inspection import inspect
from lacuna.loader import Loader
from lacuna.prepare import main
from lacuna.shards import FORMAT_VERSION, SPLITS, derived_loss_mask, open_shards
from lacuna.writing import pack_group


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same data prepared by the format-2 writer (loss_mask stored: the writer as SFT runs it) and as prepare
    writes pretraining now (format 3: no loss_mask, the reader derives it)."""
    materialize(DATA)
    root = tmp_path_factory.mktemp("pretrain-mask")
    lines = (DATA / "corpus" / "stdlib.jsonl").read_text().splitlines()[:40]
    short = [json.dumps({"text": f"def f{index}(): return {index}\n" * (index % 7 + 1)}) for index in range(200)]
    (root / "corpus.jsonl").write_text("\n".join(lines + short) + "\n")
    arguments = ["pretrain", "--dataset", str(root / "corpus.jsonl"), "--tokenizer",
                 str(DATA / "models" / "SmolLM2-config"), "--seq-len", "256", "--val-fraction", "0.05",
                 "--pack-group-tokens", "20000", "--quiet"]
    main([*arguments, "--out", str(root / "derived")])
    with pytest.MonkeyPatch.context() as patch:  # format 2 stored the pretraining mask build_shard makes
        def keeping_the_mask(*arguments: Any) -> dict[str, Any]:
            documents, items, split, index, settings, *rest = arguments
            return pack_group(documents, items, split, index, settings.model_copy(update={"mode": "sft"}), *rest)

        build_shard = writing.build_shard  # from the segments: pretraining parts hold no per-token mask
        patch.setattr(writing, "build_shard", lambda *arguments, stored_masks: build_shard(*arguments,
                                                                                          stored_masks=False))
        patch.setattr(writing, "pack_group", keeping_the_mask)
        main([*arguments, "--out", str(root / "stored")])
    return root / "stored", root / "derived"


def test_format_3_leaves_the_mask_out_of_pretraining_shards(folders: tuple[Path, Path]) -> None:
    stored, derived = (json.loads((folder / "manifest.json").read_text()) for folder in folders)
    assert derived["version"] == FORMAT_VERSION == 3 and len(derived["splits"]["train"]) > 2  # several groups
    kinds = [{name.split(".")[-2] for shard in manifest["splits"]["train"] for name in shard["files"]}
             for manifest in (stored, derived)]
    assert kinds[0] - kinds[1] == {"loss_mask"} and "loss_mask" not in {path.name.split(".")[-2]
                                                                        for path in folders[1].iterdir()}
    assert derived["stats"] == stored["stats"]  # supervised stays exactly the mask's sum


def test_pretraining_bytes_per_token_position(tmp_path: Path) -> None:
    """uint16 tokens and the row index: at most 2.05 bytes per stored token position (format 2: 3.0)."""
    (tmp_path / "code.jsonl").write_text("".join((DATA / "corpus" / "stdlib.jsonl").open().readlines()[:60]))
    main(["pretrain", "--dataset", str(tmp_path / "code.jsonl"), "--tokenizer", str(DATA / "models" / "SmolLM2-config"),
          "--out", str(tmp_path / "out"), "--quiet"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    size = sum(path.stat().st_size for path in (tmp_path / "out").glob("*.npy"))
    assert manifest["token_dtype"] == "uint16" and size / (manifest["stats"]["rows"] * manifest["seq_len"]) <= 2.05


def test_the_derived_mask_equals_the_stored_one_row_by_row(folders: tuple[Path, Path]) -> None:
    tails = Counter()
    for split in SPLITS:
        stored, derived = (open_shards(folder, split, verify=True) for folder in folders)
        assert stored.num_rows == derived.num_rows > 0
        for index in range(stored.num_rows):
            expected, row = stored.row(index), derived.row(index)
            assert np.array_equal(row.loss_mask, expected.loss_mask) and row.loss_mask.dtype == np.uint8
            assert np.array_equal(row.tokens, expected.tokens) and row.supervised == expected.supervised
            tail = len(row.tokens) - int(row.cu_seqlens[-2])
            padded = not expected.loss_mask[row.cu_seqlens[-2]:].any()
            tails["full row" if not padded else "1-token tail" if tail == 1 else "longer tail"] += 1
    assert len(tails) == 3, tails  # every case the supervised count has to tell apart occurs in this data


def test_loader_batches_and_inspect_are_the_same_without_a_stored_mask(folders: tuple[Path, Path],
                                                                       capsys: pytest.CaptureFixture) -> None:
    loaders = [Loader(open_shards(folder), batch_size=3, grad_accum=2, rank=0, world_size=1, seed=2)
               for folder in folders]
    for _ in range(8):
        (stored, stored_total), (derived, derived_total) = (loader.next_step() for loader in loaders)
        assert stored_total == derived_total
        for a, b in zip(stored, derived, strict=True):
            assert a.labels.equal(b.labels) and a.input_ids.equal(b.input_ids) and a.cu_seqlens.equal(b.cu_seqlens)
    reports = []
    for folder in folders:
        inspect(folder, row=1, split="train", as_json=True, verify=True)
        reports.append(json.loads(capsys.readouterr().out)["segments"])
    assert reports[0] == reports[1]


def test_the_supervised_count_tells_a_padding_tail_from_a_full_row() -> None:
    cases = {(0, 4, 8): (6, [0, 1, 1, 1, 0, 1, 1, 1]),  # two documents fill the row
             (0, 3, 6, 8): (4, [0, 1, 1, 0, 1, 1, 0, 0]),  # a 2-token padding tail
             (0, 3, 7, 8): (5, [0, 1, 1, 0, 1, 1, 1, 0])}  # a 1-token tail: masked as a segment start either way
    for bounds, (supervised, expected) in cases.items():
        assert derived_loss_mask(np.array(bounds, np.int32), supervised).tolist() == expected
    for supervised, derivable in ((7, 6), (4, 3)):  # counts no pretraining row has (an SFT row's, say)
        with pytest.raises(LacunaError, match=f"{supervised} supervised tokens, not a pretraining mask's {derivable}"):
            derived_loss_mask(np.array([0, 4, 8], np.int32), supervised)
