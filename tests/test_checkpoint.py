"""Checkpoints: atomic saves, retention, exact resume after a kill, HF export (tiny real Llama, CPU fp32)."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import make_model_folder, prepare_data, read_metrics, train_arguments
from transformers import AutoModelForCausalLM, AutoTokenizer

from lacuna.chat_templates import has_generation_tags
from lacuna.checkpoint import checkpoint_folders, complete_checkpoints, export, prune, read_meta
from lacuna.errors import LacunaError
from lacuna.train import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoint")
    model = make_model_folder(root / "model")
    data = prepare_data(model, root / "data")
    main(run_arguments(data, model, root / "run"))
    return {"root": root, "model": model, "data": data, "run": root / "run"}


def run_arguments(data: Path, model: Path, run_dir: Path) -> list[str]:
    return train_arguments(data, model, run_dir, "--batch-size", "2", "--grad-accum", "2", "--checkpoint-every", "1",
                           "--checkpoint.keep", "3")


def deterministic(run_dir: Path) -> list[dict]:
    """Metrics records without the timing and memory figures."""
    keys = ("step", "loss", "lr", "grad_norm", "eval_loss", "epoch")
    return [{key: record.get(key) for key in keys} for record in read_metrics(run_dir)]


def fake_checkpoint(directory: Path, step: int, eval_loss: float | None) -> None:
    path = directory / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}))


def test_retention_keeps_the_newest_and_the_best_and_skips_partial_saves(tmp_path: Path) -> None:
    for step, eval_loss in enumerate([None, 0.5, None, 0.9, None, None], start=1):
        fake_checkpoint(tmp_path, step, eval_loss)
    (tmp_path / "step-00000007.tmp").mkdir()  # a save interrupted before its rename
    (tmp_path / "step-00000008").mkdir()  # no meta.json: not a checkpoint
    assert [path.name for path in complete_checkpoints(tmp_path)][-1] == "step-00000006"
    assert checkpoint_folders(tmp_path)[-1].name == "step-00000008"  # a resume names it as skipped
    prune(tmp_path, keep=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000002", "step-00000005", "step-00000006"]
    with pytest.raises(LacunaError, match="not a complete lacuna checkpoint"):
        read_meta(tmp_path / "step-00000008")


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run_bit_for_bit(trained: dict[str, Path]) -> None:
    run = trained["run"]
    assert [path.name for path in complete_checkpoints(run / "checkpoints")] == [
        "step-00000002", "step-00000003", "step-00000004"]
    # What a kill during step 4's save leaves: checkpoints up to step 2 (3 lost too), a half-written temp folder,
    # metrics records past the checkpoint, no export.
    killed = trained["root"] / "killed"
    shutil.copytree(run, killed)
    for name in ("checkpoints/step-00000003", "checkpoints/step-00000004", "export"):
        shutil.rmtree(killed / name)
    (killed / "checkpoints/step-00000004.tmp").mkdir()
    (killed / "checkpoints/step-00000004.tmp/__0_0.distcp").write_bytes(b"partial")
    main(run_arguments(trained["data"], trained["model"], killed))
    assert deterministic(killed) == deterministic(run)
    assert (killed / "export/model.safetensors").read_bytes() == (run / "export/model.safetensors").read_bytes()
    assert not (killed / "checkpoints/step-00000004.tmp").exists()


@pytest.mark.slow
def test_export_reloads_in_plain_transformers_with_the_trained_weights_and_generates(trained: dict[str, Path]) -> None:
    checkpoint = trained["run"] / "checkpoints/step-00000004"
    out = trained["root"] / "export"
    export(checkpoint, out)
    assert (out / "model.safetensors").read_bytes() == (trained["run"] / "export/model.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out)
    stored = {"model": {name: torch.zeros_like(tensor) for name, tensor in model.state_dict().items()}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(stored, checkpoint_id=checkpoint, no_dist=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, stored["model"][name]), name
    initial = AutoModelForCausalLM.from_config(model.config)
    assert not torch.equal(initial.model.norm.weight, model.model.norm.weight)  # training moved the weights
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert has_generation_tags(tokenizer.chat_template)  # the template the SFT masks were made with


@pytest.mark.slow
def test_export_never_replaces_a_folder_lacuna_did_not_export(trained: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = trained["run"] / "checkpoints/step-00000004"
    (tmp_path / "notes.txt").write_text("keep me")
    base_model = tmp_path / "base-model"  # a user's model folder, as `cp -r data/models/... mymodel` makes
    shutil.copytree(trained["model"], base_model)
    (base_model / "model.safetensors").write_bytes(b"weights")
    for folder in (tmp_path, base_model):
        with pytest.raises(LacunaError, match="already holds files lacuna did not export.*--overwrite"):
            export(checkpoint, folder)
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (base_model / "model.safetensors").is_file()
    export(checkpoint, base_model, overwrite=True)  # the user said so
    assert (base_model / "model.safetensors").stat().st_size > 1000 and (base_model / "lacuna-export.json").is_file()
    export(trained["run"] / "checkpoints/step-00000003", base_model)  # lacuna's own export: replaced
    assert json.loads((base_model / "lacuna-export.json").read_text())["step"] == 3
    assert not list(tmp_path.glob(".base-model*"))  # nothing left beside it
    with pytest.raises(LacunaError, match="not a complete lacuna checkpoint"):
        export(trained["run"], tmp_path / "out")


@pytest.mark.slow
def test_resume_skips_unreadable_checkpoints_for_the_newest_readable_one(trained: dict[str, Path], capsys) -> None:
    damaged = trained["root"] / "damaged"
    shutil.copytree(trained["run"], damaged)
    (damaged / "checkpoints/step-00000004/meta.json").unlink()  # a deleted meta.json: incomplete
    shard = next((damaged / "checkpoints/step-00000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated copy
    shutil.rmtree(damaged / "export")
    capsys.readouterr()
    main(run_arguments(trained["data"], trained["model"], damaged))
    output = capsys.readouterr().out
    assert "skipped step-00000004 (no meta.json" in output
    assert f"skipped unreadable {damaged / 'checkpoints/step-00000003'} (" in output and "bytes" in output
    assert f"resumed from {damaged / 'checkpoints/step-00000002'} at step 2" in output
    assert deterministic(damaged) == deterministic(trained["run"])  # steps 3 and 4 trained again, bit for bit
    assert read_meta(damaged / "checkpoints/step-00000003")["files"]  # rewritten whole


@pytest.mark.slow
def test_a_rerun_after_a_kill_during_the_export_exports(trained: dict[str, Path], capsys) -> None:
    rerun = trained["root"] / "export-killed"
    shutil.copytree(trained["run"], rerun)
    shutil.rmtree(rerun / "export")  # the export is written beside and renamed in: a kill leaves none
    (rerun / ".export.lacuna-export").mkdir()  # but the half-written folder beside it
    (rerun / ".export.lacuna-export/model.safetensors").write_bytes(b"half")
    main(run_arguments(trained["data"], trained["model"], rerun))
    assert sorted(path.name for path in rerun.iterdir()) == ["checkpoints", "config.toml", "export", "metrics.jsonl"]
    assert "nothing to do: the run is already at step 4" in capsys.readouterr().out
    exported = (rerun / "export/model.safetensors").read_bytes()
    assert exported == (trained["run"] / "export/model.safetensors").read_bytes()


LOCK_HOLDER = """
import sys
from pathlib import Path
from lacuna.files import exclusive_lock
with exclusive_lock(Path(sys.argv[1]), "training run"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.mark.slow
def test_a_second_run_on_a_locked_run_folder_is_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LacunaError, match=f"training run '{run_dir}' is being written by process {holder.pid}"):
            main(run_arguments(trained["data"], trained["model"], run_dir))
    finally:
        holder.communicate("", timeout=60)
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resuming_a_checkpoint_of_another_model_is_an_error(trained: dict[str, Path], tmp_path: Path) -> None:
    arguments = train_arguments(trained["data"], trained["model"], tmp_path / "run", "--resume",
                                str(trained["run"] / "checkpoints/step-00000002"), "--model.config-overrides",
                                "{intermediate_size = 256}")
    with pytest.raises(LacunaError, match="from a different model"):
        main(arguments)


@pytest.mark.slow
def test_restarting_from_scratch_over_existing_checkpoints_is_an_error(trained: dict[str, Path]) -> None:
    arguments = run_arguments(trained["data"], trained["model"], trained["run"]) + ["--resume", "none"]
    with pytest.raises(LacunaError, match="holds checkpoints after step 0 .*step-00000004"):
        main(arguments)
    assert len(complete_checkpoints(trained["run"] / "checkpoints")) == 3



SAVE_TWICE = """
import resource, signal, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from lacuna.checkpoint import save
from lacuna.errors import run_main

def main(arguments):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = fully_shard(torch.nn.Linear(256, 256))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()
    save(Path(arguments[0]), 1, model, optimizer, {}, "", keep=2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past 4 KiB now fail (EFBIG), as on a disk filling up
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    save(Path(arguments[0]), 2, model, optimizer, {}, "", keep=2)

run_main(main, sys.argv[1:])
"""


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_full_disk_is_one_line_naming_the_sizes_and_the_last_usable_checkpoint(tmp_path: Path, when: str) -> None:
    """`before`: a 64 KiB filesystem fails the free-space check; `during`: the second save's writes fail."""
    import subprocess
    import sys

    directory = tmp_path / "checkpoints"
    directory.mkdir()
    if when == "before":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)],
                                 capture_output=True, text=True)
        if mounted.returncode:
            pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        result = subprocess.run([sys.executable, "-c", SAVE_TWICE, str(directory)], capture_output=True, text=True,
                                timeout=120)
        kept = [] if when == "before" else ["step-00000001"]
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
        line = result.stderr
        assert f"cannot write checkpoint {directory / f'step-0000000{len(kept) + 1}'}" in line
        assert "MiB free" in line and f"last complete checkpoint ({directory / kept[0] if kept else 'none'})" in line
        assert sorted(path.name for path in directory.iterdir()) == kept  # no half-written step-N.tmp left
    finally:
        if when == "before":
            subprocess.run(["umount", str(directory)], check=True)
