import subprocess
import sys
from pathlib import Path

import pytest

from lacuna.config import Config, load_config, parse_arguments, to_toml
from lacuna.errors import LacunaError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_opinionated() -> None:
    config = load_config([])
    assert config.optim.betas == (0.9, 0.95)
    assert config.optim.weight_decay == 0.1
    assert config.optim.grad_clip == 1.0
    assert config.model.dtype == "auto"
    assert config.checkpoint.resume == "latest"


def test_files_compose_in_order_and_overrides_win(tmp_path: Path) -> None:
    first = write(tmp_path / "a.toml", "seed = 1\n[optim]\nlr = 0.1\nweight_decay = 0.5\n[data]\nbatch_size = 8\n")
    second = write(tmp_path / "b.toml", "[optim]\nlr = 0.2\n")
    config = load_config(["@", str(first), f"@{second}", "--optim.weight-decay", "0.01", "--batch-size=2"])
    assert config.seed == 1
    assert config.optim.lr == 0.2
    assert config.optim.weight_decay == 0.01
    assert config.data.batch_size == 2
    reversed_order = load_config(["@", str(second), "@", str(first)])
    assert reversed_order.optim.lr == 0.1


def test_short_forms_dash_forms_and_dotted_forms_agree() -> None:
    short = load_config(["--model-name", "x", "--steps", "7", "--lr", "1e-5", "--grad-accum", "3", "--run-dir", "r"])
    dotted = load_config(["--model.name", "x", "--schedule.steps", "7", "--optim.lr", "1e-5",
                          "--data.grad_accum", "3", "--run_dir", "r"])
    assert short == dotted
    assert short.schedule.steps == 7 and short.optim.lr == 1e-5 and short.run_dir == Path("r")


def test_value_types_follow_the_field() -> None:
    config = load_config(["--model-name", "123", "--model.config_overrides.hidden_size", "64",
                          "--checkpoint.export", "--model.compile", "true", "--optim.betas", "[0.8, 0.9]"])
    assert config.model.name == "123"
    assert config.model.config_overrides == {"hidden_size": 64}
    assert config.checkpoint.export is True and config.model.compile is True
    assert config.optim.betas == (0.8, 0.9)


def test_prepare_command_reads_bare_keys_from_the_prepare_table() -> None:
    config = load_config(["--seq-len", "128", "--dataset", "a.jsonl:0.7", "--dataset", "b.parquet:0.3",
                          "--overwrite", "--model-name", "tok"], command="prepare")
    assert config.prepare.seq_len == 128
    assert config.prepare.dataset == ["a.jsonl:0.7", "b.parquet:0.3"]
    assert config.prepare.overwrite is True
    assert config.model.name == "tok"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--lrr", "1"], "unknown config key 'lrr' in command line: did you mean 'lr'?"),
        (["--optim.lrr", "1"], "did you mean 'optim.lr'?"),
        (["--batch-size", "many"], "config key 'data.batch_size' is invalid"),
        (["@", "missing.toml"], "config file 'missing.toml' not found"),
        (["--steps"], "option '--steps' needs a value"),
        (["stray"], "unexpected argument 'stray'"),
        (["@"], "'@' must be followed by a config file path"),
        (["--lr", "-1"], "config key 'optim.lr' is invalid: Input should be greater than 0 (got -1)"),
        (["--optim.betas", "[0.9, 1.5]"], "config key 'optim.betas.1' is invalid: Input should be less than 1"),
        (["--warmup-steps", "-3"], "config key 'schedule.warmup_steps' is invalid"),
        (["--schedule.min-lr-ratio", "2"], "config key 'schedule.min_lr_ratio' is invalid"),
        (["--grad-accum", "0"], "config key 'data.grad_accum' is invalid"),
        (["--parallel.replicate", "0"], "config key 'parallel.replicate' is invalid"),
    ],
)
def test_bad_input_is_one_clear_line(arguments: list[str], message: str) -> None:
    with pytest.raises(LacunaError) as error:
        load_config(arguments)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_toml_files(tmp_path: Path) -> None:
    broken = write(tmp_path / "broken.toml", "[optim\nlr = 1\n")
    with pytest.raises(LacunaError, match="is not valid TOML"):
        load_config(["@", str(broken)])
    unknown = write(tmp_path / "unknown.toml", "[optim]\nweight_decy = 1\n")
    with pytest.raises(LacunaError, match="unknown config key 'optim.weight_decy'.*did you mean 'optim.weight_decay'"):
        load_config(["@", str(unknown)])
    not_a_table = write(tmp_path / "flat.toml", "optim = 3\n")
    with pytest.raises(LacunaError, match="'optim' is invalid: .*valid dictionary.*flat.toml'"):
        load_config(["@", str(not_a_table)])


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = load_config(["--lr", "0.5", "--model.config_overrides.num_hidden_layers", "2", "--seq-len", "64"],
                         command="prepare")
    saved = write(tmp_path / "resolved.toml", to_toml(config))
    assert load_config(["@", str(saved)]) == config


@pytest.mark.parametrize("name", ["pretrain", "sft"])
def test_shipped_configs_are_valid(name: str) -> None:
    config = load_config(["@", str(REPO / "configs" / f"{name}.toml")])
    assert isinstance(config, Config)
    assert config.prepare.mode == name


def test_parse_arguments_keeps_file_order() -> None:
    files, overrides = parse_arguments(["@a.toml", "@", "b.toml", "--lr", "1"])
    assert files == [Path("a.toml"), Path("b.toml")]
    assert overrides == {"optim": {"lr": 1}}


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from lacuna.cli import main; main()", *arguments],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_cli_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ["prepare", "train", "pretrain", "sft", "inspect", "export", "chat", "count-lines"]:
        assert command in result.stdout


def test_cli_config_error_is_one_line_without_traceback_unless_debug() -> None:
    result = run_cli("prepare", "sft", "--seqlen", "4")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'seqlen' in command line: did you mean 'seq-len'?"
    debugged = run_cli("prepare", "sft", "--seqlen", "4", "--debug")
    assert debugged.returncode != 0 and "Traceback" in debugged.stderr


def test_count_lines_is_under_budget() -> None:
    result = run_cli("count-lines")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[0]) < 3000


def test_start_up_line_shows_only_what_differs_from_the_defaults() -> None:
    from lacuna.config import changed_settings

    assert changed_settings(load_config([])) == "all defaults"
    line = changed_settings(load_config(["--lr", "0.001", "--model.config-overrides.num-hidden-layers", "2"]))
    assert line == '{"model": {"config_overrides": {"num_hidden_layers": 2}}, "optim": {"lr": 0.001}}'
