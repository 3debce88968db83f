"""The public Python API: `CodeLlama.from_pretrained(...)` then complete / infill / chat / stream / generate.

Text modes (SPEC.md §3.2-§3.5): completion prompts are `<s>` + text and stop at EOS, decoded with Meta's decode;
infilling builds the PSM/SPM prompt, stops at EOT only (EOS does not stop it) and returns the middle decoded with
the infill rule (a genuine leading space kept); chat builds Meta's dialog ids and stops at EOS, or at <step> for
the 70B-Instruct format. Stop strings cut the text before their first occurrence and end that row.

Prefix reuse: the KV cache keeps what earlier calls computed, and a prompt that starts with ids a slot still holds
(a resent prompt, a chat's earlier turns, the unchanged head of an edited file) is prefilled from there only
(GenerationResult.cached_tokens counts them; from_pretrained(prefix_cache=False) turns it off).

Concurrency: calls on one model from several threads share its generation (codellama_ext.batching): a call made
while another is generating joins it, and their rows decode in the same steps, each with its own sampling
parameters, so N concurrent requests cost about one batch of N. Each result equals the same call made alone
(greedy, and seeded sampling: a seed draws from its own generator). A stream's tokens are computed whenever any
caller steps the generation; closing or dropping a stream ends its rows. A thread may call the model while it
holds an unfinished stream (the call steps the stream's row too). A prompt_lookup call joining a generation without
drafts decodes plainly (the same text); calls that cannot join (sampling while prompt_lookup calls draft, another
CodeLlama over the same model) wait for the generation in progress to end, and are served in arrival order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch

from .batching import batcher_of
from .checkpoint import verify_checklist
from .generation import Engine, GenerationResult, SamplingParams
from .model import Transformer, load_model
from .tokenizer import CodeLlamaTokenizer, InfillingNotSupported

__all__ = ["CodeLlama", "SamplingParams", "GenerationResult", "DEFAULT_MODEL_DIR"]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
DEFAULT_CONTEXT = 4096  # max_seq_len when not given: CodeLlama's window is 16k, most uses need far less cache
_MODES = ("complete", "infill", "chat")


class Scored(NamedTuple):
    """A generated token with its log-probability, the most likely alternatives (id, log-probability) and where
    its text starts in the generated text: the length of the text of the tokens before it (a byte of a multi-byte
    character starts where the character does; a byte that ends up in no character counts as a U+FFFD), at most the
    length of the text a stop string cut."""

    id: int
    logprob: float
    top: list[tuple[int, float]]
    text_offset: int


class _TextRow:
    """The text of one generated row: incremental detokenization, stop strings cut exactly, and the part that is
    safe to stream (text that could still become the start of a stop string is held back)."""

    def __init__(self, tokenizer: CodeLlamaTokenizer, detok_mode: str, stops: tuple[str, ...]):
        self.detok = tokenizer.detokenizer(detok_mode)
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.tokens = 0  # tokens fed before a stop string ended the text
        self.closed = False  # no more tokens: the text is final

    def add(self, token_id: int) -> bool:
        """Feeds a token; True when a stop string has now ended the text."""
        self.tokens += not self.stopped
        return self._append(self.detok.add(token_id))

    def close(self) -> None:
        if not self.stopped:
            self._append(self.detok.flush())
        self.closed = True

    def _append(self, delta: str) -> bool:
        if not delta or self.stopped:
            return self.stopped
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
            self.stopped = True
        return self.stopped

    def delta(self, final: bool) -> str:
        """New text that can be shown; all of it once the row is final (or stopped)."""
        end = len(self.text)
        if not (final or self.stopped):
            end -= max((k for s in self.stops for k in range(min(len(s) - 1, end), 0, -1)
                        if self.text.endswith(s[:k])), default=0)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


class CodeLlama:
    """A loaded model with its tokenizer. See the module docstring for modes and thread safety."""

    def __init__(self, model: Transformer, tokenizer: CodeLlamaTokenizer, *, cuda_graphs: bool = True,
                 prefix_cache: bool = True):
        if not isinstance(model, Transformer):
            raise ValueError(f"model must be a Transformer (codellama_ext.load_model), got {type(model).__name__}")
        if not isinstance(tokenizer, CodeLlamaTokenizer):
            raise ValueError(f"tokenizer must be a CodeLlamaTokenizer, got {type(tokenizer).__name__}")
        for name, flag in (("cuda_graphs", cuda_graphs), ("prefix_cache", prefix_cache)):
            if not isinstance(flag, bool):  # a string such as "false" would read as True
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if tokenizer.n_words > model.args.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.n_words} pieces but the model only "
                             f"{model.args.vocab_size} embedding rows")
        self.model, self.tokenizer, self.args = model, tokenizer, model.args
        self.engine = Engine(model, cuda_graphs=cuda_graphs, prefix_cache=prefix_cache)
        self._batcher = batcher_of(model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device="cpu", dtype=None,
                        quantize: str | None = None, max_seq_len: int | None = None, max_batch_size: int = 8,
                        progress: bool | None = None, prefix_cache: bool = True,
                        verify_checksums: bool = False) -> "CodeLlama":
        """Loads a Meta or HF model folder (with its tokenizer.model). path None: the default model shipped in
        codellama_ext/default_model. max_seq_len None: min(the model's context, 4096). prefix_cache: a prompt
        starting with ids a cache slot still holds (a resent prompt, a chat's earlier turns) is prefilled from
        there (generation.Engine); False: every prompt is prefilled whole. verify_checksums: before anything is
        loaded, check the folder's files against its checklist.chk (the md5 list in Meta's downloads; the default
        model ships one) and raise CheckpointError on a corrupt or truncated file, a shard of another checkpoint,
        a file the loader reads that is not listed, or a folder without checklist.chk (HF folders have none)."""
        if path is None:
            path = DEFAULT_MODEL_DIR
            if not (path / "params.json").is_file():
                raise FileNotFoundError(f"the default model folder {str(path)!r} is missing (params.json not "
                                        "found); pass the path of a CodeLlama model folder")
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path must be a model folder (str or os.PathLike) or None, got {type(path).__name__}")
        if not isinstance(prefix_cache, bool):  # checked before the (slow) load
            raise ValueError(f"prefix_cache must be a bool, got {prefix_cache!r}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder {os.fspath(path)!r} does not exist")
        if max_seq_len is None:
            max_seq_len = min(_model_context(path), DEFAULT_CONTEXT)
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if verify_checksums:  # here, not in load_model: tokenizer.model is verified before it is read too
            verify_checklist(path, progress=progress)
        tokenizer = CodeLlamaTokenizer.from_pretrained(path)
        model = load_model(path, device=device, dtype=dtype, quantize=quantize, max_seq_len=max_seq_len,
                           max_batch_size=max_batch_size, progress=progress)
        return cls(model, tokenizer, prefix_cache=prefix_cache)

    # ---- text API ----
    def complete(self, prompt: str | list[str], *, params: SamplingParams | None = None, **sampling) -> str | list[str]:
        """The completion of a prompt (str), or of each prompt of a list (generated together)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        texts = self._texts([self._ids("complete", p) for p in prompts], "complete", _params(params, sampling))
        return texts[0] if isinstance(prompt, str) else texts

    def infill(self, prefix: str, suffix: str | None = None, *, suffix_first: bool = False,
               params: SamplingParams | None = None, **sampling) -> str:
        """The middle between prefix and suffix. suffix None: prefix holds the text with one <FILL_ME>."""
        ids = self._ids("infill", prefix, suffix, suffix_first)
        return self._texts([ids], "infill", _params(params, sampling))[0]

    def chat(self, messages: Sequence[dict], *, params: SamplingParams | None = None, **sampling) -> str:
        """The assistant's reply to a dialog (dicts with 'role' and 'content'; Meta's Instruct formats)."""
        return self._texts([self._ids("chat", messages)], "chat", _params(params, sampling))[0]

    def stream(self, prompt, *, mode: str = "complete", suffix: str | None = None, suffix_first: bool = False,
               params: SamplingParams | None = None, **sampling) -> Iterator[str]:
        """Text deltas of one generation; "".join(deltas) equals the non-streamed result. Errors in the prompt
        or the sampling values are raised here, before the first item."""
        ids = self._ids(mode, prompt, suffix, suffix_first)
        sp = _params(params, sampling)
        self.engine.check_prompts([ids])
        return self._stream(ids, mode, sp)

    def _stream(self, ids: list[int], mode: str, sp: SamplingParams) -> Iterator[str]:
        with contextlib.closing(self._events([ids], mode, sp)) as events:  # closing the stream ends its row
            for _, delta, _ in events:
                if delta:
                    yield delta

    def __call__(self, prompt: str, *, params: SamplingParams | None = None, **kw) -> str:
        """Pipeline style: a prompt with <FILL_ME> gives the prompt with the middle filled in; any other prompt
        gives the prompt continued by its completion."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        fill = self.tokenizer.fill_token or "<FILL_ME>"
        if fill in prompt:
            prefix, suffix = _split_fill(prompt, fill)
            return prefix + self.infill(prefix, suffix, params=params, **kw) + suffix
        # Decoded as a continuation (the infill rule): complete() drops the leading space of the first new piece,
        # as Meta's decode of a text on its own does, but here that space separates the prompt from the new text.
        ids = self._ids("complete", prompt)
        return prompt + self._texts([ids], "complete", _params(params, kw), detok="infill")[0]

    # ---- token API ----
    def generate(self, prompt_tokens: Sequence[Sequence[int]], *, stop_ids: Sequence[int] | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, params: SamplingParams | None = None,
                 **sampling) -> list[GenerationResult]:
        """Token ids in, new token ids out (stop token excluded); stop_ids default: EOS. logprobs: each new token's
        log-probability under the raw logits; top_logprobs: also the k most likely ids at each step."""
        sp = _params(params, sampling)
        if sp.stop:
            raise ValueError("generate works on token ids: pass stop_ids, not stop strings")
        vocab = self.args.vocab_size
        if stop_ids is None:
            stop_ids = [self.tokenizer.eos_id]
        elif isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Sequence) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop_ids):
            # a str, an int or a float id would otherwise be an obscure TypeError or a stop never matched
            raise ValueError(f"stop_ids must be a list of token ids (integers in [0, {vocab})) or None, "
                             f"got {stop_ids!r}")
        call = self._batcher.submit(self.engine, prompt_tokens, sp, list(stop_ids), logprobs,
                                    top_logprobs=top_logprobs)
        with contextlib.closing(call):  # an interrupt before the first step must end the rows too
            for _ in call:
                pass
        return call.results

    # ---- internals ----
    def _ids(self, mode: str, prompt, suffix: str | None = None, suffix_first: bool = False) -> list[int]:
        tok = self.tokenizer
        if not isinstance(suffix_first, bool):
            raise ValueError(f"suffix_first must be a bool, got {suffix_first!r}")
        if mode == "complete":
            if not isinstance(prompt, str):
                raise ValueError(f"a completion prompt must be a string, got {type(prompt).__name__}")
            if suffix is not None or suffix_first:
                raise ValueError("suffix and suffix_first are only used with mode='infill'")
            return tok.encode_meta(prompt, bos=True, eos=False)
        if mode == "infill":
            if not isinstance(prompt, str) or not isinstance(suffix, (str, type(None))):
                raise ValueError("infill needs a prefix string and a suffix string (or a prefix with <FILL_ME>)")
            if suffix is None:
                prompt, suffix = _split_fill(prompt, tok.fill_token or "<FILL_ME>")
            ids = tok.infill_ids(prompt, suffix, suffix_first)  # InfillingNotSupported without <PRE>/<SUF>/<MID>
            if tok.eot_id is None:
                raise InfillingNotSupported(f"this tokenizer ({tok.vocab_file!r}) has no <EOT> piece to stop "
                                            "infilling")
            return ids
        if mode == "chat":
            if suffix is not None or suffix_first:
                raise ValueError("suffix and suffix_first are only used with mode='infill'")
            if isinstance(prompt, (str, dict)):
                raise ValueError("chat needs a list of messages (dicts with 'role' and 'content')")
            return tok.chat_ids(prompt)
        raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")

    def _stop_ids(self, mode: str) -> list[int]:
        tok = self.tokenizer
        if mode == "infill":
            return [tok.eot_id]
        if mode == "chat" and tok.step_id is not None:
            return [tok.eos_id, tok.step_id]
        return [tok.eos_id]

    def _texts(self, prompts: list[list[int]], mode: str, sp: SamplingParams,
               detok: str | None = None) -> list[str]:
        out = [""] * len(prompts)
        for row, delta, _ in self._events(prompts, mode, sp, detok):
            out[row] += delta
        return out

    def _events(self, prompts: list[list[int]], mode: str, sp: SamplingParams, detok: str | None = None,
                outcomes: list | None = None, top_logprobs: int | None = None
                ) -> Iterator[tuple[int, str, Scored | None]]:
        """(row, text delta, scored) triples as tokens arrive, the prompts joining the model's generation when this
        is first advanced. Closing this generator ends its rows. detok: the detokenizer mode, by default the mode's
        own ("infill" keeps a leading space, "completion" drops it). outcomes: a list that gets, once the rows have
        ended, (finish reason, tokens in the text) per row: "stop" for a stop id or stop string, else "length".
        top_logprobs (None: off): `scored` is the Scored token behind the event when it is part of the text (one
        per such token), with that many alternatives; else None."""
        call = self._batcher.submit(self.engine, prompts, sp, self._stop_ids(mode), vocab=self.tokenizer.n_words,
                                    logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0)
        try:
            detok = detok or ("infill" if mode == "infill" else "completion")
            rows = [_TextRow(self.tokenizer, detok, sp.stop) for _ in prompts]
            pending: list[list[Scored]] = [[] for _ in prompts]  # scored tokens whose text start may still move
            results = call.results
            for step in call:
                for r, t in step:
                    row, res = rows[r], results[r]
                    counted = row.tokens
                    if top_logprobs is not None:
                        _unbreak(pending[r], row.detok.breaks(t))
                        offset = len(row.text) + row.detok.lead_in(t)
                    if row.add(t):
                        call.finish(r)
                    if top_logprobs is not None and row.tokens > counted:  # the k-th token of the row: index k
                        pending[r].append(Scored(t, res.logprobs[counted],
                                                 res.top_logprobs[counted] if top_logprobs else [], offset))
                    yield from _released(r, row, row.delta(final=False), pending[r])
            for r, row in enumerate(rows):
                if top_logprobs is not None and not row.stopped:
                    _unbreak(pending[r], row.detok.breaks(None))
                row.close()
                yield from _released(r, row, row.delta(final=True), pending[r])
            if outcomes is not None:
                outcomes += [("stop" if row.stopped else res.finish_reason, row.tokens)
                             for row, res in zip(rows, call.results)]
        finally:
            call.close()


def _unbreak(pending: list[Scored], n: int) -> None:
    """The last n scored tokens are the bytes of a character left incomplete: each is its own U+FFFD, one after
    another from where the character would have started."""
    n = min(n, len(pending))
    for i in range(n):
        j = len(pending) - n + i
        pending[j] = pending[j]._replace(text_offset=pending[len(pending) - n].text_offset + i)


def _released(r: int, row: _TextRow, delta: str, pending: list[Scored]) -> Iterator[tuple[int, str, Scored | None]]:
    """Row r's events for a new delta: the delta with the first scored token whose text start is now final, then
    one event per further such token (or the delta alone). A start is final once text after it has been released
    (a stop string can no longer cut before it: the held-back tail covers every place one could begin) or the row
    has ended; a stop string cuts the text, so a token inside it starts at most at the text's end."""
    final = row.stopped or row.closed
    n = len(pending) if final else next((i for i, s in enumerate(pending) if s.text_offset >= row.sent),
                                        len(pending))
    out = [s._replace(text_offset=min(s.text_offset, len(row.text))) for s in pending[:n]]
    del pending[:n]
    yield r, delta, out[0] if out else None
    for s in out[1:]:
        yield r, "", s


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(sampling) - known)
    if unknown:
        raise ValueError(f"unknown sampling argument(s) {unknown}; known: {sorted(known)}")
    if params is None:
        return SamplingParams(**sampling)
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    return dataclasses.replace(params, **sampling) if sampling else params


def _split_fill(text: str, fill: str) -> tuple[str, str]:
    if text.count(fill) != 1:
        raise ValueError(f"an infill prompt must contain {fill} exactly once (found {text.count(fill)}), or pass "
                         "prefix and suffix separately")
    prefix, suffix = text.split(fill)
    return prefix, suffix


def _model_context(path) -> int:
    """The trained context of an HF folder (max_position_embeddings); Meta folders do not record it: CodeLlama's
    16384."""
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        try:
            n = json.loads(cfg.read_text()).get("max_position_embeddings")
        except ValueError:
            n = None  # load_model reports a bad config.json with the file name
        if isinstance(n, int) and n > 1:
            return n
    return 16384
