"""An HTTP server speaking OpenAI's completions and chat-completions API over one CodeLlama: the standard library's
threading HTTP server, one thread per connection; concurrent requests decode in the same steps (batching.py).

    codellama-ext serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--max-batch-size 8] ...

    POST /v1/completions       {"prompt": str or [str], "suffix": str, "max_tokens": 16, "temperature": 1,
                                "top_p": 1, "stop": str or [str], "seed": int, "stream": false, ...}
    POST /v1/chat/completions  {"messages": [{"role": ..., "content": str}], "max_tokens": null, ...}
    GET  /v1/models, GET /health

Completions: with "suffix", or a prompt holding <FILL_ME>, the text is infilled and the choice's text is the middle;
otherwise the prompt is continued. Defaults are OpenAI's (temperature 1, top_p 1, completions max_tokens 16; chat
runs to EOS or the end of the window). Extensions: "top_k", "repetition_penalty", "prompt_lookup" (as in
SamplingParams). "n" choices of a prompt are n rows of the batch: with a seed each draws its own numbers
(reproducibly), greedy ones are equal; choice i * n + j is prompt i's j-th. What OpenAI has and this server does not
(best_of other than 1, logprobs, echo, penalties other than 0, logit_bias, token-id prompts) is a 400 error, not
silently ignored; unknown fields are ignored, as clients send extras such as "user". Streams are server-sent events
("data: {chunk}", then "data: [DONE]"); a client that goes away ends its rows. Errors have OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import sys
import time
import uuid
from typing import Callable, Iterator

from .api import CodeLlama
from .generation import SamplingParams

__all__ = ["make_server"]

# OpenAI's fields this server does not implement -> the values that ask for nothing beyond what it does
_UNSUPPORTED = {"best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,),
                "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},)}
_MAX_BODY = 16 << 20
_MAX_N = 128  # OpenAI's limit on choices per prompt


class _BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _field(body: dict, name: str, kinds: tuple, default, check: Callable = lambda v: True, rule: str = ""):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds) or not check(v):
        raise _BadRequest(f"{name} must be {rule}, got {v!r}", name)
    return v


def _sampling(body: dict, max_tokens: int) -> SamplingParams:
    for name, served in _UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in served:
            raise _BadRequest(f"{name}={body[name]!r} is not supported by this server (only {served[0]!r})", name)
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = _field(body, "stop", (str, list), (), lambda v: isinstance(v, str) or all(isinstance(s, str) for s in v),
                  "a string or a list of strings")
    sp = dict(max_new_tokens=_field(body, limit, (int,), max_tokens, lambda v: v >= 1, "an integer >= 1"),
              temperature=_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v < float("inf"),
                                 "a number >= 0"),
              top_p=_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
              top_k=_field(body, "top_k", (int,), 0, lambda v: v >= 0, "an integer >= 0"),
              repetition_penalty=_field(body, "repetition_penalty", (int, float), 1.0, lambda v: v > 0,
                                        "a number > 0"),
              seed=_field(body, "seed", (int,), None, rule="an integer"),
              prompt_lookup=_field(body, "prompt_lookup", (int,), 0, lambda v: v >= 0, "an integer >= 0"),
              stop=[s for s in ([stop] if isinstance(stop, str) else stop) if s])  # OpenAI ignores empty stops
    try:
        return SamplingParams(**sp)
    except ValueError as e:  # rules between fields (prompt_lookup needs greedy) or ranges (a huge seed)
        raise _BadRequest(str(e)) from None


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "codellama-ext"
    llm: CodeLlama
    model_name: str

    # ---- routes ----
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                         "owned_by": "codellama-ext"}]})
        else:
            self._error(404, f"no route GET {self.path}", "not_found_error")

    def do_POST(self) -> None:  # noqa: N802
        route = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat}.get(self.path)
        if route is None:
            self._error(404, f"no route POST {self.path}", "not_found_error")
            return
        try:
            route(self._body())
        except _BadRequest as e:
            self._error(400, str(e), param=e.param)
        except (ValueError, TypeError) as e:  # the API's own checks: prompt too long, bad messages, ...
            self._error(400, " ".join(str(e).split()))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its rows were ended when the stream closed
        except Exception as e:  # noqa: BLE001: one failed request must not take the server down
            self.log_error("%s", f"{type(e).__name__}: {e}")
            self._error(500, f"{type(e).__name__}: {e}", "server_error")

    # ---- the two APIs ----
    def _completions(self, body: dict) -> None:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise _BadRequest("prompt must be a string or a non-empty list of strings (token-id prompts are not "
                              "supported)", "prompt")
        suffix = _field(body, "suffix", (str,), None, rule="a string")
        sp = _sampling(body, 16)
        fill = self.llm.tokenizer.fill_token or "<FILL_ME>"
        mode = "infill" if suffix is not None or any(fill in p for p in prompts) else "complete"
        ids = [self.llm._ids(mode, p, suffix) for p in prompts]

        def choice(i: int, text: str, finish: str | None) -> dict:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        self._answer(body, ids, mode, sp, "cmpl", "text_completion", choice)

    def _chat(self, body: dict) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise _BadRequest("messages must be a non-empty list of {role, content} with string content", "messages")
        sp = _sampling(body, self.llm.model.max_seq_len)  # no max_tokens: until EOS or the end of the window
        ids = [self.llm._ids("chat", [{"role": m.get("role"), "content": m["content"]} for m in messages])]

        def choice(i: int, text: str, finish: str | None, first: bool = False) -> dict:
            if self._streaming:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {"index": i, "delta": delta, "finish_reason": finish}
            return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        self._answer(body, ids, "chat", sp, "chatcmpl", "chat.completion", choice)

    def _answer(self, body: dict, prompts: list[list[int]], mode: str, sp: SamplingParams, prefix: str, kind: str,
                choice: Callable) -> None:
        self.llm.engine.check_prompts(prompts)  # a prompt too long for the window: 400 before the stream starts
        n = _field(body, "n", (int,), 1, lambda v: 1 <= v <= _MAX_N, f"an integer in [1, {_MAX_N}]")
        ids = [p for p in prompts for _ in range(n)]
        self._streaming = _field(body, "stream", (bool,), False, rule="a boolean")
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name}
        outcomes: list = []
        with contextlib.closing(self.llm._events(ids, mode, sp, outcomes=outcomes)) as events:
            if self._streaming:
                self._stream(head, kind + (".chunk" if mode == "chat" else ""), len(ids), events, outcomes, choice)
                return
            texts = [""] * len(ids)
            for row, delta in events:
                texts[row] += delta
        used = sum(k for _, k in outcomes)
        read = sum(map(len, prompts))  # as OpenAI counts: once per prompt, whatever n
        self._json(200, {**head, "choices": [choice(i, t, f) for i, (t, (f, _)) in enumerate(zip(texts, outcomes))],
                         "usage": {"prompt_tokens": read, "completion_tokens": used, "total_tokens": read + used}})

    def _stream(self, head: dict, kind: str, rows: int, events: Iterator, outcomes: list, choice: Callable) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        chat = kind.startswith("chat")

        def send(payload) -> None:
            self.wfile.write(b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
                             + b"\n\n")
            self.wfile.flush()
        if chat:  # each choice's first chunk names the role
            for row in range(rows):
                send({**head, "object": kind, "choices": [choice(row, "", None, first=True)]})
        try:
            for row, delta in events:
                if delta:
                    send({**head, "object": kind, "choices": [choice(row, delta, None)]})
        except (ValueError, RuntimeError) as e:  # the headers are sent: the error goes in the stream
            send({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
            return
        for row, (finish, _) in enumerate(outcomes):
            send({**head, "object": kind, "choices": [choice(row, "", finish)]})
        send(b"[DONE]")

    # ---- plumbing ----
    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _BadRequest("a JSON body with a Content-Length header is required") from None
        if not 0 <= n <= _MAX_BODY:
            raise _BadRequest(f"the body must be at most {_MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(n))
        except ValueError as e:
            raise _BadRequest(f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise _BadRequest("the body must be a JSON object")
        return body

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def log_message(self, fmt: str, *args) -> None:
        if self.server.log:
            sys.stderr.write(f"{self.address_string()} - {fmt % args}\n")


def make_server(llm: CodeLlama, host: str = "127.0.0.1", port: int = 8000, model_name: str = "codellama",
                log: bool = True) -> http.server.ThreadingHTTPServer:
    """The server, bound (port 0: any free port; server.server_address says which); call serve_forever()."""
    handler = type("Handler", (_Handler,), {"llm": llm, "model_name": model_name})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True  # a client holding a connection open must not keep the process alive
    server.log = log
    return server
