"""HSDP (`--parallel.replicate N`): a replicas × shards device mesh trains exactly like full sharding (gloo, fp32)."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    make_model_folder,
    packed_batch,
    prepare_data,
    read_metrics,
    save_folder,
    spawn_ranks,
    torchrun,
    train_arguments,
)

from lacuna.config import Config
from lacuna.model import build_model, load_model, loss_sum
from lacuna.train import clip_gradients

WORLD = 4


def gradients_and_norm(model: torch.nn.Module, batch: object) -> tuple[dict[str, torch.Tensor], float]:
    loss_sum(model, batch).backward()
    norm = clip_gradients(model, 0.0).item()
    gradients = {name.replace("._checkpoint_wrapped_module", ""): parameter.grad.full_tensor()
                 for name, parameter in model.named_parameters()}
    return gradients, norm


def mesh_worker(rank: int, folder: str) -> None:
    batches = [packed_batch(seed=seed)[0] for seed in range(1, WORLD + 1)]
    reference = load_model(Config.model_validate({"model": {"name": folder, "dtype": "float32"}}))
    for batch in batches:  # one process over all four batches: the gradient of the whole global batch
        loss_sum(reference, batch).backward()
    expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])).item()
    results = {}
    for replicate in (1, 2):  # 1 × 4 (full sharding) and 2 × 2 (HSDP)
        config = Config.model_validate({"model": {"name": folder, "dtype": "float32"},
                                        "parallel": {"replicate": replicate}})
        model = build_model(config, torch.device("cpu"))
        placements = {type(placement).__name__ for parameter in model.parameters()
                      for placement in parameter.placements}
        assert placements == ({"Shard"} if replicate == 1 else {"Replicate", "Shard"})
        results[replicate] = gradients_and_norm(model, batches[rank])
    for gradients, norm in results.values():
        assert math.isclose(norm, expected_norm, rel_tol=1e-6)
        for name, parameter in reference.named_parameters():
            assert (gradients[name] - parameter.grad).abs().max() <= 1e-6, name
    for name, gradient in results[2][0].items():
        assert (gradient - results[1][0][name]).abs().max() <= 1e-6, name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_two_by_two_mesh_gives_the_gradients_of_full_sharding_and_of_one_process(tmp_path: Path) -> None:
    folder = save_folder(tmp_path / "weights", with_weights=True)
    spawn_ranks(WORLD, mesh_worker, str(folder))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_hsdp_run_resumes_fully_sharded_on_fewer_ranks_at_the_same_row(tmp_path: Path) -> None:
    model = make_model_folder(tmp_path / "model")
    data = prepare_data(model, tmp_path / "data", conversations=120)
    hsdp = tmp_path / "hsdp"
    torchrun(WORLD, "lacuna.train", train_arguments(data, model, hsdp, "--batch-size", "1",
                                                    "--parallel.replicate", "2"))
    resumed = tmp_path / "resumed"
    shutil.copytree(hsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")  # as if the 2 × 2 job had died after step 2
    torchrun(2, "lacuna.train", train_arguments(data, model, resumed, "--batch-size", "1"))  # 1 × 2: grad_accum 1 → 2
    expected, records = read_metrics(hsdp), read_metrics(resumed)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    for record, reference in zip(records[2:], expected[2:], strict=True):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in reference:
                assert math.isclose(record[key], reference[key], rel_tol=1e-5), (key, record, reference)
