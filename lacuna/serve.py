"""`lacuna serve`: one model behind an OpenAI-compatible API, on the standard library's threaded HTTP server.

Routes: POST /v1/chat/completions (streaming SSE `chat.completion.chunk`s or one `chat.completion`), GET /v1/models,
GET /health. Requests are generated one at a time; each is logged as one line on stderr.
"""

import json
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lacuna.chat import LocalModel, ReplyError, load_local
from lacuna.errors import LacunaError

DEFAULT_MAX_TOKENS = 512


class RequestError(Exception):
    """A bad request: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _number(request: dict[str, Any], key: str, default: float, kind: type, low: float, high: float) -> Any:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(400, f"'{key}' must be a number in [{low}, {high}], got {value!r}")
    return kind(value)


def parse_request(body: bytes, name: str) -> dict[str, Any]:
    """Validate a chat.completions request body into generation options."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "request body is not JSON") from None
    if not isinstance(request, dict):
        raise RequestError(400, "request body must be a JSON object")
    if request.get("model") not in (None, name):
        raise RequestError(404, f"model '{request['model']}' not found: this server serves '{name}'")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(message, dict) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str) for message in messages):
        raise RequestError(400, "'messages' must be a non-empty list of {\"role\": str, \"content\": str} objects")
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    return {
        "messages": [{"role": message["role"], "content": message["content"]} for message in messages],
        "temperature": _number(request, "temperature", 1.0, float, 0, 2),
        "top_p": _number(request, "top_p", 1.0, float, 0, 1),
        "max_tokens": _number({"max_tokens": max_tokens}, "max_tokens", DEFAULT_MAX_TOKENS, int, 1, 1 << 20),
        "seed": _number(request, "seed", None, int, 0, (1 << 63) - 1),
        "stream": bool(request.get("stream", False)),
    }


class ChatHandler(BaseHTTPRequestHandler):
    local: LocalModel
    name: str

    def log_message(self, format: str, *arguments: Any) -> None:
        pass  # one line per completion instead, with its options (see _complete)

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            model = {"id": self.name, "object": "model", "owned_by": "lacuna"}
            self._send_json(200, {"object": "list", "data": [model]})
        elif self.path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(404, f"no route {self.path}: use POST /v1/chat/completions or GET /v1/models")

    def do_POST(self) -> None:
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._send_error(404, f"no route {self.path}: use POST /v1/chat/completions")
        try:
            options = parse_request(self.rfile.read(int(self.headers.get("Content-Length") or 0)), self.name)
        except RequestError as error:
            return self._send_error(error.status, str(error))
        start = time.perf_counter()
        usage: dict[str, Any] = {}
        try:
            self._complete(options, usage)
        except (BrokenPipeError, ConnectionResetError):
            usage.setdefault("finish_reason", "client gone")
        roles = ",".join(message["role"] for message in options["messages"])
        print(f"{self.client_address[0]} chat.completions messages={roles} temperature={options['temperature']} "
              f"top_p={options['top_p']} max_tokens={options['max_tokens']} stream={options['stream']} -> "
              f"{usage.get('completion_tokens', 0)} tokens ({usage.get('finish_reason')}) "
              f"in {time.perf_counter() - start:.2f}s", file=sys.stderr, flush=True)

    def _complete(self, options: dict[str, Any], usage: dict[str, Any]) -> None:
        pieces = self.local.stream(options["messages"], options["temperature"], options["top_p"],
                                   options["max_tokens"], options["seed"], usage)
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.name}
        if not options["stream"]:
            try:
                text = "".join(pieces)
            except ReplyError as error:
                return self._send_error(500, str(error))
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": usage["finish_reason"]}
            counts = {key: value for key, value in usage.items() if key != "finish_reason"}
            return self._send_json(200, {**identity, "object": "chat.completion", "choices": [choice], "usage": counts})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def send(delta: dict[str, str], finish_reason: str | None = None, **extra: Any) -> None:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            chunk = {**identity, "object": "chat.completion.chunk", "choices": [choice], **extra}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            send({"role": "assistant"})
            for piece in pieces:
                send({"content": piece})
        except ReplyError as error:
            self.wfile.write(f"data: {json.dumps({'error': {'message': str(error), 'code': 500}})}\n\n".encode())
            return
        finally:
            pieces.close()  # type: ignore[attr-defined]  # a gone client stops generation
        counts = {key: value for key, value in usage.items() if key != "finish_reason"}
        send({}, usage["finish_reason"], usage=counts)
        self.wfile.write(b"data: [DONE]\n\n")


def serve(model: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the export (or checkpoint) `model` until Ctrl-C; its id in requests is `model` as given."""
    try:
        server = ThreadingHTTPServer((host, port), ChatHandler)
    except OSError as error:
        raise LacunaError(f"cannot listen on {host}:{port} ({error.strerror}): pass another --port") from None
    local = load_local(model)
    server.RequestHandlerClass = type("Handler", (ChatHandler,), {"local": local, "name": model})
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{server.server_address[1]}/v1"
    print(f"serving {model} on {local.device} at {url}; try `lacuna chat --base-url {url}`",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
