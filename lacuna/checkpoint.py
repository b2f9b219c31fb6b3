"""DCP checkpoints and HF export.

A checkpoint is `RUN_DIR/checkpoints/step-00000100/`: the sharded model and optimizer (DCP, loadable at any world
size), `rng-RANK.pt`, `meta.json` (step, data position, eval loss, model fingerprint) and the resolved
`config.toml`. It is written as `step-00000100.tmp/` and renamed when complete, so a `step-N` folder is whole.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten

from lacuna.errors import LacunaError

CHECKPOINT_NAME = re.compile(r"step-(\d{8})")
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of parameter names and (global) shapes: equal for the same architecture at any world size."""
    entries = []
    for name, parameter in model.named_parameters():
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        entries.append(f"{name}:{tuple(parameter.shape)}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's meta.json, or a one-line error when the folder is not a complete checkpoint."""
    try:
        return json.loads((checkpoint / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise LacunaError(f"'{checkpoint}' is not a complete lacuna checkpoint (no readable meta.json): pass a "
                          "RUN_DIR/checkpoints/step-N folder") from None


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first (temp folders of interrupted saves are skipped)."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir()
             if CHECKPOINT_NAME.fullmatch(path.name) and (path / "meta.json").is_file()]
    return sorted(found, key=lambda path: path.name)


def resume_path(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: `none`, `latest` (newest complete one in the run folder), or a folder."""
    if resume == "none":
        return None
    if resume == "latest":
        checkpoints = complete_checkpoints(run_dir / "checkpoints")
        return checkpoints[-1] if checkpoints else None
    read_meta(Path(resume))
    return Path(resume)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         meta: dict[str, Any], config_toml: str, keep: int) -> Path:
    """Write checkpoint `step` collectively (all ranks call it); rank 0 renames it into place and prunes."""
    final = directory / f"step-{step:08d}"
    temporary = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    needed = torch.tensor(sum(tensor.to_local().nbytes if isinstance(tensor, DTensor) else tensor.nbytes
                              for tensor in tree_flatten(state)[0] if isinstance(tensor, torch.Tensor)))
    dist.all_reduce(needed)  # every rank sees the same total, so all of them stop, or none
    free = shutil.disk_usage(temporary).free
    try:
        if needed.item() > free:
            raise OSError(errno.ENOSPC, "not enough free space")
        dcp.save(state, checkpoint_id=temporary)
        torch.save(rng_state(), temporary / f"rng-{rank}.pt")
    except (OSError, RuntimeError, CheckpointException) as error:  # DCP wraps its writers' OSErrors
        cause = next(iter(error.failures.values()))[0] if isinstance(error, CheckpointException) else error
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:120]
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        previous = complete_checkpoints(directory)
        raise LacunaError(f"cannot write checkpoint {final} ({reason}): it needs ~{needed.item() / 2**20:,.1f} MiB, "
                          f"{directory} has {free / 2**20:,.1f} MiB free; the last complete checkpoint "
                          f"({previous[-1] if previous else 'none'}) stays usable: free space or pass another "
                          "--run-dir, then resume") from None
    dist.barrier()
    if rank == 0:
        (temporary / "config.toml").write_text(config_toml)
        (temporary / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        prune(directory, keep)
    dist.barrier()
    return final


def prune(directory: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints plus the best by eval loss; drop temp folders of interrupted saves."""
    checkpoints = complete_checkpoints(directory)
    evaluated = [path for path in checkpoints if read_meta(path).get("eval_loss") is not None]
    kept = set(checkpoints[-max(keep, 1):])
    if evaluated:
        kept.add(min(evaluated, key=lambda path: read_meta(path)["eval_loss"]))
    for path in directory.iterdir():
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def load(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG state in place (collective); returns the meta."""
    meta = read_meta(checkpoint)
    if meta["fingerprint"] != model_fingerprint(model):
        raise LacunaError(f"checkpoint '{checkpoint}' is from a different model ({meta['model_name']}, other "
                          "parameter shapes): resume with that --model-name, or pass --resume none")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rng_file = checkpoint / f"rng-{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent for ranks beyond the saving run's world size
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return meta


def export(checkpoint: Path, out: Path) -> None:
    """Write `checkpoint` as an HF folder (weights, config, sampling generation config, tokenizer, chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lacuna.chat_templates import load_template
    from lacuna.config import TEMPERATURE, TOP_P, load_config
    from lacuna.model import model_configuration

    meta = read_meta(checkpoint)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise LacunaError(f"'{out}' exists and is not an HF model folder: pass an empty or new --out folder")
    config = load_config(["@", str(checkpoint / "config.toml")])
    # architecture only: every weight comes from the checkpoint, so reading the original weights would be wasted
    model = AutoModelForCausalLM.from_config(model_configuration(config), dtype=torch.float32,
                                             trust_remote_code=config.model.trust_remote_code)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    model.load_state_dict(state["model"])
    model.to(getattr(torch, config.model.dtype))
    # training turned the KV cache off; servers (`transformers serve`) apply a request's temperature and top_p only
    # when the generation config samples, and lacuna chat's defaults then apply to requests that set none
    model.config.use_cache = True
    model.generation_config.update(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, use_cache=True)
    tokenizer = AutoTokenizer.from_pretrained(meta.get("tokenizer") or config.model.name,  # the data's tokenizer
                                              trust_remote_code=config.model.trust_remote_code)
    if meta.get("mode") == "sft":
        tokenizer.chat_template = load_template(config.prepare.chat_template, tokenizer)
    temporary = out.with_name(out.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(temporary, out)
