"""The OpenAI-style HTTP server (codellama_ext/server.py). Oracle: the Python API's own results for the same
requests (themselves tested against transformers in test_api.py), and OpenAI's response shapes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from codellama_ext.server import _token_text, make_server

from test_api import COMPLETE, DIALOGS, INFILL, N, llm  # noqa: F401 (fixtures)
from test_generation import folder, hf, spm_models  # noqa: F401  (the same module-scoped fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def url(llm):
    server = make_server(llm, port=0, model_name="toy", log=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def post(url: str, path: str, body, raw: bytes | None = None) -> tuple[int, str]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def events(text: str) -> list:
    """The server-sent events of a stream, [DONE] last."""
    items = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert items[-1] == "[DONE]"
    return [json.loads(x) for x in items[:-1]]


def test_completions_equal_the_python_api(llm, url):
    ids = [llm.tokenizer.encode_meta(p, True, False) for p in COMPLETE]
    want = llm.generate(ids, max_new_tokens=N)
    status, text = post(url, "/v1/completions", {"prompt": COMPLETE, "max_tokens": N, "temperature": 0})
    assert status == 200
    out = json.loads(text)
    assert out["object"] == "text_completion" and out["model"] == "toy" and out["id"].startswith("cmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == llm.complete(COMPLETE, max_new_tokens=N)
    assert [c["finish_reason"] for c in out["choices"]] == [r.finish_reason for r in want]
    assert {c["finish_reason"] for c in out["choices"]} == {"stop", "length"}
    assert out["usage"] == {"prompt_tokens": sum(map(len, ids)), "completion_tokens": sum(len(r.tokens) for r in want),
                            "total_tokens": sum(map(len, ids)) + sum(len(r.tokens) for r in want)}


def test_infilling_by_suffix_or_fill_me(llm, url):
    pre, suf = INFILL[0]
    want = llm.infill(pre, suf, max_new_tokens=N)
    for body in ({"prompt": pre, "suffix": suf}, {"prompt": pre + "<FILL_ME>" + suf}):
        status, text = post(url, "/v1/completions", {**body, "max_tokens": N, "temperature": 0})
        assert status == 200 and json.loads(text)["choices"][0]["text"] == want


def test_streams_concatenate_to_the_whole(llm, url):
    status, text = post(url, "/v1/completions", {"prompt": COMPLETE[1], "max_tokens": N, "temperature": 0,
                                                 "stream": True, "stop": ["by"]})
    chunks = events(text)
    assert status == 200 and len(chunks) > 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == llm.complete(COMPLETE[1], max_new_tokens=N, stop="by")
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    status, text = post(url, "/v1/chat/completions", {"messages": DIALOGS[1], "max_tokens": N, "temperature": 0,
                                                      "stream": True})
    chunks = events(text)
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        llm.chat(DIALOGS[1], max_new_tokens=N)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_and_sampling_fields(llm, url):
    status, text = post(url, "/v1/chat/completions", {"messages": DIALOGS[0], "max_tokens": N, "temperature": 0})
    out = json.loads(text)
    assert status == 200 and out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": llm.chat(DIALOGS[0], max_new_tokens=N)}
    # OpenAI's defaults: temperature 1 and top_p 1 (not SamplingParams' 0 and 0.9); our extensions pass through
    status, text = post(url, "/v1/completions", {"prompt": COMPLETE[0], "max_tokens": N, "seed": 5, "top_k": 40,
                                                 "repetition_penalty": 1.2, "presence_penalty": 0.5,
                                                 "frequency_penalty": 1})
    assert json.loads(text)["choices"][0]["text"] == llm.complete(
        COMPLETE[0], max_new_tokens=N, temperature=1.0, top_p=1.0, top_k=40, repetition_penalty=1.2,
        presence_penalty=0.5, frequency_penalty=1.0, seed=5)
    # logit_bias: JSON keys are strings; +100 makes a token every choice
    x = llm.tokenizer.encode_infilling("x")[0]
    status, text = post(url, "/v1/completions", {"prompt": COMPLETE[0], "max_tokens": 3, "logit_bias": {str(x): 100}})
    assert json.loads(text)["choices"][0]["text"] == "xxx"
    status, text = post(url, "/v1/completions", {"prompt": COMPLETE[0], "max_completion_tokens": 3,
                                                 "temperature": 0, "prompt_lookup": 2})
    assert json.loads(text)["choices"][0]["text"] == llm.complete(COMPLETE[0], max_new_tokens=3)


def test_n_choices_per_prompt(llm, url):
    # Choice i * n + j is prompt i's j-th: the same rows as the Python API given each prompt n times, seeded alike.
    body = {"prompt": COMPLETE[:2], "max_tokens": N, "n": 3, "seed": 7}
    status, text = post(url, "/v1/completions", body)
    out = json.loads(text)
    want = llm.complete([p for p in COMPLETE[:2] for _ in range(3)], max_new_tokens=N, temperature=1.0, top_p=1.0,
                        seed=7)
    assert status == 200 and [c["index"] for c in out["choices"]] == list(range(6))
    assert [c["text"] for c in out["choices"]] == want
    assert len(set(want[:3])) > 1  # each choice draws its own numbers
    assert json.loads(post(url, "/v1/completions", body)[1])["choices"] == out["choices"]  # and reproducibly
    ids = [llm.tokenizer.encode_meta(p, True, False) for p in COMPLETE[:2]]
    assert out["usage"]["prompt_tokens"] == sum(map(len, ids))  # counted once per prompt, as OpenAI does
    # greedy choices are equal; a chat stream names the role in each choice's first chunk
    status, text = post(url, "/v1/chat/completions", {"messages": DIALOGS[0], "max_tokens": N, "temperature": 0,
                                                      "n": 2, "stream": True})
    chunks = events(text)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    reply = llm.chat(DIALOGS[0], max_new_tokens=N)
    for i in range(2):
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"][0]["index"] == i) == reply


def test_logprobs_equal_the_python_api(llm, url):
    tok = llm.tokenizer
    ids = tok.encode_meta(COMPLETE[0], True, False)
    want = llm.generate([ids], max_new_tokens=N, logprobs=True, top_logprobs=2)[0]
    body = {"prompt": COMPLETE[0], "max_tokens": N, "temperature": 0, "logprobs": 2}
    choice = json.loads(post(url, "/v1/completions", body)[1])["choices"][0]
    lp = choice["logprobs"]
    assert lp["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
    assert lp["tokens"] == [_token_text(tok.piece_bytes(t)) for t in want.tokens]
    assert [list(d) for d in lp["top_logprobs"]] == [[_token_text(tok.piece_bytes(i)) for i, _ in t]
                                                     for t in want.top_logprobs]  # greedy: the sampled one is first
    assert [v for d in lp["top_logprobs"] for v in d.values()] == pytest.approx(
        [v for t in want.top_logprobs for _, v in t], abs=1e-5)
    # Each token's text is in the choice's text at its offset (a completion drops the first one's leading space;
    # this random model also picks lone bytes of multi-byte characters, which show as U+FFFD there).
    pieces = [lp["tokens"][0].removeprefix(" ")] + lp["tokens"][1:]
    assert lp["text_offset"] == sorted(lp["text_offset"])
    for p, at in zip(pieces, lp["text_offset"]):
        assert choice["text"][at:at + 1] == "\ufffd" if p.startswith("bytes:") else choice["text"][at:at + len(p)] == p
    # logprobs 0: the sampled token alone (OpenAI's entries hold it besides the alternatives)
    zero = json.loads(post(url, "/v1/completions", {**body, "logprobs": 0})[1])["choices"][0]["logprobs"]
    assert zero["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]
    # Streamed: a chunk per token, whose logprobs add up to the whole.
    chunks = events(post(url, "/v1/completions", {**body, "stream": True})[1])
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert len(parts) == len(want.tokens) and {k: sum((p[k] for p in parts), []) for k in lp} == lp
    # A stop string: the tokens up to the one that ended the text, as many as the usage counts.
    status, text = post(url, "/v1/completions", {**body, "stop": ["by"], "prompt": COMPLETE[1]})
    out = json.loads(text)
    tokens = out["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == out["usage"]["completion_tokens"] < N and "y" in tokens[-1]
    # Chat: OpenAI's content entries, with bytes.
    chat_ids = tok.chat_ids(DIALOGS[0])
    want = llm.generate([chat_ids], max_new_tokens=N, logprobs=True, top_logprobs=3)[0]
    body = {"messages": DIALOGS[0], "max_tokens": N, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    content = json.loads(post(url, "/v1/chat/completions", body)[1])["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(want.logprobs, abs=1e-5)
    assert [bytes(c["bytes"]) for c in content] == [tok.piece_bytes(t) for t in want.tokens]
    assert [[bytes(a["bytes"]) for a in c["top_logprobs"]] for c in content] == [
        [tok.piece_bytes(i) for i, _ in t] for t in want.top_logprobs]
    plain = json.loads(post(url, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": 0})[1])
    assert plain["choices"][0]["logprobs"] is None


def test_text_offsets_of_multi_byte_characters_and_stop_strings(llm, url, monkeypatch):
    """The model's tokens are set here (a stand-in for the batcher's call): the bytes of a character all start where it
    does (were: each counted as a U+FFFD, 0 1 2 3 2 for x + the 3 bytes of \u65e5 + x), the bytes of a character
    left incomplete each start at their own U+FFFD, and the token that completes a stop string starts at most at
    the text's end (was: after it), and so do the tokens before it that the stop string cut (were: where their
    text stood before the cut, streamed or not)."""
    from codellama_ext.generation import GenerationResult
    tok = llm.tokenizer
    x, ret, value = tok.encode_infilling("x") + tok.encode_infilling("return value")
    hi = [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in "\u65e5".encode()]
    broken = hi[:2]  # two of its three bytes: each becomes a U+FFFD of its own

    class Tokens:  # the call: one row, one token a step
        def __init__(self, ids):
            self.ids = ids
            self.results = [GenerationResult(ids, [-1.0] * len(ids), [[] for _ in ids])]

        def __iter__(self):
            return iter([[(0, t)] for t in self.ids])

        def finish(self, row):
            pass

        def close(self):
            pass
    for ids, stop, text, offsets in (([x, *hi, x], [], "x\u65e5x", [0, 1, 1, 1, 2]),
                                     ([*hi, *hi], [], "\u65e5\u65e5", [0, 0, 0, 1, 1, 1]),
                                     ([*broken, x], [], "\ufffd\ufffdx", [0, 1, 2]),  # were 0 0 2
                                     ([x, *broken], [], "x\ufffd\ufffd", [0, 1, 2]),
                                     ([*broken, *hi], [], "\ufffd\ufffd\u65e5", [0, 1, 2, 2, 2]),
                                     ([x, ret, value, x], ["n v"], "xretur", [0, 1, 6]),
                                     ([x, ret, value, x], ["rn valuex"], "xretu", [0, 1, 5, 5]),
                                     ([x, ret, value], ["rn valuex"], "xreturn value", [0, 1, 7])):
        monkeypatch.setattr(llm._batcher, "submit", lambda *a, ids=ids, **k: Tokens(ids))
        body = {"prompt": "a", "logprobs": 0, "stop": stop}
        choice = json.loads(post(url, "/v1/completions", body)[1])["choices"][0]
        assert (choice["text"], choice["logprobs"]["text_offset"]) == (text, offsets)
        chunks = [c["choices"][0] for c in events(post(url, "/v1/completions", {**body, "stream": True})[1])]
        assert "".join(c["text"] for c in chunks) == text
        assert sum((c["logprobs"]["text_offset"] for c in chunks if c["logprobs"]), []) == offsets


def test_token_text_writes_partial_characters_as_bytes():
    assert _token_text(b" def") == " def" and _token_text("\u00e9".encode()) == "\u00e9"
    assert _token_text(b"\xe2") == "bytes:\\xe2" and _token_text(b"\xf0\x9f") == "bytes:\\xf0\\x9f"


@pytest.mark.parametrize("path,body,status,match", [
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, r"n must be an integer in \[1, 128\]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 1.5}, 400, "n must be"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, 400, r"best_of=2 is not supported .*\(only 1\)"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, r"logprobs must be an integer in \[0, 5\] or null"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo=True is not supported"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, r"frequency_penalty must be a number in \[-2"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias must be an object mapping token ids"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 200}}, 400, r"numbers in \[-100, 100\], got 5: 200"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}, "stream": True}, 400,
     r"logit_bias: token id 99999 is not in the vocabulary"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, 400,
     "logprobs must be a boolean"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, r"top_logprobs must be an integer in \[0, 20\]"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature must be a number >= 0"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be an integer >= 1"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream must be a boolean"),
    ("/v1/completions", {"prompt": [1, 2]}, 400, "prompt must be a string or a non-empty list of strings"),
    ("/v1/completions", {"prompt": "x", "temperature": 0.5, "prompt_lookup": 2}, 400, "needs temperature 0"),
    ("/v1/completions", {"prompt": "x " * 200}, 400, "the context window"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/v1/embeddings", {}, 404, "no route POST /v1/embeddings"),
])
def test_errors_have_openai_shape(url, path, body, status, match):
    got, text = post(url, path, body)
    err = json.loads(text)["error"]
    assert got == status and re.search(match, err["message"]) and set(err) == {"message", "type", "param", "code"}


def test_bad_bodies_and_get_routes(url):
    for raw, match in ((b"{not json", "not JSON"), (b"[1]", "must be a JSON object")):
        status, text = post(url, "/v1/completions", None, raw=raw)
        assert status == 400 and match in json.loads(text)["error"]["message"]
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "toy"
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}


def test_concurrent_requests_equal_serial_ones(llm, url):
    bodies = [{"prompt": p, "max_tokens": N, "temperature": 0, "stream": i % 2 == 1} for i, p in enumerate(COMPLETE)]
    bodies += [{"messages": d, "max_tokens": N, "temperature": 0} for d in DIALOGS]
    paths = ["/v1/completions"] * len(COMPLETE) + ["/v1/chat/completions"] * len(DIALOGS)
    serial = [post(url, path, body)[1] for path, body in zip(paths, bodies)]
    got = [None] * len(bodies)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, post(url, paths[i], bodies[i])[1]))
               for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    def content(text):  # ids and timestamps differ between calls
        items = events(text) if text.startswith("data: ") else [json.loads(text)]
        return [item["choices"] for item in items]
    assert [content(x) for x in got] == [content(x) for x in serial]


def test_a_client_that_goes_away_ends_its_row(llm, url):
    host, port = url[len("http://"):].split(":")
    body = json.dumps({"prompt": COMPLETE[2], "max_tokens": 100, "temperature": 0, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(4096).startswith(b"HTTP/1.0 200")
    status, text = post(url, "/v1/completions", {"prompt": COMPLETE[0], "max_tokens": N, "temperature": 0})
    assert json.loads(text)["choices"][0]["text"] == llm.complete(COMPLETE[0], max_new_tokens=N)


def test_serve_command(folder):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "codellama_ext.cli", "serve", "--model", str(folder), "--port",
                             "0", "--device", "cpu", "--dtype", "float32", "--max-seq-len", "64", "--quiet",
                             "--name", "toy-cli", "--prefill-chunk", "3"], stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    try:
        line = proc.stderr.readline()
        m = re.search(r"serving toy-cli on (http://[\d.]+:\d+) .* prefilled 3 tokens per step", line)
        assert m, line
        status, text = post(m.group(1), "/v1/completions", {"prompt": COMPLETE[0], "max_tokens": 4, "temperature": 0})
        assert status == 200 and json.loads(text)["model"] == "toy-cli"
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 130 and "interrupted" in rest
