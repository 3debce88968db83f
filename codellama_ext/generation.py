"""The generation engine: token ids in, token ids out, over one Transformer and its preallocated KV cache.

Semantics follow Meta's `generate` (SPEC.md §3.3) with Meta's absolute positions from 0 per row: the prompts of a
batch are prefilled in one packed forward (each in its own cache slot), then one decode step per token feeds the
last token of every live row. Rows finish independently (a stop id, their token budget, the end of the context
window, or `Run.finish` from the text layer for stop strings); finished rows leave the decode batch, so a greedy
row's tokens do not depend on the rows beside it. More prompts than max_batch_size: the rest wait in a queue and
take the cache slots of finished rows (continuous batching). A prompt that takes a slot while other rows decode is
prefilled in parts (Engine.prefill_chunk tokens per step, the decoding rows' step in the same forward), so it does
not stall them for its whole prefill.

Prefix reuse: the engine records which ids each cache slot holds (a prompt, then every token fed back), and a new
prompt takes the free slot holding the longest prefix of it and is prefilled from there (its last token always,
for its logits): a resent prompt, a chat's next turn or an edit near the end of a file costs only the new tokens.
Reused keys and values equal recomputed ones up to rounding, as they do when a prompt shares a batch with others.
The records are dropped when anything else writes the cache (Transformer.cache_writes) or a weight is written in
place (tensor version counters: load_weight, load_state_dict; a write through `.data` is not seen).

Sampling stays on the device (ops.argmax / ops.sample); the only host synchronisation per step is one read of the
new ids, which the stop checks need. On CUDA the decode step is captured once per batch-size bucket in a CUDA graph
(static token / position / slot buffers) and replayed (not a step fed with a prompt part); elsewhere it runs
eagerly. On CUDA, while no prompt waits, the next step is launched from the new ids on the device before the host
reads them (Engine.overlap), so the host's per-step work runs while the GPU computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import torch

from . import ops
from .model import Transformer

__all__ = ["SamplingParams", "GenerationResult", "Engine", "Run"]


# The sampler divides fp32 logits by the temperature: under 1e-30 logits of magnitude 3.4e8 would overflow to inf
# (inf - inf = NaN probabilities), and at such temperatures sampling is the argmax anyway.
_MIN_SAMPLING_TEMPERATURE = 1e-30
_LOOKUP_NGRAM = 3  # the longest tail prompt_lookup matches (then shorter ones)
_LOOKUP_MAX_WAIT = 15  # the most plain steps between drafts after rejected ones
# The fewest ids worth copying from another slot's keys and values (a copy per layer per placement; shorter shared
# prefixes, such as BOS alone, are recomputed).
_MIN_COPY = 16
# A row's seen counts (Run): this bit for a token of its prompt, plus how many times it was generated.
_IN_PROMPT = 1 << 30


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy (and below 1e-30, where logits / temperature could overflow fp32:
    the limit of sampling as the temperature goes to 0 is the argmax); top_k 0 = off; top_p 1 = off (Meta's rule:
    drop the tokens whose probability mass before them exceeds top_p); repetition_penalty as HF's (logits of every
    token already in the prompt or output divided by it when positive, multiplied when negative); presence_penalty
    and frequency_penalty as OpenAI's, in [-2, 2] (each logit less frequency_penalty times the number of times its
    token was generated so far, and less presence_penalty if it was at all; generated tokens only, as vLLM's; after
    the repetition penalty); logit_bias: OpenAI's, {token id: bias in [-100, 100]} added to those logits after the
    penalties (kept as sorted (id, bias) pairs); stop: strings that end the text (the text before the first one is
    returned); seed: reproducible sampling on one device and dtype. prompt_lookup: greedy without penalties or
    logit_bias; per row, draft up to this many tokens by copying what followed the latest earlier occurrence of the
    text's last 1-3 tokens (in the prompt or output; code repeats itself) and check them all in one forward: the
    same tokens as plain greedy decoding, several per step when the draft is right (0 = off)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    prompt_lookup: int = 0

    def __post_init__(self):
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:  # tuple() of an int fails obscurely; of bytes gives ints
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        object.__setattr__(self, "stop", stop)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.repetition_penalty) or not (math.isfinite(self.repetition_penalty)
                                                          and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                             f"got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2] (0 = off), got {v!r}")
        bias = {} if self.logit_bias is None else self.logit_bias
        pairs = list(bias.items()) if isinstance(bias, dict) else bias if isinstance(bias, (list, tuple)) else None
        if pairs is None or not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in pairs):
            raise ValueError(f"logit_bias must map token ids to biases (a dict), got {bias!r}")
        for i, b in pairs:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0 or not _is_real(b) or not -100 <= b <= 100:
                raise ValueError(f"logit_bias must map token ids (integers >= 0) to numbers in [-100, 100], "
                                 f"got {i!r}: {b!r}")
        if len({i for i, _ in pairs}) != len(pairs):
            raise ValueError("logit_bias names a token id twice")
        object.__setattr__(self, "logit_bias", tuple(sorted((i, float(b)) for i, b in pairs)))
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2 ** 63 <= self.seed < 2 ** 64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if isinstance(self.prompt_lookup, bool) or not isinstance(self.prompt_lookup, int) or self.prompt_lookup < 0:
            raise ValueError(f"prompt_lookup must be an integer >= 0 (0 = off), got {self.prompt_lookup!r}")
        if self.prompt_lookup and not self.checks_drafts:
            raise ValueError("prompt_lookup drafts are checked against greedy choices: it needs temperature 0, "
                             "no repetition, presence or frequency penalty and no logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature < _MIN_SAMPLING_TEMPERATURE

    @property
    def penalised(self) -> bool:
        """Whether a penalty reads the row's seen counts."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def checks_drafts(self) -> bool:
        """Whether rows with these parameters can be in a drafting run: greedy, no penalty, no logit bias."""
        return self.greedy and not self.penalised and not self.logit_bias


def check_top_logprobs(logprobs: bool, top_logprobs: int, vocab: int) -> None:
    """ValueError unless logprobs is a bool and top_logprobs an int in [0, vocab], above 0 only with logprobs."""
    if not isinstance(logprobs, bool):
        raise ValueError(f"logprobs must be a bool, got {logprobs!r}")
    if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool) or not 0 <= top_logprobs <= vocab:
        raise ValueError(f"top_logprobs must be an integer in [0, {vocab}], got {top_logprobs!r}")
    if top_logprobs and not logprobs:
        raise ValueError("top_logprobs needs logprobs=True")


def check_logit_bias(params: SamplingParams, vocab: int) -> None:
    """ValueError unless every token id params.logit_bias names is in the vocabulary [0, vocab)."""
    if params.logit_bias and params.logit_bias[-1][0] >= vocab:  # sorted: the last id is the largest
        raise ValueError(f"logit_bias: token id {params.logit_bias[-1][0]} is not in the vocabulary [0, {vocab})")


class _RowArgs(NamedTuple):
    """Run._row_args: the live rows' sampling parameters on the device."""
    repetition: torch.Tensor  # [n, 1]
    presence: torch.Tensor  # [n, 1]
    frequency: torch.Tensor  # [n, 1]
    greedy: torch.Tensor  # [n] bool
    temperature: torch.Tensor  # [n]
    top_k: torch.Tensor  # [n] int32
    top_p: torch.Tensor  # [n]
    bias: torch.Tensor | None  # [n, V], None without any logit_bias


def _to_host(t: torch.Tensor):
    """(a host copy of t, a function that waits for it): on CUDA the copy is queued on t's stream (into pinned
    memory) and the wait is for it alone, not for work queued after it."""
    if t.device.type != "cuda":
        return t, lambda: None
    host = t.to("cpu", non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return host, done.synchronize


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of a and b. Bisection over slice comparisons (C loops): placing a
    request compares its prompt with every slot's ids, and an element-wise Python loop took 420 us for 4096 ids
    (this one: 66 us)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class GenerationResult:
    """The new tokens of one prompt (the stop token excluded), their log-probabilities under the model's raw
    logits (as Meta's `logprobs`) when asked for, with the top_logprobs most likely ids at each step (id,
    log-probability; most likely first; among the ids the run may pick), and why generation ended: "stop" (a stop
    id or stop string) or "length" (max_new_tokens or the end of the context window)."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str = "length"
    cached_tokens: int = 0  # leading prompt tokens not computed: left in the cache by earlier rows, or copied
    accepted_drafts: int = 0  # new tokens that came from a confirmed prompt_lookup draft


class _DecodeGraph:
    """The decode step of `bucket` rows captured in a CUDA graph. Inputs are copied into static buffers; rows past
    the live count are padding that writes position 0 of cache slots no live row uses. capture=False runs the
    same padded static-buffer step eagerly (any device), so the tests can check the padding on a CPU."""

    def __init__(self, model: Transformer, bucket: int, pool, capture: bool = True):
        dev = model.device
        self.bucket = bucket
        self.tokens = torch.zeros(bucket, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(bucket, dtype=torch.int32, device=dev)
        self.slots = torch.arange(bucket, dtype=torch.int32, device=dev)
        self.graph = None
        if not capture:
            self._step = lambda: model.decode_step(self.tokens, self.positions, self.slots)
            return
        # Warm-up on a side stream (lazy initialisation must not be captured). It writes cache position 0 of
        # slots 0..bucket-1, so graphs are built before any prefill (Engine.prepare).
        with torch.cuda.device(dev):  # capture runs on the current device: make it the model's
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    model.decode_step(self.tokens, self.positions, self.slots)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits = model.decode_step(self.tokens, self.positions, self.slots)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 pad_slots: torch.Tensor) -> torch.Tensor:
        n = tokens.numel()
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        if n < self.bucket:
            self.tokens[n:].zero_()
            self.positions[n:].zero_()
            self.slots[n:].copy_(pad_slots[:self.bucket - n])
        if self.graph is None:
            return self._step()[:n]
        self.graph.replay()
        # The graphs share one memory pool: read these logits before the next replay (the engine does).
        return self.logits[:n]


class Engine:
    """Batched generation on one Transformer. Not thread-safe (the KV cache is shared): callers serialise runs,
    and a run must be finished or closed before the next one starts (codellama_ext.batching does both for
    CodeLlama). prefix_cache=False: every prompt is prefilled whole."""

    def __init__(self, model: Transformer, cuda_graphs: bool = True, prefix_cache: bool = True):
        self.model = model
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self.prefix_cache = prefix_cache
        self._graphs: dict[int, _DecodeGraph] | None = None
        # ids at positions 0.. per slot; None: unknown (forgotten while a run held the slot, which keeps writing
        # it: it must not be rebuilt by appending the fed ids) until a prefill writes the slot again
        self._held: list[list[int] | None] = [None] * model.max_batch_size
        # prompt_lookup: how many rows may check a draft in one forward (None: all). A CPU forward costs about its
        # token count once it feeds more than a few (4 rows drafting 4 tokens each ran at 0.88x plain decoding on
        # 2 cores), so there the rows take turns; a GPU checks every row's draft for about a decode step's cost.
        self.drafts_per_forward: int | None = 1 if model.device.type == "cpu" else None
        # While rows are decoding, at most this many prompt tokens are prefilled per step (None: whole prompts), so
        # a long prompt arriving does not stall the streams beside it for its whole prefill; with nothing decoding
        # a prompt is prefilled whole. 2-core CPU, 1.1B bf16, a 512-token prompt joining a stream
        # (tools/bench_prefill_chunks.py): the stream's worst gap 7.4 s whole, 0.82 s at 32 (the prompt's first
        # token 1.5x later); above 48 rows a part takes the fp32-block GEMM, whose conversion costs more per part
        # (64: 1.8 s, 1.7x). H200, 1.1B fp16, a 4096-token prompt: worst gap 0.03 s whole, 0.01 s at 512, the
        # prompt's first token 1.53x later (256: 2.41x; 1024: 1.21x).
        self.prefill_chunk = 32 if model.device.type == "cpu" else 512
        # Launch each decode step before the host reads the previous step's ids (Run, while no prompt waits), so
        # the host's per-step work (stop checks, detokenizing, the caller's loop) runs during the GPU's step instead
        # of between steps: on an H200, 7B fp16, generate took 4.53 ms per token against the graphed step's 4.27.
        # A row found finished then had one step computed for nothing (its slot's record keeps the token fed). Off
        # on the CPU, where the host runs the step itself and a wasted step costs a whole forward.
        self.overlap = model.device.type == "cuda"
        self._writes_seen = model.cache_writes
        self._weights_seen = self._weights_version()

    @property
    def prefill_chunk(self) -> int | None:
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, n: int | None) -> None:
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"prefill_chunk must be a positive integer or None (whole prompts), got {n!r}")
        self._prefill_chunk = n

    @property
    def buckets(self) -> list[int]:
        """Decode batch sizes captured on CUDA: powers of two below max_batch_size, and max_batch_size."""
        m = self.model.max_batch_size
        return [1 << i for i in range(m.bit_length()) if (1 << i) < m] + [m]

    def prepare(self) -> None:
        """Captures the decode graphs (CUDA) on first use. Called before a prefill: their warm-up runs write
        cache position 0 of the low slots."""
        if self.cuda_graphs and self._graphs is None:
            # One pool for all buckets: runs replay one graph at a time and read its logits before the next.
            pool = torch.cuda.graph_pool_handle()
            self._graphs = {b: _DecodeGraph(self.model, b, pool) for b in reversed(self.buckets)}

    def _weights_version(self) -> int:
        """Changes whenever a weight the model computes with is written in place (load_weight, load_state_dict,
        an edit of a tensor): keys and values computed before then are not what the model computes now."""
        m = self.model
        weights, scales = m._layer_tensors()  # rebuilt after _apply, which also counts as a cache write
        out = m.output
        tensors = (m.tok_embeddings, m.norm, *((out.qweight, out.scales) if out.quantized else (out.weight,)),
                   *weights, *scales)
        return sum(t._version for t in tensors if not t.is_inference())  # inference tensors have no counter

    def _held_ids(self, check_weights: bool = False) -> list[list[int] | None]:
        """The per-slot records; forgotten when anything but this engine has written the cache since its last
        write (model.forward or decode_step from elsewhere, another engine, reset_cache, a dtype change) and,
        with check_weights (where reuse is decided: admit), when the weights changed since the last check."""
        stale = self.model.cache_writes != self._writes_seen
        if check_weights:
            version = self._weights_version()
            stale |= version != self._weights_seen
            self._weights_seen = version
        if stale:  # forgotten: those writes are accounted for
            self._held = [None] * len(self._held)
            self._writes_seen = self.model.cache_writes
        return self._held

    def _wrote(self) -> None:
        self._writes_seen = self.model.cache_writes

    def place(self, prompts: list[list[int]], free: list[int]) -> tuple[list[int], list[int]]:
        """Takes for each prompt the free slot (out of `free`) holding the longest prefix of it -> slots, and the
        reused lengths: where each prompt's prefill starts (its last token is always fed). A longer prefix held by
        a busy slot (a row decoding or being prefilled: concurrent requests sharing a context, n samples of one
        prompt) is copied into the slot taken, as a prefill would write it."""
        self.prepare()
        held = self._held_ids(check_weights=True)
        slots, starts = [], []
        for ids in prompts:
            shared = self._shared(held, ids)
            best = max(free, key=lambda s: (shared[s], -len(held[s] or [])))  # among equals: the least to lose
            free.remove(best)
            start, src = shared[best], best
            busy = [s for s in range(len(held)) if s != best and s not in free]
            if busy and max(shared[s] for s in busy) - start >= _MIN_COPY:
                src = max(busy, key=shared.__getitem__)
                start = shared[src]
                self.model.copy_cache(src, best, start)
                self._wrote()
            held[best] = (held[src] or [])[:start]  # the prefill overwrites the rest
            slots.append(best)
            starts.append(start)
        return slots, starts

    def _shared(self, held: list[list[int] | None], ids: list[int]) -> list[int]:
        """Per slot, how many leading ids of a prompt its cache holds, short of the prompt's last id (always fed,
        for its logits); zeros without prefix reuse."""
        if not self.prefix_cache:
            return [0] * len(held)
        return [min(_shared_prefix(rec, ids), len(ids) - 1) if rec else 0 for rec in held]

    def reusable(self, ids: list[int]) -> int:
        """How many leading ids of a prompt some cache slot holds now (reused or copied by place)."""
        return max(self._shared(self._held_ids(), ids))

    def prefill(self, slots: list[int], parts: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Feeds parts[i] to slots[i] at positions starts[i], starts[i] + 1, ... in one packed forward -> the logits
        [k, V] of each part's last token. A slot's record then holds its first starts[i] ids and the part."""
        held = self._held_ids()
        dev = self.model.device
        flat = torch.tensor([t for part in parts for t in part], dtype=torch.int64, device=dev)
        cu = torch.tensor([0] + [len(part) for part in parts]).cumsum(0)
        logits = self.model.forward(flat, torch.tensor(starts), cu_seqlens=cu, slots=torch.tensor(slots),
                                    last_only=True)
        self._wrote()
        for s, part, start in zip(slots, parts, starts):
            rec = held[s]
            if rec is not None and len(rec) >= start:
                del rec[start:]
                rec += part
            else:  # forgotten (or never this long) since place(): the earlier positions are not vouched for
                held[s] = None
        return logits

    def padding_slots(self, free: list[int]) -> list[int]:
        """Free slots in the order CUDA-graph padding rows overwrite their position 0: least held first."""
        return sorted(free, key=lambda s: len(self._held[s] or []))

    def decode(self, tok: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, pad_slots: torch.Tensor,
               fed: list[tuple[int, int]], pads: list[int]) -> torch.Tensor:
        """Logits [n, V] of one decode step for n rows. fed: (slot, id) of each row, on the host (or [], recorded
        later with record_fed); pad_slots (device) = pads (host): cache slots no live row uses, as padding_slots
        orders them (CUDA padding)."""
        held = self._held_ids()
        bucket = next(b for b in self.buckets if b >= tok.numel())
        # Padding rows need free slots: while prompts are being prefilled in parts (their slots are taken, not
        # free) there may be too few, and that step runs eagerly.
        if self._graphs is not None and bucket - tok.numel() <= len(pads):
            for s in pads[:bucket - tok.numel()]:
                held[s] = []
            self.model.cache_writes += 1  # a replay bypasses decode_step
            logits = self._graphs[bucket](tok, pos, slot, pad_slots)
        else:
            logits = self.model.decode_step(tok, pos, slot)
        self._wrote()
        self.record_fed(fed)
        return logits

    def record_fed(self, fed: list[tuple[int, int]]) -> None:
        """(slot, id) of each row a decode step fed: the id is now in the slot's cache, after the ids before it.
        decode records its `fed`; a step launched before its ids were on the host (overlap) records them here."""
        held = self._held_ids()
        for s, t in fed:
            if held[s] is not None:
                held[s].append(t)

    def verify(self, slots: list[int], ats: list[int], ids: list[list[int]]) -> torch.Tensor:
        """Logits [sum of len(ids[i]), V] of feeding ids[i] to slots[i] at positions ats[i], ats[i] + 1, ... (one
        packed forward). Each slot's record is cut at its `at`: which written positions hold accepted tokens is
        the caller's to say (hold)."""
        held = self._held_ids()
        for s, at in zip(slots, ats):
            if held[s] is not None:
                held[s] = held[s][:at]
        dev = self.model.device
        flat = torch.tensor([t for row in ids for t in row], dtype=torch.int64, device=dev)
        cu = torch.tensor([0] + [len(row) for row in ids]).cumsum(0)
        logits = self.model.forward(flat, torch.tensor(ats), cu_seqlens=cu, slots=torch.tensor(slots))
        self._wrote()
        return logits

    def hold(self, slot: int, at: int, ids: list[int]) -> None:
        """Records that positions at, at + 1, ... of `slot` hold `ids` (written by the last verify)."""
        rec = self._held[slot]
        if rec is not None and len(rec) == at:  # else the records were forgotten meanwhile
            rec += ids

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Validates prompt ids (ValueError naming the prompt and the rule); returns them as lists of ints."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompt_tokens must be a non-empty list of token id lists")
        out = []
        vocab, window = self.model.args.vocab_size, self.model.max_seq_len
        for i, p in enumerate(prompts):
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
                raise ValueError(f"prompt {i} must be a list of token ids, got {type(p).__name__}")
            ids = list(p)
            if not ids:
                raise ValueError(f"prompt {i} is empty: it needs at least one token (e.g. BOS)")
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt {i}: token ids must be integers in [0, {vocab})")
            if len(ids) >= window:
                raise ValueError(f"prompt {i} has {len(ids)} tokens but the context window (max_seq_len) is "
                                 f"{window}: the prompt must leave room for at least one new token")
            out.append(ids)
        return out

    def run(self, prompts: Sequence[Sequence[int]], params: SamplingParams, stop_ids: Sequence[int],
            logprobs: bool = False, vocab: int | None = None, top_logprobs: int = 0) -> "Run":
        """vocab: pick only ids below it (a tokenizer with fewer pieces than the model has embedding rows, as
        fine-tunes with a resized embedding have, cannot decode the rest); None: every id."""
        return Run(self, prompts, params, stop_ids, logprobs, vocab, top_logprobs)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, stop_ids: Sequence[int],
                 logprobs: bool = False, top_logprobs: int = 0) -> list[GenerationResult]:
        run = self.run(prompts, params, stop_ids, logprobs, top_logprobs=top_logprobs)
        for _ in run:
            pass
        return run.results


class Run:
    """One generation over a list of prompts, to which `add` can queue more (between steps, each with its own
    sampling parameters, stop ids and logprobs wish: the text API batches concurrent calls this way). Iterating
    yields, after each step, the (row, token id) pairs that step appended; `finish(row)` (between steps) ends a
    row early. `results` holds the outcome per row. Closing the iterator early (or dropping it) leaves the engine
    usable: the slots' records cover only completed writes. A run either drafts or not: its first prompts decide. A
    drafting run takes greedy rows without a penalty only (rows without prompt_lookup never draft); a plain run
    takes any rows, and decodes rows with prompt_lookup plainly (the same tokens). Per-row state is kept by row
    number; `release(rows)` lets a run that keeps taking prompts (a busy service's) forget ended rows, so it does
    not grow without bound."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams, stop_ids: frozenset,
                 logprobs: bool, vocab: int | None = None, top_logprobs: int = 0):
        self.engine = engine
        self.lookup = params.prompt_lookup > 0
        model_vocab = engine.model.args.vocab_size
        self._vocab = None if vocab is None or vocab >= model_vocab else vocab
        self._rows = 0  # rows ever added: the next row number
        self.prompts: dict[int, list[int]] = {}
        self._results: dict[int, GenerationResult] = {}
        self._done: dict[int, bool] = {}
        self._params: dict[int, SamplingParams] = {}
        self._stop_ids: dict[int, frozenset] = {}
        self._top: dict[int, int] = {}  # top_logprobs per row
        self._budget: dict[int, int] = {}
        self._generator: dict[int, torch.Generator | None] = {}  # seeded rows: their own, drawn from every step
        self._lookup_misses: dict[int, int] = {}
        self._lookup_wait: dict[int, int] = {}
        self._lookup_turn = 0  # which row drafts first (rows take turns where a forward takes one draft)
        self._released: set[int] = set()  # rows to forget once they have left the batch
        self._ngrams: dict[int, tuple[dict, int]] = {}  # row -> (n-gram -> latest start, positions indexed)
        self._queue: list[int] = []  # rows waiting for a cache slot, first first
        self.finished = False  # the generator has returned: add() would queue rows nothing runs
        self.add(prompts, params, stop_ids, logprobs, top_logprobs)
        self._steps = self._generate()

    def add(self, prompts: Sequence[Sequence[int]], params: SamplingParams, stop_ids: Sequence[int],
            logprobs: bool = False, top_logprobs: int = 0) -> list[int]:
        """Queues prompts (checked as Engine.check_prompts does) -> their row numbers. Between steps only."""
        if self.finished:
            raise RuntimeError("this run has finished: start a new one")
        check_top_logprobs(logprobs, top_logprobs, self._vocab or self.engine.model.args.vocab_size)
        if self.lookup and not params.checks_drafts:
            raise ValueError("a drafting run (prompt_lookup) takes only greedy rows without a penalty or logit bias")
        prompts = self.engine.check_prompts(prompts)
        check_logit_bias(params, self._vocab or self.engine.model.args.vocab_size)
        rows = list(range(self._rows, self._rows + len(prompts)))
        self._rows += len(prompts)
        window = self.engine.model.max_seq_len
        for i, (r, ids) in enumerate(zip(rows, prompts)):
            generator = None
            if not params.greedy and params.seed is not None:
                # One generator per prompt (the first seeded with the seed itself): a prompt's numbers do not
                # depend on when its row gets a slot, which depends on what else shares the run.
                generator = torch.Generator(device=self.engine.model.device)
                generator.manual_seed((params.seed + i * 0x9E3779B97F4A7C15) % 2 ** 64)
            self.prompts[r] = ids
            self._results[r] = GenerationResult(logprobs=[] if logprobs else None,
                                                top_logprobs=[] if top_logprobs else None)
            self._done[r] = False
            self._params[r] = params
            self._stop_ids[r] = frozenset(stop_ids)
            self._top[r] = top_logprobs
            self._budget[r] = min(params.max_new_tokens, window - len(ids))
            self._generator[r] = generator
            self._lookup_misses[r] = 0
            self._lookup_wait[r] = 0
        self._queue += rows
        return rows

    @property
    def results(self) -> list[GenerationResult]:
        """The outcome of each row, in row order (released rows left out)."""
        return list(self._results.values())

    def result(self, row: int) -> GenerationResult:
        return self._results[row]

    def release(self, rows: Sequence[int]) -> None:
        """The caller holds these ended rows' results (result): the run forgets them once they leave the batch."""
        self._released.update(rows)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self._steps

    def close(self) -> None:
        self._steps.close()

    def done(self, row: int) -> bool:
        """Whether `row` has ended (a stop id, its budget, or finish; a forgotten row has)."""
        return self._done.get(row, True)

    def finish(self, row: int, reason: str = "stop") -> None:
        """Ends `row` (its slot is freed at the next step); reason becomes its finish_reason."""
        if not self._done.get(row, True):
            self._done[row] = True
            self._results[row].finish_reason = reason

    def _placeable(self, queue: list[int], filling: dict[int, int], room: int) -> list[int]:
        """The queued rows to place now, first come first, at most `room`: a row waits while a prompt being
        prefilled (or placed before it) will give it at least _MIN_COPY more ids to copy than the cache holds now,
        so n samples of a prompt, or requests sharing a long context, prefill it once."""
        if not room or not queue:
            return []
        if not self.engine.prefix_cache:  # nothing to copy: no reason to wait
            return queue[:room]
        leaders = [self.prompts[r] for r in filling]
        out = []
        for r in queue:
            ids = self.prompts[r]
            ahead = max((min(_shared_prefix(p, ids), len(ids) - 1) for p in leaders), default=0)
            if ahead - self.engine.reusable(ids) >= _MIN_COPY:
                continue
            out.append(r)
            leaders.append(ids)
            if len(out) == room:
                break
        return out

    @torch.inference_mode()
    def _prefill(self, filling: dict[int, int], slot_of: dict[int, int], chunk: int | None,
                 decoding: list[int]) -> tuple[torch.Tensor | None, list[int], tuple[torch.Tensor, ...]]:
        """Feeds the next part of the prompts being prefilled (filling: row -> next position, in arrival order):
        all of each with chunk None, else at most `chunk` tokens in all, first come first; in the same forward,
        the last token of each of the `decoding` rows (their decode step: one reading of the weights for both).
        Returns the decoding rows' logits [d, V] (None without any), the rows whose prompts are now whole in the
        cache (they leave `filling`) and their last-token logits [k, V], next positions [k], slots [k], seen counts
        [k, V] int32 (_IN_PROMPT for the prompt's tokens, which HF's repetition penalty counts as seen; None in a
        drafting run, which has no penalty)."""
        model = self.engine.model
        dev = model.device
        rows, ends, room = [], [], chunk
        for r, at in filling.items():
            if room is not None and room <= 0:
                break
            end = len(self.prompts[r]) if room is None else min(len(self.prompts[r]), at + room)
            rows.append(r)
            ends.append(end)
            room = None if room is None else room - (end - at)
        parts = [self._results[r].tokens[-1:] for r in decoding] + [
            self.prompts[r][filling[r]:end] for r, end in zip(rows, ends)]
        starts = [len(self.prompts[r]) + len(self._results[r].tokens) - 1 for r in decoding] + [
            filling[r] for r in rows]
        logits = self.engine.prefill([slot_of[r] for r in decoding + rows], parts, starts)
        decoded, logits = (logits[:len(decoding)], logits[len(decoding):]) if decoding else (None, logits)
        whole = [j for j, (r, end) in enumerate(zip(rows, ends)) if end == len(self.prompts[r])]
        for r, end in zip(rows, ends):
            filling[r] = end
        rows = [rows[j] for j in whole]
        for r in rows:
            del filling[r]
        if not rows:
            return decoded, [], ()
        if len(whole) < len(ends):
            logits = logits[torch.tensor(whole, dtype=torch.int64, device=dev)]
        slots = [slot_of[r] for r in rows]
        lens = [len(self.prompts[r]) for r in rows]
        seen = None
        if not self.lookup:
            seen = torch.zeros(len(rows), model.args.vocab_size, dtype=torch.int32, device=dev)
            flat = torch.tensor([t for r in rows for t in self.prompts[r]], dtype=torch.int64, device=dev)
            seen[torch.repeat_interleave(torch.arange(len(rows), device=dev), torch.tensor(lens, device=dev)),
                 flat] = _IN_PROMPT
        return decoded, rows, (logits, torch.tensor(lens, dtype=torch.int32, device=dev),
                               torch.tensor(slots, dtype=torch.int32, device=dev), seen)

    def _row_args(self, rows: list[int]) -> _RowArgs | tuple[()]:
        """The sampling parameters of `rows` on the device (greedy rows get a valid placeholder: their tokens come
        from argmax); () when every row is greedy without a penalty or bias (nothing to copy to the device)."""
        dev, vocab = self.engine.model.device, self.engine.model.args.vocab_size
        ps = [self._params[r] for r in rows]
        if all(p.checks_drafts for p in ps):
            return ()
        penalties = torch.tensor([[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in ps],
                                 dtype=torch.float32, device=dev)
        return _RowArgs(*penalties.split(1, dim=1),
                        torch.tensor([p.greedy for p in ps], dtype=torch.bool, device=dev),
                        torch.tensor([1.0 if p.greedy else p.temperature for p in ps], dtype=torch.float32,
                                     device=dev),
                        torch.tensor([min(p.top_k, vocab) for p in ps], dtype=torch.int32, device=dev),
                        torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev),
                        self._biases(ps))

    def _biases(self, ps: list[SamplingParams]) -> torch.Tensor | None:
        """Logit biases [n, V] of rows with parameters ps, on the device; None when no row has any."""
        if not any(p.logit_bias for p in ps):
            return None
        rows = [j for j, p in enumerate(ps) for _ in p.logit_bias]
        ids, values = zip(*(pair for p in ps for pair in p.logit_bias))
        bias = torch.zeros(len(ps), self.engine.model.args.vocab_size, dtype=torch.float32)
        bias[rows, list(ids)] = torch.tensor(values)
        return bias.to(self.engine.model.device)

    def _uniforms(self, rows: list[int]) -> torch.Tensor:
        """One uniform number per row, each seeded row's from its own generator (so a seeded call draws
        the same numbers whatever else shares the run), the others' from torch's default generator."""
        dev = self.engine.model.device
        groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
        for j, r in enumerate(rows):
            g = self._generator[r]
            groups.setdefault(id(g), (g, []))[1].append(j)
        if len(groups) == 1:
            return torch.rand(len(rows), device=dev, dtype=torch.float32, generator=self._generator[rows[0]])
        out = torch.empty(len(rows), device=dev, dtype=torch.float32)
        for g, js in groups.values():
            out[torch.tensor(js, device=dev)] = torch.rand(len(js), device=dev, dtype=torch.float32, generator=g)
        return out

    @torch.inference_mode()
    def _choose(self, logits: torch.Tensor, seen: torch.Tensor | None, rows: list[int],
                args: _RowArgs | tuple[()] | None) -> tuple[torch.Tensor, ...]:
        """Next ids [n] from logits [n, V] of `rows` (args: their _row_args; None in a drafting run, where every row
        is greedy without a penalty or bias), and when a row asks for log-probabilities, per row on the host: (the id's
        log-probability under the raw logits, the row's top_logprobs alternatives or None); else None."""
        raw = logits
        ps = [self._params[r] for r in rows]
        # Only rows with a penalty read their seen counts: without one in the batch, none is kept up to date.
        penalised = seen is not None and any(p.penalised for p in ps)
        if penalised:
            if any(p.repetition_penalty != 1 for p in ps):  # HF RepetitionPenaltyLogitsProcessor
                rp = args.repetition
                logits = torch.where(seen != 0, torch.where(logits < 0, logits * rp, logits / rp), logits)
            if any(p.presence_penalty or p.frequency_penalty for p in ps):  # OpenAI's, on generated tokens
                generated = (seen & (_IN_PROMPT - 1)).float()
                logits = logits - generated * args.frequency - (generated > 0).float() * args.presence
        if args and args.bias is not None:  # OpenAI's logit_bias
            logits = logits + args.bias
        if self._vocab is not None:
            logits = logits[:, :self._vocab].contiguous()
        if all(p.greedy for p in ps):
            tok = ops.argmax(logits)
        else:
            tok = ops.sample(logits, args.temperature, args.top_k, args.top_p, self._uniforms(rows))
            if any(p.greedy for p in ps):
                tok = torch.where(args.greedy, ops.argmax(logits), tok)
        if penalised:
            seen[torch.arange(len(rows), device=seen.device), tok] += 1
        want = [self._top[r] for r in rows if self._results[r].logprobs is not None]
        if not want:
            return tok, None
        lsm = torch.log_softmax(raw, dim=-1)
        chosen = lsm.gather(1, tok[:, None])[:, 0].tolist()
        if not max(want):
            return tok, [(c, None) for c in chosen]
        top = (lsm if self._vocab is None else lsm[:, :self._vocab]).topk(max(want), dim=-1)
        ids, values = top.indices.tolist(), top.values.tolist()
        return tok, [(c, list(zip(i[:self._top[r]], v[:self._top[r]])))
                     for c, i, v, r in zip(chosen, ids, values, rows)]

    def _draft(self, r: int, at: int) -> list[int]:
        """Prompt lookup for row r, whose last token is about to be fed at position `at`: what followed the latest
        earlier occurrence of its last 3 (else 2, else 1) tokens, capped so that the verified tokens stay within
        the row's budget and the context window."""
        res = self._results[r]
        k = min(self._params[r].prompt_lookup, self._budget[r] - len(res.tokens) - 1,
                self.engine.model.max_seq_len - 1 - at)
        if k <= 0:
            return []
        ctx = self.prompts[r] + res.tokens
        # An index of where each 1..3-gram that some token follows last began, extended by the tokens added since
        # the last draft: a scan of the whole text per step would cost ~0.6 ms per row at 4k tokens.
        index, done = self._ngrams.setdefault(r, ({}, 0))
        for end in range(done, len(ctx) - 1):
            for n in range(1, min(_LOOKUP_NGRAM, end + 1) + 1):
                index[tuple(ctx[end + 1 - n:end + 1])] = end + 1 - n
        self._ngrams[r] = index, len(ctx) - 1
        for n in range(min(_LOOKUP_NGRAM, len(ctx) - 1), 0, -1):
            start = index.get(tuple(ctx[len(ctx) - n:]))
            if start is not None:
                return ctx[start + n:start + n + k]
        return []

    @torch.inference_mode()
    def _lookup_step(self, rows: list[int], slot_of: dict[int, int], free: list[int]) -> dict[int, list]:
        """prompt_lookup: the next tokens (and log-probabilities) of each of `rows`, whose last tokens are not yet
        in the cache. Rows with a draft feed their last token and the draft, the others their last token, in one
        packed forward (a plain decode step when no row drafts); each row gets the greedy tokens up to and
        including the first that differs from its draft: those plain greedy decoding would pick."""
        ats = [len(self.prompts[r]) + len(self._results[r].tokens) - 1 for r in rows]
        dev = self.engine.model.device
        drafts = [[] for _ in rows]
        room = self.engine.drafts_per_forward or len(rows)
        self._lookup_turn += 1
        for j in ((self._lookup_turn + i) % len(rows) for i in range(len(rows))):
            r = rows[j]
            if self._lookup_wait[r]:
                self._lookup_wait[r] -= 1
            elif room:
                drafts[j] = self._draft(r, ats[j])
                room -= bool(drafts[j])
        slots = [slot_of[r] for r in rows]
        fed = [[self._results[r].tokens[-1]] + d for r, d in zip(rows, drafts)]
        if not any(drafts):
            pads = self.engine.padding_slots(free)
            n = len(rows)
            host = torch.tensor(ats + slots + pads, dtype=torch.int32, device=dev)  # one copy for three inputs
            logits = self.engine.decode(torch.tensor([f[0] for f in fed], dtype=torch.int64, device=dev),
                                        host[:n], host[n:2 * n], host[2 * n:], [(s, f[0]) for s, f in zip(slots, fed)],
                                        pads)
        else:
            logits = self.engine.verify(slots, ats, fed)
        tok, scores = self._choose(logits, None, [r for r, f in zip(rows, fed) for _ in f], None)
        chosen = tok.tolist()
        scores = scores or [None] * len(chosen)
        out, i = {}, 0
        for r, s, at, d, f in zip(rows, slots, ats, drafts, fed):
            c = chosen[i:i + len(f)]
            m = next((j for j, (x, y) in enumerate(zip(c, d)) if x != y), len(d))
            out[r] = list(zip(c[:m + 1], scores[i:i + m + 1]))
            i += len(f)
            if not d:
                continue
            self.engine.hold(s, at, f[:m + 1])  # the later positions hold rejected draft tokens
            self._results[r].accepted_drafts += m
            # A rejected draft cost a wider forward for one token: after each in a row, draft again only after
            # 1, 3, 7, then 15 plain steps (text that does not repeat itself then costs little).
            self._lookup_misses[r] = 0 if m else self._lookup_misses[r] + 1
            self._lookup_wait[r] = min(2 ** self._lookup_misses[r] - 1, _LOOKUP_MAX_WAIT)
        return out

    def _generate(self) -> Iterator[list[tuple[int, int]]]:
        """Continuous batching: up to max_batch_size rows decode together; a finished row's cache slot is
        refilled with the next queued prompt (prefilled in the same step), so a long row never idles the rest.
        In a drafting run, rows hold the tokens chosen for their next steps (pending; a confirmed draft gives
        several) and only rows with none left are computed; their inputs are built on the host."""
        try:
            yield from self._steps_of_run()
        finally:
            self.finished = True

    def _steps_of_run(self) -> Iterator[list[tuple[int, int]]]:
        model, queue = self.engine.model, self._queue
        dev = model.device
        pending: dict[int, list[tuple[int, tuple | None]]] = {}  # drafting run: row -> its next tokens
        free = list(range(model.max_batch_size))[::-1]
        live: list[int] = []  # rows, in the order of the rows of logits / tok / pos / slot / seen / args
        filling: dict[int, int] = {}  # rows with a slot whose prompt is not yet whole in it -> next position to feed
        slot_of: dict[int, int] = {}
        pad_slots = None  # free slots on the device, rebuilt only when `free` changes (no per-step copy)
        args = None  # _row_args of the live rows, rebuilt only when they change
        fuse = False  # the live rows' last tokens are fed with the next prompt part (at the top of the loop)
        placed = None  # the queued rows to place at the top of the loop, when already chosen
        pads: list[int] = []

        def decode(fed: list[tuple[int, int]]) -> torch.Tensor:  # the live rows' step; pos moves on
            nonlocal pad_slots, pads
            if pad_slots is None:  # padding rows of a CUDA graph bucket write position 0 of these
                pads = self.engine.padding_slots(free)
                pad_slots = torch.tensor(pads, dtype=torch.int32, device=dev)
            out = self.engine.decode(tok, pos, slot, pad_slots, fed, pads)
            pos.add_(1)
            return out

        with torch.inference_mode():
            logits = torch.empty(0, model.args.vocab_size, dtype=torch.float32, device=dev)
            pos = torch.empty(0, dtype=torch.int32, device=dev)
            slot = torch.empty(0, dtype=torch.int32, device=dev)
            seen = None if self.lookup else torch.empty(0, model.args.vocab_size, dtype=torch.int32, device=dev)
        # Rows end from outside between steps; those ended before the first one are dropped here, the rest after
        # each step's yield.
        queue[:] = [r for r in queue if not self._done[r]]
        while True:
            if self._released:  # forget released rows that have left the batch
                gone = self._released.difference(live, queue, filling)
                for r in gone:
                    for d in (self.prompts, self._results, self._done, self._params, self._stop_ids, self._top,
                              self._budget, self._generator, self._lookup_misses, self._lookup_wait, self._ngrams,
                              slot_of, pending):
                        d.pop(r, None)
                self._released -= gone
            if not live and not queue and not filling:
                return
            if placed is None:
                placed = self._placeable(queue, filling, len(free))
            if placed:
                queue[:] = [r for r in queue if r not in placed]
                slots, starts = self.engine.place([self.prompts[r] for r in placed], free)
                slot_of.update(zip(placed, slots))
                for r, st in zip(placed, starts):
                    self._results[r].cached_tokens = st
                    filling[r] = st
                pad_slots = None
            placed = None
            new = []
            if filling:  # with nothing decoding, nothing waits: whole prompts
                decoded, new, parts = self._prefill(filling, slot_of, self.engine.prefill_chunk if live else None,
                                                    live if fuse else [])
                if fuse:
                    logits, fuse = decoded, False
            if new:
                args = None
                live += new
                if self.lookup:  # the new rows' first tokens
                    tok, scores = self._choose(parts[0], None, new, None)
                    pending.update((r, [(t, sc)]) for r, t, sc in zip(new, tok.tolist(), scores or [None] * len(new)))
                else:
                    with torch.inference_mode():
                        logits, pos, slot, seen = (torch.cat([a, b]) for a, b in zip((logits, pos, slot, seen), parts))
            ahead = False  # the live rows' next step is launched (Engine.overlap)
            if self.lookup:
                ids, scores = (list(v) for v in zip(*(pending[r].pop(0) for r in live)))
            else:
                if args is None:
                    args = self._row_args(live)
                tok, scores = self._choose(logits, seen, live, args)
                # the next step goes ahead of the host's read when no prompt waits to be fed with it and some row
                # has budget left for it
                ahead = (self.engine.overlap and not filling and not (queue and free)
                         and any(len(self._results[r].tokens) + 1 < self._budget[r] for r in live))
                if ahead:
                    host, wait = _to_host(tok)
                    with torch.inference_mode():
                        logits = decode([])
                    wait()
                    ids = host.tolist()
                else:
                    ids = tok.tolist()
            step = []
            for j, r in enumerate(live):
                res = self._results[r]
                if ids[j] in self._stop_ids[r]:
                    self.finish(r, "stop")
                    continue
                res.tokens.append(ids[j])
                if res.logprobs is not None:
                    res.logprobs.append(scores[j][0])
                    if res.top_logprobs is not None:
                        res.top_logprobs.append(scores[j][1])
                step.append((r, ids[j]))
                if len(res.tokens) >= self._budget[r]:
                    self.finish(r, "length")
            yield step  # the consumer may finish rows here (stop strings) and add prompts
            queue[:] = [r for r in queue if not self._done[r]]  # finished while queued (a closed call): no prefill
            for r in [r for r in filling if self._done[r]]:  # finished while being prefilled: its slot is free
                del filling[r]
                free.append(slot_of[r])
                pad_slots = None
            if ahead:  # every live row was fed, finished ones too
                self.engine.record_fed([(slot_of[r], t) for r, t in zip(live, ids)])
            keep = [j for j, r in enumerate(live) if not self._done[r]]
            fed = [(slot_of[live[j]], ids[j]) for j in keep]
            if not keep and not queue and not filling:
                return
            with torch.inference_mode():
                if len(keep) < len(live):  # finished rows leave the decode batch and free their slots
                    free += [slot_of[r] for r in live if self._done[r]]
                    pad_slots = args = None
                    if not self.lookup:
                        idx = torch.tensor(keep, dtype=torch.int64, device=dev)
                        pos, slot, seen = pos[idx], slot[idx], seen[idx]
                        if ahead:  # the launched step's logits; else the ids its step will feed
                            logits = logits[idx]
                        else:
                            tok = tok[idx]
                    live = [live[j] for j in keep]
                if self.lookup:
                    starved = [r for r in live if not pending[r]]
                    if starved:
                        pending.update(self._lookup_step(starved, slot_of, free))
                elif ahead:
                    pass  # the step is launched
                elif live and (filling or (placed := self._placeable(queue, filling, len(free)))):
                    fuse = True  # a prompt is fed at the top: the decode step goes with it
                    pos += 1
                elif live:
                    logits = decode(fed)
                else:
                    logits = logits[:0]
