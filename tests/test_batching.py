"""Concurrent calls on one model share its generation (codellama_ext.batching): each call's result equals the same
call made alone (greedy, and seeded sampling too), calls that overlap take fewer forwards than one after another,
and an ended, abandoned or failed call leaves the others and the model right."""

from __future__ import annotations

import threading

import pytest
import torch

from codellama_ext import SamplingParams

from test_api import COMPLETE, DIALOGS, INFILL, N, expected_complete, llm, ref_complete  # noqa: F401 (fixtures)
from test_generation import folder, hf, spm_models  # noqa: F401  (the same module-scoped fixtures)


def forwards(llm) -> int:
    return llm.model.cache_writes  # every prefill, decode step or draft check bumps it


def test_a_call_joins_the_generation_in_progress(llm, expected_complete):
    """A complete() made while a stream is unfinished (here on the same thread) joins its run and steps it: both
    texts are exact, in fewer forwards than the two calls one after the other."""
    w = forwards(llm)
    assert "".join(llm.stream(COMPLETE[2], max_new_tokens=N)) == expected_complete[2]
    assert llm.complete(COMPLETE[1], max_new_tokens=N) == expected_complete[1]
    serial = forwards(llm) - w
    w = forwards(llm)
    s = llm.stream(COMPLETE[2], max_new_tokens=N)
    first = next(s)
    assert llm.complete(COMPLETE[1], max_new_tokens=N) == expected_complete[1]
    assert first + "".join(s) == expected_complete[2]
    assert forwards(llm) - w < serial


def test_a_call_arriving_during_a_step_joins_the_next_one(llm, expected_complete, monkeypatch):
    """A call made while another thread is stepping is added by the next step, whoever runs it (was: the stepping
    thread took the condition back first, step after step, and the call waited for the whole run)."""
    real, batcher, box = llm.model.decode_step, llm._batcher, {}

    def step_with_arrival(*args):
        monkeypatch.setattr(llm.model, "decode_step", real)
        t = threading.Thread(target=lambda: box.update(text=llm.complete(COMPLETE[1], max_new_tokens=N)))
        t.start()
        for _ in range(1000):  # until it waits to join (the condition is free during a step)
            if batcher._joins:
                break
            t.join(0.01)
        box.update(thread=t, joined=bool(batcher._joins))
        return real(*args)
    monkeypatch.setattr(llm.model, "decode_step", step_with_arrival)
    w = forwards(llm)
    assert llm.complete(COMPLETE[2], max_new_tokens=N) == expected_complete[2]
    box["thread"].join(30)
    assert box["joined"] and box["text"] == expected_complete[1]
    assert forwards(llm) - w < 2 * N  # one run of about N steps, not two


def test_joined_calls_keep_their_own_parameters(llm, expected_complete):
    """Seeded sampling, a repetition penalty, logprobs and stop strings joined into another call's run give what
    they give alone."""
    tok = llm.tokenizer
    calls = [lambda: llm.complete(COMPLETE[0], max_new_tokens=N, temperature=0.9, top_p=0.9, seed=11),
             lambda: llm.complete([COMPLETE[1], COMPLETE[3]], max_new_tokens=N, repetition_penalty=1.4),
             lambda: llm.generate([tok.encode_meta(COMPLETE[0], True, False)], max_new_tokens=N, logprobs=True),
             lambda: llm.infill(*INFILL[0], max_new_tokens=N, stop=["\n"]),
             lambda: llm.chat(DIALOGS[0], max_new_tokens=N, temperature=0.7, seed=3)]
    alone = [call() for call in calls]
    for call, want in zip(calls, alone):
        s = llm.stream(COMPLETE[2], max_new_tokens=N)
        first = next(s)
        got = call()
        if isinstance(want, list) and want and not isinstance(want[0], str):  # GenerationResults
            assert [(r.tokens, r.finish_reason) for r in got] == [(r.tokens, r.finish_reason) for r in want]
            assert got[0].logprobs == pytest.approx(want[0].logprobs, abs=1e-5)
        else:
            assert got == want
        assert first + "".join(s) == expected_complete[2]


def test_concurrent_threads_equal_their_calls_alone(llm, expected_complete):
    tok = llm.tokenizer
    calls = {"complete": lambda: llm.complete(COMPLETE[:2], max_new_tokens=N),
             "infill": lambda: llm.infill(*INFILL[1], max_new_tokens=N),
             "chat": lambda: llm.chat(DIALOGS[1], max_new_tokens=N),
             "sampled": lambda: llm.complete(COMPLETE[3], max_new_tokens=N, temperature=1.0, seed=5),
             "stream": lambda: "".join(llm.stream(COMPLETE[2], max_new_tokens=N)),
             "lookup": lambda: llm.complete(COMPLETE[3], max_new_tokens=N, prompt_lookup=4),
             "ids": lambda: [r.tokens for r in llm.generate([tok.encode_meta(COMPLETE[0], True, False)],
                                                            max_new_tokens=N)]}
    alone = {name: call() for name, call in calls.items()}
    results, errors = {}, []
    start = threading.Barrier(len(calls))

    def worker(name):
        try:
            start.wait()
            results[name] = [calls[name]() for _ in range(2)]
        except Exception as e:  # noqa: BLE001 (reported by the assert below)
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    assert results == {name: [want] * 2 for name, want in alone.items()}


def test_a_call_of_another_kind_waits_for_the_run(llm, expected_complete):
    """prompt_lookup rows cannot share a plain run: the call steps the run to its end (the stream's text goes to
    the stream), then runs alone."""
    plain = llm.complete(COMPLETE[3], max_new_tokens=N)
    s = llm.stream(COMPLETE[2], max_new_tokens=N)
    first = next(s)
    assert llm.complete(COMPLETE[3], max_new_tokens=N, prompt_lookup=4) == plain
    assert first + "".join(s) == expected_complete[2]


def test_closed_and_abandoned_calls_end_their_rows(llm, expected_complete):
    plain = llm.complete(COMPLETE[1], max_new_tokens=3)
    s = llm.stream(COMPLETE[2], max_new_tokens=N)
    next(s)
    s.close()
    t = llm.stream(COMPLETE[0], max_new_tokens=N)
    next(t)
    del t  # garbage: its row ends before the next step
    w = forwards(llm)
    # another kind of call steps the run to its end first: the ended rows take no more forwards (N each if not)
    assert llm.complete(COMPLETE[1], max_new_tokens=3, prompt_lookup=2) == plain
    assert forwards(llm) - w <= 3  # its own prefill and at most two steps
    assert llm.complete(COMPLETE[0], max_new_tokens=N) == expected_complete[0]


def test_a_failed_step_fails_the_calls_that_shared_it(llm, expected_complete, monkeypatch):
    """The thread that stepped gets the error; the other call in the run a RuntimeError that names it; the model
    then works as before (no stale prefix records)."""
    s = llm.stream(COMPLETE[2], max_new_tokens=N)
    next(s)
    real = llm.model.decode_step

    def broken(*args):
        monkeypatch.setattr(llm.model, "decode_step", real)
        raise KeyboardInterrupt
    monkeypatch.setattr(llm.model, "decode_step", broken)
    with pytest.raises(KeyboardInterrupt):
        llm.complete(COMPLETE[0], max_new_tokens=N)
    with pytest.raises(RuntimeError, match="the generation this call shared with others failed: KeyboardInterrupt"):
        "".join(s)
    assert [llm.complete(p, max_new_tokens=N) for p in COMPLETE] == expected_complete
    assert llm.complete(COMPLETE[2], max_new_tokens=N, temperature=0.8, seed=1) == \
        llm.complete(COMPLETE[2], max_new_tokens=N, temperature=0.8, seed=1)


def test_sampling_params_bundle_is_per_call(llm):
    """Two calls with different temperatures in one run: neither takes the other's (the per-row tensors)."""
    cold = SamplingParams(max_new_tokens=N)
    alone = llm.complete(COMPLETE[0], params=cold)
    s = llm.stream(COMPLETE[2], max_new_tokens=N, temperature=1.5, top_k=5, seed=2)
    next(s)
    assert llm.complete(COMPLETE[0], params=cold) == alone
    s.close()
    assert not torch.is_inference_mode_enabled()  # a step resumed on this thread leaves no mode behind
