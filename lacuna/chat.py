"""Talk to a model in the terminal (`lacuna chat`): locally with plain transformers (`generate` in a thread feeding a
`TextIteratorStreamer`), or streamed by the `openai` client from a server (`transformers serve DIR`, vLLM, SGLang)."""

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lacuna.config import TEMPERATURE, TOP_P
from lacuna.errors import LacunaError, first_line
from lacuna.files import write_atomically

Message = dict[str, str]
COMMANDS = "/reset  /system TEXT  /save FILE  /exit"
WHERE_TO_FIND = "pass an HF export folder (RUN_DIR/export) or a DCP checkpoint (RUN_DIR/checkpoints/step-N)"


class ReplyError(LacunaError):
    """A reply that failed (server unreachable, HTTP error, generation error): one line, and the chat goes on."""


class LocalModel:
    """An HF causal LM loaded with plain transformers, float32 on CPU, bfloat16 on GPU."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging

        from lacuna.chat_templates import load_template

        logging.disable_progress_bar()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # bfloat16 generation on CPU is several times slower than float32 (measured 1.4 vs 10.6 tokens/s).
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise LacunaError(f"no usable tokenizer in '{path}' ({first_line(error)}): {WHERE_TO_FIND}") from None
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        except (OSError, ValueError) as error:
            raise LacunaError(f"'{path}' is not a loadable causal LM ({first_line(error)}): {WHERE_TO_FIND}") from None
        if not self.tokenizer.chat_template:
            self.tokenizer.chat_template = load_template(None, self.tokenizer)
        eos = self.model.generation_config.eos_token_id
        self.eos = {*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id} - {None}

    def stream(self, messages: list[Message], temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
        """Yield the reply's text as it is generated; closing the generator stops generation after one token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = threading.Event()

        class StopOnEvent(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        try:
            inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                        return_dict=True).to(self.device)
        except Exception as error:  # templates raise on conversations they do not support (roles, order)
            raise ReplyError(f"the chat template rejected the conversation: {first_line(error)}") from None
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        errors: list[Exception] = []

        def generate() -> None:
            try:
                self.model.generate(**inputs, streamer=streamer, max_new_tokens=max_tokens,
                                    eos_token_id=sorted(self.eos), pad_token_id=min(self.eos),
                                    stopping_criteria=StoppingCriteriaList([StopOnEvent()]), **sampling)
            except Exception as error:  # surfaced to the caller below; the streamer must still end
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()
            thread.join()
        if errors:
            raise ReplyError(f"generation failed: {first_line(errors[0])}")


def load_local(model: str) -> LocalModel:
    """Load an HF export folder, or export a DCP checkpoint to a temporary folder and load that."""
    path = Path(model)
    if not path.is_dir():
        raise LacunaError(f"model folder '{path}' not found: {WHERE_TO_FIND}; `make sft` writes data/runs/sft/export")
    if (path / ".metadata").is_file():
        from lacuna.checkpoint import export

        with tempfile.TemporaryDirectory(prefix="lacuna-chat-") as directory:
            export(path, Path(directory) / "export")
            return LocalModel(Path(directory) / "export")
    if not (path / "config.json").is_file():
        raise LacunaError(f"'{path}' has no config.json, so it is not an HF model folder: {WHERE_TO_FIND}")
    return LocalModel(path)


def _error_message(body: Any) -> str:
    """The message of an OpenAI- or FastAPI-style error body, on one line."""
    if isinstance(body, dict):
        error = body.get("error") or body.get("detail") or body.get("message") or body
        body = error.get("message", error) if isinstance(error, dict) else error
    return " ".join(str(body).split())[:300]


class RemoteModel:
    """A model behind an OpenAI-compatible `/v1/chat/completions` endpoint, through the `openai` client."""

    def __init__(self, base_url: str, name: str | None, api_key: str | None) -> None:
        import openai

        self.base_url = base_url.rstrip("/")
        # the client requires a key; local servers ignore it
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "none", max_retries=0,
                                    timeout=openai.Timeout(600, connect=10))
        self.name = name or self._first_model()

    def _first_model(self) -> str:
        with self._errors():
            models = [model.id for model in self.client.models.list()]
        if not models:
            raise LacunaError(f"{self.base_url}/models lists no models: pass --model NAME")
        return models[0]

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The client's exceptions as one-line ReplyErrors."""
        import openai

        try:
            yield
        except openai.APIStatusError as error:
            hint = ": pass --api-key or set OPENAI_API_KEY" if error.status_code in (401, 403) else ""
            raise ReplyError(f"{self.base_url} returned HTTP {error.status_code}: {_error_message(error.body)}{hint}"
                             ) from None
        except openai.APITimeoutError:
            raise ReplyError(f"{self.base_url} did not answer within 600 s: check the server's log") from None
        except openai.APIConnectionError:
            raise ReplyError(f"cannot reach {self.base_url}: is the server running? (`transformers serve DIR`)"
                             ) from None
        except openai.APIError as error:  # an error event in the middle of a stream
            raise ReplyError(f"{self.base_url} failed mid-reply: {_error_message(error.body or error.message)}"
                             ) from None

    def stream(self, messages: list[Message], temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
        """Yield the reply's text from the server's stream; closing the generator drops the connection."""
        with self._errors():
            with self.client.chat.completions.create(model=self.name, messages=messages, stream=True,  # type: ignore
                                                     temperature=temperature, top_p=top_p, max_tokens=max_tokens
                                                     ) as chunks:
                for chunk in chunks:
                    for choice in chunk.choices:
                        yield choice.delta.content or ""


def save_conversation(path: Path, messages: list[Message]) -> None:
    """Append the conversation to a jsonl file as one `{"messages": [...]}` line, the format `lacuna prepare` reads."""
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    write_atomically(path, existing + json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def _show_reply(console: Any, pieces: Iterator[str]) -> str:
    """Stream a reply to the terminal (live markdown) or to a pipe (plain text); Ctrl-C stops it."""
    from rich.live import Live
    from rich.markdown import Markdown

    text = ""
    try:
        if console.is_terminal:
            with Live(Markdown(""), console=console, refresh_per_second=12, vertical_overflow="visible") as live:
                for piece in pieces:
                    text += piece
                    live.update(Markdown(text))
        else:
            for piece in pieces:
                text += piece
                print(piece, end="", flush=True)
            print()
    except KeyboardInterrupt:
        pieces.close()  # type: ignore[attr-defined]
        console.print("[dim](reply stopped)[/]")
    return text


def _run_command(line: str, messages: list[Message], console: Any) -> bool:
    """Handle one /command; False means leave the chat."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        messages[:] = [message for message in messages[:1] if message["role"] == "system"]
        console.print("[dim](history cleared)[/]")
    elif command == "/system":
        messages[:] = [message for message in messages if message["role"] != "system"]
        messages[:0] = [{"role": "system", "content": argument}] if argument else []
        console.print(f"[dim](system prompt {'set' if argument else 'removed'})[/]")
    elif command == "/save" and argument:
        try:
            save_conversation(Path(argument), messages)
            console.print(f"[dim](saved {len(messages)} messages to {argument})[/]")
        except OSError as error:
            console.print(f"[red]error:[/] cannot write {argument}: {error.strerror}")
    else:
        console.print(f"[red]error:[/] unknown command or missing argument in {line!r}: use {COMMANDS}")
    return True


def chat(model: str | None = None, base_url: str | None = None, api_key: str | None = None, system: str | None = None,
         temperature: float = TEMPERATURE, top_p: float = TOP_P, max_tokens: int = 512) -> None:
    """Multi-turn terminal chat with a local export/checkpoint (`model`) or an OpenAI-compatible `base_url`."""
    from rich.console import Console

    console = Console(highlight=False)
    console.soft_wrap = not console.is_terminal  # piped output: one line per message, no hard wraps
    backend: LocalModel | RemoteModel
    if base_url:
        backend = RemoteModel(base_url, model, api_key or os.environ.get("OPENAI_API_KEY"))
        where = f"{backend.name} at {backend.base_url}"
    elif model:
        backend = load_local(model)
        where = f"{model} on {backend.device}"
    else:
        raise LacunaError("nothing to chat with: pass --model DIR (an export or checkpoint) or --base-url URL")
    console.print(f"[bold]chatting with {where}[/]  [dim]{COMMANDS}  (Ctrl-C stops a reply)[/]")
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = console.input("[bold green]you>[/] ").strip()
        except EOFError:
            console.print()
            break
        except KeyboardInterrupt:
            console.print("\n[dim](/exit or Ctrl-D quits)[/]")
            continue
        if line.startswith("/"):
            if not _run_command(line, messages, console):
                break
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = _show_reply(console, backend.stream(messages, temperature, top_p, max_tokens))
        except ReplyError as error:
            messages.pop()
            console.print(f"[red]error:[/] {error} (message not added; history kept)")
            continue
        messages.append({"role": "assistant", "content": reply})
