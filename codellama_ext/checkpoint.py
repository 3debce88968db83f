"""Checkpoint reading: Meta folders (params.json + consolidated.NN.pth) and HF folders (config.json + safetensors
or pytorch_model*.bin), memory-mapped and streamed one tensor at a time.

Facts: SPEC.md §1.1 (Meta folder), §1.5 (keys and shapes), §1.6 (how shards split each tensor), §1.7 (HF names,
q/k row permutation). Tensors are yielded under Meta's names (`layers.0.attention.wq.weight`); HF q/k rows stay
in HF's rotate-half order, which `Checkpoint.layout == "hf"` records (the model then uses interleaved=False rotary;
both layouts give the same attention scores, SPEC §2). Pickles are only ever read with weights_only=True.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fnmatch
import glob
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import zipfile
from typing import Iterator

import torch

from .config import ConfigError, ModelArgs

__all__ = ["CheckpointError", "Checkpoint", "open_checkpoint", "detect_format", "expected_shapes",
           "HF_NAMES", "meta_to_hf_name", "hf_to_meta_name", "permute_for_hf", "permute_for_meta",
           "META_SPLIT_DIM", "convert_to_hf", "convert_to_meta", "CHECKLIST", "read_checklist", "verify_checklist"]


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file and the tensor."""


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_IGNORED_META = {"rope.freqs"}
_IGNORED_HF = re.compile(r"^(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# ---- names and shapes ----
def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Full (consolidated) Meta tensor names and shapes, in a streaming-friendly order (SPEC §1.5)."""
    D, F, V, hd = args.dim, args.ffn_hidden, args.vocab_size, args.head_dim
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, D)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        out[p + "attention.wq.weight"] = (args.n_heads * hd, D)
        out[p + "attention.wk.weight"] = (args.n_kv_heads * hd, D)
        out[p + "attention.wv.weight"] = (args.n_kv_heads * hd, D)
        out[p + "attention.wo.weight"] = (D, args.n_heads * hd)
        out[p + "feed_forward.w1.weight"] = (F, D)
        out[p + "feed_forward.w3.weight"] = (F, D)
        out[p + "feed_forward.w2.weight"] = (D, F)
        out[p + "attention_norm.weight"] = (D,)
        out[p + "ffn_norm.weight"] = (D,)
    out["norm.weight"] = (D,)
    out["output.weight"] = (V, D)
    return out


def _suffix(name: str) -> str:
    return name.rsplit(".", 2)[-2] if name.startswith("layers.") else name.split(".")[0]


# Concatenation dim of model-parallel shards (SPEC §1.6); None = replicated, take shard 0.
META_SPLIT_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
                  "wo": 1, "w2": 1, "attention_norm": None, "ffn_norm": None, "norm": None}

HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
            "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}
_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_HF_TOP_INV = {v: k for k, v in _HF_TOP.items()}
_HF_NAMES_INV = {v: k for k, v in HF_NAMES.items()}


def meta_to_hf_name(name: str) -> str:
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if not m or m.group(2) not in HF_NAMES:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{HF_NAMES[m.group(2)]}.weight"


def hf_to_meta_name(name: str) -> str | None:
    """Meta name of an HF tensor name, None when it is not a Llama weight name."""
    if name in _HF_TOP_INV:
        return _HF_TOP_INV[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if not m or m.group(2) not in _HF_NAMES_INV:
        return None
    return f"layers.{m.group(1)}.{_HF_NAMES_INV[m.group(2)]}.weight"


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved q/k rows -> HF rotate-half rows (SPEC §1.7): per head, even rows first, then odd rows."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def permute_for_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_for_hf: HF rotate-half q/k rows -> Meta interleaved rows."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


# ---- format detection ----
def _glob(folder: str, pattern: str) -> list[str]:
    """Sorted matches of pattern in folder; the folder name is escaped, so "CodeLlama-7b [v2]" is not a
    character class that matches nothing."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))


def detect_format(path: str | os.PathLike) -> str:
    """"meta" (params.json + consolidated.*.pth) or "hf" (config.json + weights); CheckpointError otherwise."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a Meta or HF checkpoint folder)")
    has_params = os.path.isfile(os.path.join(path, "params.json"))
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    has_pth = bool(_glob(path, "consolidated.*.pth"))
    has_hf_weights = bool(_glob(path, "*.safetensors") or _glob(path, "pytorch_model*.bin"))
    if has_params and (has_pth or not has_config):
        return "meta"
    if has_config and (has_hf_weights or not has_pth):
        return "hf"
    if has_pth:
        raise CheckpointError(f"{path}: consolidated.*.pth shards found but params.json is missing (Meta format)")
    if has_hf_weights:
        raise CheckpointError(f"{path}: HF weight files found but config.json is missing (HF format)")
    raise CheckpointError(f"{path}: neither a Meta checkpoint (params.json + consolidated.NN.pth) nor an HF one "
                          f"(config.json + *.safetensors or pytorch_model*.bin)")


# ---- file readers ----
def _torch_load(file: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only; a dict of str -> tensor, else CheckpointError naming the file. Memory-mapped
    for the zip format (torch >= 1.6, Meta's and HF's files); the older tar/pickle format cannot be mapped
    (torch.load refuses mmap=True for it), so such a file is read into memory, still with weights_only."""
    try:
        obj = torch.load(file, map_location="cpu", mmap=zipfile.is_zipfile(file), weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused to load: the pickle holds objects other than plain tensors "
                              f"(only weights_only loading is allowed): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read (truncated or corrupt file?): {str(e).splitlines()[0]}") \
            from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a state dict (dict of tensors), got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{file}: state dict key {k!r} is not a string")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return obj


class _SafetensorsFile:
    def __init__(self, file: str):
        from safetensors import safe_open
        self.file = file
        try:
            self.handle = safe_open(file, framework="pt", device="cpu")
            self.names = list(self.handle.keys())
        except Exception as e:  # SafetensorError and OSError; message carries the cause
            raise CheckpointError(f"{file}: cannot be read as safetensors (truncated or corrupt file?): {e}") from None

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        sl = self.handle.get_slice(name)
        st = sl.get_dtype()
        return tuple(sl.get_shape()), _ST_DTYPES.get(st, st)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.file}: cannot read tensor {name!r}: {e}") from None


def _check_dtype(file: str, name: str, dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {dtype}, expected a floating type "
                              f"(float32, float16, bfloat16, float64)")


def _mismatch(where: str, found: set[str], expected: set[str], ctx: str = "") -> None:
    extra = sorted(found - expected)
    missing = sorted(expected - found)
    if not extra and not missing:
        return
    parts = []
    if extra:
        parts.append(f"unexpected tensor(s) {_short(extra)}")
    if missing:
        parts.append(f"missing tensor(s) {_short(missing)}")
    hint = " (misnamed?)" if extra and missing else ""
    raise CheckpointError(f"{where}: {'; '.join(parts)}{hint}{ctx}")


def _short(names: list[str], n: int = 6) -> str:
    s = ", ".join(repr(x) for x in names[:n])
    return s + (f" and {len(names) - n} more" if len(names) > n else "")


# ---- the checkpoint ----
class Checkpoint:
    """An opened (validated, memory-mapped) checkpoint folder. `tensors()` streams it."""

    path: str
    format: str           # "meta" | "hf"
    layout: str           # q/k row order: "meta" (interleaved pairs) or "hf" (rotate-half)
    args: ModelArgs
    files: list[str]
    storage_dtype: torch.dtype

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.format = detect_format(self.path)
        self.layout = self.format
        if self.format == "meta":
            self._open_meta()
        else:
            self._open_hf()

    # -- Meta --
    def _open_meta(self) -> None:
        params_file = os.path.join(self.path, "params.json")
        files = _glob(self.path, "consolidated.*.pth")
        if not files:
            raise CheckpointError(f"{self.path}: params.json found but no consolidated.NN.pth shard")
        for i, f in enumerate(files):
            if os.path.basename(f) != f"consolidated.{i:02d}.pth":
                raise CheckpointError(f"{f}: unexpected shard name; {len(files)} shards must be named "
                                      f"consolidated.00.pth ... consolidated.{len(files) - 1:02d}.pth")
        self.files = files
        shards = [_torch_load(f) for f in files]
        mp = len(shards)
        emb = shards[0].get("tok_embeddings.weight")
        if emb is None:
            raise CheckpointError(f"{files[0]}: missing tensor 'tok_embeddings.weight'")
        if emb.dim() != 2:
            raise CheckpointError(f"{files[0]}: tensor 'tok_embeddings.weight' must be 2-D, got {list(emb.shape)}")
        try:
            args = ModelArgs.from_meta_params(params_file, vocab_size=emb.shape[0])
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        if args.dim % emb.shape[1] == 0 and args.dim // emb.shape[1] != mp:
            raise CheckpointError(
                f"{self.path}: found {mp} shard file(s) but {files[0]} holds {emb.shape[1]} of the {args.dim} "
                f"embedding columns, i.e. it belongs to a {args.dim // emb.shape[1]}-shard checkpoint")
        for what, n in (("dim", args.dim), ("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                        ("vocab_size", args.vocab_size), ("FFN size", args.ffn_hidden)):
            if n % mp:
                raise CheckpointError(f"{self.path}: {mp} shards cannot split {what} = {n} evenly")
        self.args = args
        full = expected_shapes(args)
        expected = set(full)
        for f, sd in zip(files, shards):
            _mismatch(f, set(sd) - _IGNORED_META, expected)
            for name, t in sd.items():
                if name in _IGNORED_META:
                    continue
                _check_dtype(f, name, t.dtype)
                shape = list(full[name])
                dim = META_SPLIT_DIM[_suffix(name)]
                if dim is not None:
                    shape[dim] //= mp
                if list(t.shape) != shape:
                    raise CheckpointError(
                        f"{f}: tensor {name!r} has shape {list(t.shape)}, expected {shape} "
                        f"({'shard 1/' + str(mp) + ' of ' if dim is not None and mp > 1 else ''}"
                        f"{list(full[name])} from {os.path.basename(params_file)}"
                        f"{', FFN size ' + str(args.ffn_hidden) if 'feed_forward' in name else ''})")
        self._shards = shards
        self.storage_dtype = emb.dtype

    def _meta_tensor(self, name: str) -> torch.Tensor:
        parts = [sd[name] for sd in self._shards]
        dim = META_SPLIT_DIM[_suffix(name)]
        if dim is None or len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=dim)

    # -- HF --
    def _open_hf(self) -> None:
        config_file = os.path.join(self.path, "config.json")
        try:
            with open(config_file, encoding="utf-8") as fh:
                config = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file}: expected a JSON object")
        self.tied = bool(config.get("tie_word_embeddings", False))
        # name (HF) -> (reader, file)
        self._where: dict[str, tuple[object, str]] = {}
        st_index = os.path.join(self.path, "model.safetensors.index.json")
        bin_index = os.path.join(self.path, "pytorch_model.bin.index.json")
        st_files = _glob(self.path, "*.safetensors")
        bin_files = _glob(self.path, "pytorch_model*.bin")
        index = st_index if os.path.isfile(st_index) else bin_index if os.path.isfile(bin_index) and not st_files \
            else None
        weight_map = None
        if index is not None:
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object): {e}") from None
            if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
                raise CheckpointError(f"{index}: 'weight_map' must map each tensor name to a file name")
            files = sorted({os.path.join(self.path, f) for f in weight_map.values()})
            for f in files:
                if not os.path.isfile(f):
                    raise CheckpointError(f"{index}: lists {os.path.basename(f)}, which is missing from {self.path}")
        elif st_files:
            files = st_files
        elif bin_files:
            files = bin_files
        else:
            raise CheckpointError(f"{self.path}: config.json found but no *.safetensors or pytorch_model*.bin")
        self.files = files
        shapes: dict[str, tuple[tuple[int, ...], object, str]] = {}
        for f in files:
            if f.endswith(".safetensors"):
                reader = _SafetensorsFile(f)
                items = [(n, *reader.meta(n)) for n in reader.names]
            else:
                sd = _torch_load(f)
                reader = sd
                items = [(n, tuple(t.shape), t.dtype) for n, t in sd.items()]
            for name, shape, dtype in items:
                if _IGNORED_HF.match(name):
                    continue
                if name in shapes:
                    raise CheckpointError(f"{f}: tensor {name!r} is also stored in {shapes[name][2]}")
                if weight_map is not None and os.path.join(self.path, weight_map.get(name, "")) != f:
                    raise CheckpointError(f"{f}: tensor {name!r} is not listed for this file in {index}")
                shapes[name] = (shape, dtype, f)
                self._where[name] = (reader, f)
        if weight_map is not None:
            missing = sorted(n for n in weight_map if n not in shapes and not _IGNORED_HF.match(n))
            if missing:
                raise CheckpointError(f"{index}: lists tensor(s) {_short(missing)} that no weight file contains")
        emb = shapes.get("model.embed_tokens.weight")
        if emb is None:
            raise CheckpointError(f"{self.path}: missing tensor 'model.embed_tokens.weight'")
        try:
            args = ModelArgs.from_hf_config(config_file, vocab_size=emb[0][0] if len(emb[0]) == 2 else None)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self.args = args
        full = expected_shapes(args)
        expected = {meta_to_hf_name(n) for n in full}
        found = set(shapes)
        if self.tied:
            # transformers ties lm_head to embed_tokens after loading, so a stored lm_head.weight is never used:
            # taking it would give other logits than LlamaForCausalLM for the same folder.
            found.add("lm_head.weight")
            shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
            self._where["lm_head.weight"] = self._where["model.embed_tokens.weight"]
        extra = sorted(found - expected)
        if extra or expected - found:
            _mismatch(shapes[extra[0]][2] if extra else self.path, found, expected)
        for meta_name, shape in full.items():
            name = meta_to_hf_name(meta_name)
            got, dtype, f = shapes[name]
            _check_dtype(f, name, dtype)
            if tuple(got) != tuple(shape):
                raise CheckpointError(
                    f"{f}: tensor {name!r} has shape {list(got)}, expected {list(shape)} from config.json"
                    f"{' (intermediate_size ' + str(args.ffn_hidden) + ')' if '.mlp.' in name else ''}")
        self.storage_dtype = shapes["model.embed_tokens.weight"][1]

    def _hf_tensor(self, meta_name: str) -> torch.Tensor:
        name = meta_to_hf_name(meta_name)
        reader, f = self._where[name]
        src = "model.embed_tokens.weight" if self.tied and name == "lm_head.weight" else name
        return reader.get(src) if isinstance(reader, _SafetensorsFile) else reader[src]

    # -- streaming --
    def tensors(self, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (Meta name, tensor) one at a time, shards merged (SPEC §1.6), converted to `dtype` (None: as
        stored) on `device`. q/k rows are in `self.layout` order."""
        device = torch.device(device)
        get = self._meta_tensor if self.format == "meta" else self._hf_tensor
        for name in expected_shapes(self.args):
            t = get(name)
            if device.type != "cpu":
                t = t.to(device)
            if dtype is not None and t.dtype != dtype:
                src, t = t, t.to(dtype)
                if torch.finfo(dtype).max < torch.finfo(src.dtype).max and _has_inf(t) and not _has_inf(src):
                    # float16 tops out at 65504: a larger weight would silently become inf (and an inf int8 scale)
                    raise CheckpointError(
                        f"{self._file_of(name, dtype)}: tensor {name!r} holds values up to "
                        f"{src.abs().max().item():.4g}, beyond {dtype}'s range (max {torch.finfo(dtype).max:.6g}); "
                        f"load it as bfloat16 or float32")
            yield name, t

    def _file_of(self, name: str, dtype: torch.dtype) -> str:
        """The file(s) whose part of Meta-named tensor `name` overflows `dtype`, for error messages."""
        if self.format == "hf":
            return self._where[meta_to_hf_name(name)][1]
        bad = [f for f, sd in zip(self.files, self._shards) if _has_inf(sd[name].to(dtype))]
        return ", ".join(bad or self.files)

    def __len__(self) -> int:
        return len(expected_shapes(self.args))

    def nbytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)


def _has_inf(t: torch.Tensor) -> bool:
    # two reductions, no tensor-sized temporary (isinf would allocate one the size of the embedding)
    return t.numel() > 0 and (t.amax().item() == float("inf") or t.amin().item() == float("-inf"))


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Detects the format, reads the config, memory-maps the weight files and validates every name, shape and
    dtype before any weight is read."""
    return Checkpoint(path)


# ---- checksums (Meta's checklist.chk) ----
CHECKLIST = "checklist.chk"
_MD5_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")  # md5sum output: text mode "  name", binary mode " *name"
_HASH_CHUNK = 8 << 20


def read_checklist(file: str | os.PathLike) -> dict[str, str]:
    """File name -> lower-case md5 of an md5sum list (`<md5>  <name>` per line; blank lines and trailing
    whitespace ignored). A line in any other form is a CheckpointError naming its number."""
    file = os.fspath(file)
    try:
        with open(file, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError:
        raise CheckpointError(f"{file}: not a text file (expected md5sum output)") from None
    out: dict[str, str] = {}
    for i, line in enumerate(lines, 1):
        line = line.rstrip()
        if not line:
            continue
        m = _MD5_LINE.fullmatch(line)
        if not m:
            raise CheckpointError(f"{file}: line {i} is not '<32 hex digits>  <file name>' (md5sum output): "
                                  f"{line[:80]!r}")
        name, md5 = os.path.normpath(m.group(2)), m.group(1).lower()  # normpath: `md5sum ./*` writes ./name
        if out.get(name, md5) != md5:
            raise CheckpointError(f"{file}: line {i} lists {name} again with another md5")
        out[name] = md5
    return out


def _meta_model_file(name: str) -> bool:
    """params.json or a shard, as _open_meta globs them: the files that decide what load_model loads."""
    return name == "params.json" or fnmatch.fnmatchcase(name, "consolidated.*.pth")


def _md5(file: str, done: list[int], i: int) -> str:
    h = hashlib.md5(usedforsecurity=False)  # an integrity check, not security: allowed on FIPS systems too
    buf = bytearray(_HASH_CHUNK)  # one reused buffer: memory stays flat on a 13 GB shard
    view = memoryview(buf)
    with open(file, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
            done[i] += n
    return h.hexdigest()


def verify_checklist(path: str | os.PathLike, progress: bool | None = None) -> list[str]:
    """Checks a Meta folder against its checklist.chk (md5sum output, as Meta's download ships it) before any
    weight is read; returns the verified file names. CheckpointError when a listed file's md5 differs (a corrupt
    or truncated download, or a shard of another checkpoint: equal shapes would load silently), when a file the
    loader reads (params.json, consolidated.*.pth, tokenizer.model) is present but not listed, when a listed
    params.json or shard is missing, and when there is no checklist.chk (HF folders carry none). Files are
    hashed in parallel threads (hashlib and file reads release the GIL). progress: a line on stderr; None = only
    when stderr is a terminal and the files total over 1 GB."""
    path = os.fspath(path)
    if detect_format(path) == "hf":
        raise CheckpointError(f"{path}: an HF folder; checksum verification needs Meta's {CHECKLIST} (md5 list), "
                              f"and HF folders carry none, so there is nothing to verify against")
    chk = os.path.join(path, CHECKLIST)
    if not os.path.isfile(chk):
        raise CheckpointError(f"{path}: no {CHECKLIST} (Meta's md5 list of the folder), so there is nothing to "
                              f"verify against")
    listed = read_checklist(chk)
    unlisted = sorted(n for n in os.listdir(path)
                      if (_meta_model_file(n) or n == "tokenizer.model") and n not in listed)
    if unlisted:
        raise CheckpointError(f"{chk}: does not list {_short(unlisted)}, so the loader would read unverified "
                              f"file(s)")
    present = sorted(n for n in listed if os.path.isfile(os.path.join(path, n)))
    # a listed shard that is gone changes what loads (fewer shards); other absent files are not read
    # (from_pretrained reports a missing tokenizer.model itself)
    missing = sorted(n for n in listed if n not in present and _meta_model_file(n))
    if missing:
        raise CheckpointError(f"{path}: {_short(missing)} listed in {CHECKLIST} but missing")
    files = [os.path.join(path, n) for n in present]
    total = sum(os.path.getsize(f) for f in files)
    if progress is None:
        progress = sys.stderr.isatty() and total > (1 << 30)
    done, t0, name = [0] * len(files), time.monotonic(), os.path.basename(os.path.normpath(path))

    def report(end: str = "") -> None:
        if progress:
            print(f"\rverifying {name}: {sum(done) / 1e9:.2f}/{total / 1e9:.2f} GB md5, "
                  f"{time.monotonic() - t0:.0f} s", end=end, file=sys.stderr, flush=True)

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1))) as pool:
        futures = [pool.submit(_md5, f, done, i) for i, f in enumerate(files)]
        while concurrent.futures.wait(futures, timeout=0.5).not_done:
            report()
        actual = [f.result() for f in futures]
    report("\n")
    bad = [f"{n}: md5 {got}, expected {listed[n]}" for n, got in zip(present, actual) if got != listed[n]]
    if bad:
        raise CheckpointError(f"{path}: checksum mismatch (corrupt or truncated download, or a file of another "
                              f"checkpoint): {'; '.join(bad)}")
    return present


# ---- conversion (streaming) ----
@contextlib.contextmanager
def _output_folder(output_dir: str | os.PathLike) -> Iterator[str]:
    """A temporary folder beside output_dir, renamed to output_dir when the block succeeds and removed when it
    fails: a failed or interrupted conversion leaves no half-written model behind."""
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output_dir):
        raise CheckpointError(f"{output_dir}: already exists; choose a new output folder")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        yield tmp
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _to_layout(ck: "Checkpoint", name: str, t: torch.Tensor, layout: str) -> torch.Tensor:
    """t (a Meta-named tensor read from ck) with its q/k rows in `layout`'s rotary order (SPEC §1.7), contiguous."""
    if ck.layout != layout and name.endswith(("attention.wq.weight", "attention.wk.weight")):
        heads = ck.args.n_heads if name.endswith("wq.weight") else ck.args.n_kv_heads
        t = (permute_for_hf if layout == "hf" else permute_for_meta)(t, heads)
    return t.contiguous()


def _copy_tokenizer(ck: "Checkpoint", folder: str) -> None:
    tok = os.path.join(ck.path, "tokenizer.model")
    if os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(folder, "tokenizer.model"))


def convert_to_hf(input_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                  max_shard_bytes: int = 2 << 30) -> str:
    """Writes a Meta (or HF) checkpoint as an HF folder: config.json, model-NNNNN-of-NNNNN.safetensors +
    model.safetensors.index.json, tokenizer.model when present. q/k rows of Meta input are permuted per SPEC §1.7.
    Streams one tensor at a time, holding at most one output shard (max_shard_bytes) in memory. Written to a
    temporary folder beside output_dir and renamed at the end: a failure leaves no half-written model."""
    from safetensors.torch import save_file

    ck = open_checkpoint(input_dir)
    with _output_folder(output_dir) as tmp:
        files: list[tuple[str, list[str]]] = []
        shard: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush():
            nonlocal shard, size
            if shard:
                name = f"part-{len(files):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                files.append((name, list(shard)))
            shard, size = {}, 0

        out_dtype = None
        for name, t in ck.tensors(dtype=dtype):
            t = _to_layout(ck, name, t, "hf")
            out_dtype = out_dtype or t.dtype
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
            shard[meta_to_hf_name(name)] = t
            size += nbytes
            total += nbytes
        flush()
        n = len(files)
        weight_map = {}
        for i, (name, names) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(tmp, name), os.path.join(tmp, final))
            weight_map.update({k: final for k in names})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        config = ck.args.to_hf_config()
        config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        _copy_tokenizer(ck, tmp)
    return os.path.abspath(os.fspath(output_dir))


def convert_to_meta(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                    dtype: torch.dtype | None = None) -> str:
    """Writes an HF (or Meta) checkpoint as a one-shard Meta folder: params.json, consolidated.00.pth (a plain
    dict of tensors, loadable with weights_only=True), tokenizer.model when present. q/k rows of HF input are
    permuted back to Meta's interleaved order (inverse of SPEC §1.7). The tensors are read one at a time but a
    .pth file is one pickle, so the whole state dict is held in memory before it is written. Written to a
    temporary folder beside output_dir and renamed at the end: a failure leaves no half-written model."""
    ck = open_checkpoint(input_dir)
    params = _meta_params(ck.args)
    with _output_folder(output_dir) as tmp:
        sd: dict[str, torch.Tensor] = {}
        for name, t in ck.tensors(dtype=dtype):
            t = _to_layout(ck, name, t, "meta")
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a compact storage of its own: torch.save writes whole storages
            sd[name] = t
        with open(os.path.join(tmp, "params.json"), "w", encoding="utf-8") as f:
            json.dump(params, f, indent=2)
        torch.save(sd, os.path.join(tmp, "consolidated.00.pth"))
        del sd
        _copy_tokenizer(ck, tmp)
    return os.path.abspath(os.fspath(output_dir))


def _meta_params(args: ModelArgs) -> dict:
    """params.json content whose multiple_of / ffn_dim_multiplier reproduce args.ffn_hidden through Meta's formula
    (SPEC §1.3); HF configs only give the size: the roundest multiple_of (multiplier None, then 1.3, 1.0) wins, an
    exact fractional multiplier is the last resort."""
    from .config import ffn_hidden_size
    F = args.ffn_hidden
    h = int(2 * (4 * args.dim) / 3)
    candidates = [(args.multiple_of, args.ffn_dim_multiplier)]
    candidates += [(m, mult) for mult in (None, 1.3, 1.0) for m in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8,
                                                                     4, 2, 1)]
    candidates.append((1, (F + 0.5) / h))
    for m, mult in candidates:
        if ffn_hidden_size(args.dim, m, mult) == F:
            params = args.replace(multiple_of=m, ffn_dim_multiplier=mult).to_meta_params()
            params["vocab_size"] = args.vocab_size
            return params
    raise CheckpointError(f"FFN size {F} cannot be expressed with Meta's params.json keys for dim {args.dim}")
