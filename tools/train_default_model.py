#!/usr/bin/env python
"""Trains codellama_ext's embedded default model from scratch (issue 6): a small model with CodeLlama's
architecture and conventions, on the Python standard library's own sources (PSF licence; every machine has them).

Stages (default: all four, in order), each reading what the previous ones wrote to --work:

  prepare   the running Python's stdlib *.py files (huge / generated / unparsable ones skipped), ~3% of whole files
            held out (chosen by a hash of the relative path), a SentencePiece tokenizer trained on the rest with
            CodeLlama's conventions (BPE, byte fallback, <unk>=0 <s>=1 </s>=2, the 16 infill pieces appended at the
            end of the vocabulary as in CodeLlama 7B/13B), and the training files' token ids (numpy uint16).
  train     causal LM + fill-in-the-middle in exactly the token format of CodeLlamaTokenizer.infill_ids (PSM and
            SPM, half each) followed by the middle and <EOT>; AdamW, warmup + cosine schedule, bf16 autocast on
            CUDA; a --minutes time budget or a --steps count.
  export    a Meta folder: params.json, consolidated.00.pth (bf16, a plain tensor dict), tokenizer.model,
            training.json (the training budget) and checklist.chk (md5s, as in Meta's downloads), into
            codellama_ext/default_model/ or --out.
  evaluate  loads the exported folder through the engine (codellama_ext.load_model, the code path of every
            CodeLlama checkpoint) and measures, on the held-out files, the per-token perplexity and the exact-match
            rate of greedy single-line infilling, against unigram baselines; writes MODEL_CARD.md.

FIM cut points lie on line boundaries (just before or just after a newline token). No SentencePiece piece contains
a newline, so the token ids on either side of such a cut do not depend on the other side: the prefix, middle and
suffix ids are slices of the document's ids (the window's first line re-encoded with the implicit leading space),
equal to what infill_ids / encode_infilling make of the cut texts, with no tokenization in the training loop.
Half of the FIM examples mask exactly one line (the task the evaluation measures), the rest a random span. FIM
windows have every length up to the row and are packed several to a row, so infilling works at any prompt length.
--init continues training from an exported folder (the shipped model: a GPU run, then a FIM-heavier CPU run).

  python tools/train_default_model.py                         # everything on this CPU (~2 hours)
  python tools/train_default_model.py --stages train,export --device cuda --minutes 4 --batch-size 64 \\
      --seq-len 1024 --lr 3e-3 --work WORK --out OUT            # a GPU run from a prepared work dir

prepare, train and export need only torch, numpy and sentencepiece (the package's tokenizer.py and config.py are
loaded by path), so train/export run where the extension is not built; evaluate needs the built package.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "codellama_ext" / "default_model"
DEFAULT_WORK = ROOT / "build" / "default_model_work"
STAGES = ("prepare", "train", "export", "evaluate")
MAX_FILE_BYTES = 200_000      # larger stdlib files are data tables or generated (pydoc_data/topics.py)
HELDOUT_PER_MILLE = 30
MIN_FIM_WINDOW = 48           # ids of the shortest FIM window (prefix + middle + suffix)


def _package_module(name: str):
    """codellama_ext/<name>.py loaded by path (tokenizer.py and config.py import nothing from the package), so the
    train and export stages run without the compiled extension."""
    key = f"_codellama_ext_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "codellama_ext" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ============================================================================================= prepare
def stdlib_files(limit: int | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's *.py files, sorted; skips site-packages, files over MAX_FILE_BYTES,
    files that are not UTF-8 or do not parse (test data), and generated ones (codec tables, casefix data)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "__pycache__" in rel:
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
            ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        if "generated" in text[:1000].lower() or not text.strip():
            continue
        out.append((rel, text))
        if limit is not None and len(out) >= limit:
            break
    return out


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 1000 < HELDOUT_PER_MILLE


def train_tokenizer(texts: list[str], vocab_size: int, seed: int) -> bytes:
    """Llama's SentencePiece settings (BPE, byte fallback, identity normalizer, implicit leading space, digits split,
    whitespace-only pieces for indentation) plus CodeLlama's 16 extra pieces at the end of the vocabulary.
    Trained line by line, so no piece contains a newline (the FIM slicing above relies on it)."""
    import sentencepiece as spm
    tok_mod = _package_module("tokenizer")
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    rng = np.random.default_rng(seed)
    rng.shuffle(lines)  # the trainer keeps the first input_sentence_size lines
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        # "☺" is required (a piece of its own that never merges): Meta's encode_infilling trick needs it.
        character_coverage=0.9999, required_chars="☺", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=min(len(lines), 400_000), shuffle_input_sentence=False,
        num_threads=os.cpu_count() or 1, max_sentence_length=8192, minloglevel=2)
    return tok_mod.append_pieces(buf.getvalue())


def prepare(args) -> None:
    t0 = time.monotonic()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = stdlib_files(args.max_files)
    train = [(r, t) for r, t in files if not is_heldout(r)]
    held = [(r, t) for r, t in files if is_heldout(r)]
    if not train or not held:
        raise SystemExit(f"prepare: need training and held-out files, got {len(train)} and {len(held)} "
                         "(raise --max-files)")
    log(f"prepare: {len(files)} stdlib files ({sum(len(t) for _, t in files) / 1e6:.1f} MB), "
        f"{len(held)} held out")
    (work / "tokenizer.model").write_bytes(train_tokenizer([t for _, t in train], args.vocab_size, args.seed))
    tok = _package_module("tokenizer").CodeLlamaTokenizer(work / "tokenizer.model")
    if not (tok.supports_infilling and tok.eot_id is not None and tok._newline_free):
        raise SystemExit("prepare: the trained tokenizer lacks the infill pieces or has a piece with a newline")
    log(f"prepare: tokenizer of {tok.n_words} pieces in {time.monotonic() - t0:.0f} s")
    docs = [np.asarray(tok.encode_meta(t, bos=True, eos=True), dtype=np.uint16) for _, t in train]
    offsets = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    np.save(work / "train_ids.npy", np.concatenate(docs))
    np.save(work / "train_offsets.npy", offsets)
    (work / "heldout.json").write_text(json.dumps([{"path": r, "text": t} for r, t in held]))
    counts: dict[str, int] = {}
    for _, t in train:
        for line in t.split("\n"):
            if line.strip():
                counts[line.strip()] = counts.get(line.strip(), 0) + 1
    meta = {
        "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
        "train_files": len(train), "heldout_files": len(held),
        "train_bytes": sum(len(t.encode()) for _, t in train),
        "heldout_bytes": sum(len(t.encode()) for _, t in held),
        "train_tokens": int(offsets[-1]), "vocab_size": tok.n_words, "spm_vocab_size": args.vocab_size,
        "newline_id": tok._sp.piece_to_id("<0x0A>"), "most_frequent_line": max(counts, key=counts.get),
        "seed": args.seed, "prepare_seconds": round(time.monotonic() - t0, 1),
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"prepare: {meta['train_tokens']:,} training tokens ({meta['train_bytes'] / meta['train_tokens']:.2f} "
        f"bytes/token), done in {meta['prepare_seconds']:.0f} s")


# ============================================================================================= model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float) -> torch.Tensor:
    """cos and sin of position * theta^(-2i/hd), fp32: [2, seq_len, hd/2] (Meta's freqs_cis as real numbers)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angle = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return torch.stack([angle.cos(), angle.sin()])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Meta's layout: adjacent pairs (x[2i], x[2i+1]) rotated as complex numbers, in fp32. x [B, T, H, hd].
    Real arithmetic rather than complex tensors, so that torch.compile can fuse it."""
    cos, sin = (t[None, :x.shape[1], None, :] for t in rope)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.wq = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)

    def forward(self, x, rope):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rope)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        # GQA as Meta's repeat_kv: query head h reads kv head h // n_rep.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.attention = Attention(a)
        self.feed_forward = FeedForward(a.dim, a.ffn_hidden)
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, rope):
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


class TrainModel(nn.Module):
    """Meta's CodeLlama Transformer (llama/model.py) for training: same parameter names, untied output."""

    def __init__(self, a, seq_len: int):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.register_buffer("rope", rope_tables(a.head_dim, seq_len, a.rope_theta), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init: residual projections scaled down with depth
                std = 0.02 / math.sqrt(2 * a.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope)
        return self.output(self.norm(h))


def model_args(args, vocab_size: int):
    return _package_module("config").ModelArgs(
        dim=args.dim, n_layers=args.n_layers, n_heads=args.dim // args.head_dim, n_kv_heads=args.n_kv_heads,
        vocab_size=vocab_size, multiple_of=args.multiple_of, norm_eps=1e-5, rope_theta=1e6)


# ============================================================================================= data
class FIMSampler:
    """Training rows of seq_len + 1 token ids: plain windows of the document stream, or (with probability
    fim_rate) one fill-in-the-middle example of a line-aligned window of a document, padded with stream tokens."""

    def __init__(self, work: Path, seq_len: int, fim_rate: float, seed: int):
        meta = json.loads((work / "meta.json").read_text())
        self.ids = np.load(work / "train_ids.npy", mmap_mode="r")
        self.offsets = np.load(work / "train_offsets.npy")
        self.tok = _package_module("tokenizer").CodeLlamaTokenizer(work / "tokenizer.model")
        self.nl = meta["newline_id"]
        self.seq_len, self.fim_rate = seq_len, fim_rate
        self.rng = np.random.default_rng(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.row() for _ in range(batch_size)]).astype(np.int64))

    def _stream(self, n: int) -> np.ndarray:
        s = int(self.rng.integers(0, len(self.ids) - n))
        return self.ids[s:s + n]

    def row(self) -> np.ndarray:
        """With probability fim_rate a FIM example starts the row, and after each one, with that probability again,
        another follows while it fits; plain stream ids fill the rest. Window lengths are uniform up to the row, so
        FIM works at every prompt length (trained on full-row windows only, a model infilled at ~1000 tokens of
        prompt and not at 200); packing several short ones keeps the FIM share of the compute up."""
        n = self.seq_len + 1
        parts, used = [], 0
        while self.rng.random() < self.fim_rate:
            w = self.window(int(self.rng.integers(min(MIN_FIM_WINDOW, n - 8), n - 7)))
            cut = self.cut_points(w, bool(self.rng.random() < 0.5))
            if cut is None:
                continue
            ex = self.fim_ids(w, *cut, spm_order=bool(self.rng.random() < 0.5))
            if used + len(ex) > n:
                break
            parts.append(ex)
            used += len(ex)
        return np.concatenate(parts + [self._stream(n - used)])

    def window(self, max_len: int) -> np.ndarray:
        """Ids of whole lines of one document (doc chosen in proportion to its length), as encode_meta makes them
        for the window's text: the first line carries the implicit leading space."""
        d = int(np.searchsorted(self.offsets, self.rng.integers(0, self.offsets[-1]), side="right")) - 1
        doc = self.ids[self.offsets[d] + 1:self.offsets[d + 1] - 1]  # without <s> and </s>
        nls = np.flatnonzero(doc == self.nl)
        # a window starts at a non-empty line (an empty first line would leave a lone implicit "▁" in the prefix)
        starts = np.concatenate([[0], nls + 1])
        starts = starts[starts < len(doc)]
        starts = starts[doc[starts] != np.where(starts == 0, self.tok._underline_id, self.nl)]
        if not len(starts):
            return doc[:0]
        start = int(starts[self.rng.integers(0, len(starts))])
        w = doc[start:start + max_len + 8]
        at_end = start + len(w) == len(doc)
        if start > 0:
            first = np.flatnonzero(w == self.nl)
            q = int(first[0]) if len(first) else len(w)
            line = self.tok.decode_infill(w[:q].tolist())
            w = np.concatenate([np.asarray(self.tok.encode_meta(line + "\n", bos=False, eos=False)[:-1],
                                           dtype=w.dtype), w[q:]])
        if len(w) > max_len or not at_end:  # end on a line boundary: cut just before a newline
            cut = np.flatnonzero(w[:max_len + 1] == self.nl)
            w = w[:cut[-1]] if len(cut) else w[:0]
        return w

    def cut_points(self, w: np.ndarray, single_line: bool) -> tuple[int, int] | None:
        """(a, b): the middle is w[a:b]. single_line: one non-empty line (the prefix ends with the newline before
        it, the suffix starts with the newline after it); else a random non-empty span between line boundaries
        (either side of a newline). The prefix is never empty: the window's first ids carry the implicit leading
        space, which a middle (encoded without it) cannot start with."""
        nls = np.flatnonzero(w == self.nl)
        if single_line:
            ends = np.concatenate([nls, [len(w)]])
            starts = np.concatenate([[0], nls + 1])
            ok = np.flatnonzero((ends > starts) & (starts > 0))
            if not len(ok):
                return None
            k = int(ok[self.rng.integers(0, len(ok))])
            return int(starts[k]), int(ends[k])
        cuts = np.unique(np.concatenate([[len(w)], nls[nls > 0], nls + 1]))
        if len(cuts) < 2:
            return None
        a, b = sorted(int(c) for c in self.rng.choice(cuts, 2, replace=False))
        return a, b

    def fim_ids(self, w: np.ndarray, a: int, b: int, spm_order: bool) -> np.ndarray:
        """<s> <PRE> prefix <SUF> suffix <MID> middle <EOT> (PSM) or <s> <PRE> <SUF> suffix <MID> prefix middle
        <EOT> (SPM): infill_ids(prefix, suffix, suffix_first) + encode_infilling(middle) + [eot]."""
        t = self.tok
        pre, mid, suf = w[:a], w[a:b], w[b:]
        if spm_order:
            head = [[t.bos_id, t.prefix_id, t.suffix_id], suf, [t.middle_id], pre]
        else:
            head = [[t.bos_id, t.prefix_id], pre, [t.suffix_id], suf, [t.middle_id]]
        return np.concatenate([np.asarray(x, dtype=np.uint16) for x in head + [mid, [t.eot_id]]])


class Batches(torch.utils.data.IterableDataset):
    """Endless [batch, seq_len + 1] batches; each DataLoader worker samples with its own seed."""

    def __init__(self, work: Path, seq_len: int, fim_rate: float, seed: int, batch_size: int):
        self.args = (work, seq_len, fim_rate, seed, batch_size)

    def __iter__(self):
        work, seq_len, fim_rate, seed, batch_size = self.args
        worker = torch.utils.data.get_worker_info()
        sampler = FIMSampler(work, seq_len, fim_rate, seed + (worker.id if worker else 0))
        while True:
            yield sampler.batch(batch_size)


# ============================================================================================= train
def heldout_windows(work: Path, seq_len: int, n: int) -> torch.Tensor:
    """n windows of seq_len + 1 ids spread evenly over the held-out files (<s> ids </s> each, concatenated)."""
    tok = _package_module("tokenizer").CodeLlamaTokenizer(work / "tokenizer.model")
    held = json.loads((work / "heldout.json").read_text())
    stream = np.concatenate([tok.encode_meta(f["text"], bos=True, eos=True) for f in held])
    starts = np.linspace(0, len(stream) - seq_len - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, device, cuda: bool) -> float:
    """Mean next-token cross-entropy on the held-out windows (plain causal LM, no FIM)."""
    model.eval()
    total = 0.0
    for chunk in windows.split(8):
        chunk = chunk.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / windows[:, 1:].numel()


def load_init(model: TrainModel, folder: Path) -> dict:
    """Loads an exported folder's weights into `model` (continued training) and returns that folder's
    training.json, so the new model's record says what it started from."""
    try:
        weights = torch.load(folder / "consolidated.00.pth", map_location="cpu", weights_only=True, mmap=True)
        info = json.loads((folder / "training.json").read_text())
    except FileNotFoundError as e:
        raise SystemExit(f"--init {folder}: not an exported model folder ({e.filename} is missing)") from None
    try:
        model.load_state_dict({k: v.float() for k, v in weights.items()})
    except RuntimeError as e:
        raise SystemExit(f"--init {folder}: its weights do not fit the model flags (--dim, --n-layers, ...): "
                         f"{str(e).splitlines()[0]}") from None
    log(f"train: starting from {folder} ({info.get('tokens', 0):,} tokens of training)")
    return info


def train(args) -> None:
    work = Path(args.work)
    meta = json.loads((work / "meta.json").read_text())
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    a = model_args(args, meta["vocab_size"])
    model = TrainModel(a, args.seq_len)
    init_info = None
    if args.init:
        init_info = load_init(model, Path(args.init))
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"train: {n_params / 1e6:.2f}M parameters, dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads / "
        f"{a.n_kv_heads} kv heads, FFN {a.ffn_hidden}, vocab {a.vocab_size}, seq {args.seq_len}, "
        f"batch {args.batch_size}, device {device}")
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
    step_fn = torch.compile(model) if args.compile else model
    val = heldout_windows(work, args.seq_len, args.val_windows)
    last_val = time.monotonic()
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    batches = iter(torch.utils.data.DataLoader(
        Batches(work, args.seq_len, args.fim_rate, args.seed, args.batch_size), batch_size=None,
        num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0))
    budget_s = None if args.minutes is None else args.minutes * 60
    warmup = args.warmup
    t0 = time.monotonic()
    step, tokens, loss_ema, last_log = 0, 0, None, t0
    while True:
        elapsed = time.monotonic() - t0
        progress = step / args.steps if budget_s is None else elapsed / budget_s
        if progress >= 1:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1))))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(batches).to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = step_fn(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, a.vocab_size), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += batch[:, 1:].numel()
        if step % 10 == 0 or step == 1:
            v = loss.item()
            loss_ema = v if loss_ema is None else 0.9 * loss_ema + 0.1 * v
            if time.monotonic() - last_log > args.log_every or step == 1:
                last_log = time.monotonic()
                el = last_log - t0
                log(f"step {step} loss {v:.3f} (ema {loss_ema:.3f}) lr {lr:.2e} {tokens:,} tokens "
                    f"{tokens / el:,.0f} tok/s {el / 60:.1f} min")
            if time.monotonic() - last_val > args.val_every:
                log(f"step {step}: held-out loss {heldout_loss(model, val, device, cuda):.3f}")
                last_val = time.monotonic()
    minutes = (time.monotonic() - t0) / 60
    val_loss = heldout_loss(model, val, device, cuda)
    log(f"train: held-out loss {val_loss:.3f} (perplexity {math.exp(val_loss):.2f}, {val[:, 1:].numel():,} tokens)")
    info = {"device": torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)",
            "steps": step, "tokens": tokens, "epochs": round(tokens / meta["train_tokens"], 2),
            "minutes": round(minutes, 1), "final_loss_ema": round(loss_ema, 3) if loss_ema else None,
            "heldout_loss": round(val_loss, 3),
            "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "fim_rate": args.fim_rate,
            "seed": args.seed, "parameters": n_params, "torch": str(torch.__version__),
            "python": sys.version.split()[0], "data_python": meta["python"], "fim_windows": "packed, any length",
            "command": " ".join(["tools/train_default_model.py", *sys.argv[1:]])}
    if init_info is not None:
        info["init"] = init_info
    torch.save({"model": {k: v.float().cpu() for k, v in model.state_dict().items()},
                "params": a.to_meta_params() | {"vocab_size": a.vocab_size}, "info": info}, work / "ckpt.pt")
    log(f"train: {step} steps, {tokens:,} tokens in {minutes:.1f} min -> {work / 'ckpt.pt'}")


# ============================================================================================= export
def export(args) -> None:
    work, out = Path(args.work), Path(args.out)
    ck = torch.load(work / "ckpt.pt", map_location="cpu", weights_only=True)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in ck["model"].items()}
    torch.save(weights, out / "consolidated.00.pth")
    (out / "params.json").write_text(json.dumps(ck["params"], indent=1) + "\n")
    shutil.copyfile(work / "tokenizer.model", out / "tokenizer.model")
    meta = json.loads((work / "meta.json").read_text())
    info = ck["info"] | {"data": {k: meta[k] for k in ("python", "train_files", "heldout_files", "train_bytes",
                                                      "train_tokens", "spm_vocab_size", "prepare_seconds")}}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    write_checklist(out)
    log(f"export: {out} ({(out / 'consolidated.00.pth').stat().st_size / 1e6:.1f} MB weights)")


def write_checklist(out: Path) -> None:
    """checklist.chk: md5sum output for every file of the folder, as in Meta's downloads, so that
    --verify-checksums works on the default model too. Export and evaluate (MODEL_CARD.md) both rewrite it."""
    names = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "checklist.chk")
    (out / "checklist.chk").write_text("".join(
        f"{hashlib.md5((out / n).read_bytes(), usedforsecurity=False).hexdigest()}  {n}\n" for n in names))


# ============================================================================================= evaluate
def infill_tasks(held: list[dict], n: int, seed: int) -> list[tuple[str, str, str]]:
    """(prefix, line, suffix): one non-blank line inside a held-out function body, prefix ending with the newline
    before it, suffix starting with the newline after it; n samples chosen with a fixed seed."""
    cands = []
    for f in held:
        lines = f["text"].split("\n")
        for node in ast.walk(ast.parse(f["text"])):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for i in range(node.body[0].lineno - 1, node.end_lineno):
                    if lines[i].strip():
                        cands.append((f["path"], i))
    cands = sorted(set(cands))
    pick = np.random.default_rng(seed).choice(len(cands), size=min(n, len(cands)), replace=False)
    texts = {f["path"]: f["text"].split("\n") for f in held}
    out = []
    for j in sorted(pick):
        path, i = cands[j]
        lines = texts[path]
        out.append(("\n".join(lines[max(0, i - 40):i]) + "\n", lines[i], "\n" + "\n".join(lines[i + 1:i + 21])))
    return out


def _fit(tok, pre: str, suf: str, budget: int) -> tuple[str, str] | None:
    """Drops prefix lines from the top and suffix lines from the bottom until the PSM prompt fits `budget` tokens
    (None if even the lines next to the gap do not fit)."""
    while len(tok.infill_ids(pre, suf)) > budget:
        p, s = pre.split("\n"), suf.split("\n")
        if len(p) > 2 and (len(p) >= len(s) or len(s) <= 2):
            pre = "\n".join(p[1:])
        elif len(s) > 2:
            suf = "\n".join(s[:-1])
        else:
            return None
    return pre, suf


def _engine(out: Path, seq_len: int):
    """The exported folder through the public API (codellama_ext.CodeLlama, the code path of every checkpoint)."""
    sys.path.insert(0, str(ROOT))
    from codellama_ext import CodeLlama
    return CodeLlama.from_pretrained(out, max_seq_len=seq_len, max_batch_size=1)


def evaluate(args) -> dict:
    work, out = Path(args.work), Path(args.out)
    meta = json.loads((work / "meta.json").read_text())
    info = json.loads((out / "training.json").read_text())
    held = json.loads((work / "heldout.json").read_text())
    seq_len = info["seq_len"]
    llm = _engine(out, seq_len)
    model, tok = llm.model, llm.tokenizer
    t0 = time.monotonic()
    # perplexity: held-out files as training sees them (<s> ids </s>), non-overlapping windows of seq_len + 1,
    # every k-th window so that about --eval-tokens predictions spread over all held-out files
    stream = np.concatenate([tok.encode_meta(f["text"], bos=True, eos=True) for f in held])
    n_win = len(stream) // (seq_len + 1)
    every = max(1, math.ceil(n_win * seq_len / args.eval_tokens))
    counts = np.bincount(np.load(work / "train_ids.npy"), minlength=tok.n_words).astype(np.float64) + 1
    log_unigram = np.log(counts / counts.sum())
    nll = nll_uni = 0.0
    n_pred = 0
    for w in range(0, n_win, every):
        chunk = stream[w * (seq_len + 1):(w + 1) * (seq_len + 1)]
        logp = torch.log_softmax(model.logits(torch.from_numpy(chunk[:-1].astype(np.int64))), -1)
        tgt = torch.from_numpy(chunk[1:].astype(np.int64))
        nll -= logp.gather(-1, tgt[:, None]).sum().item()
        nll_uni -= log_unigram[chunk[1:]].sum()
        n_pred += len(tgt)
    ppl, ppl_uni = math.exp(nll / n_pred), math.exp(nll_uni / n_pred)
    log(f"evaluate: held-out perplexity {ppl:.2f} (unigram {ppl_uni:.1f}) over {n_pred:,} tokens, "
        f"{time.monotonic() - t0:.0f} s")
    t1 = time.monotonic()
    tasks = [(fit, line) for pre, line, suf in infill_tasks(held, args.eval_infill, args.seed)
             if (fit := _fit(tok, pre, suf, seq_len - args.max_new)) is not None]
    if not tasks:
        raise SystemExit("evaluate: no held-out function line fits the context (more files, or a longer --seq-len)")
    hits = hits_base = 0
    examples = []
    for (pre, suf), line in tasks:
        got = llm.infill(pre, suf, max_new_tokens=args.max_new, temperature=0.0)
        hits += got.strip() == line.strip()
        hits_base += meta["most_frequent_line"] == line.strip()
        if len(examples) < 3 and got.strip() == line.strip() and len(line.strip()) > 20:
            examples.append((pre.split("\n")[-4:], line, suf.split("\n")[:3]))
    em, em_base = hits / len(tasks), hits_base / len(tasks)
    log(f"evaluate: single-line infill exact match {em:.1%} (baseline {em_base:.1%}) on {len(tasks)} lines, "
        f"{time.monotonic() - t1:.0f} s")
    result = {"perplexity": round(ppl, 3), "unigram_perplexity": round(ppl_uni, 2), "ppl_tokens": n_pred,
              "infill_exact_match": round(em, 4), "infill_baseline": round(em_base, 4), "infill_samples": len(tasks)}
    write_card(out, meta, info, model, result, examples)
    return result


def write_card(out: Path, meta: dict, info: dict, model, r: dict, examples) -> None:
    a = model.args
    size = (out / "consolidated.00.pth").stat().st_size
    d = info["data"]
    ex = "\n".join("```python\n" + "\n".join(p[:-1]) + f"\n{line}    # <- filled in\n" + "\n".join(s[1:]) + "\n```"
                   for p, line, s in examples)
    ex = f"Some exact single-line infills (over 20 characters):\n\n{ex}" if ex else \
        "No exact single-line infill longer than 20 characters to show."
    em, base = r["infill_exact_match"], r["infill_baseline"]
    if em > max(2 * base, 0.05):
        infill = (f"Infilling: it fills a masked line exactly in {em:.0%} of held-out cases, mostly short, "
                  "predictable lines.")
    elif em > base:
        infill = (f"Infilling: rarely exact ({em:.1%} of held-out lines, baseline {base:.1%}). Its middles "
                  "mostly have the right shape (indentation, a statement that fits the names around the gap) and "
                  "are wrong in the details; some do not stop at the end of the line. On short prompts unlike "
                  "the standard library it tends to copy the suffix into the gap and run on; idioms the standard "
                  "library repeats it does fill (README's quick start: `unittest.main()` under a main guard).")
    else:
        infill = (f"Infilling: not useful yet, {em:.0%} exact on held-out lines, no better "
                  "than the baseline; greedy output soon repeats itself.")
    card = f"""# codellama_ext default model

A {info['parameters'] / 1e6:.1f}M-parameter model with CodeLlama's architecture and conventions, trained from
scratch by `tools/train_default_model.py` on the Python {d['python']} standard library. It exists so that the
package runs out of the box (no download); it is loaded through exactly the same code path as a CodeLlama checkpoint.
It is a toy next to CodeLlama 7B: see "What it can and cannot do".

## Data
- The `*.py` files of the CPython {d['python']} standard library (PSF licence), without site-packages, files over
  {MAX_FILE_BYTES // 1000} kB, generated tables and files that do not parse: {d['train_files']} training files
  ({d['train_bytes'] / 1e6:.1f} MB, {d['train_tokens']:,} tokens) and {meta['heldout_files']} held-out files
  ({meta['heldout_bytes'] / 1e6:.2f} MB), chosen by a hash of the relative path (about {HELDOUT_PER_MILLE / 10:g}%).
- Objective: causal LM plus fill-in-the-middle examples in CodeLlama's token format (`infill_ids` + middle +
  `<EOT>`), half PSM and half SPM; cuts on line boundaries, half of the FIM examples masking exactly one line.

## Tokenizer
SentencePiece BPE trained on the training files with Llama's settings (byte fallback, implicit leading space,
digits split): {d['spm_vocab_size']} pieces plus CodeLlama's 16 infill pieces (`▁<PRE>` {model_ids(out)})
at the end, as in CodeLlama 7B/13B; `<unk>`=0, `<s>`=1, `</s>`=2. {d['train_bytes'] / d['train_tokens']:.2f}
bytes per token on the training files.

## Architecture
dim {a.dim}, {a.n_layers} layers, {a.n_heads} query heads over {a.n_kv_heads} key/value heads (head_dim
{a.head_dim}), SwiGLU FFN {a.ffn_hidden} (Meta's sizing, multiple_of {a.multiple_of}), RMSNorm eps {a.norm_eps},
RoPE theta {a.rope_theta:g} (Meta's interleaved layout), untied output, vocabulary {a.vocab_size}.
{info['parameters']:,} parameters; consolidated.00.pth is {size / 1e6:.1f} MB (bfloat16). Trained context:
{info['seq_len']} tokens.

## Training
{training_stages(info)}
AdamW (betas 0.9/0.95, weight decay 0.1), warmup then cosine decay to 10% of the peak lr in each run, seed
{info['seed']}. Final training loss (EMA, FIM rows included) {info['final_loss_ema']}; held-out loss (plain LM)
{info['heldout_loss']}. Data prepared in {d['prepare_seconds']:.0f} s (Python {d['python']}). Details:
training.json.

## Held-out metrics (measured through codellama_ext)
| metric | this model | unigram baseline |
|---|---|---|
| perplexity per token ({r['ppl_tokens']:,} tokens) | {r['perplexity']:.2f} | {r['unigram_perplexity']:.1f} |
| greedy single-line infill exact match ({r['infill_samples']} lines) | {r['infill_exact_match']:.1%} \
| {r['infill_baseline']:.1%} |

Perplexity: windows of {info['seq_len']} tokens over the held-out files; baseline: training-set token frequencies
(add-one). Infill: one non-blank line of a held-out function masked (up to 40 lines before, 20 after), PSM prompt,
greedy until `<EOT>`, stripped middle compared with the stripped line; baseline: always the most frequent
training line (`{meta['most_frequent_line']}`).

{ex}

## What it can and cannot do
- Can: run every engine path exactly as a CodeLlama checkpoint does (complete, infill PSM/SPM, chat formatting,
  streaming, int8, CPU and CUDA), which is what it is for; predict the standard library's code far better
  than token frequencies do (perplexity {r['perplexity']:.1f} against {r['unigram_perplexity']:.0f}).
- {infill}
- Cannot: follow instructions or chat (it never saw a dialogue), reason about what code should do, or write
  correct non-trivial code; other languages than Python fare worse (its tokenizer and data are Python only).
  Infill prompts work best when the prefix ends and the suffix starts at a line boundary (all its FIM training
  cuts do). It was trained on {info['seq_len']}-token windows: longer prompts degrade. Expect plausible-looking,
  often wrong code; never a substitute for a real CodeLlama checkpoint.
"""
    (out / "MODEL_CARD.md").write_text(card)
    write_checklist(out)
    log(f"evaluate: wrote {out / 'MODEL_CARD.md'}")


def training_stages(info: dict) -> str:
    """One list item per training run, oldest first (a run continued with --init records its start's info)."""
    runs = []
    while info is not None:
        runs.append(info)
        info = info.get("init")
    lines = []
    for i, r in enumerate(reversed(runs)):
        fim = (f"FIM windows of any length packed into the rows (each row opens with one with probability "
               f"{r['fim_rate']}, and each further one follows with that probability while it fits)"
               if r.get("fim_windows") else
               f"a FIM example in a row with probability {r['fim_rate']}, always a full-row window (an earlier "
               "version of the sampler)")
        how = "from scratch" if i == 0 else "continued from the weights above"
        cmd = f"; `{r['command']}`" if r.get("command") else ""
        lines.append(f"- {how}: {r['device']}, torch {r['torch']}, {r['steps']:,} steps of {r['batch_size']} x "
                     f"{r['seq_len']} tokens = {r['tokens']:,} tokens ({r['epochs']} epochs) in {r['minutes']} "
                     f"minutes, peak lr {r['lr']}; {fim}{cmd}")
    return "\n".join(lines)


def model_ids(out: Path) -> str:
    tok = _package_module("tokenizer").CodeLlamaTokenizer(out / "tokenizer.model")
    return f"= {tok.prefix_id}, `▁<SUF>` = {tok.suffix_id}, `▁<MID>` = {tok.middle_id}, `▁<EOT>` = {tok.eot_id}"


# ============================================================================================= main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (run in that order; default: all)")
    p.add_argument("--work", default=str(DEFAULT_WORK), help=f"work folder (default {DEFAULT_WORK})")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"exported model folder (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("prepare")
    g.add_argument("--vocab-size", type=int, default=4096, help="SentencePiece pieces before the 16 extra ones")
    g.add_argument("--max-files", type=int, default=None, help="use only the first N stdlib files (smoke tests)")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=int, default=256)
    g.add_argument("--n-layers", type=int, default=6)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--n-kv-heads", type=int, default=2)
    g.add_argument("--multiple-of", type=int, default=256, help="FFN size rounding (Meta's formula)")
    g = p.add_argument_group("train")
    g.add_argument("--device", default="cpu")
    g.add_argument("--minutes", type=float, default=None, help="time budget (default: 110 on CPU unless --steps)")
    g.add_argument("--steps", type=int, default=None, help="number of optimizer steps instead of --minutes")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    g.add_argument("--fim-rate", type=float, default=0.7, help="probability that a row opens with a FIM example, and that each further one follows (while it fits)")
    g.add_argument("--init", default=None,
                   help="continue training from an exported model folder (same model flags and tokenizer)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on a GPU)")
    g.add_argument("--workers", type=int, default=None,
                   help="data loader processes (default: 4 on CUDA, 0 on CPU, where cores go to the model)")
    g.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines")
    g.add_argument("--val-every", type=float, default=600.0, help="seconds between held-out loss lines")
    g.add_argument("--val-windows", type=int, default=16, help="held-out windows of --seq-len for that loss")
    g = p.add_argument_group("evaluate")
    g.add_argument("--eval-tokens", type=int, default=100_000, help="held-out tokens for perplexity")
    g.add_argument("--eval-infill", type=int, default=200, help="held-out lines for the infill exact match")
    g.add_argument("--max-new", type=int, default=48, help="token limit of one infilled line")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        p.error(f"--stages: unknown stage(s) {bad}; choose from {','.join(STAGES)}")
    args.stages = [s for s in STAGES if s in stages]
    if args.minutes is not None and args.steps is not None:
        p.error("--minutes and --steps are exclusive: give a time budget or a step count")
    if args.minutes is None and args.steps is None:
        args.minutes = 110.0
    for name in ("vocab_size", "dim", "n_layers", "head_dim", "n_kv_heads", "batch_size", "seq_len", "warmup",
                 "val_windows", "eval_tokens", "eval_infill", "max_new", "multiple_of"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.dim % args.head_dim or (args.dim // args.head_dim) % args.n_kv_heads:
        p.error(f"--head-dim ({args.head_dim}) must divide --dim ({args.dim}) and --n-kv-heads ({args.n_kv_heads}) "
                "must divide the number of heads (dim / head_dim)")
    if not 0 <= args.fim_rate <= 1:
        p.error(f"--fim-rate must lie in [0, 1], got {args.fim_rate}")
    if args.vocab_size + 16 > 65535:
        p.error(f"--vocab-size must be at most 65519 (token ids are stored as uint16), got {args.vocab_size}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    for stage in args.stages:
        {"prepare": prepare, "train": train, "export": export, "evaluate": evaluate}[stage](args)


if __name__ == "__main__":
    main()
