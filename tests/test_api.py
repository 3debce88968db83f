"""Tests of the public API (codellama_ext.api.CodeLlama). Oracle: transformers' LlamaForCausalLM.generate
(do_sample=False) on the same random float32 weights, given our prompt ids (tokenizer semantics are tested in
test_tokenizer.py), and the tokenizer's own decode rules for the expected text."""

from __future__ import annotations

import gc
import shutil
import threading

import pytest
import torch

from codellama_ext import CodeLlama, CodeLlamaTokenizer, InfillingNotSupported, SamplingParams
from codellama_ext import api

from checkpoint_fixtures import save_hf
from test_generation import EOS, EOT, STEP, hf_greedy
from test_generation import folder, hf, spm_models  # noqa: F401  (the same module-scoped fixtures)

N = 20
# Chosen so that the fixture model (test_generation.make_hf_model) stops on EOS for one completion, on EOT for one
# infill in each format, generates EOS inside another infill, and stops on <step> in the 70B chat format.
COMPLETE = ["def fib(n):", "import os\n", "class A:\n    def __init__(self):", "# print hello\nprint("]
INFILL = [("def f(x):\n    ", "\n    return y"), ("import ", "\nprint(os.name)"), ("", "x = 2")]
DIALOGS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "sum two ints"}],
]


@pytest.fixture(scope="module")
def llm(folder):
    return CodeLlama.from_pretrained(folder, dtype=torch.float32, max_seq_len=128, max_batch_size=3)


@pytest.fixture(scope="module")
def ref_complete(llm, hf):
    """transformers' (tokens, stopped) per COMPLETE prompt."""
    return [hf_greedy(hf, llm.tokenizer.encode_meta(p, True, False), N) for p in COMPLETE]


@pytest.fixture(scope="module")
def expected_complete(llm, ref_complete):
    return [llm.tokenizer.decode_meta(ref) for ref, _ in ref_complete]


@pytest.fixture(scope="module")
def ref_infill(llm, hf):
    """transformers' (tokens, stopped) per INFILL case, PSM (suffix_first False) and SPM, stopping at EOT."""
    return {sf: [hf_greedy(hf, llm.tokenizer.infill_ids(pre, suf, sf), N, stop_id=EOT) for pre, suf in INFILL]
            for sf in (False, True)}


@pytest.fixture(scope="module")
def step_llm(llm, spm_models):
    """The same weights with the 70B-Instruct layout vocabulary (<step> as the last piece)."""
    return CodeLlama(llm.model, CodeLlamaTokenizer(spm_models["step"]))


def test_from_pretrained(llm, folder, hf, spm_models, tmp_path, expected_complete):
    assert isinstance(llm.tokenizer, CodeLlamaTokenizer) and llm.args.vocab_size == 1216
    assert llm.device == torch.device("cpu") and llm.model.max_batch_size == 3
    default = CodeLlama.from_pretrained(folder, dtype=torch.float32, max_batch_size=1)
    assert default.model.max_seq_len == 4096  # a Meta folder: min(CodeLlama's 16384, 4096)
    # an HF folder (rotate-half q/k rows): its context from config.json, the same text
    save_hf(hf, tmp_path)
    shutil.copy(spm_models["codellama"], tmp_path / "tokenizer.model")
    from_hf = CodeLlama.from_pretrained(tmp_path, dtype=torch.float32, max_batch_size=1)
    assert from_hf.model.max_seq_len == 256 and not from_hf.model.interleaved
    assert from_hf.complete(COMPLETE[0], max_new_tokens=N) == expected_complete[0]


def test_complete_matches_transformers(llm, ref_complete, expected_complete):
    res = llm.generate([llm.tokenizer.encode_meta(COMPLETE[3], True, False)], max_new_tokens=N)[0]
    assert (res.tokens, res.finish_reason == "stop") == ref_complete[3]
    for p, exp in zip(COMPLETE, expected_complete):
        assert llm.complete(p, max_new_tokens=N) == exp
    assert {stopped for _, stopped in ref_complete} == {True, False}
    # a batch (4 prompts over 3 cache slots) gives each prompt's single result
    assert llm.complete(COMPLETE, max_new_tokens=N) == expected_complete


@pytest.mark.parametrize("suffix_first", [False, True])
def test_infill_matches_transformers(llm, ref_infill, suffix_first):
    refs = ref_infill[suffix_first]
    for (pre, suf), (ref, _) in zip(INFILL, refs):
        assert llm.infill(pre, suf, suffix_first=suffix_first, max_new_tokens=N) == llm.tokenizer.decode_infill(ref)
    # the cases include a run stopped by EOT and one that generated EOS and went on (EOS does not stop infilling)
    assert any(st for _, st in refs) and any(EOS in ref for ref, _ in refs)


def test_pipeline_call(llm, ref_infill, ref_complete):
    tok = llm.tokenizer
    pre, suf = INFILL[0]
    middle = tok.decode_infill(ref_infill[False][0][0])
    assert llm(pre + "<FILL_ME>" + suf, max_new_tokens=N) == pre + middle + suf
    assert llm.infill(pre + "<FILL_ME>" + suf, max_new_tokens=N) == middle
    # the whole text, as decoding prompt and new ids together gives it: a first new piece "▁x" keeps its space
    # (complete() alone drops it, as Meta's decode of the new ids does)
    for p, (ref, _) in zip(COMPLETE, ref_complete):
        assert llm(p, max_new_tokens=N) == tok.decode_meta(tok.encode_meta(p, True, False) + ref)
    assert any(tok.convert_ids_to_tokens(ref[0]).startswith("▁") for ref, _ in ref_complete)


def test_chat_matches_transformers(llm, step_llm, hf):
    for msgs in DIALOGS:
        ref, _ = hf_greedy(hf, llm.tokenizer.chat_ids(msgs), N)
        assert llm.chat(msgs, max_new_tokens=N) == llm.tokenizer.decode_meta(ref)
    # the 70B-Instruct format (Source/Destination turns) stops at <step> or EOS
    for msgs in DIALOGS:
        ref, stopped = hf_greedy(hf, step_llm.tokenizer.chat_ids(msgs), N, stop_id=[EOS, STEP])
        assert stopped
        assert step_llm.chat(msgs, max_new_tokens=N) == step_llm.tokenizer.decode_meta(ref)


def test_prefix_cache_reuses_and_can_be_off(llm, folder, expected_complete):
    ids = llm.tokenizer.encode_meta(COMPLETE[0], True, False)
    first, again = (llm.generate([ids], max_new_tokens=N)[0] for _ in range(2))
    assert again.cached_tokens == len(ids) - 1 and again.tokens == first.tokens
    off = CodeLlama(llm.model, llm.tokenizer, prefix_cache=False)
    assert [(r.cached_tokens, r.tokens) for r in (off.generate([ids], max_new_tokens=N)[0] for _ in range(2))] \
        == [(0, first.tokens)] * 2
    loaded = CodeLlama.from_pretrained(folder, dtype=torch.float32, max_seq_len=64, max_batch_size=1,
                                       prefix_cache=False)
    assert not loaded.engine.prefix_cache and loaded.complete(COMPLETE[0], max_new_tokens=N) == expected_complete[0]


def test_stop_strings_cut_exactly(llm, expected_complete):
    p, full = COMPLETE[1], expected_complete[1]
    s1, s2 = full[10:13], full[20:22]
    assert full.find(s1) > 0
    assert llm.complete(p, max_new_tokens=N, stop=s1) == full[:full.find(s1)]
    assert llm.complete(p, max_new_tokens=N, stop=[s2, s1]) == full[:min(full.find(s1), full.find(s2))]
    assert llm.complete(p, max_new_tokens=N, stop=["never in this text \u2603"]) == full
    assert "".join(llm.stream(p, max_new_tokens=N, stop=s1)) == full[:full.find(s1)]
    # in a batch only the row that meets the stop string is cut
    assert llm.complete(COMPLETE[:2], max_new_tokens=N, stop=s1) == \
        [llm.complete(COMPLETE[0], max_new_tokens=N, stop=s1), full[:full.find(s1)]]


def test_prompt_lookup_gives_the_same_text(llm, ref_infill, expected_complete):
    assert llm.complete(COMPLETE, max_new_tokens=N, prompt_lookup=5) == expected_complete
    pre, suf = INFILL[1]
    assert llm.infill(pre, suf, max_new_tokens=N, prompt_lookup=5) == \
        llm.tokenizer.decode_infill(ref_infill[False][1][0])
    assert llm.chat(DIALOGS[0], max_new_tokens=N, prompt_lookup=5) == llm.chat(DIALOGS[0], max_new_tokens=N)
    full = expected_complete[1]
    stop = full[10:13]  # may fall inside a step's several confirmed tokens: still cut exactly
    assert llm.complete(COMPLETE[1], max_new_tokens=N, stop=stop, prompt_lookup=5) == full[:full.find(stop)]
    assert "".join(llm.stream(COMPLETE[1], max_new_tokens=N, prompt_lookup=5)) == full


def test_stream_deltas_join_to_result(llm, ref_infill, expected_complete):
    pre, suf = INFILL[1]
    tok = llm.tokenizer
    cases = [(COMPLETE[0], {}, expected_complete[0]),
             (pre, dict(mode="infill", suffix=suf), tok.decode_infill(ref_infill[False][1][0])),
             (pre, dict(mode="infill", suffix=suf, suffix_first=True), tok.decode_infill(ref_infill[True][1][0])),
             (DIALOGS[0], dict(mode="chat"), llm.chat(DIALOGS[0], max_new_tokens=N))]
    for prompt, kw, whole in cases:
        deltas = list(llm.stream(prompt, max_new_tokens=N, **kw))
        assert len(deltas) > 1 and "".join(deltas) == whole


def test_abandoned_stream_leaves_model_usable(llm, expected_complete):
    s = llm.stream(COMPLETE[2], max_new_tokens=N)
    next(s), next(s)
    s.close()
    assert llm.complete(COMPLETE[0], max_new_tokens=N) == expected_complete[0]
    s = llm.stream(COMPLETE[2], max_new_tokens=N)
    next(s)
    del s  # dropped mid-way: garbage collection closes it and releases the lock
    gc.collect()
    assert llm.complete(COMPLETE[3], max_new_tokens=N) == expected_complete[3]
    # a call from inside one's own unfinished stream joins its generation (test_batching.py)
    s = llm.stream(COMPLETE[2], max_new_tokens=N)
    first = next(s)
    assert llm.complete(COMPLETE[0], max_new_tokens=N) == expected_complete[0]
    assert first + "".join(s) == expected_complete[2]


def test_concurrent_calls_on_two_instances(llm, step_llm, expected_complete):
    # two instances over one model (one KV cache) share its batcher; their calls take turns (different engines)
    assert step_llm._batcher is llm._batcher
    # the <step> vocabulary decodes the last piece differently: its single run is the reference
    expected = {0: [step_llm.complete(COMPLETE[0], max_new_tokens=N)] * 2, 3: [expected_complete[3]] * 2}
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = [(llm if i else step_llm).complete(COMPLETE[i], max_new_tokens=N) for _ in range(2)]
        except Exception as e:  # noqa: BLE001 (reported by the assert below)
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == expected


def test_params_bundle_equals_kwargs(llm):
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=4)
    a = llm.complete(COMPLETE[0], params=sp)
    assert a == llm.complete(COMPLETE[0], max_new_tokens=12, temperature=0.9, top_k=20, seed=4)
    assert llm.complete(COMPLETE[0], params=sp, temperature=0.0) == llm.complete(COMPLETE[0], max_new_tokens=12)
    # top_k beyond the vocabulary is top_k off; seeds span torch's range
    assert llm.complete(COMPLETE[0], max_new_tokens=12, temperature=0.9, top_k=2 ** 40, seed=2 ** 64 - 1) == \
        llm.complete(COMPLETE[0], max_new_tokens=12, temperature=0.9, top_k=0, seed=2 ** 64 - 1)


def test_text_modes_pick_only_ids_the_tokenizer_has(llm, spm_models, hf):
    # The base vocabulary has 1200 pieces, the model 1216 embedding rows (as a fine-tune with a resized
    # embedding): the text API picks among the first 1200 logits, as transformers with the rest suppressed.
    base = CodeLlama(llm.model, CodeLlamaTokenizer(spm_models["base"]))
    ids = base.tokenizer.encode_meta("import", True, False)
    assert max(base.generate([ids], max_new_tokens=N)[0].tokens) >= 1200  # unrestricted, it would pick one
    ref, _ = hf_greedy(hf, ids, N, suppress_tokens=list(range(1200, 1216)))
    assert base.complete("import", max_new_tokens=N) == base.tokenizer.decode_meta(ref)


def test_errors(llm, spm_models, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens but the context window \(max_seq_len\) is 128"):
        llm.complete("x = 1\n" * 100)
    with pytest.raises(ValueError, match="context window"):
        llm.stream("x = 1\n" * 100)  # raised at the call, not at the first item
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        llm.complete("x", temperature=-1)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
        llm.complete("x", temperature=1, seed=2 ** 64)
    with pytest.raises(ValueError, match=r"unknown sampling argument\(s\) \['temprature'\]"):
        llm.complete("x", temprature=0.5)
    with pytest.raises(ValueError, match="exactly once"):
        llm("a <FILL_ME> b <FILL_ME>")
    with pytest.raises(ValueError, match="exactly once"):
        llm.infill("no fill token here")
    with pytest.raises(ValueError, match="mode must be one of"):
        llm.stream("x", mode="edit")
    with pytest.raises(ValueError, match="pass stop_ids, not stop strings"):
        llm.generate([[1, 5]], stop="x")
    with pytest.raises(ValueError, match="prompt must be a string or a non-empty list"):
        llm.complete([])
    with pytest.raises(ValueError, match="special tags"):
        llm.chat([{"role": "user", "content": "[INST] hi"}])
    base = CodeLlama(llm.model, CodeLlamaTokenizer(spm_models["base"]))
    with pytest.raises(InfillingNotSupported, match="no infilling pieces"):
        base.infill("def f():", "\n")  # the base vocabulary (34B, -Python) has no infill pieces
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CodeLlama.from_pretrained(tmp_path / "nowhere")
    monkeypatch.setattr(api, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    with pytest.raises(FileNotFoundError, match="default model folder .* is missing"):
        CodeLlama.from_pretrained()
