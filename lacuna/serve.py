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

from pydantic import BaseModel, Field, ValidationError

from lacuna.chat import LocalModel, ReplyError, load_local
from lacuna.errors import LacunaError

DEFAULT_MAX_TOKENS = 512


class RequestError(Exception):
    """A bad request: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    """The chat.completions fields this server honours (others are ignored); ranges follow the OpenAI API."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stream: bool = False


def parse_request(body: bytes, name: str) -> ChatRequest:
    """Validate a chat.completions request body."""
    try:
        request = ChatRequest.model_validate_json(body, strict=True)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "request body"
        raise RequestError(400, f"'{where}': {first['msg']}") from None
    if request.model not in (None, name):
        raise RequestError(404, f"model '{request.model}' not found: this server serves '{name}'")
    request.max_tokens = request.max_completion_tokens or request.max_tokens
    return request


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
            request = parse_request(self.rfile.read(int(self.headers.get("Content-Length") or 0)), self.name)
        except RequestError as error:
            return self._send_error(error.status, str(error))
        start = time.perf_counter()
        usage: dict[str, Any] = {}
        try:
            self._complete(request, usage)
        except (BrokenPipeError, ConnectionResetError):
            usage.setdefault("finish_reason", "client gone")
        roles = ",".join(message.role for message in request.messages)
        print(f"{self.client_address[0]} chat.completions messages={roles} temperature={request.temperature} "
              f"top_p={request.top_p} max_tokens={request.max_tokens} stream={request.stream} -> "
              f"{usage.get('completion_tokens', 0)} tokens ({usage.get('finish_reason')}) "
              f"in {time.perf_counter() - start:.2f}s", file=sys.stderr, flush=True)

    def _complete(self, request: ChatRequest, usage: dict[str, Any]) -> None:
        pieces = self.local.stream([message.model_dump() for message in request.messages], request.temperature,
                                   request.top_p, request.max_tokens, request.seed, usage)
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.name}
        if not request.stream:
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
