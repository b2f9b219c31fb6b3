"""The derived pretraining loss mask: a folder without loss_mask files reads, trains and inspects as the stored one."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lacuna.assets import materialize
from lacuna.errors import LacunaError
from lacuna.inspection import inspect
from lacuna.loader import Loader
from lacuna.prepare import main
from lacuna.shards import SPLITS, derived_loss_mask, open_shards

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A pretrain folder as prepare writes it (loss_mask stored) and a copy whose manifest lists no loss_mask."""
    materialize(DATA)
    root = tmp_path_factory.mktemp("pretrain-mask")
    lines = (DATA / "corpus" / "stdlib.jsonl").read_text().splitlines()[:40]
    short = [json.dumps({"text": f"def f{index}(): return {index}\n" * (index % 7 + 1)}) for index in range(200)]
    (root / "corpus.jsonl").write_text("\n".join(lines + short) + "\n")
    main(["pretrain", "--dataset", str(root / "corpus.jsonl"), "--out", str(root / "stored"), "--tokenizer",
          str(DATA / "models" / "SmolLM2-config"), "--seq-len", "256", "--val-fraction", "0.05", "--quiet"])
    shutil.copytree(root / "stored", root / "derived")
    manifest = json.loads((root / "derived" / "manifest.json").read_text())
    for shard in (shard for split in manifest["splits"].values() for shard in split):
        name = f"{shard['name']}.loss_mask.npy"
        del shard["files"][name]
        (root / "derived" / name).unlink()
    (root / "derived" / "manifest.json").write_text(json.dumps(manifest))
    return root / "stored", root / "derived"


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
