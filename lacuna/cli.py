"""The `lacuna` command. Heavy imports (torch, transformers) happen inside commands so `--help` is instant."""

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from lacuna.config import TEMPERATURE, TOP_P
from lacuna.errors import LacunaError, run_main

app = typer.Typer(
    help="lacuna: prepare datasets into packed shards, train HF causal LMs under FSDP2, chat with the result. "
    "Add --debug to any command to see the full traceback of an error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
CONFIG_EPILOG = "Config: `@ file.toml` (several allowed, later wins), then `--section.key value` overrides."


@app.command(context_settings=PASS_THROUGH, epilog=CONFIG_EPILOG)
def prepare(context: typer.Context, mode: Annotated[str, typer.Argument(help="pretrain or sft")]) -> None:
    """Tokenize a dataset, build loss masks, best-fit pack into rows and write memory-mapped shards.

    Options: --dataset NAME_OR_PATH[:WEIGHT] (repeatable), --out DIR, --tokenizer, --chat-template,
    --seq-len, --text-field, --messages-field, --val-fraction, --num-proc, --overlong drop|truncate,
    --overwrite, --streaming, --quiet.
    """
    from lacuna.prepare import main

    main([mode, *context.args])


@app.command(context_settings=PASS_THROUGH, epilog=CONFIG_EPILOG)
def train(context: typer.Context) -> None:
    """Launch training under torchrun with the right process count and OMP_NUM_THREADS.

    Options: --data DIR, --model-name, --steps, --batch-size, --grad-accum, --lr, --seed, --run-dir,
    --checkpoint-every, --log-every, --eval-every, --resume PATH|latest|none, --nproc-per-node, --nnodes,
    --parallel.replicate N (HSDP: N replicas, each sharded over world/N ranks), --model.dtype auto|bfloat16|float32.
    """
    from lacuna.launch import launch

    launch(context.args)


def _recipe(name: str, arguments: list[str]) -> None:
    """Prepare the data folder when missing or stale, then train: with the user's `@ file.toml`s, else configs/NAME."""
    from lacuna.config import load_config, parse_arguments
    from lacuna.launch import launch
    from lacuna.prepare import main as prepare_main
    from lacuna.prepare import recorded_settings
    from lacuna.shards import FORMAT_VERSION

    files = [part for path in parse_arguments(arguments).files for part in ("@", str(path))]
    if not files:  # the embedded default: its config and the offline assets it names (pipelines/assets.py)
        config_file = Path("configs") / f"{name}.toml"
        if not config_file.is_file():
            raise LacunaError(f"'{config_file}' not found: run `lacuna {name}` from the lacuna repository root or "
                              "pass your own config with `@ file.toml`")
        if not Path("data/models").is_dir():
            raise LacunaError(f"the offline assets are not in data/: run `make {name}` or `python pipelines/assets.py`")
        files, arguments = ["@", str(config_file)], ["@", str(config_file), *arguments]
    config = load_config(arguments)
    if config.prepare.mode != name:
        raise LacunaError(f"the config sets prepare.mode = '{config.prepare.mode}', so it is not a {name} config: "
                          f"run `{config.prepare.mode}` with it, or set [prepare] mode = '{name}'")
    manifest_path = config.data.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is not None and manifest.get("mode", name) != name:
        raise LacunaError(f"'{config.data.path}' holds {manifest['mode']} data, not {name} data: pass a folder "
                          f"prepared with `lacuna prepare {name}` as --data, or run `lacuna {manifest['mode']}`")
    own = load_config(files).data.path == config.data.path  # never replace a user's --data
    stale = own and manifest is not None and (manifest.get("version") != FORMAT_VERSION
                                              or manifest.get("config") != recorded_settings(config))
    if stale:  # the recipe's own folder, made by an older lacuna or with other [prepare] settings
        print(f"lacuna: {config.data.path} was prepared differently; preparing it again", file=sys.stderr)
    if manifest is None or stale:
        prepare_main([config.prepare.mode, *arguments, *(["--overwrite"] if stale else [])])
    launch(arguments)


@app.command(context_settings=PASS_THROUGH, epilog=CONFIG_EPILOG)
def pretrain(context: typer.Context) -> None:
    """Prepare the data if needed and pretrain: `@ configs/pretrain_qwen.toml`, say, else configs/pretrain.toml."""
    _recipe("pretrain", context.args)


@app.command(context_settings=PASS_THROUGH, epilog=CONFIG_EPILOG)
def sft(context: typer.Context) -> None:
    """Prepare the data if needed and fine-tune: `@ configs/sft_qwen.toml`, say, else the embedded configs/sft.toml."""
    _recipe("sft", context.args)


@app.command()
def inspect(
    directory: Annotated[Path, typer.Argument(help="A prepared data folder (with manifest.json).")],
    row: Annotated[int | None, typer.Option(help="Decode this row with boundaries and supervision shown.")] = None,
    split: Annotated[str, typer.Option(help="train or val.")] = "train",
    json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Recheck the sha256 of every shard file.")] = False,
) -> None:
    """Show a prepared data folder: manifest stats, length histogram, a decoded row."""
    from lacuna.inspection import inspect as inspect_folder

    inspect_folder(directory, row=row, split=split, as_json=json, verify=verify)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A DCP checkpoint folder (RUN_DIR/checkpoints/step-N).")],
    out: Annotated[Path, typer.Option(help="Output folder for the HF model.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out even if lacuna did not export it.")
                         ] = False,
) -> None:
    """Export a DCP checkpoint as an HF folder (weights, config, tokenizer, chat template), replaced atomically."""
    from lacuna.checkpoint import export as export_checkpoint

    export_checkpoint(checkpoint, out, overwrite=overwrite)


@app.command()
def chat(
    flags: Annotated[list[str] | None, typer.Argument(
        help="More `generate` flags, as `transformers chat` takes them: repetition_penalty=1.1 ...")] = None,
    model: Annotated[str | None, typer.Option(help="HF export folder or DCP checkpoint, served for the chat; with "
                                              "--base-url, the server's model (default: the first it lists).")] = None,
    base_url: Annotated[str | None, typer.Option(help="A running `transformers serve`: http://host:8000/v1")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = TEMPERATURE,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = TOP_P,
    max_tokens: Annotated[int, typer.Option(help="Maximum new tokens per reply.")] = 512,
) -> None:
    """Chat in the terminal with `transformers chat`: !help lists its commands (!clear, !set, !save, !exit)."""
    from lacuna.chat import chat as run_chat

    run_chat(model=model, base_url=base_url, system=system, temperature=temperature, top_p=top_p,
             max_tokens=max_tokens, flags=flags)


@app.command("count-lines")
def count_lines() -> None:
    """Print the package's code line count: non-blank, non-comment lines (budget: 3,000)."""
    count = sum(1 for path in Path(__file__).parent.rglob("*.py") for line in path.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#"))
    print(f"{count} lines of code in lacuna/ (budget 3000)")
    if count >= 3000:
        raise LacunaError(f"package has {count} lines, over the 3,000 budget: simplify before adding more")


def main() -> None:
    """The `lacuna` console script."""
    run_main(lambda arguments: app(args=arguments, standalone_mode=True), sys.argv[1:])


def _script(name: str) -> Callable[[], None]:
    """A console script that runs the `lacuna NAME` subcommand itself: `pretrain ARGS` is `lacuna pretrain ARGS`."""
    def script() -> None:
        command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
        prog_name = Path(sys.argv[0]).name
        run_main(lambda arguments: command.main(args=arguments, prog_name=prog_name, standalone_mode=True),
                 sys.argv[1:])

    return script


pretrain_main, sft_main, chat_main, count_lines_main = map(_script, ["pretrain", "sft", "chat", "count-lines"])
