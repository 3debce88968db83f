"""An HTTP server speaking OpenAI's completions and chat-completions API over one CodeLlama: the standard library's
threading HTTP server, one thread per connection; concurrent requests decode in the same steps (batching.py).

    codellama-ext serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--max-batch-size 8] ...

    POST /v1/completions       {"prompt": str or [str], "suffix": str, "max_tokens": 16, "temperature": 1,
                                "top_p": 1, "stop": str or [str], "seed": int, "stream": false, ...}
    POST /v1/chat/completions  {"messages": [{"role": ..., "content": str}], "max_tokens": null, ...}
    GET  /v1/models, GET /health

Completions: with "suffix", or a prompt holding <FILL_ME>, the text is infilled and the choice's text is the middle;
otherwise the prompt is continued. Defaults are OpenAI's (temperature 1, top_p 1, completions max_tokens 16; chat
runs to EOS or the end of the window); "presence_penalty", "frequency_penalty" and "logit_bias" are OpenAI's.
Extensions: "top_k", "repetition_penalty", "prompt_lookup" (as in SamplingParams). "n" choices of a prompt are n
rows of the batch (the prompt prefilled once, its keys and values copied): with a seed each draws its own numbers
(reproducibly), greedy ones are equal; choice i * n + j is prompt i's j-th. "logprobs" (completions: 0-5
alternatives, plus the sampled token as OpenAI's; chat: true, with "top_logprobs" 0-20) gives each token of the text
its log-probability under the raw logits; a token that is part of a multi-byte character is written "bytes:\\xNN",
and completions' text_offset counts characters of the choice's text; streamed, each token comes in a chunk of its
own once where its text starts is final. What OpenAI has and this server does not (best_of other than 1, echo,
token-id prompts) is a 400 error, not silently ignored; unknown fields are ignored, as clients send extras such as
"user". Streams are server-sent events ("data: {chunk}", then "data: [DONE]"); a client that goes away ends its
rows.
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import sys
import time
import uuid
from typing import Callable, Iterator

from .api import CodeLlama, Scored
from .generation import SamplingParams, check_logit_bias
from .tokenizer import CodeLlamaTokenizer

__all__ = ["make_server"]

# OpenAI's fields this server does not implement -> the values that ask for nothing beyond what it does
_UNSUPPORTED = {"best_of": (1,), "echo": (False,)}
_MAX_BODY = 16 << 20
_MAX_N = 128  # OpenAI's limit on choices per prompt
_MAX_TOP = {"completions": 5, "chat": 20}  # OpenAI's limits on logprobs alternatives


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
    bias = _field(body, "logit_bias", (dict,), {}, lambda v: all(k.isdigit() for k in v),
                  "an object mapping token ids (as strings) to numbers in [-100, 100]")
    sp = dict(max_new_tokens=_field(body, limit, (int,), max_tokens, lambda v: v >= 1, "an integer >= 1"),
              temperature=_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v < float("inf"),
                                 "a number >= 0"),
              top_p=_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
              top_k=_field(body, "top_k", (int,), 0, lambda v: v >= 0, "an integer >= 0"),
              repetition_penalty=_field(body, "repetition_penalty", (int, float), 1.0, lambda v: v > 0,
                                        "a number > 0"),
              **{name: _field(body, name, (int, float), 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
                 for name in ("presence_penalty", "frequency_penalty")},
              seed=_field(body, "seed", (int,), None, rule="an integer"),
              prompt_lookup=_field(body, "prompt_lookup", (int,), 0, lambda v: v >= 0, "an integer >= 0"),
              logit_bias={int(k): v for k, v in bias.items()},
              stop=[s for s in ([stop] if isinstance(stop, str) else stop) if s])  # OpenAI ignores empty stops
    try:
        return SamplingParams(**sp)
    except ValueError as e:  # rules between fields (prompt_lookup needs greedy) or ranges (a huge seed)
        raise _BadRequest(str(e)) from None


def _token_text(data: bytes) -> str:
    """A token as OpenAI writes it: its text, or "bytes:\\xNN..." for part of a multi-byte character."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _completion_logprobs(tok: CodeLlamaTokenizer, scored: list[Scored]) -> dict:
    """OpenAI's completions logprobs: text offsets count characters of the choice's text; each top_logprobs entry
    holds the `logprobs` likeliest tokens and, as OpenAI's, the sampled one (so up to logprobs + 1, and with
    logprobs 0 the sampled one alone)."""
    def text(i: int) -> str:
        return _token_text(tok.piece_bytes(i))
    return {"tokens": [text(s.id) for s in scored], "token_logprobs": [s.logprob for s in scored],
            "top_logprobs": [{text(i): lp for i, lp in s.top} | {text(s.id): s.logprob} for s in scored],
            "text_offset": [s.text_offset for s in scored]}


def _chat_logprob(tok: CodeLlamaTokenizer, s: Scored) -> dict:
    """One token of OpenAI's chat logprobs content, with its alternatives."""
    def entry(i: int, lp: float) -> dict:
        data = tok.piece_bytes(i)
        return {"token": _token_text(data), "logprob": lp, "bytes": list(data)}
    return {**entry(s.id, s.logprob), "top_logprobs": [entry(i, lp) for i, lp in s.top]}


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
        top = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= _MAX_TOP["completions"],
                     f"an integer in [0, {_MAX_TOP['completions']}] or null")
        tok = self.llm.tokenizer

        def choice(i: int, text: str, finish: str | None, scored: list[Scored] | None = None) -> dict:
            return {"index": i, "text": text, "logprobs": None if scored is None else _completion_logprobs(
                tok, scored), "finish_reason": finish}
        self._answer(body, ids, mode, sp, "cmpl", "text_completion", choice, top)

    def _chat(self, body: dict) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise _BadRequest("messages must be a non-empty list of {role, content} with string content", "messages")
        sp = _sampling(body, self.llm.model.max_seq_len)  # no max_tokens: until EOS or the end of the window
        ids = [self.llm._ids("chat", [{"role": m.get("role"), "content": m["content"]} for m in messages])]
        wanted = _field(body, "logprobs", (bool,), False, rule="a boolean")
        top = _field(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= _MAX_TOP["chat"],
                     f"an integer in [0, {_MAX_TOP['chat']}]")
        if top and not wanted:  # 0 asks for nothing: some clients send it by default
            raise _BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        tok = self.llm.tokenizer

        def choice(i: int, text: str, finish: str | None, scored: list[Scored] | None = None,
                   first: bool = False) -> dict:
            logprobs = None if scored is None else {"content": [_chat_logprob(tok, s) for s in scored]}
            if self._streaming:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish}
        self._answer(body, ids, "chat", sp, "chatcmpl", "chat.completion", choice, (top or 0) if wanted else None)

    def _answer(self, body: dict, prompts: list[list[int]], mode: str, sp: SamplingParams, prefix: str, kind: str,
                choice: Callable, top_logprobs: int | None) -> None:
        """top_logprobs: None, no logprobs; else each choice's tokens with their log-probabilities and that many
        alternatives."""
        self.llm.engine.check_prompts(prompts)  # a prompt too long for the window: 400 before the stream starts
        try:  # likewise
            check_logit_bias(sp, self.llm.tokenizer.n_words)
        except ValueError as e:
            raise _BadRequest(str(e), "logit_bias") from None
        n = _field(body, "n", (int,), 1, lambda v: 1 <= v <= _MAX_N, f"an integer in [1, {_MAX_N}]")
        ids = [p for p in prompts for _ in range(n)]
        self._streaming = _field(body, "stream", (bool,), False, rule="a boolean")
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name}
        outcomes: list = []
        with contextlib.closing(self.llm._events(ids, mode, sp, outcomes=outcomes,
                                                 top_logprobs=top_logprobs)) as events:
            if self._streaming:
                self._stream(head, kind + (".chunk" if mode == "chat" else ""), len(ids), events, outcomes, choice)
                return
            texts = [""] * len(ids)
            scored = [[] if top_logprobs is not None else None for _ in ids]
            for row, delta, s in events:
                texts[row] += delta
                if s is not None:
                    scored[row].append(s)
        used = sum(k for _, k in outcomes)
        read = sum(map(len, prompts))  # as OpenAI counts: once per prompt, whatever n
        self._json(200, {**head, "choices": [choice(i, t, f, s) for i, (t, s, (f, _))
                                             in enumerate(zip(texts, scored, outcomes))],
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
            for row, delta, s in events:
                if delta or s is not None:  # with logprobs, a chunk per token once where its text starts is final
                    send({**head, "object": kind, "choices": [choice(row, delta, None, None if s is None else [s])]})
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
