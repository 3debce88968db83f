"""Tests of the generation engine (codellama_ext.generation). Oracle: transformers' LlamaForCausalLM.generate
(do_sample=False, float32, eager attention) on the same random weights, run one prompt at a time.

The helpers at the top (a tiny model whose vocabulary is the CodeLlama-format toy tokenizer's) are shared with
tests/test_api.py."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codellama_ext import SamplingParams
from codellama_ext.generation import Engine, _shared_prefix
from codellama_ext.model import load_model

import tokenizer_fixtures
from checkpoint_fixtures import save_meta, tiny_hf_model

# The toy vocabulary has 1200 + 16 pieces (SPEC §3.1 order): <EOT> is the 11th appended, <step> (70B-Instruct
# layout) the last.
EOS, EOT, STEP = 2, 1210, 1215
VOCAB = 1216


def make_hf_model():
    """A tiny random model whose output rows for EOS, EOT and <step> copy (scaled) those of tokens it likes to
    emit, so that greedy runs do stop on them now and then (a random model would almost never pick them)."""
    hf = tiny_hf_model(seed=0, vocab=VOCAB)
    with torch.no_grad():
        w = hf.lm_head.weight
        w[EOS] = 1.2 * w[110]
        w[EOT] = 1.2 * w[893]
        w[STEP] = 1.2 * w[801]
    return hf


def write_folder(hf, tokenizer_model, folder):
    """A Meta-format model folder with the given tokenizer.model."""
    save_meta(hf, folder)
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder


def random_prompts(n, seed=3, lengths=(3, 6, 9, 14, 1, 20, 5)):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 1200) for _ in range(lengths[i % len(lengths)] - 1)] for i in range(n)]


def hf_greedy(hf, ids, max_new_tokens, stop_id=EOS, **kw):
    """transformers' greedy continuation: (new tokens without the stop token, whether it stopped). stop_id: an
    id, a list of ids, or None."""
    out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_id,
                      pad_token_id=0, top_p=None, top_k=None, temperature=None, **kw)[0, len(ids):].tolist()
    stops = [stop_id] if isinstance(stop_id, int) else stop_id or []
    cut = [i for i, t in enumerate(out) if t in stops]
    return (out[:cut[0]], True) if cut else (out, False)


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    return tokenizer_fixtures.build_models(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def hf():
    return make_hf_model()


@pytest.fixture(scope="module")
def folder(hf, spm_models, tmp_path_factory):
    return write_folder(hf, spm_models["codellama"], tmp_path_factory.mktemp("gen-model"))


@pytest.fixture(scope="module")
def engine(folder):
    return Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=2))


N_NEW, N_PROMPTS = 20, 5


@pytest.fixture(scope="module")
def expected(hf):
    """transformers' greedy output for each prompt, one at a time."""
    return [hf_greedy(hf, p, N_NEW) for p in random_prompts(N_PROMPTS)]


def test_decode_step_and_last_only_match_full_forward(folder):
    model = load_model(folder, dtype=torch.float32, max_seq_len=32, max_batch_size=3)
    a, b = random_prompts(2, lengths=(9, 5))
    full_a, full_b = model.logits(a), model.logits(b)
    # packed prefill of a[:-1] into slot 2 and b[:-1] into slot 0, last-token logits only
    out = model.forward(torch.tensor(a[:-1] + b[:-1]), torch.tensor([0, 0]), cu_seqlens=torch.tensor([0, 8, 12]),
                        slots=torch.tensor([2, 0]), last_only=True)
    assert out.shape == (2, VOCAB)
    torch.testing.assert_close(out, torch.stack([full_a[7], full_b[3]]), rtol=1e-5, atol=1e-5)
    step = model.decode_step(torch.tensor([a[-1], b[-1]]), torch.tensor([8, 4], dtype=torch.int32),
                             torch.tensor([2, 0], dtype=torch.int32))
    torch.testing.assert_close(step, torch.stack([full_a[8], full_b[4]]), rtol=1e-5, atol=1e-5)


def test_greedy_single_matches_transformers(engine, expected):
    for p, (ref, stopped) in zip(random_prompts(N_PROMPTS), expected):
        res = engine.generate([p], SamplingParams(max_new_tokens=N_NEW), [EOS])[0]
        assert res.tokens == ref
        assert res.finish_reason == ("stop" if stopped else "length")
    # the fixture model stops on EOS for some prompts and runs to the budget for others
    assert {s for _, s in expected} == {True, False}


def test_batch_equals_single_runs(engine, expected):
    # 5 prompts of different lengths on a 2-slot cache: queued prompts take the slots of finished rows
    res = engine.generate(random_prompts(N_PROMPTS), SamplingParams(max_new_tokens=N_NEW), [EOS])
    assert [r.tokens for r in res] == [ref for ref, _ in expected]


def test_logprobs_match_transformers(engine, hf):
    p = random_prompts(1)[0]
    res = engine.generate([p], SamplingParams(max_new_tokens=8), [], logprobs=True)[0]
    out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0,
                      output_logits=True, return_dict_in_generate=True, top_p=None, top_k=None, temperature=None)
    ref = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, res.tokens)]
    assert out.sequences[0, len(p):].tolist() == res.tokens
    assert res.logprobs == pytest.approx(ref, abs=1e-4)


def test_top_logprobs_match_transformers(engine, hf):
    prompts = random_prompts(2)
    res = engine.generate(prompts, SamplingParams(max_new_tokens=6), [], logprobs=True, top_logprobs=3)
    for p, r in zip(prompts, res):
        out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True, top_p=None, top_k=None, temperature=None)
        assert out.sequences[0, len(p):].tolist() == r.tokens and len(r.top_logprobs) == len(r.tokens)
        for lg, t, top in zip(out.logits, r.tokens, r.top_logprobs):
            ref = torch.log_softmax(lg[0].float(), -1).topk(3)
            assert [i for i, _ in top] == ref.indices.tolist() and top[0][0] == t  # greedy takes the first
            assert [v for _, v in top] == pytest.approx(ref.values.tolist(), abs=1e-4)
    # a drafting run gives the same; a vocabulary limit leaves out the ids the run may not pick
    drafted = engine.generate(prompts, SamplingParams(max_new_tokens=6, prompt_lookup=3), [], logprobs=True,
                              top_logprobs=3)
    for a, b in zip(drafted, res):
        assert [[i for i, _ in t] for t in a.top_logprobs] == [[i for i, _ in t] for t in b.top_logprobs]
        assert [v for t in a.top_logprobs for _, v in t] == pytest.approx([v for t in b.top_logprobs for _, v in t],
                                                                          abs=1e-5)
    run = engine.run(prompts[:1], SamplingParams(max_new_tokens=3), [], True, vocab=40, top_logprobs=5)
    for _ in run:
        pass
    tops = run.results[0].top_logprobs
    assert len(tops) == 3 and all(len(t) == 5 and all(i < 40 for i, _ in t) for t in tops)
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=2), [], logprobs=True)
    assert all(r.top_logprobs is None for r in plain)


@pytest.mark.parametrize("logprobs,top,match", [
    (False, 2, "top_logprobs needs logprobs=True"), (True, -1, "top_logprobs must be an integer in"),
    (True, True, "top_logprobs must be an integer in"), (True, 10 ** 6, "top_logprobs must be an integer in"),
    ("yes", 0, "logprobs must be a bool")])
def test_bad_logprobs_wishes(engine, logprobs, top, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(random_prompts(1), SamplingParams(max_new_tokens=2), [], logprobs=logprobs, top_logprobs=top)


def test_repetition_penalty_matches_transformers(engine, hf, expected):
    changed = False
    for p, (greedy, _) in zip(random_prompts(2), expected):
        ref, _ = hf_greedy(hf, p, N_NEW, repetition_penalty=1.3)
        res = engine.generate([p], SamplingParams(max_new_tokens=N_NEW, repetition_penalty=1.3), [EOS])[0]
        assert res.tokens == ref
        changed |= ref != greedy
    assert changed  # the penalty changes an output, or this test would prove nothing


class OpenAIPenalties:
    """transformers logits processor: OpenAI's presence and frequency penalties on the generated ids (the rule of
    SamplingParams' docstring, written independently of the engine's)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_presence_and_frequency_penalties_match_transformers(engine, hf, expected):
    """Greedy with the penalties (and with HF's repetition penalty before them) equals transformers' generate with
    OpenAIPenalties, alone and in a batch beside unpenalised rows."""
    from transformers import LogitsProcessorList
    prompts, changed = random_prompts(3), False
    for presence, frequency, repetition in ((1.5, 0.0, 1.0), (0.0, 0.7, 1.0), (-0.5, 0.4, 1.3)):
        sp = SamplingParams(max_new_tokens=N_NEW, presence_penalty=presence, frequency_penalty=frequency,
                            repetition_penalty=repetition)
        refs = [hf_greedy(hf, p, N_NEW, repetition_penalty=repetition,
                          logits_processor=LogitsProcessorList([OpenAIPenalties(len(p), presence, frequency)]))[0]
                for p in prompts]
        assert [r.tokens for r in engine.generate(prompts, sp, [EOS])] == refs
        changed |= refs != [greedy for greedy, _ in expected[:3]]
        run = engine.run(prompts[:1], SamplingParams(max_new_tokens=N_NEW), [EOS])
        for i, _ in enumerate(run):
            if i == 1:
                penalised = run.add(prompts[1:2], sp, [EOS])
        assert run.results[penalised[0]].tokens == refs[1]
        assert run.results[0].tokens == expected[0][0]
    assert changed  # the penalties change outputs, or this test would prove nothing


def test_logit_bias_matches_transformers(engine, hf, expected):
    """OpenAI's logit_bias against transformers' sequence_bias (one-token sequences), greedy alone and in a batch
    beside an unbiased row; banning each greedy first token changes the output; an id past the vocabulary is
    refused when the call starts."""
    prompts = random_prompts(2)
    bias = {expected[0][0][0]: -100.0, expected[1][0][0]: -100.0, 7: 4.0, 300: 2.5}
    sp = SamplingParams(max_new_tokens=N_NEW, logit_bias=bias)
    refs = [hf_greedy(hf, p, N_NEW, sequence_bias={(i,): b for i, b in bias.items()})[0] for p in prompts]
    assert [r.tokens for r in engine.generate(prompts, sp, [EOS])] == refs
    assert all(ref[0] != greedy[0] for ref, (greedy, _) in zip(refs, expected))
    run = engine.run(prompts[:1], SamplingParams(max_new_tokens=N_NEW), [EOS])
    for i, _ in enumerate(run):
        if i == 1:
            biased = run.add(prompts[1:], sp, [EOS])
    assert run.results[0].tokens == expected[0][0] and run.results[biased[0]].tokens == refs[1]
    with pytest.raises(ValueError, match=r"logit_bias: token id 5000 is not in the vocabulary \[0, 1216\)"):
        engine.generate(prompts, SamplingParams(logit_bias={5000: 1}), [EOS])


def test_top_k_1_equals_greedy_and_seeded_sampling_reproduces(engine, expected):
    prompts = random_prompts(4)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=N_NEW), [EOS])
    top1 = engine.generate(prompts, SamplingParams(max_new_tokens=N_NEW, temperature=0.8, top_k=1, seed=3), [EOS])
    assert [r.tokens for r in top1] == [r.tokens for r in greedy]
    sp = SamplingParams(max_new_tokens=N_NEW, temperature=1.0, top_p=0.95, seed=7)
    a = engine.generate(prompts, sp, [EOS])
    b = engine.generate(prompts, sp, [EOS])
    c = engine.generate(prompts, SamplingParams(max_new_tokens=N_NEW, temperature=1.0, top_p=0.95, seed=8), [EOS])
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    assert [r.tokens for r in a] != [r.tokens for r in greedy]


@pytest.mark.parametrize("temperature", [1e-45, 1e-35, 1e-20])
def test_vanishing_temperature_is_greedy(engine, temperature):
    # 1e-45 is an fp32 subnormal: logits / T overflowed to inf - inf = NaN; 1e-20 still takes the sampler's path
    prompts = random_prompts(2)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=N_NEW), [EOS])
    cold = engine.generate(prompts, SamplingParams(max_new_tokens=N_NEW, temperature=temperature, seed=1), [EOS])
    assert [r.tokens for r in cold] == [r.tokens for r in greedy]


def test_window_end_and_prompt_too_long(folder, hf):
    small = Engine(load_model(folder, dtype=torch.float32, max_seq_len=16, max_batch_size=2))
    p = random_prompts(1, lengths=(10,))[0]
    res = small.generate([p, p[:4]], SamplingParams(max_new_tokens=50), [])
    # Meta's rule: prompt + new tokens fit in max_seq_len
    assert [len(r.tokens) for r in res] == [6, 12] and all(r.finish_reason == "length" for r in res)
    assert res[0].tokens == hf_greedy(hf, p, 6, stop_id=None)[0]
    with pytest.raises(ValueError, match=r"prompt 1 has 16 tokens but the context window \(max_seq_len\) is 16"):
        small.generate([p, p + p[:6]], SamplingParams(), [])


@pytest.mark.parametrize("prompts,match", [
    ([], "non-empty list"),
    ([[]], "prompt 0 is empty"),
    ([[1, 5], [1, VOCAB]], r"prompt 1: token ids must be integers in \[0, 1216\)"),
    ("hello", "non-empty list"),
    ([[1, 2.0]], "token ids must be integers"),
])
def test_bad_prompt_ids(engine, prompts, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, SamplingParams(), [EOS])


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be a number in"),
    (dict(frequency_penalty="1"), "frequency_penalty must be a number in"),
    (dict(logit_bias={5: 101}), r"logit_bias must map token ids \(integers >= 0\) to numbers in \[-100, 100\]"),
    (dict(logit_bias={"5": 1}), "logit_bias must map token ids"),
    (dict(logit_bias=[5]), r"logit_bias must map token ids to biases \(a dict\)"),
    (dict(logit_bias=((5, 1), (5, 2))), "logit_bias names a token id twice"),
    (dict(stop=["ok", ""]), "stop must be a non-empty string"),
    (dict(stop=5), "stop must be a non-empty string or a list of them, got 5"),  # was: TypeError, not iterable
    (dict(stop=b"ab"), r"got b'ab'"),  # was: accepted as the ints (97, 98), then refused naming them
    (dict(seed="x"), "seed must be an integer"),
])
def test_bad_sampling_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_rows_added_between_steps_equal_their_own_runs(folder):
    """Run.add queues prompts with their own sampling parameters, stop ids and logprobs wish into a running
    generation (as the text API does with concurrent calls): each call's rows equal that call alone, greedy,
    penalised and seeded-sampled alike (a seeded call draws from its own generator), with more rows than slots."""
    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=3))
    p = random_prompts(6)
    calls = [([p[0]], SamplingParams(max_new_tokens=N_NEW), [EOS], True),
             ([p[1], p[2]], SamplingParams(max_new_tokens=N_NEW, temperature=0.8, top_k=20, seed=5), [EOS], False),
             ([p[3]], SamplingParams(max_new_tokens=7, repetition_penalty=1.3), [EOS, 110], True),
             ([p[4], p[5]], SamplingParams(max_new_tokens=N_NEW, temperature=1.1, top_p=0.8, seed=9), [], True)]
    alone = [engine.generate(*call) for call in calls]
    run = engine.run(*calls[0])
    rows = [[0]]
    for i, _ in enumerate(run):
        if i in (0, 2, 3):
            rows.append(run.add(*calls[len(rows)]))
    assert len(rows) == len(calls)
    for call_rows, want in zip(rows, alone):
        for r, ref in zip(call_rows, want):
            res = run.results[r]
            assert (res.tokens, res.finish_reason) == (ref.tokens, ref.finish_reason)
            assert (res.logprobs is None) == (ref.logprobs is None)
            if ref.logprobs is not None:
                assert res.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert run.finished
    with pytest.raises(RuntimeError, match="this run has finished"):
        run.add([p[0]], SamplingParams(), [EOS])
    with pytest.raises(ValueError, match="a drafting run .* takes only greedy rows without a penalty or logit bias"):
        engine.run([p[0]], SamplingParams(prompt_lookup=3), [EOS]).add([p[1]], SamplingParams(temperature=0.5), [EOS])
    # a plain run decodes a prompt_lookup row plainly; a drafting run takes a greedy row that does not draft
    greedy = [r.tokens for r in engine.generate([p[0], p[3]], SamplingParams(max_new_tokens=N_NEW), [EOS])]
    for first, then in ((SamplingParams(max_new_tokens=N_NEW), SamplingParams(max_new_tokens=N_NEW, prompt_lookup=3)),
                        (SamplingParams(max_new_tokens=N_NEW, prompt_lookup=3), SamplingParams(max_new_tokens=N_NEW))):
        run = engine.run([p[0]], first, [EOS])
        rows = [0] + run.add([p[3]], then, [EOS])
        for _ in run:
            pass
        assert [run.results[r].tokens for r in rows] == greedy
        assert run.results[rows[1]].accepted_drafts == 0


def test_rows_finished_before_the_first_step_are_not_prefilled(engine, expected):
    """Was: a row finished before the run's first step was prefilled anyway and got a token."""
    w = engine.model.cache_writes
    run = engine.run(random_prompts(2), SamplingParams(max_new_tokens=N_NEW), [EOS])
    run.finish(0)
    assert next(iter(run)) == [(1, expected[1][0][0])]
    assert (run.results[0].tokens, run.results[0].finish_reason) == ([], "stop")
    run.close()
    assert engine.model.cache_writes - w == 1  # one prefill, of prompt 1 alone


def test_long_prompts_are_prefilled_in_parts_between_decode_steps(folder):
    """A prompt added while rows decode is prefilled at most prefill_chunk tokens per step: the decoding rows get a
    token every step meanwhile, and every row's tokens equal its own run's."""
    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=3), prefix_cache=False)
    engine.prefill_chunk = 4
    short, long_a, long_b = random_prompts(1)[0][:5], [1] + list(range(40, 70)), [1] + list(range(300, 317))
    sp = SamplingParams(max_new_tokens=24)
    alone = [engine.generate([p], sp, [])[0].tokens for p in (short, long_a, long_b)]
    run = engine.run([short], sp, [])
    steps = []
    for i, step in enumerate(run):
        steps.append(dict(step))
        if i == 1:
            rows = run.add([long_a, long_b], sp, [])
    assert [run.results[r].tokens for r in [0] + rows] == alone
    # 31 + 18 prompt tokens at 4 per step from step 2 (first come first): long_a's end in step 9, long_b's in 14
    first = [next(i for i, s in enumerate(steps) if r in s) for r in rows]
    assert first == [9, 14]
    assert all(0 in s for s in steps[:len(alone[0])])  # the short row never waited
    for bad in (0, -3, 2.5, True, "32"):
        with pytest.raises(ValueError, match="prefill_chunk must be a positive integer or None"):
            engine.prefill_chunk = bad
    # with nothing decoding, a prompt is prefilled whole: its first token comes at the first step
    run = engine.run([long_a], sp, [])
    assert next(iter(run)) == [(0, alone[1][0])]


def test_abandoned_run_leaves_engine_usable(engine, expected):
    run = engine.run(random_prompts(3), SamplingParams(max_new_tokens=N_NEW), [EOS])
    next(iter(run))
    next(iter(run))
    run.close()
    res = engine.generate(random_prompts(3), SamplingParams(max_new_tokens=N_NEW), [EOS])
    assert [r.tokens for r in res] == [ref for ref, _ in expected[:3]]


def test_padded_bucket_decode_equals_plain(folder, expected):
    """The CUDA graph path's static buffers and padding rows (which write free cache slots), run eagerly on the
    CPU: 3 prompts in bucket 4, then 5 prompts over 4 slots (buckets 1, 2, 4), a queued prompt refilling a freed
    slot."""
    from codellama_ext.generation import _DecodeGraph
    padded = []

    class Recording(_DecodeGraph):
        def __call__(self, tokens, *args):
            padded.append(tokens.numel() < self.bucket)
            return super().__call__(tokens, *args)

    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=4))
    assert engine.buckets == [1, 2, 4]
    engine._graphs = {b: Recording(engine.model, b, None, capture=False) for b in engine.buckets}
    for n in (3, N_PROMPTS):
        res = engine.generate(random_prompts(n), SamplingParams(max_new_tokens=N_NEW), [EOS])
        assert [r.tokens for r in res] == [ref for ref, _ in expected[:n]]
    assert any(padded) and not all(padded)


def test_shared_prefixes_are_copied_from_busy_slots(folder, hf):
    """n samples of one prompt prefill it once (the others wait for it, then copy its keys and values), and a prompt
    joining rows that hold a long prefix of it copies that prefix: the ids of an engine that reuses nothing."""
    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=4))
    plain = Engine(engine.model, prefix_cache=False)
    base = [1] + list(range(300, 340))
    sp = SamplingParams(max_new_tokens=N_NEW)
    want = {tuple(p): hf_greedy(hf, p, N_NEW, None)[0] for p in (base, base[:30] + [7, 8, 9])}
    for _ in range(2):  # the second time after another writer: the records left by the first are stale
        res = engine.generate([base] * 3, sp, [])
        assert [r.tokens for r in res] == [want[tuple(base)]] * 3
        assert [r.cached_tokens for r in res] == [0, len(base) - 1, len(base) - 1]
        engine.model.reset_cache()
    run = engine.run([base], sp, [])  # nothing left from before: the prefix below comes from a row decoding
    for i, _ in enumerate(run):
        if i == 2:
            (joined,) = run.add([base[:30] + [7, 8, 9]], sp, [])
    assert [r.tokens for r in run.results] == [want[tuple(base)], want[tuple(base[:30] + [7, 8, 9])]]
    assert run.results[joined].cached_tokens == 30
    assert [r.tokens for r in plain.generate([base] * 3, sp, [])] == [want[tuple(base)]] * 3


def test_prefix_reuse_matches_transformers(folder, hf):
    """A resent prompt, one extending a prompt and its fed-back output, one diverging from it and one it
    contains are prefilled from the end of the prefix their slot holds, and still continue as transformers."""
    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=2))
    sp = SamplingParams(max_new_tokens=N_NEW)
    p = random_prompts(1, seed=11, lengths=(14,))[0]
    first = engine.generate([p], sp, [])[0]
    assert first.cached_tokens == 0 and first.tokens == hf_greedy(hf, p, N_NEW, stop_id=None)[0]
    again = engine.generate([p], sp, [])[0]
    assert again.cached_tokens == len(p) - 1 and again.tokens == first.tokens
    cases = [(p + first.tokens[:5] + [7, 8], len(p) + 5),  # a chat's next turn: output tokens were fed back
             (p[:8], 7),  # contained: the last token is recomputed for its logits
             (p[:6] + [9, 10, 11], 6)]  # an edit: reuse up to it (the slot then holds the edited text)
    for q, cached in cases:
        res = engine.generate([q], sp, [])[0]
        assert (res.cached_tokens, res.tokens) == (cached, hf_greedy(hf, q, N_NEW, stop_id=None)[0])
    # in a batch each prompt takes the slot holding its prefix; one sharing nothing takes the slot holding least
    q = cases[-1][0] + res.tokens[:2]
    batch = engine.generate([[5, 6, 7], q], sp, [])
    assert [r.cached_tokens for r in batch] == [0, len(q) - 1]
    assert batch[1].tokens == hf_greedy(hf, q, N_NEW, stop_id=None)[0]


def test_prefix_records_forgotten_when_others_write_the_cache(folder, expected):
    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=2))
    sp = SamplingParams(max_new_tokens=N_NEW)
    p, ref = random_prompts(1)[0], expected[0][0]
    engine.generate([p], sp, [EOS])
    for other_write in (lambda m: m.forward(torch.tensor([[1, 2, 3]] * 2)), lambda m: m.reset_cache(),
                        lambda m: m.to(torch.float64).to(torch.float32)):
        other_write(engine.model)
        res = engine.generate([p], sp, [EOS])[0]
        assert (res.cached_tokens, res.tokens) == (0, ref)
        res = engine.generate([p], sp, [EOS])[0]  # and recorded anew
        assert (res.cached_tokens, res.tokens) == (len(p) - 1, ref)
    off = Engine(engine.model, prefix_cache=False)
    assert [(r.cached_tokens, r.tokens) for r in (off.generate([p], sp, [EOS])[0] for _ in range(2))] == [(0, ref)] * 2


def test_padding_rows_evict_the_prefix_they_overwrite(folder, expected):
    """CUDA-graph padding rows write position 0 of free slots: a prompt held there must be prefilled again."""
    from codellama_ext.generation import _DecodeGraph
    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=4))
    engine._graphs = {b: _DecodeGraph(engine.model, b, None, capture=False) for b in engine.buckets}
    sp = SamplingParams(max_new_tokens=N_NEW)
    p, ref = random_prompts(1)[0], expected[0][0]
    engine.generate([p], sp, [EOS])
    # three rows in the 4-row bucket: the one free slot, p's, is the padding row (no BOS: nothing shared with p)
    engine.generate([q[1:] for q in random_prompts(3, seed=9)], SamplingParams(max_new_tokens=2), [])
    res = engine.generate([p], sp, [EOS])[0]
    assert (res.cached_tokens, res.tokens) == (0, ref)


def test_prefix_records_forgotten_when_the_weights_change(folder):
    """Keys and values held from before an in-place weight update (load_weight, load_state_dict: a fine-tune
    loaded into the running model) are not what the model computes now: the prompt is prefilled whole again.
    Was: the resent prompt reused 11 stale positions and continued differently from prefix_cache=False."""
    model = load_model(folder, dtype=torch.float32, max_seq_len=64, max_batch_size=1)
    engine, sp = Engine(model), SamplingParams(max_new_tokens=10)
    p = random_prompts(1, seed=5, lengths=(12,))[0]
    before = engine.generate([p], sp, [])[0].tokens
    hq, hkv = model.args.n_heads * model.args.head_dim, model.args.n_kv_heads * model.args.head_dim
    model.load_weight("layers.0.attention.wk.weight", 0.5 * model.layers[0].wqkv.weight[hq:hq + hkv])
    res = engine.generate([p], sp, [])[0]
    ref = Engine(model, prefix_cache=False).generate([p], sp, [])[0].tokens  # after: its prefill clears records
    assert (res.cached_tokens, res.tokens) == (0, ref) and ref != before


def test_prefix_records_not_rebuilt_after_a_write_during_a_run(folder, hf):
    """A cache write from elsewhere during a run drops the records; the run's own slot must stay unknown, not
    start a new record from the ids it feeds next (which sit at positions 12.., not 0..).
    Was: the slot then 'held' the fed ids from position 0, and a prompt starting with them reused 6 positions
    that hold the first prompt's keys and values."""
    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=64, max_batch_size=1))
    p = random_prompts(1, seed=5, lengths=(12,))[0]
    run = engine.run([p], SamplingParams(max_new_tokens=10), [])
    for i, _ in enumerate(run):
        if i == 0:
            engine.model.to(torch.float32)  # leaves the cache as it is, but counts as a write (_apply)
    q = run.results[0].tokens[:6] + [7, 8]
    res = engine.generate([q], SamplingParams(max_new_tokens=N_NEW), [])[0]
    assert (res.cached_tokens, res.tokens) == (0, hf_greedy(hf, q, N_NEW, stop_id=None)[0])


def test_prefix_reuse_equals_no_reuse_over_random_calls(folder):
    """Seeded random call sequences (resent prompts, prompts extended by their outputs, cut, edited or grown to
    the window end, repeated within a batch, batches larger than the cache), with stop ids and budgets that end
    rows at different steps, rows finished by the consumer, abandoned runs, a repetition penalty, prompt lookup,
    logprobs, the padded CUDA-graph step (emulated on the CPU) and prompts arriving while others decode: the same
    ids as an engine that prefills every prompt whole."""
    from codellama_ext.generation import _DecodeGraph
    reused = 0
    for seed, slots, padded in ((1, 3, False), (4, 4, True)):
        rng = random.Random(seed)
        on, off = (Engine(load_model(folder, dtype=torch.float32, max_seq_len=64, max_batch_size=slots),
                          prefix_cache=cache) for cache in (True, False))
        # whole prompts in both: a prompt prefilled in parts reaches its first token later the more it must feed,
        # so rows cut at a step (finished, abandoned) would differ; test_prefill_in_parts_... covers parts
        on.prefill_chunk = off.prefill_chunk = None
        if padded:
            on._graphs = {b: _DecodeGraph(on.model, b, None, capture=False) for b in on.buckets}
        history = [[1, 5, 6]]
        for _ in range(12):
            prompts = []
            for _ in range(rng.choice([1, 2, slots - 1, slots + 2])):
                h, kind, extra = rng.choice(history[-6:]), rng.random(), [rng.randrange(3, 1200) for _ in range(5)]
                p = (h if kind < 0.3 else h + extra[:rng.randrange(1, 4)] if kind < 0.55  # resent; next turn
                     else h[:rng.randrange(1, len(h) + 1)] + extra[:rng.randrange(0, 3)] if kind < 0.8  # cut, edit
                     else h + extra * 13 if kind < 0.9 else prompts[-1] if prompts else h)  # window end; repeat
                prompts.append(p[:rng.choice([63, 62, 60, 40])] or [1])
            penalty = rng.choice([1.0, 1.0, 1.3])
            sp = SamplingParams(max_new_tokens=rng.randrange(1, 16), repetition_penalty=penalty,
                                prompt_lookup=rng.choice([0, 3]) if penalty == 1 else 0)
            stops, logprobs = rng.choice([[], [EOS], [EOS, 110, 893]]), rng.random() < 0.3
            abandon, finish = rng.choice([None, None, 1, 4]), (rng.randrange(4), rng.randrange(len(prompts)))
            late = rng.choice([None, 0, 1, 2])  # after this step, prompts arrive while the others decode
            late_prompts = [rng.choice(history)[:rng.choice([63, 40, 20])] for _ in range(rng.choice([1, 2]))]
            results, added = [], []
            for engine in (on, off):
                run = engine.run(prompts, sp, stops, logprobs)
                for step, _ in enumerate(run):
                    if step == late:
                        run.add(late_prompts, sp, stops, logprobs)
                    if step == finish[0]:
                        run.finish(finish[1])
                    if step + 1 == abandon:
                        run.close()
                results.append(run.results)
                added.append(len(run.results) > len(prompts))
            assert added[0] == added[1]
            for p, a, b in zip(prompts + late_prompts * added[0], *results):
                assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
                if logprobs:
                    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
                reused += a.cached_tokens
                history += [p, p + a.tokens]
    assert reused > 200


def history_prompts(rng: random.Random, history: list[list[int]], longest: int, slots: int) -> list[list[int]]:
    """1, 2 or slots + 1 prompts: a prefix (shorter than `longest`) of an earlier prompt or output, and a new id."""
    return [rng.choice(history)[:rng.randrange(1, longest)] + [rng.randrange(3, 1200)]
            for _ in range(rng.choice([1, 2, slots + 1]))]


def random_params(rng: random.Random, drafting: bool = True) -> SamplingParams:
    """Greedy, penalised (HF's repetition penalty; OpenAI's presence and frequency, with a logit bias),
    seeded-sampling or (drafting) prompt-lookup parameters."""
    kind = rng.random()
    return (SamplingParams(max_new_tokens=rng.randrange(2, 12)) if kind < 0.3 else
            SamplingParams(max_new_tokens=8, repetition_penalty=1.3) if kind < 0.42 else
            SamplingParams(max_new_tokens=8, presence_penalty=0.8, frequency_penalty=0.5,
                           logit_bias={110: 2.0, 893: -3.0}) if kind < 0.5 else
            SamplingParams(max_new_tokens=8, temperature=0.9, seed=rng.randrange(99)) if kind < 0.8 or not drafting
            else SamplingParams(max_new_tokens=10, prompt_lookup=3))


def test_prefill_in_parts_equals_whole_over_random_calls(folder):
    """Prompts arriving while others decode, prefilled a few tokens per step (prefix reuse on, so parts start
    anywhere; with the padded CUDA-graph step emulated, which at times finds too few free slots and runs eagerly),
    with greedy, penalised, seeded-sampling and drafting rows: the same ids as an engine that prefills every prompt
    whole and reuses nothing."""
    from codellama_ext.generation import _DecodeGraph
    fed = []
    for seed, slots, padded, chunk in ((2, 3, False, 2), (5, 4, True, 5)):
        rng = random.Random(seed)
        parts, whole = (Engine(load_model(folder, dtype=torch.float32, max_seq_len=64, max_batch_size=slots),
                               prefix_cache=cache) for cache in (True, False))
        parts.prefill_chunk, whole.prefill_chunk = chunk, None
        if padded:
            parts._graphs = {b: _DecodeGraph(parts.model, b, None, capture=False) for b in parts.buckets}
        prefill = parts.prefill
        # parts of `chunk` tokens: prompts cut by the budget (or, rarely, whose rest was that long)
        parts.prefill = lambda *a: fed.append(sum(len(p) == chunk for p in a[1])) or prefill(*a)
        history = [[1] + [rng.randrange(3, 1200) for _ in range(50)]]
        for _ in range(8):
            sp = random_params(rng)
            first = history_prompts(rng, history, 60, slots)
            later = {rng.randrange(4): history_prompts(rng, history, 60, slots) for _ in range(rng.choice([1, 2]))}
            stops = rng.choice([[], [EOS, 110, 893]])
            results = []
            for engine in (parts, whole):
                run = engine.run(first, sp, stops)
                for step, _ in enumerate(run):
                    if step in later:
                        run.add(later[step], sp, stops)
                results.append(run.results)
            assert len(results[0]) == len(results[1]) > len(first)
            for a, b in zip(*results):
                assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
                history.append((history[0] + a.tokens)[:60])
    assert sum(fed) > 30


def test_steps_launched_ahead_equal_plain_steps_over_random_calls(folder, monkeypatch):
    """Engine.overlap (each decode step launched before the host reads the ids it feeds; on by default on CUDA,
    forced here on the CPU): over random calls with stop ids, budgets, rows finished by the consumer, abandoned runs,
    prompts arriving while others decode (prefilled in parts), penalties, seeded sampling, logprobs, the padded
    CUDA-graph step emulated and prefix reuse across calls (whose records must hold the ids the launched-ahead
    steps fed, finished rows' too), the same results as plain steps."""
    from codellama_ext import generation
    launched, reused = [], 0
    to_host = generation._to_host
    monkeypatch.setattr(generation, "_to_host", lambda t: launched.append(len(t)) or to_host(t))
    for seed, slots, padded, chunk in ((3, 3, False, 3), (6, 4, True, None)):
        rng = random.Random(seed)
        ahead, plain = (Engine(load_model(folder, dtype=torch.float32, max_seq_len=64, max_batch_size=slots))
                        for _ in range(2))
        ahead.overlap, plain.overlap = True, False
        ahead.prefill_chunk = plain.prefill_chunk = chunk
        if padded:
            ahead._graphs = {b: generation._DecodeGraph(ahead.model, b, None, capture=False) for b in ahead.buckets}
        history = [[1] + [rng.randrange(3, 1200) for _ in range(40)]]
        for _ in range(10):
            sp = random_params(rng, drafting=False)
            first = history_prompts(rng, history, 50, slots)
            later = {rng.randrange(4): history_prompts(rng, history, 50, slots) for _ in range(rng.choice([0, 1, 2]))}
            stops, logprobs = rng.choice([[], [EOS, 110, 893]]), rng.random() < 0.3
            finish, abandon = (rng.randrange(5), rng.randrange(len(first))), rng.choice([None, None, 2, 5])
            results = []
            for engine in (ahead, plain):
                run = engine.run(first, sp, stops, logprobs)
                for step, _ in enumerate(run):
                    if step in later:
                        run.add(later[step], sp, stops, logprobs)
                    if step == finish[0]:
                        run.finish(finish[1])
                    if step + 1 == abandon:
                        run.close()
                results.append(run.results)
            assert len(results[0]) == len(results[1])
            for a, b in zip(*results):
                # (cached_tokens may differ: a finished row's slot holds one id more after a step launched ahead)
                assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
                if logprobs:
                    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
                reused += a.cached_tokens
                history.append((history[0] + a.tokens)[:50])
    assert reused > 100 and len(launched) > 50 and max(launched) > 1


def test_prompt_lookup_equals_greedy(folder, hf):
    """Drafts checked in one forward give plain greedy's tokens, logprobs and finish reasons (and transformers'),
    with budgets and the window end cutting a draft, alone and in batches (rows drafting at different steps,
    the queue refilling slots)."""
    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=40, max_batch_size=2), prefix_cache=False)
    prompts = random_prompts(N_PROMPTS)
    accepted = accepted_in_batch = 0
    for n_new in (N_NEW, 3, 40):  # 40: every prompt runs into the window (max_seq_len 40)
        plain = engine.generate(prompts, SamplingParams(max_new_tokens=n_new), [EOS], logprobs=True)
        for p, ref in zip(prompts, plain):
            res = engine.generate([p], SamplingParams(max_new_tokens=n_new, prompt_lookup=4), [EOS], logprobs=True)[0]
            assert (res.tokens, res.finish_reason) == (ref.tokens, ref.finish_reason)
            assert res.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
            accepted += res.accepted_drafts
        batch = engine.generate(prompts, SamplingParams(max_new_tokens=n_new, prompt_lookup=4), [EOS], logprobs=True)
        for res, ref in zip(batch, plain):
            assert (res.tokens, res.finish_reason) == (ref.tokens, ref.finish_reason)
            assert res.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
            accepted_in_batch += res.accepted_drafts
    assert accepted > 0 and accepted_in_batch > 0  # drafts were right, or this test would prove nothing
    for p in prompts:
        assert engine.generate([p], SamplingParams(max_new_tokens=N_NEW, prompt_lookup=4), [EOS])[0].tokens == \
            hf_greedy(hf, p, N_NEW)[0]


def test_prompt_lookup_keeps_prefix_records_exact(folder, hf):
    """Rejected draft tokens are written to the cache past the accepted ones: they must never be reused."""
    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=1))
    sp = SamplingParams(max_new_tokens=N_NEW, prompt_lookup=6)
    p = random_prompts(3)[2]  # its greedy output repeats itself: drafts are accepted
    first = engine.generate([p], sp, [])[0]
    assert first.accepted_drafts > 0
    resent = p + first.tokens  # the last output token was never fed: all but it are held
    for q, held in ((resent, len(resent) - 1), (p + first.tokens[:7] + [5, 6], len(p) + 7)):
        res = engine.generate([q], sp, [])[0]
        assert (res.cached_tokens, res.tokens) == (held, hf_greedy(hf, q, N_NEW, stop_id=None)[0])


def test_prompt_lookup_drafts_for_several_rows_at_once(folder):
    """Rows whose drafts are right at the same steps verify them in one packed forward: a batch takes as few
    forwards as one of its rows alone, and fewer than plain decoding (the GPU's way: drafts_per_forward None).
    On the CPU by default one row drafts per forward, the rows taking turns: the same tokens."""
    engine = Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=3), prefix_cache=False)
    assert engine.drafts_per_forward == 1
    engine.drafts_per_forward = None
    p = random_prompts(3)[2]  # its greedy output repeats itself: drafts are accepted
    sp = SamplingParams(max_new_tokens=N_NEW, prompt_lookup=6)

    def forwards(prompts, params):
        writes = engine.model.cache_writes
        results = engine.generate(prompts, params, [])
        return results, engine.model.cache_writes - writes - 1  # less the prefill

    plain, n_plain = forwards([p, p, p], SamplingParams(max_new_tokens=N_NEW))
    alone, n_alone = forwards([p], sp)
    batch, n_batch = forwards([p, p, p], sp)
    assert [r.tokens for r in batch] == [r.tokens for r in plain] == [alone[0].tokens] * 3
    assert all(r.accepted_drafts == alone[0].accepted_drafts > 0 for r in batch)
    assert n_batch == n_alone < n_plain == N_NEW - 1
    engine.drafts_per_forward = 1
    turns, n_turns = forwards([p, p, p], sp)
    assert [r.tokens for r in turns] == [r.tokens for r in plain]
    assert all(r.accepted_drafts > 0 for r in turns) and n_batch < n_turns < n_plain


def test_prompt_lookup_refused_with_sampling():
    with pytest.raises(ValueError, match="prompt_lookup must be an integer >= 0"):
        SamplingParams(prompt_lookup=-1)
    for kw in (dict(temperature=0.7), dict(repetition_penalty=1.2), dict(presence_penalty=0.1),
               dict(frequency_penalty=-0.1), dict(logit_bias={3: 1})):
        with pytest.raises(ValueError, match="needs temperature 0, no repetition, presence or frequency penalty and"):
            SamplingParams(prompt_lookup=4, **kw)


@pytest.fixture(scope="module")
def folder_d64(spm_models, tmp_path_factory):
    """As `folder`, with head_dim 64: the CUDA attention kernels take head_dim 64 or 128 (CodeLlama: 128)."""
    hf64 = tiny_hf_model(seed=0, vocab=VOCAB, dim=128, n_heads=2, n_kv_heads=1, ffn=384)
    return write_folder(hf64, spm_models["codellama"], tmp_path_factory.mktemp("gen-model-d64"))


@pytest.mark.cuda
def test_cuda_graph_decode_equals_eager(folder_d64):
    folder = folder_d64
    model = load_model(folder, device="cuda", dtype=torch.float32, max_seq_len=96, max_batch_size=5)
    prompts = random_prompts(7)
    sp = SamplingParams(max_new_tokens=N_NEW)
    eager = Engine(model, cuda_graphs=False).generate(prompts, sp, [EOS], logprobs=True)
    graphed_engine = Engine(model)
    graphed = graphed_engine.generate(prompts, sp, [EOS], logprobs=True)
    assert graphed_engine.buckets == [1, 2, 4, 5] and graphed_engine._graphs is not None
    assert [r.tokens for r in graphed] == [r.tokens for r in eager]
    plain = Engine(model)
    plain.overlap = False  # each step launched after the host read the ids it feeds (graphed_engine: before)
    assert graphed_engine.overlap
    assert [r.tokens for r in plain.generate(prompts, sp, [EOS])] == [r.tokens for r in graphed]
    for g, e in zip(graphed, eager):
        assert g.logprobs == pytest.approx(e.logprobs, abs=1e-5)
    # and the CPU engine agrees on the ids
    cpu = Engine(load_model(folder, dtype=torch.float32, max_seq_len=96, max_batch_size=5))
    assert [r.tokens for r in cpu.generate(prompts, sp, [EOS])] == [r.tokens for r in graphed]
    seeded = SamplingParams(max_new_tokens=N_NEW, temperature=0.9, seed=5)
    assert [r.tokens for r in graphed_engine.generate(prompts, seeded, [EOS])] == \
        [r.tokens for r in graphed_engine.generate(prompts, seeded, [EOS])]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,quantize", [(torch.float32, None), (torch.float16, None), (torch.bfloat16, "int8")])
def test_cuda_dependent_launch_changes_no_bits(folder_d64, monkeypatch, dtype, quantize):
    """The decoder's kernels started before their predecessors end (programmatic dependent launch, codellama/launch.h;
    on compute capability 9.x) change when they run, never what they compute: ids and log-probabilities
    equal to bits with it turned off (CODELLAMA_PDL=0), graphed and eager, prefill and decode."""
    model = load_model(folder_d64, device="cuda", dtype=dtype, quantize=quantize, max_seq_len=96, max_batch_size=5)
    prompts = random_prompts(7)
    sp = SamplingParams(max_new_tokens=N_NEW)

    def run():
        out = []
        for graphs in (True, False):
            results = Engine(model, cuda_graphs=graphs, prefix_cache=False).generate(prompts, sp, [EOS], logprobs=True)
            out.append([(r.tokens, r.logprobs) for r in results])
        return out

    monkeypatch.setenv("CODELLAMA_PDL", "0")
    plain = run()
    monkeypatch.delenv("CODELLAMA_PDL")
    assert run() == plain


@pytest.mark.cuda
def test_cuda_prompts_joining_in_parts_equal_whole(folder_d64):
    """On CUDA with graphs: prompts joining a run in parts of 3 tokens, fed with the decoding rows' step (eager);
    in a drafting run, whose plain steps are graph replays, the prompts being prefilled leave too few free slots
    for graph padding at times (those steps run eagerly): the ids of an eager engine that prefills whole."""
    model = load_model(folder_d64, device="cuda", dtype=torch.float32, max_seq_len=96, max_batch_size=4)
    prompts = random_prompts(7)
    later = {1: prompts[2:5], 4: prompts[5:]}
    for sp in (SamplingParams(max_new_tokens=N_NEW), SamplingParams(max_new_tokens=N_NEW, prompt_lookup=3)):
        results = []
        for engine in (Engine(model), Engine(model, cuda_graphs=False, prefix_cache=False)):
            engine.prefill_chunk = 3 if engine.cuda_graphs else None
            run = engine.run(prompts[:2], sp, [EOS], logprobs=True)
            for i, _ in enumerate(run):
                if i in later:
                    run.add(later[i], sp, [EOS], logprobs=True)
            results.append(run.results)
        assert len(results[0]) == len(prompts)
        for a, b in zip(*results):
            assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@settings(max_examples=300, deadline=None)
@given(head=st.lists(st.integers(0, 3), max_size=40), a=st.lists(st.integers(0, 3), max_size=20),
       b=st.lists(st.integers(0, 3), max_size=20))
def test_shared_prefix_is_the_first_difference(head, a, b):
    """_shared_prefix (bisection over slices) against an element-wise scan; small alphabets make tails agree often."""
    x, y = head + a, head + b
    expected = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
    assert _shared_prefix(x, y) == expected == _shared_prefix(y, x)
