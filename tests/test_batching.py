"""Concurrent calls on one model share its generation (codellama_ext.batching): each call's result equals the same
call made alone (greedy, and seeded sampling too), calls that overlap take fewer forwards than one after another,
and an ended, abandoned or failed call leaves the others and the model right."""

from __future__ import annotations

import threading

import pytest
import torch

from codellama_ext import CodeLlama, SamplingParams

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
    """Seeded sampling, a repetition penalty, logprobs (with alternatives) and stop strings joined into another call's
    run give what they give alone."""
    tok = llm.tokenizer
    calls = [lambda: llm.complete(COMPLETE[0], max_new_tokens=N, temperature=0.9, top_p=0.9, seed=11),
             lambda: llm.complete([COMPLETE[1], COMPLETE[3]], max_new_tokens=N, repetition_penalty=1.4),
             lambda: llm.generate([tok.encode_meta(COMPLETE[0], True, False)], max_new_tokens=N, logprobs=True,
                                  top_logprobs=2),
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
            assert [[i for i, _ in t] for t in got[0].top_logprobs] == [[i for i, _ in t] for t in want[0].top_logprobs]
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


def test_drafting_and_plain_calls_share_runs_where_they_can(llm, expected_complete):
    """A prompt_lookup call joins a plain run (decoding plainly: the same text); a greedy call joins a drafting
    run; a sampling call cannot be in a drafting run: it steps that run to its end (the stream's text goes to the
    stream), then runs."""
    plain = llm.complete(COMPLETE[3], max_new_tokens=N)
    sampled = llm.complete(COMPLETE[1], max_new_tokens=N, temperature=0.8, seed=2)
    for stream_kw, call_kw, want in ((dict(), dict(prompt_lookup=4), plain),
                                     (dict(prompt_lookup=4), dict(), plain),
                                     (dict(prompt_lookup=4), dict(temperature=0.8, seed=2), sampled)):
        s = llm.stream(COMPLETE[2], max_new_tokens=N, **stream_kw)
        first = next(s)
        w = forwards(llm)
        prompt = COMPLETE[1] if "seed" in call_kw else COMPLETE[3]
        assert llm.complete(prompt, max_new_tokens=N, **call_kw) == want
        shared = forwards(llm) - w
        rest = "".join(s)
        assert first + rest == expected_complete[2]
        if "seed" in call_kw:  # the stream's row ran to its end first: nothing left for it to compute
            assert forwards(llm) - w == shared


def test_closed_and_abandoned_calls_end_their_rows(llm, expected_complete):
    plain = llm.complete(COMPLETE[1], max_new_tokens=3)
    s = llm.stream(COMPLETE[2], max_new_tokens=N)
    next(s)
    s.close()
    t = llm.stream(COMPLETE[0], max_new_tokens=N)
    next(t)
    del t  # garbage: its row ends before the next step
    w = forwards(llm)
    # a call through another engine steps the run to its end first: the ended rows take no more forwards (N each
    # if not), then its own prefill and at most two steps
    assert CodeLlama(llm.model, llm.tokenizer).complete(COMPLETE[1], max_new_tokens=3) == plain
    assert forwards(llm) - w <= 3
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


def test_a_stream_closed_during_another_threads_step_ends_its_row(llm, expected_complete, monkeypatch):
    """A call closed while someone else is stepping has its rows finished at the next step (was: the step dropped
    the closed call before its rows were ended, and they ran to their budget)."""
    want = llm.complete(COMPLETE[1], max_new_tokens=3)
    s = llm.stream(COMPLETE[2], max_new_tokens=100)
    next(s)
    run, real = llm._batcher._run, llm.model.decode_step

    def close_during_step(*args):
        monkeypatch.setattr(llm.model, "decode_step", real)
        s.close()  # as another thread would, while this one steps
        return real(*args)
    monkeypatch.setattr(llm.model, "decode_step", close_during_step)
    assert llm.complete(COMPLETE[1], max_new_tokens=3) == want
    assert all(run.done(r) for r in range(run._rows))  # the stream's row too: no steps left to take


def test_a_call_waiting_to_join_an_ended_run_is_not_added_to_the_next(llm, expected_complete, monkeypatch):
    """A call that arrived during a run's last step retries once the run is over: the next run, of another kind,
    must not take it in (was: its step added the sampling call to the prompt_lookup run: ValueError)."""
    from codellama_ext.generation import Run
    batcher, box, real_iter = llm._batcher, {}, Run.__iter__
    sampled = llm.complete(COMPLETE[1], max_new_tokens=N, temperature=0.8, seed=4)

    def last_step(run):
        if not run.lookup and all(run.done(r) for r in range(run._rows)) and "t" not in box:
            box["t"] = t = threading.Thread(target=lambda: box.update(text=llm.complete(
                COMPLETE[1], max_new_tokens=N, temperature=0.8, seed=4)))
            t.start()
            for _ in range(1000):  # until it waits to join (the condition is free during a step)
                if batcher._joins:
                    break
                t.join(0.01)
            batcher._cond.acquire()  # keep the joiner asleep until this thread has started the next run
        return real_iter(run)
    lookup = llm.complete(COMPLETE[3], max_new_tokens=N, prompt_lookup=4)
    monkeypatch.setattr(Run, "__iter__", last_step)
    s = llm.stream(COMPLETE[2], max_new_tokens=N, stop=expected_complete[2][2:4])  # stops: the step after ends the run
    try:
        "".join(s)
        monkeypatch.setattr(Run, "__iter__", real_iter)
        assert llm.complete(COMPLETE[3], max_new_tokens=N, prompt_lookup=4) == lookup
    finally:
        if "t" in box:
            batcher._cond.release()
    box["t"].join(30)
    assert box["text"] == sampled


def test_a_call_of_another_kind_gets_the_next_run(llm):
    """Calls of another kind are served in arrival order: once the run they wait for ends, no call that arrived
    after them starts the next one (was: whichever thread took the condition first started its run, and a
    call among threads making calls of another kind waited for up to 17 runs). Here: calls through a second
    CodeLlama over the model (another engine) among threads calling the first."""
    from codellama_ext.generation import Engine
    other = CodeLlama(llm.model, llm.tokenizer)
    runs, real_run = [], Engine.run
    stop = threading.Event()

    def busy(i):
        while not stop.is_set():
            llm.complete(COMPLETE[i % 4], max_new_tokens=6)

    def counting_run(engine, *args):
        runs.append(engine)
        return real_run(engine, *args)
    Engine.run = counting_run
    threads = [threading.Thread(target=busy, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for _ in range(8):
            n = len(runs)
            other.complete(COMPLETE[3], max_new_tokens=2)
            # at most the one run of the busy threads started before it arrived, then its own
            assert other.engine in runs[n:] and runs[n:].index(other.engine) <= 1
    finally:
        stop.set()
        Engine.run = real_run
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)


def test_seeded_prompts_of_one_call_do_not_depend_on_their_slots(llm):
    """Each prompt of a seeded call draws from its own generator: the call gives the same texts alone, beside
    another call (its prompts then get slots at different steps) and with more prompts than slots (was: one
    generator per call, drawn from by whichever rows were live)."""
    prompts = [COMPLETE[0], COMPLETE[1], COMPLETE[3], COMPLETE[0]]  # four prompts over three slots
    sp = SamplingParams(max_new_tokens=N, temperature=1.0, seed=7)
    alone = llm.complete(prompts, params=sp)
    assert alone[0] != alone[3]  # the same prompt twice: other numbers
    assert [llm.complete(p, params=sp) for p in prompts][0] == alone[0]
    s = llm.stream(COMPLETE[2], max_new_tokens=4)
    next(s)
    assert llm.complete(prompts, params=sp) == alone
    s.close()


def test_a_run_that_keeps_taking_calls_forgets_ended_rows(llm):
    """A busy service's run never ends: the rows of ended calls are dropped (was: every prompt, result, sampling
    parameter and generator since the run began stayed in it, and every call in the batcher's row map)."""
    tok = llm.tokenizer
    ids = [tok.encode_meta(COMPLETE[0], True, False)]
    want = llm.complete(COMPLETE[1], max_new_tokens=2), llm.generate(ids, max_new_tokens=2, logprobs=True)[0].tokens
    long = "".join(llm.stream(COMPLETE[2], max_new_tokens=100))
    s = llm.stream(COMPLETE[2], max_new_tokens=100)  # keeps the run going while the calls come and go
    first = next(s)
    run, batcher = llm._batcher._run, llm._batcher
    for _ in range(12):
        assert (llm.complete(COMPLETE[1], max_new_tokens=2),
                llm.generate(ids, max_new_tokens=2, logprobs=True)[0].tokens) == want
    assert batcher._run is run
    assert len(run._results) <= 3 and len(batcher._owner) <= 3
    assert first + "".join(s) == long


def test_a_call_closed_before_its_first_step_ends_its_rows(llm, expected_complete):
    # (an interrupt between submit and the first step closes the call this way): its rows must not decode to
    # their budget in the steps other calls drive
    ids = llm.tokenizer.encode_meta(COMPLETE[0], True, False)
    call = llm._batcher.submit(llm.engine, [ids], SamplingParams(max_new_tokens=N), [])
    call.close()
    assert llm.complete(COMPLETE[2], max_new_tokens=N) == expected_complete[2]  # it steps the run call is in
    assert call.results[0].tokens == [] and list(call) == []
