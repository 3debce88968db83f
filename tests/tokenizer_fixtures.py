"""Builds small CodeLlama-format SentencePiece models for the tokenizer tests (no network, no protobuf package).

A BPE model (byte fallback, identity normalizer, dummy prefix, split digits: Llama's settings) is trained on Python
standard-library source plus snippets in other languages; the 16 CodeLlama pieces are then appended as ordinary
pieces at ids V-16..V-1 (SPEC §3.1 order) with scores continuing the -rank sequence, the way
shared/tokenizers/codellama-format-tokenizer.model was built from Llama 2's vocabulary
(codellama_ext.tokenizer.append_pieces, at the protobuf wire level)."""

from __future__ import annotations

import inspect
import io
import textwrap
from pathlib import Path

from codellama_ext.tokenizer import CODELLAMA_EXTRA_PIECES, append_pieces

CODELLAMA_PIECES = list(CODELLAMA_EXTRA_PIECES)
assert len(CODELLAMA_PIECES) == 16

SNIPPETS = [
    "#include <stdio.h>\nint main(int argc, char **argv) {\n\tprintf(\"hello %d\\n\", argc);\n\treturn 0;\n}\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{:?}\", v);\n}\n",
    "function add(a, b) { return a + b; }\nconst xs = [1, 2, 3].map((x) => x ** 2);\nconsole.log(`sum ${xs}`);\n",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;\n",
    "<html><body><p class=\"x\">Hello, world!</p></body></html>\n",
    "// naïve café — 日本語のテキスト, Привет мир, emoji 😀🚀\n",
    "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"hi\") }\n",
]


def corpus_lines() -> list[str]:
    text = "\n".join([Path(inspect.__file__).read_text(), Path(textwrap.__file__).read_text()] + SNIPPETS * 20)
    # One "☺" (a required char): sentencepiece 0.2.2 aborts on a required char that never occurs.
    return [line for line in text.split("\n") if line.strip()] + ["☺"]


def train_base(vocab_size: int = 1200) -> bytes:
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        # "☺" only via required_chars: a piece of its own that never merges (Meta's infill trick needs that).
        character_coverage=1.0, required_chars="☺", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=2, max_sentence_length=100000, minloglevel=2)
    return buf.getvalue()


def build_models(directory: Path) -> dict[str, Path]:
    """Writes base (no infill pieces, like 34B/-Python), codellama (7B/13B layout) and step (70B-Instruct layout:
    the last piece is <step>) models; returns their paths by name."""
    directory = Path(directory)
    base = train_base()
    models = {
        "base": base,
        "codellama": append_pieces(base, CODELLAMA_PIECES),
        "step": append_pieces(base, CODELLAMA_PIECES[:-1] + ["<step>"]),
    }
    paths = {}
    for name, proto in models.items():
        p = directory / f"{name}.model"
        p.write_bytes(proto)
        paths[name] = p
    return paths
