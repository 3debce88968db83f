"""Tests of codellama_ext.tokenizer (issue 3).

Oracles: transformers' CodeLlamaTokenizer (slow) and, where documented to agree, CodeLlamaTokenizerFast (SPEC §4);
Meta's formats reimplemented below from SPEC §3 with raw sentencepiece (independent of the module). Models: a
CodeLlama-format tokenizer trained here (tests/tokenizer_fixtures.py) and, when present, the real Llama-2 vocabulary
with the 16 CodeLlama pieces (shared/tokenizers/codellama-format-tokenizer.model; skipped cleanly otherwise)."""

from __future__ import annotations

import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import tokenizer_fixtures  # noqa: E402

from codellama_ext.tokenizer import (CodeLlamaTokenizer, IncrementalDetokenizer,  # noqa: E402
                                     InfillingNotSupported)

REAL_NAME = "codellama-format-tokenizer.model"


def _real_model() -> Path | None:
    dirs = [os.environ.get("CODELLAMA_TEST_TOKENIZERS"), Path(__file__).resolve().parents[2] / "shared/tokenizers"]
    for d in dirs:
        if d and (Path(d) / REAL_NAME).is_file():
            return Path(d) / REAL_NAME
    return None


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory):
    return tokenizer_fixtures.build_models(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session", params=["toy", "real"])
def model_path(request, toy_models):
    if request.param == "toy":
        return toy_models["codellama"]
    p = _real_model()
    if p is None:
        pytest.skip("shared/tokenizers/codellama-format-tokenizer.model not available")
    return p


@pytest.fixture(scope="session")
def tok(model_path):
    return CodeLlamaTokenizer(model_path)


@pytest.fixture(scope="session")
def hf_slow(model_path):
    tr = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    return tr.CodeLlamaTokenizer(vocab_file=str(model_path))


@pytest.fixture(scope="session")
def hf_fast(model_path):
    tr = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    return tr.CodeLlamaTokenizerFast(vocab_file=str(model_path), from_slow=True)


CORPUS = [
    "", " ", "  ", "\n", "\t", "x", " x", "x ", "  leading", "trailing  ", " both ", "a    b        c",
    'def remove_non_ascii(s: str) -> str:\n    """ ',
    "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(10)]\n",
    "#include <stdio.h>\nint main(void) {\n    printf(\"%d\\n\", 42);\n}\n",
    "fn main() { let s = String::from(\"héllo\"); }\r\nline two\r\n",
    "const f = (a, b) => a + b; // JS\nSELECT * FROM t WHERE x = 'y';",
    "naïve café — 日本語 Привет мир ☺ 😀🚀 👩‍💻 \U0001F9EC",
    "numbers 1234567890 3.14159 0xDEADBEEF",
    "text ▁ with ▁underline▁ chars",
    "<s>\nfoo", "a </s> b", "[INST] hi [/INST]", "<<SYS>>\nsys\n<</SYS>>\n\n", "<unk> x", "<s></s>",
    "<PRE> abc <SUF> d <MID>", "▁<PRE> x", "<EOT><EOT>", "a<step>b",
    "<FILL_ME>def f():", "def f(<FILL_ME>):\n    pass\n", "def f():<FILL_ME>", " <FILL_ME> ", "x  <FILL_ME>  y  ",
    "<FILL_ME>", "  <FILL_ME>\n", "é<FILL_ME>😀",
]
PAIRS = [("def f(", "):\n    pass\n"), ("", "tail"), ("head", " tail"), (" x ", "  y  "), ("a\n", "\n"),
         ('def remove_non_ascii(s: str) -> str:\n    """ ', "\n    return result\n"), ("日本", "語 ☺"),
         ("<s> x", "</s> [INST]")]
SPECIAL_STRINGS = ("<s>", "</s>", "<unk>", "<PRE>", "<SUF>", "<MID>", "<EOT>")


# ------------------------------------------------------------------------------------------ Meta oracle (SPEC §3)
class MetaOracle:
    def __init__(self, path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        pid = self.sp.piece_to_id
        self.prefix_id, self.suffix_id, self.middle_id = pid("▁<PRE>") or None, pid("▁<SUF>") or None, \
            pid("▁<MID>") or None
        self.step_id = pid("<step>") or None

    def encode(self, s, bos, eos):
        return [1] * bos + self.sp.encode(s) + [2] * eos

    def encode_infilling(self, s):
        return self.sp.encode("☺" + s)[2:]

    def decode_infilling(self, t):
        return self.sp.decode([self.sp.piece_to_id("☺")] + t)[1:]

    def infill(self, pre, suf, suffix_first):
        if suffix_first:
            return [1, self.prefix_id, self.suffix_id] + self.encode_infilling(suf) + [self.middle_id] + \
                self.encode(pre, False, False)
        return [1, self.prefix_id] + self.encode(pre, False, False) + [self.suffix_id] + \
            self.encode_infilling(suf) + [self.middle_id]

    def chat(self, dialog):
        if self.step_id is not None:
            if dialog[0]["role"] != "system":
                dialog = [{"role": "system", "content": ""}] + dialog
            out = [1]
            for m in dialog:
                h = [f"Source: {m['role'].strip()}"] + ([f"Destination: {m['destination'].strip()}"]
                                                        if m.get("destination") is not None else [])
                out += self.encode(" " + "\n".join(h), False, False)
                if m["content"]:
                    out += self.encode("\n\n " + m["content"].strip(), False, False)
                out.append(self.step_id)
            return out + self.encode(" Source: assistant\nDestination: user", False, False) + \
                self.encode("\n\n ", False, False)
        if dialog[0]["role"] == "system":
            dialog = [{"role": dialog[1]["role"], "content": "<<SYS>>\n" + dialog[0]["content"] +
                       "\n<</SYS>>\n\n" + dialog[1]["content"]}] + dialog[2:]
        out = []
        for u, a in zip(dialog[::2], dialog[1::2]):
            out += self.encode(f"[INST] {u['content'].strip()} [/INST] {a['content'].strip()} ", True, True)
        return out + self.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]", True, False)


DIALOGS = [
    [{"role": "user", "content": "Write fizzbuzz in Rust."}],
    [{"role": "system", "content": "Answer in Python only."}, {"role": "user", "content": "  sort a list  "}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": " a1 "},
     {"role": "user", "content": "u2\nwith ☺ and 😀"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "destination": "user"},
     {"role": "user", "content": "\ty\r\n"}],
]


# ----------------------------------------------------------------------------------------------------- known value
def test_known_psm_vector():
    p = _real_model()
    if p is None:
        pytest.skip("shared/tokenizers/codellama-format-tokenizer.model not available")
    t = CodeLlamaTokenizer(p)
    want = [int(x) for x in ("1 32007 822 3349 29918 5464 29918 294 18869 29898 29879 29901 851 29897 1599 851 "
                             "29901 13 1678 9995 29871 32008 13 1678 736 1121 13 32009").split()]
    pre, suf = 'def remove_non_ascii(s: str) -> str:\n    """ ', "\n    return result\n"
    assert t.infill_ids(pre, suf) == want
    assert t.encode(pre, suffix=suf) == want
    assert t.encode(pre + "<FILL_ME>" + suf) == want
    assert (t.prefix_id, t.suffix_id, t.middle_id, t.eot_id, t.step_id) == (32007, 32008, 32009, 32010, None)
    assert (t.bos_token_id, t.eos_token_id, t.vocab_size) == (1, 2, 32016)


# ------------------------------------------------------------------------------------------------- HF slow parity
def test_hf_slow_encode_parity(tok, hf_slow):
    for text in CORPUS:
        for ast in (True, False):
            assert tok.encode(text, add_special_tokens=ast) == hf_slow.encode(text, add_special_tokens=ast), text
        assert tok.tokenize(text) == hf_slow.tokenize(text), text
        assert tok(text) == dict(hf_slow(text)), text
    batch = [t for t in CORPUS if t][:12]
    assert tok(batch) == dict(hf_slow(batch))
    for pre, suf in PAIRS:
        for sf in (False, True):
            assert tok.encode(pre, suffix=suf, suffix_first=sf) == hf_slow.encode(pre, suffix=suf, suffix_first=sf)
            assert tok.tokenize(pre, suffix=suf, suffix_first=sf) == hf_slow.tokenize(pre, suffix=suf,
                                                                                       suffix_first=sf)
        assert tok(pre, suffix=suf) == dict(hf_slow(pre, suffix=suf))


def test_long_text_parity(tok, hf_slow, model_path):
    """Long texts are encoded in newline-aligned chunks: the ids must not change."""
    import textwrap
    src = Path(textwrap.__file__).read_text()[:9000]
    texts = [src, " " + src.replace("\n", "\r\n"), "\n" * 3000 + "x", ("😀 é\n\t" * 700) + " end ",
             "no newline at all " * 300, "a\n" * 3000]
    meta = MetaOracle(model_path)
    for text in texts:
        assert tok.encode(text) == hf_slow.encode(text)
        assert tok.tokenize(text) == hf_slow.tokenize(text)
        assert tok.encode_meta(text, True, False) == meta.encode(text, True, False)
        assert tok.encode_infilling(text) == meta.encode_infilling(text)
        assert tok.infill_ids(text, text, suffix_first=True) == meta.infill(text, text, True)
        assert tok.decode(tok.encode(text)) == hf_slow.decode(hf_slow.encode(text))


def test_hf_slow_two_fill_tokens(tok, hf_slow):
    with pytest.raises(ValueError):
        hf_slow.encode("a<FILL_ME>b<FILL_ME>c")
    with pytest.raises(ValueError, match="FILL_ME"):
        tok.encode("a<FILL_ME>b<FILL_ME>c")


def test_hf_slow_decode_parity(tok, hf_slow):
    rng = random.Random(0)
    seqs = [hf_slow.encode(t) for t in CORPUS] + [hf_slow.encode(p, suffix=s) for p, s in PAIRS]
    specials = [0, 1, 2, tok.prefix_id, tok.middle_id, tok.suffix_id, tok.eot_id]
    for _ in range(200):
        n = rng.randrange(0, 12)
        seqs.append([rng.choice(specials) if rng.random() < 0.2 else rng.randrange(tok.vocab_size)
                     for _ in range(n)])
    vocab = tok.get_vocab()
    spaces = [i for p, i in vocab.items() if set(p) == {"▁"}]  # whitespace-only pieces: first-▁ strip quirk
    seqs += [[i, 5, 300] for i in spaces] + [[i] for i in spaces] + [[i, 1, 300] for i in spaces]
    for ids in seqs:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_slow.decode(ids, skip_special_tokens=skip), ids
        assert tok.convert_ids_to_tokens(ids) == hf_slow.convert_ids_to_tokens(ids)
    assert tok.batch_decode(seqs[:5]) == hf_slow.batch_decode(seqs[:5])


def test_hf_slow_misc_parity(tok, hf_slow, model_path, tmp_path):
    for name in ("bos_token_id", "eos_token_id", "prefix_id", "middle_id", "suffix_id", "eot_id", "vocab_size",
                 "add_bos_token", "add_eos_token", "all_special_ids", "all_special_tokens"):
        assert getattr(tok, name) == getattr(hf_slow, name), name
    assert tok.get_vocab() == hf_slow.get_vocab()
    toks = ["▁def", "<s>", "▁<PRE>", "not-a-piece", "<0x0A>"]
    assert tok.convert_tokens_to_ids(toks) == hf_slow.convert_tokens_to_ids(toks)
    assert tok.convert_ids_to_tokens(5) == hf_slow.convert_ids_to_tokens(5)
    a, b = [5, 6, 7], [8, 9]
    for add_bos, add_eos in ((True, False), (False, True), (True, True), (False, False)):
        t = CodeLlamaTokenizer(model_path, add_bos_token=add_bos, add_eos_token=add_eos)
        import transformers
        h = transformers.CodeLlamaTokenizer(vocab_file=str(model_path), add_bos_token=add_bos,
                                            add_eos_token=add_eos)
        for x in ((a,), (a, b)):
            assert t.build_inputs_with_special_tokens(*x) == h.build_inputs_with_special_tokens(*x)
            assert t.get_special_tokens_mask(*x) == h.get_special_tokens_mask(*x)
            assert t.create_token_type_ids_from_sequences(*x) == h.create_token_type_ids_from_sequences(*x)
        ids = h.encode("def f(): pass</s>")
        assert t.get_special_tokens_mask(ids, already_has_special_tokens=True) == \
            h.get_special_tokens_mask(ids, already_has_special_tokens=True)
        for text in ("x", "", "<FILL_ME>y", "a<FILL_ME>b"):
            assert t.encode(text) == h.encode(text)
    (out,) = tok.save_vocabulary(str(tmp_path), "p")
    assert Path(out).name == "p-tokenizer.model" and Path(out).read_bytes() == Path(model_path).read_bytes()
    assert Path(hf_slow.save_vocabulary(str(tmp_path / ""), "p")[0]).read_bytes() == Path(out).read_bytes()


def test_suffix_first_config(model_path):
    t = CodeLlamaTokenizer(model_path, suffix_first=True)
    spm_ids = t.encode("a", suffix="b", suffix_first=True)
    assert t.encode("a", suffix="b") != spm_ids  # HF: the default argument False wins over the constructor
    assert t.encode("a", suffix="b", suffix_first=None) == spm_ids


# ------------------------------------------------------------------------------------------------- HF fast parity
def test_hf_fast_parity_where_documented(tok, hf_fast):
    """Agreement expected on text without special-token strings and on infilling with a non-empty prefix; the
    fast tokenizer differs after special tokens (extra ▁), on empty prefixes (stray ▁) and on decode spaces."""
    for text in CORPUS:
        if any(s in text for s in SPECIAL_STRINGS) or text.startswith("<FILL_ME>"):
            continue
        assert tok.encode(text) == hf_fast.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == \
            hf_fast.decode(hf_fast.encode(text), skip_special_tokens=True), text
    for pre, suf in PAIRS:
        if pre and not any(s in pre + suf for s in SPECIAL_STRINGS):
            for sf in (False, True):
                assert tok.encode(pre, suffix=suf, suffix_first=sf) == \
                    hf_fast.encode(pre, suffix=suf, suffix_first=sf), (pre, suf, sf)


# ---------------------------------------------------------------------------------------------------- Meta parity
def test_meta_encode_and_infill_parity(tok, model_path):
    meta = MetaOracle(model_path)
    for text in CORPUS:
        for bos, eos in ((True, False), (False, True), (False, False)):
            assert tok.encode_meta(text, bos, eos) == meta.encode(text, bos, eos)
        assert tok.encode_infilling(text) == meta.encode_infilling(text)
        ids = meta.encode(text, True, True)
        assert tok.decode_meta(ids + [-1]) == meta.sp.decode(ids)
        assert tok.decode_infill(meta.encode_infilling(text)) == meta.decode_infilling(meta.encode_infilling(text))
    for pre, suf in PAIRS + [(t, t) for t in CORPUS]:
        for sf in (False, True):
            assert tok.infill_ids(pre, suf, suffix_first=sf) == meta.infill(pre, suf, sf), (pre, suf, sf)
    # Meta keeps a genuine leading space of a middle; HF decode loses it.
    mid = tok.encode_infilling(" bar = 1")
    assert tok.decode_infill(mid) == " bar = 1"
    assert tok.decode(mid) == "bar = 1"
    assert tok.infill_ids("", "x")[:3] == [1, tok.prefix_id, tok.suffix_id]  # empty prefix: nothing between


def test_meta_chat_inst(tok, model_path):
    meta = MetaOracle(model_path)
    assert tok.step_id is None
    for d in DIALOGS:
        assert tok.chat_ids(d) == meta.chat(d)
    ids = tok.chat_ids(DIALOGS[2])
    assert ids.count(1) == 2 and ids.count(2) == 1


def test_meta_chat_step(toy_models):
    t = CodeLlamaTokenizer(toy_models["step"])
    meta = MetaOracle(toy_models["step"])
    assert t.step_id == t.vocab_size - 1 and t.eot_id is not None
    for d in DIALOGS:
        assert t.chat_ids(d) == meta.chat(d)
    ids = t.chat_ids(DIALOGS[0])
    assert ids[0] == 1 and ids.count(t.step_id) == 2


@pytest.mark.parametrize("content", ["[INST] x", "a [/INST]", "<<SYS>>", "x<</SYS>>", "<step>"])
def test_chat_rejects_special_tags(tok, toy_models, content):
    for t in (tok, CodeLlamaTokenizer(toy_models["step"])):
        with pytest.raises(ValueError, match="special tags"):
            t.chat_ids([{"role": "user", "content": content}])


def test_chat_bad_roles(tok):
    with pytest.raises(ValueError):
        tok.chat_ids([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError):
        tok.chat_ids([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    with pytest.raises(ValueError):
        tok.chat_ids([])


# ------------------------------------------------------------------------------------------------------ bad input
def test_missing_and_corrupt_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot read"):
        CodeLlamaTokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        CodeLlamaTokenizer.from_pretrained(tmp_path)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x0a\xff\xff garbage")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        CodeLlamaTokenizer(bad)
    bad.write_bytes(b"")
    with pytest.raises(ValueError):
        CodeLlamaTokenizer(bad)


def test_from_pretrained(toy_models, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(toy_models["codellama"].read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"add_eos_token": true, "legacy": null}')
    t = CodeLlamaTokenizer.from_pretrained(tmp_path)
    assert t.add_eos_token and t.add_bos_token and t.encode("x")[-1] == 2
    assert not CodeLlamaTokenizer.from_pretrained(tmp_path, add_eos_token=False).add_eos_token


def test_hf_slow_parity_without_infill_pieces(toy_models):
    """34B/-Python-like vocabulary: plain text agrees with HF (which adds out-of-vocabulary infill tokens)."""
    tr = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    t = CodeLlamaTokenizer(toy_models["base"])
    h = tr.CodeLlamaTokenizer(vocab_file=str(toy_models["base"]))
    assert h.prefix_id == t.vocab_size and t.prefix_id is None  # HF: an added token past the vocabulary
    for text in CORPUS:
        if "<PRE>" in text or "<SUF>" in text or "<MID>" in text or "<EOT>" in text or "<FILL_ME>" in text:
            continue
        ids = h.encode(text)
        assert t.encode(text) == ids, text
        assert t.decode(ids) == h.decode(ids) and t.decode(ids, True) == h.decode(ids, skip_special_tokens=True)


def test_infilling_without_pieces(toy_models):
    t = CodeLlamaTokenizer(toy_models["base"])
    assert (t.prefix_id, t.middle_id, t.suffix_id, t.eot_id, t.step_id) == (None,) * 5
    assert not t.supports_infilling
    for call in (lambda: t.infill_ids("a", "b"), lambda: t.encode("a", suffix="b"),
                 lambda: t.encode("a<FILL_ME>b"), lambda: t("a", suffix="b")):
        with pytest.raises(InfillingNotSupported, match="no infilling pieces"):
            call()
    assert t.encode("a<FILL_ME>") == t.encode("a")  # empty suffix: plain encoding, as HF
    assert isinstance(InfillingNotSupported("x"), ValueError)


def test_out_of_range_ids(tok):
    for bad in ([tok.vocab_size], [-2], [5, 10 ** 9]):
        for fn in (tok.decode, tok.decode_meta, tok.decode_infill, tok.convert_ids_to_tokens):
            with pytest.raises(ValueError, match="out of range"):
                fn(bad)
    with pytest.raises(ValueError, match="out of range"):
        tok.detokenizer().add(tok.vocab_size)
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, "sideways")
    with pytest.raises(TypeError):
        tok.encode(123)


def test_piece_bytes_concatenate_to_the_text(tok):
    # Oracle: the text itself. SentencePiece's pieces of a text (its dummy-prefix space first) stand for its UTF-8
    # bytes, byte-fallback pieces one byte each (here the characters no piece holds).
    text = "def na\u00efve(x):\n\treturn '\u65e5\u672c' + \"\U0001f999\"  # \u00e9t\u00e9"
    ids = tok.encode_meta(text, bos=False, eos=False)
    assert b"".join(tok.piece_bytes(i) for i in ids) == (" " + text).encode()
    assert any(tok._sp.is_byte(i) for i in ids)
    assert tok.piece_bytes(tok.bos_id) == b"<s>" and tok.piece_bytes(tok.eos_id) == b"</s>"
    x, unk = tok.encode_infilling("x"), tok._sp.unk_id()
    assert tok.decode_infill(x + [unk] + x) == "x" + tok.piece_bytes(unk).decode() + "x"  # was "<unk>"
    with pytest.raises(ValueError, match="out of range"):
        tok.piece_bytes(tok.vocab_size)


def test_detokenizer_holds_incomplete_characters(tok):
    e_acute = [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in "\u00e9".encode()]
    det = tok.detokenizer("infill")
    assert det.add(e_acute[0]) == "" and det.held == "\ufffd"
    assert det.add(e_acute[1]) == "\u00e9" and det.held == ""
    assert det.add(e_acute[0]) == "" and det.flush() == "\ufffd" and det.held == ""


def test_batch_call_str_suffix_applies_to_every_text(tok, hf_slow):
    """A str suffix with a list of texts is each text's suffix in HF slow; it used to be split into characters and
    zipped with the texts ("xy" -> "x" for the first text, "y" for the second)."""
    texts = ["def f(", "b<FILL_ME>c", "x = "]
    assert tok(texts[:2], suffix="xy") == dict(hf_slow(texts[:2], suffix="xy"))  # as many characters as texts
    for suf in ("xy", "\n    return 1\n"):
        assert tok(texts, suffix=suf) == dict(hf_slow(texts, suffix=suf))
        assert tok(texts, suffix=suf, suffix_first=True) == dict(hf_slow(texts, suffix=suf, suffix_first=True))
    assert tok(["a", "b"], suffix=["x", "y"])["input_ids"] == [hf_slow.encode("a", suffix="x"),
                                                               hf_slow.encode("b", suffix="y")]


def test_second_positional_argument_is_refused(tok, hf_slow, hf_fast):
    """HF slow reads encode(a, b) as a text pair, HF fast as prefix and suffix: neither meaning can be silently
    right, so suffix is keyword-only."""
    a, b = (hf_slow.encode(x, add_special_tokens=False) for x in ("a", "b"))
    assert hf_slow.encode("a", "b") == hf_slow.build_inputs_with_special_tokens(a, b)
    assert hf_fast.encode("a", "b") == hf_slow.encode("a", suffix="b")
    for call in (lambda: tok.encode("a", "b"), lambda: tok("a", "b")):
        with pytest.raises(TypeError):
            call()
    assert tok.encode("a", suffix="b") == hf_slow.encode("a", suffix="b")


def test_lone_surrogate_error_names_the_argument(tok, model_path):
    """sentencepiece (so Meta and HF alike) fails on a lone surrogate with pybind11's opaque "Unable to cast"
    RuntimeError; ours names the argument and the position."""
    with pytest.raises(RuntimeError):
        spm.SentencePieceProcessor(model_file=str(model_path)).encode("a\ud800")
    calls = {"encode_meta: s": lambda: tok.encode_meta("a\ud800", True, False),
             "encode_infilling: s": lambda: tok.encode_infilling("a\ud800"),
             "infill_ids: prefix": lambda: tok.infill_ids("a\ud800", "b"),
             "infill_ids: suffix": lambda: tok.infill_ids("a", "b\ud800"),
             "encode: text": lambda: tok.encode("a\ud800"),
             "encode: suffix": lambda: tok.encode("a", suffix="b\ud800"),
             "tokenize: text": lambda: tok.tokenize("a\ud800"),
             "__call__: text[1]": lambda: tok(["a", "a\ud800"]),
             "chat_ids: messages[1]['content']": lambda: tok.chat_ids([
                 {"role": "system", "content": "s"}, {"role": "user", "content": "x\udfff"}])}
    for what, call in calls.items():
        with pytest.raises(ValueError, match=r"lone surrogate '\\ud(800|fff)' at index 1") as e:
            call()
        assert str(e.value).startswith(what), (what, str(e.value))
    # Unicode that is valid but unusual still agrees with SentencePiece (Meta's encode).
    meta = MetaOracle(model_path)
    for text in ("\x00", "a\x00b", "e\u0301\u0301", "\ufeff\u200bx\u3000", "\U0010ffff", "\r\n\r\t\x0b\x0c"):
        assert tok.encode_meta(text, True, False) == meta.encode(text, True, False)
        assert tok.decode_meta(meta.encode(text, True, False)) == meta.sp.decode(meta.encode(text, True, False))


def test_ids_must_be_integers(tok, model_path):
    """int() used to truncate float ids and read a str as digits: decode("123") decoded ids [1, 2, 3] and
    detokenizer().add(1.9) fed id 1. Meta's decode (sentencepiece) raises TypeError on floats."""
    import numpy as np
    import torch
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    with pytest.raises(TypeError):
        sp.decode([1.7, 5])
    for fn, name in ((tok.decode_meta, "decode_meta"), (tok.decode_infill, "decode_infill"), (tok.decode, "decode"),
                     (tok.convert_ids_to_tokens, "convert_ids_to_tokens")):
        for bad in ([1.7, 5], "123", b"12", [[5, 6]], torch.tensor([5.0]), None):
            with pytest.raises(TypeError, match=f"^{name}: ids must be"):
                fn(bad)
    det = tok.detokenizer()
    for bad in (1.9, "5", None, [5]):
        with pytest.raises(TypeError, match="^IncrementalDetokenizer.add: token_id must be an int"):
            det.add(bad)
    assert det.ids == []
    ids = sp.encode("def f(x): return x")
    for good in (ids, tuple(ids), np.array(ids), torch.tensor(ids), [np.int64(i) for i in ids]):
        assert tok.decode_meta(good) == sp.decode(ids)
    assert det.add(torch.tensor(ids[0])) + det.add(np.int64(ids[1])) == sp.decode(ids[:2])


def test_bad_argument_errors_name_the_argument(tok, toy_models):
    cases = [(lambda: tok.encode_infilling(None), TypeError, "encode_infilling: s must be a str, got NoneType"),
             (lambda: tok.infill_ids("x", None), TypeError, "infill_ids: suffix must be a str, got NoneType"),
             (lambda: tok.infill_ids(5, "x"), TypeError, "infill_ids: prefix must be a str, got int"),
             (lambda: tok.encode("a", suffix=5), TypeError, "encode: suffix must be a str, got int"),
             (lambda: tok.encode(b"a"), TypeError, "encode: text must be a str, got bytes"),
             (lambda: tok(["a", 5]), TypeError, r"__call__: text\[1\] must be a str, got int"),
             (lambda: tok(["a"], suffix=5), TypeError, "__call__: suffix must be None, a str or a list"),
             (lambda: tok.chat_ids("hi"), TypeError, "chat_ids: messages must be a list of dicts"),
             (lambda: tok.chat_ids(None), TypeError, "chat_ids: messages must be a list of dicts"),
             (lambda: tok.chat_ids(["hi"]), TypeError, r"chat_ids: messages\[0\] must be a dict"),
             (lambda: tok.chat_ids([{"role": "user"}]), ValueError, r"needs str 'role' and 'content'.*messages\[0\]")]
    step = CodeLlamaTokenizer(toy_models["step"])
    cases.append((lambda: step.chat_ids([{"role": "user", "content": "x", "destination": 5}]), TypeError,
                  r"chat_ids: messages\[0\]\['destination'\] must be a str, got int"))
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()


# ------------------------------------------------------------------------------------------------------- streaming
def _stream(tok, ids, mode):
    d = tok.detokenizer(mode)
    deltas = [d.add(i) for i in ids]
    deltas.append(d.flush())
    return deltas


def test_streaming_corpus(tok):
    for text in CORPUS:
        ids = tok.encode_meta(text, bos=False, eos=False)
        deltas = _stream(tok, ids, "completion")
        assert "".join(deltas) == tok.decode_meta(ids)
        assert not any("\ufffd" in x for x in deltas), text  # never half a UTF-8 character
        mid = tok.encode_infilling(text)
        deltas = _stream(tok, mid, "infill")
        assert "".join(deltas) == tok.decode_infill(mid) == text.replace("▁", " ")
        assert not any("\ufffd" in x for x in deltas)
    assert "".join(_stream(tok, tok.encode_infilling(" bar"), "infill")) == " bar"
    assert "".join(_stream(tok, tok.encode_meta(" bar", False, False), "completion")) == " bar"
    assert "".join(_stream(tok, tok.encode_meta("bar", True, False), "completion")) == "bar"


HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYP
@given(ids=st.lists(st.integers(min_value=0, max_value=10 ** 6), max_size=24), mode=st.sampled_from(
    ["completion", "infill"]))
def test_streaming_random_ids(tok, ids, mode):
    ids = [i % tok.vocab_size for i in ids]
    full = tok.decode_meta(ids) if mode == "completion" else tok.decode_infill(ids)
    assert "".join(_stream(tok, ids, mode)) == full


@HYP
@given(s=st.text(max_size=60))
def test_roundtrip_property(tok, s):
    want = s.replace("▁", " ")
    assert tok.decode_meta(tok.encode_meta(s, False, False)) == want
    assert tok.decode_infill(tok.encode_infilling(s)) == want
    if "<" not in s:  # no special-token strings, no <FILL_ME>
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == want
        assert tok.decode(tok.encode(s), skip_special_tokens=True) == want
    assert "".join(_stream(tok, tok.encode_meta(s, True, False), "completion")) == want


# ---------------------------------------------------------------------------------------------------- thread safety
def test_thread_safety(tok):
    texts = [t * 20 for t in CORPUS if "<FILL_ME>" not in t]
    want = [(tok.encode(t), tok.encode_meta(t, True, False), tok.decode(tok.encode(t))) for t in texts]

    def work(i):
        t = texts[i % len(texts)]
        return (tok.encode(t), tok.encode_meta(t, True, False), tok.decode(tok.encode(t)))

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(work, range(len(texts) * 4)))
    assert got == [want[i % len(texts)] for i in range(len(texts) * 4)]
