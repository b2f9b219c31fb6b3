"""A lacuna export behind a real `transformers serve` on 127.0.0.1, driven by `lacuna chat --base-url` and `openai`.

The server is a subprocess of the test on a port it picks itself; every request has a timeout, and the server is
stopped (killed if it does not stop) when the module is done.
"""

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SCRIPT, check_conversations, greedy, saved

BIN = Path(sys.executable).parent
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process


@pytest.fixture(scope="module")
def lacuna_export(export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a DCP checkpoint, exported with `lacuna export` as a training run's export would be."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from lacuna.config import Config, to_toml

    root = tmp_path_factory.mktemp("served")
    checkpoint = root / "checkpoints" / "step-00000001"
    model = AutoModelForCausalLM.from_pretrained(export)
    dcp.save({"model": model.state_dict()}, checkpoint_id=checkpoint, no_dist=True)
    config = Config.model_validate({"model": {"name": str(export), "dtype": "float32"}, "prepare": {"mode": "sft"}})
    (checkpoint / "config.toml").write_text(to_toml(config))
    (checkpoint / "meta.json").write_text(json.dumps({"step": 1, "mode": "sft"}))
    result = subprocess.run([BIN / "lacuna", "export", checkpoint, "--out", root / "export"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    generation = json.loads((root / "export" / "generation_config.json").read_text())
    assert (generation["do_sample"], generation["temperature"], generation["top_p"]) == (True, 0.7, 0.9)
    assert generation["use_cache"] and json.loads((root / "export" / "config.json").read_text())["use_cache"]
    return root / "export"


@pytest.fixture(scope="module")
def server(lacuna_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`transformers serve EXPORT` on 127.0.0.1 (offline, CPU); yields its /v1 URL."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available() or not (BIN / "transformers").is_file():
        pytest.skip("the serve extra is not installed (pip install -e '.[serve]'), so there is no transformers serve")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen([BIN / "transformers", "serve", str(lacuna_export), "--host", "127.0.0.1",
                                    "--port", "0", "--device", "cpu"], stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            url = (re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text()) or [None, None])[1]
        assert url, f"transformers serve did not start (exit code {process.poll()}):\n{log.read_text()[-3000:]}"
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server: str):  # -> openai.OpenAI
    import openai

    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)


def test_chat_client_keeps_history_and_saves_greedy_replies(server: str, lacuna_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "chat.jsonl"
    options = ["--system", "Be brief.", "--temperature", "0", "--top-p", "0.5", "--max-tokens", "5"]
    result = subprocess.run([BIN / "chat", "--base-url", server, *options], input=SCRIPT.format(out=out),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"chatting with {lacuna_export} at {server}" in result.stdout  # the server's one model, found by itself
    check_conversations(saved(out), lacuna_export, 5)

    wrong = subprocess.run([BIN / "lacuna", "chat", "--base-url", server, "--model", "nope"],
                           input=f"hello\n/save {out}\n/exit\n", capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 0, wrong.stderr
    pinned = f"Server is pinned to '{lacuna_export}'; requested 'nope'."
    assert f"error: {server} returned HTTP 400: {pinned} (message not added; history kept)" in wrong.stdout
    assert saved(out)[-1] == []  # the failed message was not added to the history


def test_openai_client_temperature_zero_is_transformers_greedy(client, lacuna_export: Path) -> None:
    model = client.models.list().data[0].id
    assert model == str(lacuna_export)
    expected = greedy(lacuna_export, MESSAGES, 6)
    completion = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=6)
    assert completion.choices[0].message.content == expected
    assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"
    chunks = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=6, stream=True)
    pieces = [choice.delta.content for chunk in chunks for choice in chunk.choices if choice.delta.content]
    assert "".join(pieces) == expected and len(pieces) > 1  # streamed token by token


def test_sampling_follows_the_request_and_the_seed(client, lacuna_export: Path) -> None:
    model = str(lacuna_export)

    def reply(**options: float) -> str:
        completion = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, **options)
        return completion.choices[0].message.content

    first, second = reply(temperature=1.0, top_p=1.0, seed=1), reply(temperature=1.0, top_p=1.0, seed=2)
    assert first != second
    assert reply(temperature=1.0, top_p=1.0, seed=1) == first
    assert greedy(lacuna_export, MESSAGES, 8) not in (first, second)
    # a request without sampling options gets the export's generation config: the chat's defaults, sampled
    assert reply(seed=1) != reply(seed=2)
