"""The API as a service uses it: one CodeLlama called from several threads, streams handed between threads or
abandoned, and argument errors that name the argument. Oracle: the same calls made one after another (greedy), on
the embedded default model (small and fast on the CPU)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from codellama_ext import CodeLlama

N = 16
PROMPTS = ["def fibonacci(n):\n", "import os\n", "class Stack:\n    def __init__(self):\n", "# sort a list\n"]


@pytest.fixture(scope="module")
def llm():
    return CodeLlama.from_pretrained(max_batch_size=2, max_seq_len=192)


@pytest.fixture(scope="module")
def expected(llm):
    return [llm.complete(p, max_new_tokens=N) for p in PROMPTS]


def _call(llm, kind: str, i: int):
    p = PROMPTS[i % len(PROMPTS)]
    if kind == "complete":
        return llm.complete(p, max_new_tokens=N)
    if kind == "stream":
        return "".join(llm.stream(p, max_new_tokens=N))
    if kind == "batch":  # three prompts over two cache slots: one waits in the queue
        return llm.complete([p, *PROMPTS[:2]], max_new_tokens=N)
    if kind == "infill":
        return llm.infill(p, "\n    return x\n", max_new_tokens=N)
    if kind == "chat":
        return llm.chat([{"role": "user", "content": p}], max_new_tokens=N)
    if kind == "generate":
        return llm.generate([llm.tokenizer.encode_meta(p, True, False)], max_new_tokens=N)[0].tokens
    if kind == "abandon":  # a stream dropped after two items: its slot is freed, its records stay exact
        s = llm.stream(p, max_new_tokens=N)
        next(s), next(s)
        del s
        return None
    raise AssertionError(kind)


def test_threads_give_the_serial_results(llm):
    kinds = ["complete", "stream", "batch", "infill", "chat", "generate", "abandon"]
    calls = [(kinds[(3 * i) % len(kinds)], i) for i in range(28)]
    serial = [_call(llm, k, i) for k, i in calls]
    got, errors = [None] * len(calls), []

    def worker(t):
        try:
            for j in range(t, len(calls), 4):
                got[j] = _call(llm, *calls[j])
        except Exception as e:  # noqa: BLE001 (reported by the assert below)
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and not errors
    assert got == serial


def test_stream_continued_by_another_thread(llm, expected):
    """A stream may be served by a thread pool, its items taken by different threads, and any of them may call
    the model meanwhile: the call joins the stream's generation (with a lock per model this deadlocked, or was
    refused)."""
    s = llm.stream(PROMPTS[0], max_new_tokens=N)
    parts = [next(s)]
    box = {}

    def other():
        parts.append(next(s))
        box["result"] = llm.complete(PROMPTS[1], max_new_tokens=N)
    t = threading.Thread(target=other, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive() and box["result"] == expected[1]

    def finish():  # a third thread takes the rest of the stream while this one calls the model
        time.sleep(0.2)
        parts.extend(s)
    t = threading.Thread(target=finish, daemon=True)
    t.start()
    assert llm.complete(PROMPTS[2], max_new_tokens=N) == expected[2]
    t.join(30)
    assert not t.is_alive() and "".join(parts) == expected[0]


def test_errors_name_the_argument(llm, tmp_path):
    ids = [llm.tokenizer.encode_meta(PROMPTS[0], True, False)]
    # were: TypeError "'int' object is not iterable", or a stop id that can never match (str, float, out of range)
    for bad in (2, "2", [2.0], [-1], [llm.args.vocab_size], [True]):
        with pytest.raises(ValueError, match=r"stop_ids must be a list of token ids \(integers in \[0, 4112\)\)"):
            llm.generate(ids, stop_ids=bad, max_new_tokens=2)
    assert llm.generate(ids, stop_ids=(2,), max_new_tokens=2)[0].tokens == llm.generate(ids, max_new_tokens=2)[0].tokens
    with pytest.raises(ValueError, match="logprobs must be a bool, got 'yes'"):
        llm.generate(ids, logprobs="yes", max_new_tokens=2)
    # were: any truthy value meant SPM, and suffix_first outside infilling was silently ignored
    for bad in ("yes", None, 1):
        with pytest.raises(ValueError, match="suffix_first must be a bool"):
            llm.infill("def f(", "):\n", suffix_first=bad)
    for mode, prompt in (("complete", "x"), ("chat", [{"role": "user", "content": "x"}])):
        with pytest.raises(ValueError, match="suffix and suffix_first are only used with mode='infill'"):
            llm.stream(prompt, mode=mode, suffix_first=True)
        with pytest.raises(ValueError, match="suffix and suffix_first are only used with mode='infill'"):
            llm.stream(prompt, mode=mode, suffix="y")
    # were: prefix_cache="no" meant reuse on; an int path a TypeError from os; None parts an AttributeError
    with pytest.raises(ValueError, match="prefix_cache must be a bool, got 'no'"):
        CodeLlama.from_pretrained(prefix_cache="no")
    with pytest.raises(ValueError, match="path must be a model folder"):
        CodeLlama.from_pretrained(5)
    with pytest.raises(ValueError, match="tokenizer must be a CodeLlamaTokenizer, got NoneType"):
        CodeLlama(llm.model, None)
    with pytest.raises(ValueError, match="model must be a Transformer"):
        CodeLlama(torch.nn.Linear(2, 2), llm.tokenizer)
    with pytest.raises(ValueError, match="cuda_graphs must be a bool"):
        CodeLlama(llm.model, llm.tokenizer, cuda_graphs="false")
