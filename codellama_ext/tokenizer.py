"""CodeLlama tokenizer: Meta's exact prompt formats for the engine, and a Hugging Face compatible surface.

Built on sentencepiece only (no transformers, no protobuf at run time). Facts: shared/SPEC.md §3 (Meta) and §4 (HF).

Two SentencePiece processors are loaded from the same model file:

* ``_sp``: the file as published (``add_dummy_prefix=true``): Meta's ``llama/tokenizer.py`` behaviour.
* ``_sp_hf``: the same proto with ``normalizer_spec.add_dummy_prefix = false`` (edited at the protobuf wire level),
  as transformers' ``CodeLlamaTokenizer`` (slow) loads it; leading spaces are then handled in Python.

Engine (Meta-exact) methods: ``encode_meta``, ``decode_meta``, ``encode_infilling``, ``decode_infill``,
``infill_ids``, ``chat_ids``. HF-compatible methods: ``encode``, ``decode``, ``__call__``, ``tokenize``,
``convert_tokens_to_ids``, ``convert_ids_to_tokens``, ``build_inputs_with_special_tokens``,
``get_special_tokens_mask``, ``create_token_type_ids_from_sequences``, ``save_vocabulary``, ``get_vocab``.
Streaming: ``IncrementalDetokenizer`` (``tokenizer.detokenizer(mode)``).

Meta / HF differences handled (the engine builds its prompts with the Meta methods):

1. Special-token strings inside user text. Meta never parses them (``<s>``, ``</s>``, ``[INST]`` are plain text to
   SentencePiece): ``encode_meta``/``infill_ids``/``chat_ids``. HF ``encode`` splits the text on ``<s>``, ``</s>``,
   ``<unk>`` and the infill tokens and maps them to their ids, adding no ``▁`` to the text after them (slow
   behaviour; the fast tokenizer does add one, transformers#25881); a lone ``▁`` before a leading special token is
   dropped. Infill prefixes/suffixes are not split on special tokens (as the slow tokenizer).
2. ``<FILL_ME>``: only the HF surface splits on it (``encode``/``__call__``/``tokenize``); more than one is a
   ValueError; an empty suffix after the split gives a plain encoding (no infill tokens). Meta's ``infill_ids`` takes
   prefix and suffix separately (a ``<FILL_ME>`` in them is plain text, as for Meta). ``suffix`` is keyword-only in
   ``encode``/``__call__``: HF slow reads a second positional argument as a text pair (``[1, a.., 1, b..]``), HF fast
   as the suffix (an infill prompt), so a positional one is refused rather than silently taking one meaning.
3. Empty prefix: Meta and HF slow emit nothing between ``<PRE>`` and ``<SUF>``; HF fast emits a stray ``▁`` (29871).
   We follow Meta/slow.
4. First-space on decode: ``decode_meta`` and ``decode`` drop the leading space of the first piece (completion);
   ``decode_infill`` keeps a genuine leading space of an infill middle (Meta's ☺ trick) where HF ``decode`` loses it.
   HF ``decode`` writes special tokens verbatim (``"<s>▁<PRE> def▁<SUF>"``) unless ``skip_special_tokens``; Meta
   decodes control pieces to nothing.
5. ``suffix_first``: as in HF slow, ``encode(..., suffix_first=False)`` is the default, so the constructor's
   ``suffix_first`` applies only when ``suffix_first=None`` is passed. Meta SPM (``infill_ids(...,
   suffix_first=True)``) encodes the prefix with its implicit leading space after ``<MID>``; HF SPM gives the same ids.
6. Vocabularies without the infill pieces (34B, -Python): HF registers ``▁<PRE>``... as added tokens with ids past
   the SentencePiece vocabulary (out of the embedding); we follow Meta: ``prefix_id``/``middle_id``/``suffix_id``/
   ``eot_id`` are None and any infilling (``infill_ids`` or ``encode`` with a suffix / ``<FILL_ME>``) raises
   ``InfillingNotSupported`` (a ValueError).
7. Chat: Meta encodes each turn separately (each with its own implicit leading space and its own BOS/EOS ids); the HF
   chat templates render text and re-tokenize it, which differs. ``chat_ids`` follows Meta (§3.4 [INST] format, or
   §3.5 Source/Destination/<step> when the vocabulary has ``<step>``). Meta replaces the *reply* by
   "Error: special tags are not allowed as part of the prompt." when a message contains ``[INST]``, ``[/INST]``,
   ``<<SYS>>``, ``<</SYS>>`` or ``<step>``; we raise ``ValueError`` instead, before any generation.
8. Out-of-range ids in decode raise ValueError (sentencepiece raises IndexError); Meta's pad id -1 is dropped by
   ``decode_meta`` only. Ids must be ints (Python, numpy or an integer tensor): floats and strings raise TypeError
   (sentencepiece, Meta's decode, raises on floats; HF slow truncates 1.7 to 1 and reads "123" as [1, 2, 3]). Text
   with a lone surrogate raises ValueError naming the argument (sentencepiece: an opaque pybind11 RuntimeError).
9. ``encode_infilling``/``decode_infill`` use Meta's ☺ trick (encode "☺"+s, drop two ids; decode [☺]+ids, drop
   one character) when "☺" encodes as ``[▁, ☺]``; on a vocabulary where it does not (the trick would corrupt the
   ids) the equivalent no-dummy-prefix route is used (same ids as Meta wherever Meta's trick is valid).
10. HF's stateful fast-tokenizer infilling (normalizer/post-processor swapped per call) is not reproduced: all methods
   here are pure functions of their arguments (thread-safe); only ``add_bos_token``/``add_eos_token``/
   ``suffix_first`` are user-settable configuration.

Speed: SentencePiece's BPE encode is superlinear in the length of one string, so texts over ~2 kB are cut just
before newlines (no piece of the vocabulary may contain a newline; checked at load, else no cutting) and the
chunks are encoded in one batched call; the ids are identical (tests compare long texts with both oracles).
``tools/bench_tokenizer.py`` times a 100 kB file against transformers' fast tokenizer.
"""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import sentencepiece as spm

__all__ = ["CodeLlamaTokenizer", "IncrementalDetokenizer", "InfillingNotSupported", "SPECIAL_TAGS",
           "CODELLAMA_EXTRA_PIECES", "append_pieces"]

SPIECE_UNDERLINE = "▁"
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>")
_SMILEY = "☺"
# SentencePiece's BPE encode is superlinear in the input length (100 kB: ~140 ms on one string, ~35 ms in 1 kB
# pieces). When no piece contains a newline, no merge can cross one, so a long text is cut just before newlines
# into chunks of about this many characters, encoded in one batched call, and concatenated: identical ids.
_CHUNK_CHARS = 1024


class InfillingNotSupported(ValueError):
    """The vocabulary has no ▁<PRE>/▁<SUF>/▁<MID> pieces (CodeLlama 34B and -Python models)."""


def _check_text(text, what: str) -> str:
    """``text`` as a str SentencePiece can take; else an error naming ``what`` (the caller and argument)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # sentencepiece's own error for this is pybind11's "Unable to cast Python instance of type <class 'str'>".
        raise ValueError(f"{what} is not valid Unicode: lone surrogate {text[e.start]!r} at index {e.start} "
                         "(cannot be encoded as UTF-8)") from None
    return text


def _as_ids(ids, what: str) -> list[int]:
    """A flat list of Python ints from an int, a sequence of ints or an integer tensor/array. Floats and strings
    are refused: int() would silently truncate 1.7 to 1 or read "123" as [1, 2, 3] (Meta's decode, i.e.
    sentencepiece, raises TypeError on floats)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{what} must be an int or a sequence of ints, got {type(ids).__name__}")
    out = []
    for i in ids:
        try:
            out.append(operator.index(i))
        except TypeError:
            raise TypeError(f"{what} must be a flat sequence of ints, got an element {i!r} of type "
                            f"{type(i).__name__}") from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Minimal protobuf wire-format editing (so that no protobuf package is needed at run time).

def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _iter_fields(buf: bytes):
    """Yields (field_number, wire_type, start, value_start, end) for each top-level field of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wt = key >> 3, key & 7
        vstart = pos
        if wt == 0:
            _, pos = _read_varint(buf, pos)
        elif wt == 1:
            pos += 8
        elif wt == 2:
            n, vstart = _read_varint(buf, pos)
            pos = vstart + n
        elif wt == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if pos > len(buf):
            raise ValueError("truncated protobuf field")
        yield field, wt, start, vstart, pos


def _without_dummy_prefix(proto: bytes) -> bytes:
    """ModelProto bytes with normalizer_spec (field 3) given add_dummy_prefix (its field 3) = false, as HF does
    with ``normalizer_spec.MergeFrom`` (a scalar appended later wins in protobuf)."""
    out = bytearray()
    found = False
    for field, wt, start, vstart, end in _iter_fields(proto):
        if field == 3 and wt == 2:
            body = proto[vstart:end] + b"\x18\x00"  # field 3 (add_dummy_prefix), varint 0
            out += proto[start:start + 1] + _varint(len(body)) + body
            found = True
        else:
            out += proto[start:end]
    if not found:
        out += b"\x1a\x02\x18\x00"
    return bytes(out)


# CodeLlama's 16 extra pieces, in the order of ids 32000..32015 of the 7B/13B/70B vocabularies (SPEC §3.1).
CODELLAMA_EXTRA_PIECES = ("▁<SU", "▁<SUF", "▁<PRE", "▁<M", "▁<MID", "▁<E", "▁<EOT", "▁<PRE>", "▁<SUF>", "▁<MID>",
                          "▁<EOT>") + tuple("▁" + "<EOT>" * k for k in range(2, 7))


def _piece_message(piece: str, score: float) -> bytes:
    """One ModelProto.SentencePiece (piece = field 1, score = field 2, type = field 3: NORMAL) as field 1."""
    p = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(p)) + p + b"\x15" + struct.pack("<f", score) + b"\x18\x01"
    return b"\x0a" + _varint(len(body)) + body


def append_pieces(proto: bytes, pieces: Sequence[str] = CODELLAMA_EXTRA_PIECES) -> bytes:
    """A SentencePiece ModelProto with ``pieces`` appended as ordinary (NORMAL) pieces at the end of the vocabulary,
    scores continuing below the current last one: how CodeLlama's vocabulary extends Llama 2's (the infill pieces
    at ids V..V+15, so ``supports_infilling`` holds). A repeated protobuf field may be continued at the end of the
    message, so no protobuf package is needed."""
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    present = [p for p in pieces if sp.piece_to_id(p) != sp.unk_id() or p == sp.id_to_piece(sp.unk_id())]
    if present:
        raise ValueError(f"append_pieces: pieces {present} are already in the vocabulary")
    last = sp.get_score(sp.get_piece_size() - 1)
    return proto + b"".join(_piece_message(p, last - 1 - k) for k, p in enumerate(pieces))


# ---------------------------------------------------------------------------------------------------------------

class CodeLlamaTokenizer:
    """CodeLlama's SentencePiece tokenizer. See the module docstring for the Meta/HF differences."""

    bos_token, eos_token, unk_token = "<s>", "</s>", "<unk>"
    prefix_token, middle_token = "▁<PRE>", "▁<MID>"
    suffix_token, eot_token = "▁<SUF>", "▁<EOT>"
    step_token = "<step>"
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, model_file: str | os.PathLike, *, add_bos_token: bool = True, add_eos_token: bool = False,
                 suffix_first: bool = False, fill_token: str | None = "<FILL_ME>"):
        self.vocab_file = str(model_file)
        try:
            with open(self.vocab_file, "rb") as f:
                proto = f.read()
        except OSError as e:
            raise FileNotFoundError(f"CodeLlamaTokenizer: cannot read tokenizer model file {self.vocab_file!r}: "
                                    f"{e.strerror}") from e
        self._sp = spm.SentencePieceProcessor()
        self._sp_hf = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
            self._sp_hf.LoadFromSerializedProto(_without_dummy_prefix(proto))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError; our parser ValueError
            raise ValueError(f"CodeLlamaTokenizer: {self.vocab_file!r} is not a valid SentencePiece model "
                             f"({type(e).__name__}: {e})") from e
        if self._sp.get_piece_size() == 0:
            raise ValueError(f"CodeLlamaTokenizer: {self.vocab_file!r} has an empty vocabulary")
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.suffix_first = suffix_first
        self.fill_token = fill_token
        self.n_words = self._sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), -1
        self.bos_token_id = self._sp.piece_to_id(self.bos_token)
        self.eos_token_id = self._sp.piece_to_id(self.eos_token)
        self.unk_token_id = self._sp.piece_to_id(self.unk_token)
        self.prefix_id = self._piece_or_none(self.prefix_token)
        self.middle_id = self._piece_or_none(self.middle_token)
        self.suffix_id = self._piece_or_none(self.suffix_token)
        self.eot_id = self._piece_or_none(self.eot_token)
        self.step_id = self._piece_or_none(self.step_token)
        # Meta's infill trick needs "☺" to encode as [▁, ☺]; otherwise the equivalent no-dummy-prefix route is used.
        self._smiley_id = self._piece_or_none(_SMILEY)
        if self._smiley_id is not None and self._sp.encode(_SMILEY) != [self._sp.piece_to_id("▁"), self._smiley_id]:
            self._smiley_id = None
        # HF's all_special_tokens (only those present in the vocabulary; see difference 6).
        specials = [self.bos_token, self.eos_token, self.unk_token]
        specials += [t for t in (self.prefix_token, self.middle_token, self.suffix_token, self.eot_token)
                     if self._piece_or_none(t) is not None]
        self.all_special_tokens = specials
        self._special_token_set = frozenset(specials)
        self.all_special_ids = [self._sp.piece_to_id(t) for t in specials]
        self._special_id_set = frozenset(self.all_special_ids)
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        self._unk_len = len(self._sp_hf.encode(self.unk_token))
        self._newline_free = not any("\n" in self._sp.id_to_piece(i) for i in range(self.n_words))
        self._underline_id = self._sp.piece_to_id(SPIECE_UNDERLINE)

    def _chunked(self, text: str, first, out_type=int) -> list:
        """``first(text)`` for short texts; for long ones ``first`` on the first chunk and the no-dummy-prefix
        processor on the following chunks, each of which starts with a newline (see _CHUNK_CHARS)."""
        if len(text) <= 2 * _CHUNK_CHARS or not self._newline_free:
            return first(text)
        cuts = [0]
        pos = _CHUNK_CHARS
        while True:
            cut = text.find("\n", pos)
            if cut < 0 or len(text) - cut < _CHUNK_CHARS // 2:
                break
            cuts.append(cut)
            pos = cut + _CHUNK_CHARS
        if len(cuts) == 1:
            return first(text)
        cuts.append(len(text))
        out = first(text[:cuts[1]])
        for ids in self._sp_hf.encode([text[a:b] for a, b in zip(cuts[1:-1], cuts[2:])], out_type=out_type):
            out += ids
        return out

    def _piece_or_none(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # Meta: `piece_to_id(...) or None` (a missing piece maps to unk = 0); guard against a non-exact match too.
        return i if i and self._sp.id_to_piece(i) == piece else None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "CodeLlamaTokenizer":
        """Loads ``tokenizer.model`` from a Meta or HF model folder; honours ``add_bos_token``, ``add_eos_token``,
        ``suffix_first`` and ``fill_token`` from tokenizer_config.json when present (kwargs win)."""
        path = Path(path)
        model = path if path.is_file() else path / "tokenizer.model"
        if not model.is_file():
            raise FileNotFoundError(f"CodeLlamaTokenizer.from_pretrained: no tokenizer.model in {str(path)!r}")
        cfg_file = model.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except ValueError as e:
                raise ValueError(f"CodeLlamaTokenizer.from_pretrained: bad JSON in {str(cfg_file)!r}: {e}") from e
            for key in ("add_bos_token", "add_eos_token", "suffix_first", "fill_token"):
                if key in cfg and key not in kwargs:
                    kwargs[key] = cfg[key]
        return cls(model, **kwargs)

    # ----------------------------------------------------------------------------------------------- Meta (engine)
    @property
    def vocab_size(self) -> int:
        return self.n_words

    @property
    def supports_infilling(self) -> bool:
        return None not in (self.prefix_id, self.middle_id, self.suffix_id)

    def encode_meta(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Meta ``Tokenizer.encode``: SentencePiece with its implicit leading space, optional BOS/EOS."""
        t = self._chunked(_check_text(s, "encode_meta: s"), self._sp.encode)
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode_meta(self, ids: Iterable[int]) -> str:
        """Meta ``Tokenizer.decode``: drops pad (-1) entries; control pieces decode to nothing; the first piece's
        leading space is removed."""
        return self._sp.decode(self._check_ids([i for i in _as_ids(ids, "decode_meta: ids") if i != -1]))

    def piece_bytes(self, token_id: int) -> bytes:
        """What one piece stands for on its own: a byte-fallback piece (<0xNN>) its byte, others their text with
        '▁' as a space; control pieces (<s>, </s>, <EOT>, ...) their name; <unk> what decoding writes for it
        (" ⁇ ")."""
        i = self._check_ids([token_id])[0]
        piece = self._sp.id_to_piece(i)
        if self._sp.is_byte(i):
            return bytes([int(piece[3:-1], 16)])
        if self._sp.is_unknown(i):
            return self._sp.decode([i]).encode()
        return piece.replace("\u2581", " ").encode()

    def encode_infilling(self, s: str) -> list[int]:
        """Meta ``encode_infilling``: the tokens of ``s`` with no implicit leading space (as in mid-text)."""
        _check_text(s, "encode_infilling: s")
        if self._smiley_id is not None:
            return self._chunked(s, lambda t: self._sp.encode(_SMILEY + t)[2:])
        if s.startswith((" ", SPIECE_UNDERLINE)):
            return self._chunked(s[1:], self._sp.encode)
        return self._chunked(s, self._sp_hf.encode)

    def decode_infill(self, ids: Iterable[int]) -> str:
        """Meta ``decode_infilling``: decodes a generated middle keeping a genuine leading space."""
        ids = self._check_ids([i for i in _as_ids(ids, "decode_infill: ids") if i != -1])
        if self._smiley_id is not None:
            return self._sp.decode([self._smiley_id] + ids)[1:]
        return self._sp_hf.decode(ids)

    decode_infilling = decode_infill

    def infill_ids(self, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
        """Meta ``infilling_prompt_tokens`` (SPEC §3.2): PSM ``<s> <PRE> pre <SUF>suf <MID>`` or SPM
        ``<s> <PRE> <SUF>suf <MID> pre``."""
        _check_text(prefix, "infill_ids: prefix")
        _check_text(suffix, "infill_ids: suffix")
        self._require_infilling()
        pre = self.encode_meta(prefix, bos=False, eos=False)
        suf = self.encode_infilling(suffix)
        if suffix_first:
            return [self.bos_id, self.prefix_id, self.suffix_id] + suf + [self.middle_id] + pre
        return [self.bos_id, self.prefix_id] + pre + [self.suffix_id] + suf + [self.middle_id]

    def _require_infilling(self) -> None:
        if not self.supports_infilling:
            missing = [t for t, i in ((self.prefix_token, self.prefix_id), (self.suffix_token, self.suffix_id),
                                      (self.middle_token, self.middle_id)) if i is None]
            raise InfillingNotSupported(
                f"this tokenizer ({self.vocab_file!r}, {self.n_words} pieces) has no infilling pieces "
                f"{missing}: infilling needs a CodeLlama 7B/13B (base or Instruct) or 70B vocabulary")

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """Meta's chat prompt: [INST]/<<SYS>> format (SPEC §3.4) or, when the vocabulary has ``<step>`` (70B
        Instruct), the Source/Destination/<step> format (§3.5). Raises ValueError on special tags in messages."""
        if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Iterable):
            raise TypeError(f"chat_ids: messages must be a list of dicts with 'role' and 'content', got "
                            f"{type(messages).__name__}")
        msgs = list(messages)
        if not msgs:
            raise ValueError("chat_ids: empty dialog")
        for k, m in enumerate(msgs):
            if not isinstance(m, Mapping):
                raise TypeError(f"chat_ids: messages[{k}] must be a dict with 'role' and 'content', got "
                                f"{type(m).__name__}")
            msgs[k] = m = dict(m)
            if not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
                raise ValueError(f"chat_ids: each message needs str 'role' and 'content', got messages[{k}] = "
                                 f"{m!r}")
            for key in ("role", "content", "destination"):
                if key == "destination" and m.get(key) is None:
                    continue
                _check_text(m[key], f"chat_ids: messages[{k}][{key!r}]")
            if any(tag in m["content"] for tag in SPECIAL_TAGS):
                raise ValueError(f"chat_ids: special tags {list(SPECIAL_TAGS)} are not allowed in messages "
                                 "(Meta replaces the reply by an error message instead)")
        if self.step_id is not None:
            return self._dialog_step_ids(msgs)
        return self._dialog_inst_ids(msgs)

    def _dialog_inst_ids(self, msgs: list[dict]) -> list[int]:
        if msgs[0]["role"] == "system":
            if len(msgs) < 2:
                raise ValueError("chat_ids: a system message must be followed by a user message")
            msgs = [{"role": msgs[1]["role"], "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}] \
                + msgs[2:]
        if not (all(m["role"] == "user" for m in msgs[::2]) and all(m["role"] == "assistant" for m in msgs[1::2])):
            raise ValueError("chat_ids: roles must be 'system' (optional, first), then alternate user/assistant/...")
        if msgs[-1]["role"] != "user":
            raise ValueError(f"chat_ids: the last message must be from user, got {msgs[-1]['role']!r}")
        ids: list[int] = []
        for u, a in zip(msgs[::2], msgs[1::2]):
            ids += self.encode_meta(f"{B_INST} {u['content'].strip()} {E_INST} {a['content'].strip()} ",
                                    bos=True, eos=True)
        ids += self.encode_meta(f"{B_INST} {msgs[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return ids

    def _dialog_step_ids(self, msgs: list[dict]) -> list[int]:
        if msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": ""}] + msgs
        if not (all(m["role"] == "user" for m in msgs[1::2]) and all(m["role"] == "assistant" for m in msgs[2::2])):
            raise ValueError("chat_ids: roles must be 'system' (optional, first), then alternate user/assistant/...")
        if msgs[-1]["role"] != "user":
            raise ValueError(f"chat_ids: the last message must be from user, got {msgs[-1]['role']!r}")
        ids = [self.bos_id]
        for m in msgs:
            headers = [f"Source: {m['role'].strip()}"]
            if m.get("destination") is not None:
                headers.append(f"Destination: {m['destination'].strip()}")
            ids += self.encode_meta(" " + "\n".join(headers), bos=False, eos=False)
            if m["content"]:
                ids += self.encode_meta("\n\n " + m["content"].strip(), bos=False, eos=False)
            ids.append(self.step_id)
        ids += self.encode_meta(" Source: assistant\nDestination: user", bos=False, eos=False)
        ids += self.encode_meta("\n\n ", bos=False, eos=False)
        return ids

    def detokenizer(self, mode: str = "completion") -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, mode)

    # ---------------------------------------------------------------------------------------------- HF-compatible
    def _hf_sp_tokenize(self, text: str, as_ids: bool) -> list:
        """HF ``_tokenize``: no-dummy-prefix SentencePiece; a leading space/▁ is protected with the unk trick."""
        out = int if as_ids else str
        return self._chunked(text, lambda t: self._hf_sp_tokenize_short(t, out), out)

    def _hf_sp_tokenize_short(self, text: str, out) -> list:
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp_hf.encode(text, out_type=out)
        toks = self._sp_hf.encode(self.unk_token + text, out_type=out)
        return toks[self._unk_len:] if len(toks) >= self._unk_len else toks

    def _hf_tokenize(self, prefix: str, suffix: str | None, suffix_first: bool | None, as_ids: bool,
                     names: tuple[str, str]) -> list:
        """``names``: how errors call the text and the suffix, e.g. ("encode: text", "encode: suffix")."""
        _check_text(prefix, names[0])
        if suffix is not None:
            _check_text(suffix, names[1])
        if self.fill_token is not None and suffix is None and self.fill_token in prefix:
            parts = prefix.split(self.fill_token)
            if len(parts) != 2:
                raise ValueError(f"text contains {len(parts) - 1} {self.fill_token!r} tokens; at most one allowed")
            prefix, suffix = parts
        if prefix:
            prefix = SPIECE_UNDERLINE + prefix.replace(SPIECE_UNDERLINE, " ")
        if not suffix:
            toks: list = []
            pos = 0
            for m in self._special_re.finditer(prefix):
                if m.start() > pos:
                    toks += self._hf_sp_tokenize(prefix[pos:m.start()], as_ids)
                toks.append(self._sp.piece_to_id(m.group()) if as_ids else m.group())
                pos = m.end()
            if pos < len(prefix):
                toks += self._hf_sp_tokenize(prefix[pos:], as_ids)
            if len(toks) > 1:
                lone, special = (self._underline_id, self._special_id_set) if as_ids \
                    else (SPIECE_UNDERLINE, self._special_token_set)
                if toks[0] == lone and toks[1] in special:
                    toks = toks[1:]
            return toks
        self._require_infilling()
        pre = self._hf_sp_tokenize(prefix, as_ids)
        suf = self._hf_sp_tokenize(suffix, as_ids)
        if as_ids:
            p, s, m = self.prefix_id, self.suffix_id, self.middle_id
        else:
            p, s, m = self.prefix_token, self.suffix_token, self.middle_token
        suffix_first = self.suffix_first if suffix_first is None else suffix_first
        if suffix_first:
            return [p, s] + suf + [m] + pre
        return [p] + pre + [s] + suf + [m]

    def tokenize(self, text: str, suffix: str | None = None, suffix_first: bool | None = False) -> list[str]:
        return self._hf_tokenize(text, suffix, suffix_first, as_ids=False, names=("tokenize: text", "tokenize: suffix"))

    def encode(self, text: str, *, suffix: str | None = None, suffix_first: bool | None = False,
               add_special_tokens: bool = True) -> list[int]:
        """HF ``encode``: splits on ``fill_token``; with a suffix builds the PSM/SPM prompt; BOS/EOS per
        ``add_bos_token``/``add_eos_token`` when ``add_special_tokens``. ``suffix`` is keyword-only (difference 2)."""
        return self._encode(text, suffix, suffix_first, add_special_tokens, ("encode: text", "encode: suffix"))

    def _encode(self, text, suffix, suffix_first, add_special_tokens, names: tuple[str, str]) -> list[int]:
        ids = self._hf_tokenize(text, suffix, suffix_first, as_ids=True, names=names)
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def __call__(self, text, *, suffix=None, suffix_first: bool | None = False,
                 add_special_tokens: bool = True) -> dict:
        """HF ``__call__``: ``{"input_ids": ..., "attention_mask": ...}``; lists of lists for a list of texts.
        With a list of texts, a str ``suffix`` is the suffix of every text (as HF slow); a list of suffixes pairs
        one with each text. No padding, truncation or tensors. ``suffix`` is keyword-only (difference 2)."""
        if isinstance(text, (list, tuple)):
            if suffix is None or isinstance(suffix, str):
                sufs = [suffix] * len(text)
            elif isinstance(suffix, (list, tuple)):
                sufs = list(suffix)
            else:
                raise TypeError(f"__call__: suffix must be None, a str or a list of str, got {type(suffix).__name__}")
            if len(sufs) != len(text):
                raise ValueError(f"__call__: {len(text)} texts but {len(sufs)} suffixes")
            ids = [self._encode(t, s, suffix_first, add_special_tokens, (f"__call__: text[{k}]", "__call__: suffix"
                                if isinstance(suffix, str) else f"__call__: suffix[{k}]"))
                   for k, (t, s) in enumerate(zip(text, sufs))]
            return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        ids = self._encode(text, suffix, suffix_first, add_special_tokens, ("__call__: text", "__call__: suffix"))
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def _check_ids(self, ids: list[int]) -> list[int]:
        n = self.n_words
        if not ids or (min(ids) >= 0 and max(ids) < n):
            return ids
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is out of range for this vocabulary of {n} pieces (0..{n - 1})")
        return ids

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._sp.id_to_piece(self._check_ids([ids])[0])
        ids = self._check_ids(_as_ids(ids, "convert_ids_to_tokens: ids"))
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_id_set]
        return [self._sp.id_to_piece(i) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._sp.piece_to_id(tokens)
        return [self._sp.piece_to_id(t) for t in tokens]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """HF slow: strip the first token's ▁, SentencePiece-decode runs of ordinary pieces (no dummy prefix), write
        special tokens verbatim."""
        tokens = list(tokens)
        if not tokens:
            return ""
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        out, cur = [], []
        for t in tokens:
            if t in self._special_token_set:
                out.append(self._sp_hf.decode_pieces(cur) + t)
                cur = []
            else:
                cur.append(t)
        out.append(self._sp_hf.decode_pieces(cur))
        return "".join(out)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """HF slow ``decode`` (``clean_up_tokenization_spaces=False``)."""
        ids = self._check_ids(_as_ids(ids, "decode: ids"))
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_id_set]
        if not ids:
            return ""
        first = self._sp.id_to_piece(ids[0])
        strip = first.startswith(SPIECE_UNDERLINE)
        special = self._special_id_set
        if SPIECE_UNDERLINE not in first[1:] and not (strip and ids[0] in special):
            # Fast path, same result as convert_tokens_to_string: runs of ordinary ids decoded by the no-dummy-prefix
            # processor, special tokens verbatim, minus the space that the first piece's leading ▁ became. (HF strips
            # that ▁ from the piece string; when the rest still has ▁s, e.g. a whitespace-only piece, or the piece is
            # a special token, the result may no longer be a vocabulary piece: the literal path below reproduces
            # what SentencePiece then does.)
            parts, start = [], 0
            for k, i in enumerate(ids):
                if i in special:
                    parts.append(self._sp_hf.decode(ids[start:k]))
                    parts.append(self._sp.id_to_piece(i))
                    start = k + 1
            parts.append(self._sp_hf.decode(ids[start:]))
            text = "".join(parts)
            return text[1:] if strip else text
        return self.convert_tokens_to_string([self._sp.id_to_piece(i) for i in ids])

    def batch_decode(self, seqs, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def get_vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.n_words)}

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens: bool = False):
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("get_special_tokens_mask: pass one sequence when already_has_special_tokens=True")
            return [1 if i in self._special_id_set else 0 for i in token_ids_0]
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        out = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + [0] * len(token_ids_1) + eos
        return out

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None) -> list[int]:
        n = int(self.add_bos_token) + int(self.add_eos_token)
        out = [0] * (len(token_ids_0) + n)
        if token_ids_1 is not None:
            out += [1] * (len(token_ids_1) + n)
        return out

    def save_vocabulary(self, save_directory, filename_prefix: str | None = None) -> tuple[str]:
        """Copies the original model file (never the no-dummy-prefix variant) to
        ``save_directory/[prefix-]tokenizer.model``."""
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_vocabulary: {save_directory!r} is not a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, out)
            else:
                with open(out, "wb") as f:
                    f.write(self._sp.serialized_model_proto())
        return (out,)

    def __len__(self) -> int:
        return self.n_words

    def __repr__(self) -> str:
        return (f"CodeLlamaTokenizer({self.vocab_file!r}, vocab_size={self.n_words}, infilling="
                f"{self.supports_infilling}, step_id={self.step_id})")


class IncrementalDetokenizer:
    """Streams text from ids fed one at a time. ``mode="completion"``: the deltas concatenate to
    ``tok.decode_meta(ids)`` (first space dropped); ``mode="infill"``: to ``tok.decode_infill(ids)`` (first space
    kept). Text ending in U+FFFD (an incomplete UTF-8 sequence from byte-fallback pieces) is held back until the
    sequence completes or ``flush()`` is called. Work per step is bounded by a short window of ids."""

    def __init__(self, tokenizer: CodeLlamaTokenizer, mode: str = "completion"):
        if mode not in ("completion", "infill"):
            raise ValueError(f"IncrementalDetokenizer: mode must be 'completion' or 'infill', got {mode!r}")
        self.tok = tokenizer
        self.mode = mode
        self.ids: list[int] = []
        self._prefix_offset = 0   # window start
        self._read_offset = 0     # ids whose text has been emitted
        self._emitted: list[str] = []
        self.held = ""  # text of the ids fed but not yet emitted (an incomplete character: U+FFFD)

    def _decode_window(self, start: int, end: int) -> str:
        ids = self.ids[start:end]
        if start == 0 and self.mode == "completion":
            return self.tok.decode_meta(ids)
        return self.tok.decode_infill(ids)

    def add(self, token_id: int) -> str:
        """Feeds one id; returns the new stable text (possibly "")."""
        try:
            token_id = operator.index(token_id)
        except TypeError:
            raise TypeError(f"IncrementalDetokenizer.add: token_id must be an int, got {type(token_id).__name__}") \
                from None
        self.tok._check_ids([token_id])
        self.ids.append(token_id)
        prefix_text = self._decode_window(self._prefix_offset, self._read_offset)
        new_text = self._decode_window(self._prefix_offset, len(self.ids))
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            self._emitted.append(delta)
            self.held = ""
            return delta
        self.held = new_text[len(prefix_text):]
        return ""

    def lead_in(self, token_id: int) -> int:
        """How much of `held` comes before the text of token_id, fed next: all of it, but for a byte that continues
        an incomplete character, which starts where that character does (SentencePiece writes each of its bytes
        as a U+FFFD until it is whole, then the whole character as one)."""
        return len(self.held) - (self._open_char() if self._continues(token_id) else 0)

    def breaks(self, token_id: int | None) -> int:
        """How many of the last ids are the bytes of a character that token_id, fed next (None: the end), leaves
        incomplete (0 when none). SentencePiece then writes each of them as its own U+FFFD, where lead_in placed
        them all at the character's start."""
        return 0 if self._continues(token_id) else self._open_char()

    def _continues(self, token_id: int | None) -> bool:
        """Whether token_id is a UTF-8 continuation byte (10xxxxxx)."""
        return token_id is not None and self.tok._sp.is_byte(token_id) and \
            0x80 <= self.tok.piece_bytes(token_id)[0] < 0xC0

    def _open_char(self) -> int:
        """How many bytes of a character not yet whole end the ids fed (0 when none)."""
        for k in range(1, min(3, len(self.ids)) + 1):
            i = self.ids[-k]
            if not self.tok._sp.is_byte(i):
                return 0
            b = self.tok.piece_bytes(i)[0]
            if b >= 0xC0:  # the lead byte: a character of 2, 3 or 4 bytes, k of them fed
                return k if k < 2 + (b >= 0xE0) + (b >= 0xF0) else 0
            if b < 0x80:
                return 0
        return 0

    def flush(self) -> str:
        """Returns any held-back text (call once generation ends)."""
        prefix_text = self._decode_window(self._prefix_offset, self._read_offset)
        new_text = self._decode_window(self._prefix_offset, len(self.ids))
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset = len(self.ids)
        self.held = ""
        if delta:
            self._emitted.append(delta)
        return delta

    @property
    def text(self) -> str:
        return "".join(self._emitted)
