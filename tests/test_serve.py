"""A lacuna export behind a real `transformers serve` on 127.0.0.1 (`lacuna.chat.serve`, as `lacuna chat --model`
starts it), driven by `lacuna chat --base-url` and by the `openai` client. Every request has a timeout, and the server
stops when the module is done."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import greedy
from test_chat import dcp_checkpoint, lacuna_chat, needs_serve, saved_chat

from lacuna.chat import serve

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"), needs_serve]  # dcp.save: 1 process


@pytest.fixture(scope="module")
def lacuna_export(export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a DCP checkpoint, exported by lacuna as a training run's export is."""
    from lacuna.checkpoint import export as export_checkpoint

    root = tmp_path_factory.mktemp("served")
    export_checkpoint(dcp_checkpoint(export, root), root / "export")
    generation = json.loads((root / "export" / "generation_config.json").read_text())
    assert (generation["do_sample"], generation["temperature"], generation["top_p"]) == (True, 0.7, 0.9)
    assert generation["use_cache"] and json.loads((root / "export" / "config.json").read_text())["use_cache"]
    return root / "export"


@pytest.fixture(scope="module")
def server(lacuna_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`transformers serve EXPORT` on 127.0.0.1 (CPU here), under the model name 'export'; yields its /v1 URL."""
    with serve(lacuna_export, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str):  # -> openai.OpenAI
    import openai

    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)


def test_chat_with_a_running_server_finds_its_model_and_takes_the_sampling_defaults(server: str, tmp_path: Path):
    # no !exit: the end of input ends the chat (click's "Aborted!"), which is no error
    result = lacuna_chat(["--base-url", server, "repetition_penalty=1.5"], "!save\n", tmp_path)
    assert result.returncode == 0, result.stderr
    settings = saved_chat(tmp_path)["settings"]
    assert (settings["model_id"], settings["base_url"]) == ("export", server)  # the one model the server lists
    config = {name: value for name, value in settings["config"].items() if value is not None}
    assert config == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 512,
                      "repetition_penalty": 1.5, "transformers_version": config["transformers_version"]}


def test_a_model_the_server_does_not_serve_is_a_one_line_error(server: str, tmp_path: Path) -> None:
    result = lacuna_chat(["--base-url", server, "--model", "nope"], "hello\n", tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"error: `transformers chat` at {server} failed: RuntimeError: Server is pinned to "
                             "'export'; requested 'nope'.: is `transformers serve` up there?\n")


def test_openai_client_temperature_zero_is_transformers_greedy(client, lacuna_export: Path) -> None:
    assert [model.id for model in client.models.list().data] == ["export"]
    expected = greedy(lacuna_export, MESSAGES, 6)
    completion = client.chat.completions.create(model="export", messages=MESSAGES, temperature=0, max_tokens=6)
    assert completion.choices[0].message.content == expected
    assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"
    chunks = client.chat.completions.create(model="export", messages=MESSAGES, temperature=0, max_tokens=6,
                                            stream=True)
    pieces = [choice.delta.content for chunk in chunks for choice in chunk.choices if choice.delta.content]
    assert "".join(pieces) == expected and len(pieces) > 1  # streamed token by token


def test_sampling_follows_the_request_and_the_seed(client, lacuna_export: Path) -> None:
    def reply(**options: float) -> str:
        completion = client.chat.completions.create(model="export", messages=MESSAGES, max_tokens=8, **options)
        return completion.choices[0].message.content

    first, second = reply(temperature=1.0, top_p=1.0, seed=1), reply(temperature=1.0, top_p=1.0, seed=2)
    assert first != second
    assert reply(temperature=1.0, top_p=1.0, seed=1) == first
    assert greedy(lacuna_export, MESSAGES, 8) not in (first, second)
    # a request without sampling options gets the export's generation config: the chat's defaults, sampled
    assert reply(seed=1) != reply(seed=2)
