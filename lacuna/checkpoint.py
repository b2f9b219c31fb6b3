"""DCP checkpoints (`step-N/`, written as `step-N.tmp/` and renamed when complete; meta.json records every file's
size), the run's checkpoint policy (`Checkpointer`) and HF export."""

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten

from lacuna.config import Config, to_toml
from lacuna.errors import LacunaError, first_line
from lacuna.files import exclusive_lock, replace_directory
from lacuna.loader import DataPosition

CHECKPOINT_NAME = re.compile(r"step-(\d{8})")
EXPORT_MARKER = "lacuna-export.json"  # in every export folder: which checkpoint it holds; marks it as lacuna's own
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of parameter names and (global) shapes: equal for the same architecture at any world size."""
    entries = []
    for name, parameter in model.named_parameters():
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        entries.append(f"{name}:{tuple(parameter.shape)}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def data_identity(manifest: dict[str, Any]) -> str:
    """A hash of the shard files' hashes in a manifest: another prepared folder gives another value."""
    return hashlib.sha256(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()[:16]


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's meta.json, or a one-line error when the folder is not a complete checkpoint."""
    try:
        return json.loads((checkpoint / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise LacunaError(f"'{checkpoint}' is not a complete lacuna checkpoint (no readable meta.json): pass a "
                          "RUN_DIR/checkpoints/step-N folder") from None


def checkpoint_folders(directory: Path) -> list[Path]:
    """Every `step-N` folder under `directory`, oldest first (temp folders of interrupted saves are skipped)."""
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if CHECKPOINT_NAME.fullmatch(path.name))


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (with meta.json) under `directory`, oldest first."""
    return [path for path in checkpoint_folders(directory) if (path / "meta.json").is_file()]


def check_files(checkpoint: Path, meta: dict[str, Any]) -> None:
    """Raise OSError when a file recorded at save time is missing or has another size (a truncated copy)."""
    for name, size in meta.get("files", {}).items():
        found = (checkpoint / name).stat().st_size  # FileNotFoundError for a missing one
        if found != size:
            raise OSError(f"{name} has {found:,} bytes, {size:,} were written")


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
    # a CPU tensor: the process group has a CPU backend (gloo) beside NCCL for exactly this kind of collective
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
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        previous = complete_checkpoints(directory)
        raise LacunaError(f"cannot write checkpoint {final} ({first_line(cause, last=True, limit=120)}): it needs "
                          f"~{needed.item() / 2**20:,.1f} MiB, {directory} has {free / 2**20:,.1f} MiB free; the last "
                          f"complete checkpoint ({previous[-1] if previous else 'none'}) stays usable: free space or "
                          "pass another --run-dir, then resume") from None
    dist.barrier()
    if rank == 0:
        (temporary / "config.toml").write_text(config_toml)
        files = {path.name: path.stat().st_size for path in sorted(temporary.iterdir())}
        (temporary / "meta.json").write_text(json.dumps({**meta, "step": step, "files": files}, indent=2))
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
    """Restore model, optimizer and RNG (collective); a different model is a LacunaError."""
    meta = read_meta(checkpoint)
    if meta["fingerprint"] != model_fingerprint(model):
        raise LacunaError(f"checkpoint '{checkpoint}' is from a different model ({meta['model_name']}, other "
                          "parameter shapes): resume with that --model-name, or pass --resume none")
    check_files(checkpoint, meta)  # every rank sees the same files, so every rank skips it, or none
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


@dataclass
class Start:
    """Where a run starts, the saving run's global batch and world size, and what the resume skipped."""

    checkpoint: Path | None = None
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    global_batch_rows: int | None = None
    world_size: int | None = None
    notes: list[str] = field(default_factory=list)


class Checkpointer:
    """The run's checkpoint policy: resume from the newest readable one, save every N and last, keep, export."""

    def __init__(self, config: Config) -> None:
        self.config, self.directory = config, config.run_dir / "checkpoints"
        self.latest: Path | None = None
        self.skipped: list[Path] = []  # unreadable ones: saving their step again replaces them

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data_identity: str) -> Start:
        """Load the checkpoint `checkpoint.resume` names into model and optimizer (collective); where to start."""
        choice, notes = self.config.checkpoint.resume, []
        if choice == "none":
            return Start()
        if choice == "latest":
            folders = checkpoint_folders(self.directory)
            candidates = [path for path in folders if (path / "meta.json").is_file()]
            newest = candidates[-1] if candidates else None
            notes += [f"skipped {path.name} (no meta.json: its save did not finish)" for path in folders
                      if path not in candidates and (newest is None or path.name > newest.name)]
        else:
            read_meta(Path(choice))
            candidates = [Path(choice)]
        for path in reversed(candidates):
            try:
                meta = load(path, model, optimizer)
            except (OSError, RuntimeError, ValueError, KeyError, CheckpointException) as error:
                cause = next(iter(error.failures.values()))[0] if isinstance(error, CheckpointException) else error
                notes.append(f"skipped unreadable {path} ({first_line(cause, last=True, limit=120)})")
                self.skipped.append(path)
                continue
            self.latest = path
            position = DataPosition(meta["epoch"], meta["offset"])
            if meta.get("data", data_identity) != data_identity:
                notes.append(f"the data differs from {path.name}'s: starting at its first row")
                position = DataPosition()
            return Start(path, meta["step"], position, meta["global_batch_rows"], meta["world_size"], notes)
        if candidates:
            raise LacunaError(f"no readable checkpoint in {self.directory}: {'; '.join(notes)}; pass --resume none "
                              "with a new --run-dir to start again")
        return Start(notes=notes)

    def refuse_later(self, step: int) -> None:
        """Refuse to start at `step` in a run folder holding checkpoints from later steps (they would be mixed up)."""
        later = [path for path in complete_checkpoints(self.directory)
                 if int(path.name.split("-")[1]) > step and path not in self.skipped]
        if later:
            raise LacunaError(f"run folder '{self.config.run_dir}' holds checkpoints after step {step} (newest "
                              f"{later[-1]}): pass a new --run-dir, or --resume latest to continue it")

    def due(self, step: int) -> bool:
        """Whether to save at `step`: every `checkpoint.every` steps and always at the last."""
        every = self.config.checkpoint.every
        return (every > 0 and step % every == 0) or step == self.config.schedule.steps

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
        """Save checkpoint `step` (collective) and prune to the newest `checkpoint.keep` plus the best."""
        self.latest = save(self.directory, step, model, optimizer, meta, to_toml(self.config),
                           self.config.checkpoint.keep)

    def export(self, rank: int) -> Path | None:
        """Rank 0: export the newest checkpoint to RUN_DIR/export unless it already holds it (also after a kill
        during an earlier export); returns the folder written, or None."""
        out = self.config.run_dir / "export"
        if rank != 0 or not self.config.checkpoint.export or self.latest is None:
            return None
        marker = out / EXPORT_MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("checkpoint") == self.latest.name:
            return None
        export(self.latest, out, overwrite=True)
        return out


def export(checkpoint: Path, out: Path, overwrite: bool = False) -> None:
    """`checkpoint` as an HF folder at `out`, under its lock, swapped in atomically; a folder lacuna did not
    export is replaced only with `overwrite`."""
    meta = read_meta(checkpoint)
    with exclusive_lock(out, "export"):
        if out.exists() and not overwrite and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
            raise LacunaError(f"'{out}' already holds files lacuna did not export (a model folder?): pass a new "
                              "--out, or --overwrite to replace it")
        temporary = out.with_name(f".{out.name}.lacuna-export")  # a killed export's is removed by the next one
        shutil.rmtree(temporary, ignore_errors=True)
        save_pretrained(checkpoint, meta, temporary)
        (temporary / EXPORT_MARKER).write_text(json.dumps({"checkpoint": checkpoint.name, "step": meta["step"]}))
        replace_directory(temporary, out)


def save_pretrained(checkpoint: Path, meta: dict[str, Any], out: Path) -> None:
    """The checkpoint's model, generation config, tokenizer and chat template as an HF folder at `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lacuna.chat_templates import choose_template
    from lacuna.config import TEMPERATURE, TOP_P, load_config
    from lacuna.model import model_configuration

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
        tokenizer.chat_template = choose_template(config.prepare.chat_template, tokenizer).source
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
