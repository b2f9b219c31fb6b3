"""One pydantic config for the whole pipeline: `@ file.toml` files in order (later wins), then `--dotted.key`,
`--dash-key` or alias overrides; in `prepare`, bare keys name `[prepare]` fields."""

import difflib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lacuna.errors import LacunaError

# sampling defaults of `lacuna chat`, also written into every export's generation config
TEMPERATURE, TOP_P = 0.7, 0.9


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    name: str = "data/models/SmolLM2-135M-Instruct"
    """HF hub name, a folder with weights, or a folder with only config.json (random init)."""
    random_init: bool = False
    """Seeded random weights from the architecture even where `name` has weights (pretraining from scratch)."""
    config_overrides: dict[str, Any] = {}
    attention: Literal["auto", "varlen_attn", "varlen_sdpa", "flash_attention_2", "sdpa"] = "auto"
    """auto: torch's varlen_attn on CUDA in bf16, else lacuna's per-document SDPA (see lacuna/attention.py)."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """auto: bf16 on CUDA devices that support it and on CPUs that compute it natively, else fp32."""
    activation_checkpointing: bool = True
    compile: bool = False
    liger: Literal["auto", "on", "off"] = "auto"
    trust_remote_code: bool = False


class DataConfig(Section):
    path: Path = Path("data/sft")
    batch_size: int = Field(4, ge=1)
    """Rows per micro-batch per rank."""
    grad_accum: int = Field(1, ge=1)
    global_batch_rows: int | None = Field(None, ge=1)
    """Rows per optimizer step over all ranks; when set, grad_accum = global_batch_rows / (batch_size × ranks)."""
    verify: bool = False


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0: no clipping)."""


class ScheduleConfig(Section):
    steps: int = Field(1000, ge=1)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class ParallelConfig(Section):
    nproc_per_node: int | Literal["auto"] = "auto"
    nnodes: int = Field(1, ge=1)
    replicate: int = Field(1, ge=1)
    """HSDP: N replicas × world/N shards (e.g. nodes × GPUs per node); 1 = shard over every rank."""
    reshard_after_forward: bool = True
    timeout_seconds: int = Field(600, ge=1)
    """Collective and rendezvous timeout: a hung or dead rank fails the job after this long instead of hanging."""
    max_restarts: int = Field(0, ge=0)
    """torchrun restarts of the whole worker group after a failure; each restart resumes from the newest checkpoint."""
    rdzv_endpoint: str | None = None
    """HOST:PORT of the first node for multi-node c10d rendezvous (default: a free local port, single node)."""
    rdzv_id: str = "lacuna"


class CheckpointConfig(Section):
    every: int = Field(0, ge=0)
    """Save every N steps (0: only at the end)."""
    keep: int = Field(2, ge=1)
    resume: str = "latest"
    """`latest`, `none`, or a checkpoint folder."""
    export: bool = True


class LogConfig(Section):
    every: int = Field(10, ge=1)
    wandb: Literal["off", "online", "offline"] = "off"
    wandb_project: str = "lacuna"
    peak_tflops: float | None = None
    """Device peak for MFU; default: table for known GPUs, measured bf16 matmul on CPU."""


class EvalConfig(Section):
    every: int = Field(0, ge=0)
    max_rows: int = Field(256, ge=1)


class PrepareConfig(Section):
    mode: Literal["pretrain", "sft"] = "sft"
    dataset: list[str] = []
    """Hub names or local files/globs/folders, each optionally `:weight` for a mixture."""
    subset: str | None = None
    split: str = "train"
    text_field: str = "text"
    messages_field: str = "messages"
    tokenizer: str | None = None
    """Default: model.name."""
    chat_template: Path | None = None
    seq_len: int = Field(2048, ge=2)
    num_proc: int = Field(1, ge=1)
    val_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    overlong: Literal["drop", "truncate"] = "drop"
    assistant_turns: Literal["all", "last"] = "all"
    """SFT: supervise every assistant turn, or only each conversation's last (per turn: "train": false)."""
    out: Path | None = None
    """Default: data.path."""
    overwrite: bool = False
    streaming: bool = False
    shard_index: int | None = None
    num_shards: int | None = None
    rows_per_shard: int = Field(16384, ge=1)
    pack_group_tokens: int = Field(2**23, ge=1)  # consecutive documents best-fit packed together (lacuna/writing.py)
    quiet: bool = False


class Config(Section):
    seed: int = 0
    run_dir: Path = Path("data/runs/default")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()
    prepare: PrepareConfig = PrepareConfig()


ALIASES: dict[str, str] = {
    "model-name": "model.name", "steps": "schedule.steps", "warmup-steps": "schedule.warmup_steps",
    "batch-size": "data.batch_size", "grad-accum": "data.grad_accum", "lr": "optim.lr", "run-dir": "run_dir",
    "checkpoint-every": "checkpoint.every", "log-every": "log.every", "eval-every": "eval.every",
    "resume": "checkpoint.resume", "data": "data.path", "nproc-per-node": "parallel.nproc_per_node",
    "nnodes": "parallel.nnodes", "wandb": "log.wandb", "max-restarts": "parallel.max_restarts",
    "rdzv-endpoint": "parallel.rdzv_endpoint"
}


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


SECTIONS = {name for name, field in Config.model_fields.items() if _is_section(field.annotation)}


def _field_annotation(path: list[str]) -> Any:
    """The type annotation at a dotted path, or None when the path is inside a free-form dict."""
    model: Any = Config
    for part in path:
        if not _is_section(model):
            return None
        model = model.model_fields[part].annotation
    return model


def _valid_paths(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    return [path for name, field in model.model_fields.items() for path in (
        _valid_paths(field.annotation, f"{prefix}{name}.") if _is_section(field.annotation) else [prefix + name])]


def _unknown_key_error(key: str, where: str) -> LacunaError:
    valid = _valid_paths()
    shown = [path.replace("_", "-") for path in valid] if where == "command line" else valid
    if where == "command line":
        shown += list(ALIASES) + [path.split(".")[-1] for path in shown]
    guess = difflib.get_close_matches(key, shown, n=1, cutoff=0.5)
    hint = f"did you mean '{guess[0]}'?" if guess else "run with --help to list valid keys"
    return LacunaError(f"unknown config key '{key}' in {where}: {hint}")


def _validate(data: dict[str, Any], where: str) -> Config:
    """A Config from `data`; its first problem becomes one LacunaError naming the key and where it was set."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise _unknown_key_error(key, where) from None
        raise LacunaError(f"config key '{key}' is invalid: {first['msg']} (got {first.get('input')!r}); fix the value "
                          f"({where})") from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_toml(path: Path) -> dict[str, Any]:
    """Read one TOML config file, with one-line errors for a missing file or bad syntax."""
    if not path.is_file():
        raise LacunaError(f"config file '{path}' not found: check the path after '@'")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise LacunaError(f"config file '{path}' is not valid TOML ({error}): fix the syntax") from None
    _validate(data, f"'{path}'")
    return data


def _parse_value(raw: str, annotation: Any) -> Any:
    """Strings stay strings for str/Path fields; everything else is read as a TOML value."""
    arguments = typing.get_args(annotation) if typing.get_origin(annotation) in (list, types.UnionType) else ()
    if {annotation, *arguments} & {str, Path}:
        return raw
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def _resolve_key(name: str, command: str) -> list[str]:
    if name in ALIASES:
        return ALIASES[name].split(".")
    head, _, tail = name.partition("-")
    parts = name.split(".") if "." in name else [head, tail] if head in SECTIONS and tail else [name]
    parts = [part.replace("-", "_") for part in parts]
    if command == "prepare" and parts[0] not in SECTIONS and parts[0] in PrepareConfig.model_fields:
        parts = ["prepare", *parts]
    return parts


class Arguments(NamedTuple):
    files: list[Path]  # the `@ file.toml` references, in order
    overrides: dict[str, Any]  # `--key value` pairs as a nested dict


def parse_arguments(arguments: list[str], command: str = "train") -> Arguments:
    """Split `@ file.toml` / `@file.toml` references from `--key value` overrides (a nested dict)."""
    files: list[Path] = []
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        index += 1
        if argument.startswith("@"):
            if argument == "@" and index >= len(arguments):
                raise LacunaError("'@' must be followed by a config file path, e.g. @ configs/sft.toml")
            files.append(Path(argument[1:] or arguments[index]))
            index += argument == "@"
            continue
        if not argument.startswith("--") or argument == "--":
            raise LacunaError(f"unexpected argument '{argument}': use '@ file.toml' or '--key value'")
        name, has_value, value = argument[2:].partition("=")
        path = _resolve_key(name, command)
        try:
            annotation = _field_annotation(path)
        except KeyError:
            raise _unknown_key_error(name, "command line") from None
        if not has_value:
            next_is_value = index < len(arguments) and not arguments[index].startswith(("--", "@"))
            if annotation is bool and not next_is_value:
                value = "true"
            elif not next_is_value:
                raise LacunaError(f"option '--{name}' needs a value, e.g. --{name} VALUE")
            else:
                value, index = arguments[index], index + 1
        parsed = _parse_value(value, annotation)
        target = overrides
        for part in path[:-1]:
            target = target.setdefault(part, {})
        if typing.get_origin(annotation) is list:
            target.setdefault(path[-1], []).append(parsed)
        else:
            target[path[-1]] = parsed
    return Arguments(files, overrides)


def load_config(arguments: list[str], command: str = "train") -> Config:
    """Compose TOML files and overrides into a validated Config (errors are one-line LacunaErrors)."""
    files, overrides = parse_arguments(arguments, command)
    data: dict[str, Any] = {}
    for path in files:
        data = _merge(data, load_toml(path))
    return _validate(_merge(data, overrides), "command line")  # each file was checked on its own


def to_toml(config: Config) -> str:
    """The resolved config as TOML that `@` can read back."""
    import tomli_w

    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def changed_settings(config: Config) -> str:
    """The settings that differ from the defaults (the start-up line; the full config goes to RUN_DIR/config.toml)."""
    return json.dumps(config.model_dump(mode="json", exclude_defaults=True)) if config != Config() else "all defaults"
