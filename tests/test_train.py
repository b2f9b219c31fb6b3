"""The train loop on a tiny real Llama (SmolLM2 tokenizer, prepared chat shards), FSDP2 over gloo, CPU fp32.

One module fixture prepares the data and runs the expensive jobs once: a one-process run in this process and a
two-process torchrun run with the same global batch; the tests assert on their metrics and checkpoints.
"""

import contextlib
import dataclasses
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import REPOSITORY, make_model_folder, prepare_data, read_metrics, torchrun, train_arguments

from lacuna.checkpoint import Start
from lacuna.config import DataConfig, ScheduleConfig, load_config
from lacuna.errors import LacunaError
from lacuna.loader import Loader
from lacuna.machine import nvidia_driver, unusable_gpu_message
from lacuna.shards import open_shards
from lacuna.train import (
    accumulate_gradients,
    build_optimizer,
    derive_grad_accum,
    init_distributed,
    learning_rate,
    main,
    process_group_backend,
)


def assert_close(records: list[dict], expected: list[dict], tolerance: float) -> None:
    assert [record["step"] for record in records] == [record["step"] for record in expected]
    for record, reference in zip(records, expected, strict=True):
        for key in ("loss", "grad_norm"):
            assert math.isclose(record[key], reference[key], rel_tol=tolerance, abs_tol=0), (key, record, reference)


@contextlib.contextmanager
def process_group() -> Iterator[torch.device]:
    """A one-process gloo group in this process, as `python -m lacuna.train` makes it."""
    device = init_distributed(60)
    try:
        yield device
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    model = make_model_folder(root / "model")
    data = prepare_data(model, root / "data")
    # Same global batch of 4 rows: 1 process × 2 rows × 2 micro-batches, and 2 processes × 1 row × 2.
    main(train_arguments(data, model, root / "one", "--batch-size", "2", "--grad-accum", "2"))
    torchrun(2, "lacuna.train", train_arguments(data, model, root / "two", "--batch-size", "1", "--grad-accum", "2"))
    return {"root": root, "model": model, "data": data, "one": root / "one", "two": root / "two"}


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_minimum() -> None:
    schedule = ScheduleConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    values = [learning_rate(step, 1.0, schedule) for step in range(1, 111)]
    assert values[:10] == pytest.approx([0.1 * step for step in range(1, 11)])
    assert values[59] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert values[-1] == pytest.approx(0.1)
    assert all(later <= earlier for earlier, later in zip(values[9:], values[10:], strict=False))


@pytest.mark.slow
def test_accumulation_splits_give_identical_gradients_and_masked_tokens_count_nothing(runs: dict[str, Path]) -> None:
    config = load_config(["--data", str(runs["data"]), "--model-name", str(runs["model"]), "--model.dtype", "float32",
                          "--model.activation-checkpointing", "false", "--optim.weight-decay", "0.1"])
    from lacuna.model import build_model, loss_sum

    with process_group() as device:
        model = build_model(config, device)
        shards = open_shards(runs["data"])
        gradients, losses = [], []
        for batch_size, grad_accum in ((1, 8), (2, 4), (8, 1)):
            batches, supervised = Loader(shards, batch_size, grad_accum, 0, 1, seed=5).next_step()
            assert len(batches) == grad_accum and sum(batch.supervised_tokens for batch in batches) == supervised
            losses.append(accumulate_gradients(model, batches, supervised, device).item() / supervised)
            gradients.append({name: parameter.grad.full_tensor().clone()
                              for name, parameter in model.named_parameters()})
            model.zero_grad(set_to_none=True)
        for other in gradients[1:]:
            for name, gradient in gradients[0].items():
                assert (other[name] - gradient).abs().max() <= 1e-6 * gradient.abs().max(), name
        assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)

        # The loss is exactly the cross-entropy of the supervised positions: masked tokens contribute nothing.
        batch = batches[0]
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
            supervised_positions = batch.labels[0] != -100
            expected = F.cross_entropy(logits[supervised_positions].float(), batch.labels[0][supervised_positions],
                                       reduction="sum")
            assert loss_sum(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
        assert supervised_positions.sum().item() == batch.supervised_tokens
        boundaries = batch.cu_seqlens[1:-1].long() - 1  # last position of each document: no target across documents
        assert (batch.labels[0][boundaries] == -100).all()

        # A micro-batch without any supervised token still runs forward and backward (FSDP collectives) and adds 0.
        batch.labels.fill_(-100)
        batch = dataclasses.replace(batch, supervised_positions=None)  # found again: none
        assert accumulate_gradients(model, [batch], 0, device).item() == 0.0
        assert all(parameter.grad is None or parameter.grad.full_tensor().abs().max() == 0
                   for parameter in model.parameters())

        groups = build_optimizer(model, config).param_groups
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        decayed = {names[id(parameter)] for group in groups if group["weight_decay"] > 0
                   for parameter in group["params"]}
        assert decayed and all(name.endswith("proj.weight") for name in decayed)
        assert len(decayed) + sum(len(group["params"]) for group in groups if group["weight_decay"] == 0) == len(names)


@pytest.mark.slow
def test_two_ranks_match_one_rank_at_the_same_global_batch(runs: dict[str, Path]) -> None:
    one, two = read_metrics(runs["one"]), read_metrics(runs["two"])
    assert [record["step"] for record in one] == [1, 2, 3, 4]
    assert_close(two, one, 1e-6)
    assert one[-1]["loss"] < one[0]["loss"]
    for record in one:
        assert record["tokens_per_second"] > 0 and 0 < record["mfu"] < 1 and record["lr"] > 0
    assert "eval_loss" in one[1] and "eval_loss" in one[3] and "eval_loss" not in one[0]
    assert one[1]["eval_loss"] == pytest.approx(two[1]["eval_loss"], rel=1e-6)
    assert (runs["one"] / "config.toml").is_file() and (runs["two"] / "export/model.safetensors").is_file()


@pytest.mark.slow
def test_each_run_starts_metrics_with_a_record_of_what_it_decided(runs: dict[str, Path]) -> None:
    (one,), (two,) = read_metrics(runs["one"], "start"), read_metrics(runs["two"], "start")
    for record, world_size, grad_accum in ((one, 1, 2), (two, 2, 2)):
        assert record["step"] == 0 and record["resumed_from"] is None and record["device"] == "cpu"
        assert record["dtype"] == "float32" and record["dtype_reason"] == "model.dtype"
        assert record["attention"] == "lacuna_varlen_sdpa" and record["liger"] is False and record["compile"] is False
        assert (record["world_size"], record["grad_accum"], record["global_batch_rows"]) == (world_size, grad_accum, 4)
        assert record["tokens_per_step"] == 4 * 128 and record["total_tokens"] == 4 * 4 * 128


def test_global_batch_derives_grad_accum_from_the_world_size() -> None:
    data = DataConfig(batch_size=16, global_batch_rows=128)
    assert [derive_grad_accum(data, world_size, Start()) for world_size in (1, 2, 8)] == [8, 4, 1]
    with pytest.raises(LacunaError, match="global batch of 128 rows does not divide by batch size 16 × 3 ranks"):
        derive_grad_accum(data, 3, Start())
    fixed = DataConfig(batch_size=2, grad_accum=3)  # no global batch stated: grad_accum as given
    assert derive_grad_accum(fixed, 8, Start()) == 3
    assert derive_grad_accum(fixed, 8, Start(global_batch_rows=32, world_size=8)) == 3  # same world size
    assert derive_grad_accum(fixed, 4, Start(global_batch_rows=32, world_size=8)) == 4  # kept across world sizes
    recipe = load_config(["@", str(REPOSITORY / "configs/pretrain_qwen.toml")])
    assert [derive_grad_accum(recipe.data, world_size, Start()) for world_size in (1, 8)] == [8, 1]


def test_cuda_runs_get_a_cpu_backend_beside_nccl_and_unusable_gpus_stop_the_run(monkeypatch) -> None:
    assert process_group_backend(cuda=True) == "cpu:gloo,cuda:nccl" and process_group_backend(cuda=False) == "gloo"
    message = unusable_gpu_message("550.54.15", "2.15.0+cu130", "13.0")
    assert "driver 550.54.15" in message and "CUDA 13.0 build" in message and ">= 580" in message
    assert "CPU-only build" in unusable_gpu_message("580.1", "2.13.0+cpu", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose: no check
    assert nvidia_driver() is None


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank_at_the_same_global_batch(runs: dict[str, Path]) -> None:
    resumed = runs["root"] / "two-to-one"
    shutil.copytree(runs["two"], resumed)
    shutil.rmtree(resumed / "checkpoints/step-00000004")
    # One process: grad_accum 2 becomes 4, to keep the checkpoint's global batch of 4 rows.
    main(train_arguments(runs["data"], runs["model"], resumed, "--batch-size", "1", "--grad-accum", "2"))
    assert_close(read_metrics(resumed), read_metrics(runs["two"]), 1e-6)
    assert json.loads((resumed / "checkpoints/step-00000004/meta.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_global_batch_that_does_not_divide_on_the_new_world_size_is_an_error(runs: dict[str, Path]) -> None:
    resumed = runs["root"] / "indivisible"
    shutil.copytree(runs["two"], resumed)
    with pytest.raises(LacunaError, match="global batch of 4 rows does not divide by batch size 3"):
        main(train_arguments(runs["data"], runs["model"], resumed, "--batch-size", "3"))


def foreign_copy(data: Path, destination: Path, **tokenizer: object) -> Path:
    """The data folder with its shard files linked and the manifest's tokenizer entry changed."""
    destination.mkdir()
    for path in data.iterdir():
        (destination / path.name).symlink_to(path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"] |= tokenizer
    (destination / "manifest.json").unlink()
    (destination / "manifest.json").write_text(json.dumps(manifest))
    return destination


@pytest.mark.slow
def test_bad_inputs_fail_with_one_clear_line(runs: dict[str, Path], tmp_path: Path) -> None:
    model, data = runs["model"], runs["data"]

    def fails(pattern: str, *arguments: str, data_folder: Path = data) -> None:
        with pytest.raises(LacunaError, match=pattern):
            main(train_arguments(data_folder, model, tmp_path / "run", "--resume", "none", *arguments))

    fails("does not exist", data_folder=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    fails("no manifest.json", data_folder=tmp_path / "empty")
    foreign = foreign_copy(data, tmp_path / "foreign", name="other/tokenizer", hash="0" * 64)
    fails("was tokenized with other/tokenizer", data_folder=foreign)
    fails("has rows of 128 tokens but .* context of 64", "--model.config-overrides", "{max_position_embeddings = 64}")
    fails("vocabulary of 49152 tokens but .* 1000 embeddings", "--model.config-overrides", "{vocab_size = 1000}")
    fails("exceeds the 1\\d\\d rows", "--batch-size", "64", "--grad-accum", "4")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(data, corrupt)
    tokens = next(corrupt.glob("train-*.tokens.npy"))
    raw = bytearray(tokens.read_bytes())
    raw[-1] ^= 0xFF
    tokens.write_bytes(bytes(raw))
    fails("fails its sha256 check", "--data.verify", "true", data_folder=corrupt)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    arguments = train_arguments(runs["data"], runs["model"], tmp_path / "run", "--lr", "1e30", "--warmup-steps", "0",
                                "--checkpoint-every", "1", "--eval-every", "0", "--batch-size", "2",
                                "--grad-accum", "2")
    with pytest.raises(LacunaError, match="NaN/inf at step 2; .* last good checkpoint is .*step-00000001"):
        main(arguments)
    assert sorted(path.name for path in (tmp_path / "run/checkpoints").iterdir()) == ["step-00000001"]
