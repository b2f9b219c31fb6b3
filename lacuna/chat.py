"""`lacuna chat`: `transformers chat` in the terminal, with a model that `transformers serve` serves meanwhile."""

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from lacuna.config import TEMPERATURE, TOP_P
from lacuna.errors import LacunaError, first_line

TRANSFORMERS = [sys.executable, "-m", "transformers.cli.transformers"]
WHERE_TO_FIND = "pass an HF export folder (RUN_DIR/export) or a DCP checkpoint (RUN_DIR/checkpoints/step-N)"


def first_model(base_url: str) -> str:
    """The first model that an OpenAI-compatible server lists."""
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/models", timeout=30) as response:
            return json.load(response)["data"][0]["id"]
    except (OSError, ValueError, LookupError) as error:
        raise LacunaError(f"{base_url}/models: {first_line(error)}: is the server up? or pass --model") from None


@contextlib.contextmanager
def serve(model: Path, log: Path) -> Iterator[str]:
    """`transformers serve` for a model folder on a free 127.0.0.1 port: its /v1 URL; stopped at the end, however."""
    with log.open("w") as output:  # its own session: Ctrl-C in the terminal ends the chat, then this stops the server
        # served under the folder's name, which `transformers chat` saves conversations under (./chat_history/NAME)
        server = subprocess.Popen([*TRANSFORMERS, "serve", model.name, "--host", "127.0.0.1", "--port", "0"],
                                  cwd=model.parent, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a large model loads before the server listens
        while not (url := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())):
            if server.poll() is not None or time.monotonic() > deadline:
                text = log.read_text()  # its error line, else its last line
                last = (re.findall(r"(?m)^[\w.]+(?:Error|Exception): .*", text) or text.splitlines() or [""])[-1]
                raise LacunaError(f"`transformers serve` did not start for '{model}': {last[:300]}: {WHERE_TO_FIND}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(0.5)  # returns at once if the server exits
        yield f"{url[1]}/v1"
    finally:
        server.terminate()  # the server stops its model's process
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(30)
        server.kill()  # nothing if it has stopped
        server.wait()


def chat(model: str | None = None, base_url: str | None = None, system: str | None = None,
         temperature: float = TEMPERATURE, top_p: float = TOP_P, max_tokens: int = 512,
         flags: list[str] | None = None) -> None:
    """`transformers chat` with a model folder (served meanwhile) or the server at `base_url`; `flags`: NAME=VALUE."""
    if temperature < 0 or not 0 < top_p <= 1 or max_tokens < 1:
        raise LacunaError(f"--temperature {temperature} --top-p {top_p} --max-tokens {max_tokens} out of range: "
                          "use temperature >= 0 (0 is greedy), 0 < top-p <= 1, max-tokens >= 1")
    sampling = [f"temperature={temperature}", f"top_p={top_p}"] if temperature > 0 else ["do_sample=False"]
    with tempfile.TemporaryDirectory(prefix="lacuna-chat-") as directory, contextlib.ExitStack() as cleanup:
        if not base_url:
            if not (model and Path(model).is_dir()):
                raise LacunaError(f"model folder {model!r} not found: {WHERE_TO_FIND} as --model, or the --base-url "
                                  "of a running server; `make sft` writes data/runs/sft/export")
            path = Path(model).resolve()
            if (path / ".metadata").is_file():
                from lacuna.checkpoint import export

                export(path, Path(directory) / path.name)
                path = Path(directory) / path.name
            model, base_url = path.name, cleanup.enter_context(serve(path, Path(directory) / "server.log"))
        # HF_HUB_OFFLINE=0: huggingface_hub's offline mode refuses even loopback URLs (the chat reaches base_url only)
        result = subprocess.run([*TRANSFORMERS, "chat", model or first_model(base_url), base_url, *sampling,
                                 f"max_new_tokens={max_tokens}", *(flags or []),
                                 *(["--system-prompt", system] if system else [])], text=True, stderr=subprocess.PIPE,
                                env=dict(os.environ, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_UPDATE_CHECK="1"))
    # "Aborted!": click's word for the end of input (Ctrl-D), the user's way out
    if result.returncode and (last := (result.stderr.strip().splitlines() or [""])[-1]) != "Aborted!":
        raise LacunaError(f"`transformers chat` at {base_url} failed: {last[:300]}: is `transformers serve` up there?")
