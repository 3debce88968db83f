"""The `codellama-ext` command line: checkpoint conversion and a memory calculator (issue 4).

    codellama-ext convert --input_dir META_DIR --model_size 7B --output_dir OUT         # Meta -> HF
    codellama-ext convert --input_dir HF_DIR --output_dir OUT --to meta                 # HF -> Meta
    codellama-ext memory --model-size 7B --dtype float16 --context 16384 --batch 1 [--quantize int8]

Every user error is one line on stderr, `codellama-ext: error: ...`: exit status 2 for a bad command line
(argparse), 1 for anything else (missing folder, CheckpointError, ConfigError, I/O). Set CODELLAMA_EXT_DEBUG=1 to
get the traceback instead. New subcommands register themselves in `_COMMANDS` (one `_add_<name>` function each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

PROG = "codellama-ext"
GiB = 1 << 30

# Sizes named by --model_size in transformers' convert_llama_weights_to_hf.py that we can check params.json against.
_KNOWN_SIZES = ("7B", "13B", "34B", "70B")
_DTYPES = ("float32", "float16", "bfloat16")
_INFILL_TOKENS = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]


class CLIError(Exception):
    """A user error found by the command line itself (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exits with status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


# ---- argument types ----
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _byte_size(s: str) -> int:
    """'2GB', '500MB', '3MiB', '1048576' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    t = s.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        v = float(num)
    except ValueError:
        v = -1.0
    if unit not in units or not v > 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or 3MiB, got {s!r}")
    return int(v * units[unit])


def _torch_dtype(name: str | None):
    import torch
    return None if name in (None, "auto") else getattr(torch, name)


# ---- convert ----
def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a Meta checkpoint to an HF folder (or back, with --to meta)",
        description="Converts a checkpoint folder, streaming one tensor at a time. Default (--to hf): a Meta "
                    "folder (params.json + consolidated.NN.pth) becomes an HF folder (config.json, "
                    "model-NNNNN-of-NNNNN.safetensors + model.safetensors.index.json, tokenizer.model + "
                    "tokenizer_config.json + special_tokens_map.json when the input has tokenizer.model, "
                    "generation_config.json). --to meta: an HF (or Meta) folder becomes a one-shard Meta folder "
                    "(params.json, consolidated.00.pth, tokenizer.model). The output is written to a temporary "
                    "folder beside OUTPUT_DIR and renamed at the end; OUTPUT_DIR must not exist.")
    p.add_argument("--input_dir", "--input-dir", dest="input_dir", required=True,
                   help="checkpoint folder to read (Meta or HF, detected from its files)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True,
                   help="folder to create (must not exist)")
    p.add_argument("--model_size", "--model-size", dest="model_size", default=None,
                   help="accepted for compatibility with transformers' convert_llama_weights_to_hf.py: one of "
                        f"{', '.join(_KNOWN_SIZES)} is checked against the folder's params; any other value is "
                        "ignored (the folder's own params are used)")
    p.add_argument("--to", choices=("hf", "meta"), default="hf", help="output format (default: hf)")
    p.add_argument("--dtype", choices=("auto",) + _DTYPES, default="auto",
                   help="dtype of the written weights (default auto: as stored)")
    p.add_argument("--max_shard_size", "--max-shard-size", dest="max_shard_size", type=_byte_size,
                   default=2 << 30, help="largest HF safetensors file, e.g. 2GB, 500MB (default 2GiB)")
    p.set_defaults(func=_run_convert)


def _check_model_size(size: str | None, args, where: str) -> None:
    if size is None:
        return
    key = size.strip().upper()
    if key not in _KNOWN_SIZES:
        print(f"{PROG}: note: --model_size {size!r} is not one of {', '.join(_KNOWN_SIZES)}; ignored, using "
              f"{where}'s own parameters", file=sys.stderr)
        return
    from .config import preset
    want = preset(key.lower())
    if (args.dim, args.n_layers) != (want.dim, want.n_layers):
        raise CLIError(f"--model_size {size} expects dim {want.dim} and {want.n_layers} layers, but {where} has "
                       f"dim {args.dim} and {args.n_layers} layers")


def _write_hf_tokenizer_files(src: str, out: str) -> list[str]:
    """Fills what convert_to_hf leaves out: tokenizer_config.json, special_tokens_map.json, tokenizer.json and
    generation_config.json, copied from the input folder when it has them, else (the first two only when
    tokenizer.model is there) written with CodeLlama's Hub values (SPEC §4.1). Returns the names written."""
    import shutil
    written = []
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "generation_config.json"):
        if os.path.isfile(os.path.join(src, name)) and not os.path.exists(os.path.join(out, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
            written.append(name)

    def put(name, obj):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)
            written.append(name)

    put("generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    model = os.path.join(out, "tokenizer.model")
    if os.path.isfile(model):
        from .tokenizer import CodeLlamaTokenizer
        try:
            infill = CodeLlamaTokenizer(model).supports_infilling
        except Exception as e:  # a corrupt tokenizer.model: the weights are written, say what is missing
            raise CLIError(f"{out}: weights written, but tokenizer.model cannot be read, so tokenizer_config.json "
                           f"was not: {e}") from None
        extra = list(_INFILL_TOKENS) if infill else []
        put("tokenizer_config.json", {
            "tokenizer_class": "CodeLlamaTokenizer", "legacy": None, "model_max_length": 1e30,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
            "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "fill_token": "<FILL_ME>", "additional_special_tokens": extra})
        put("special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                        "additional_special_tokens": extra})
    return written


def _run_convert(ns) -> int:
    from .checkpoint import convert_to_hf, convert_to_meta, open_checkpoint
    src = ns.input_dir
    if not os.path.exists(src):
        raise CLIError(f"--input_dir {src}: no such folder")
    if not os.path.isdir(src):
        raise CLIError(f"--input_dir {src}: not a folder")
    if os.path.exists(ns.output_dir):
        raise CLIError(f"--output_dir {ns.output_dir}: already exists; choose a new output folder")
    ck = open_checkpoint(src)  # validates names, shapes and dtypes; reads no weight
    _check_model_size(ns.model_size, ck.args, src)
    dtype = _torch_dtype(ns.dtype)
    if ns.to == "hf":
        out = convert_to_hf(src, ns.output_dir, dtype=dtype, max_shard_bytes=ns.max_shard_size)
        _write_hf_tokenizer_files(src, out)
    else:
        out = convert_to_meta(src, ns.output_dir, dtype=dtype)
    print(f"wrote {ns.to.upper() if ns.to == 'hf' else 'Meta'} checkpoint {out} "
          f"({ck.format} input, {len(ck)} tensors)")
    return 0


# ---- memory ----
def _add_memory(sub) -> None:
    p = sub.add_parser(
        "memory", help="estimate the memory a model needs (weights, KV cache, working memory)",
        description="Bytes this engine allocates for a model: weights as loaded (int8 + float32 row scales with "
                    "--quantize int8), the KV cache for BATCH x CONTEXT tokens, and the working memory of one "
                    "forward over PREFILL_CHUNK tokens (default: the whole context). Printed in GiB.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-size", "--model_size", dest="model_size",
                       help="a preset: 7B, 13B, 34B, 70B, optionally with -Python / -Instruct "
                            "(e.g. 34B-Instruct, CodeLlama-7b-hf)")
    which.add_argument("--model", help="a model folder (Meta or HF) to read the parameters from")
    p.add_argument("--dtype", choices=_DTYPES, default="float16", help="weight/activation dtype (default float16)")
    p.add_argument("--context", type=_positive_int, default=16384, help="tokens per sequence (default 16384)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences (default 1)")
    p.add_argument("--quantize", choices=("int8",), default=None, help="int8 linear weights")
    p.add_argument("--prefill-chunk", "--prefill_chunk", dest="prefill_chunk", type=_positive_int, default=None,
                   help="tokens per prefill forward (default: the whole context)")
    p.set_defaults(func=_run_memory)


def _run_memory(ns) -> int:
    from .model import estimate_memory
    if ns.model is not None:
        if not os.path.isdir(ns.model):
            raise CLIError(f"--model {ns.model}: no such folder")
        from .checkpoint import open_checkpoint
        args, name = open_checkpoint(ns.model).args, ns.model
    else:
        from .config import PRESETS, preset
        args = preset(ns.model_size)
        name = next(k for k, v in PRESETS.items() if v is args)
    est = estimate_memory(args, _torch_dtype(ns.dtype), context=ns.context, batch=ns.batch, quantize=ns.quantize,
                          prefill_chunk=ns.prefill_chunk)
    weights = f"{ns.dtype}" + (" + int8 linears" if ns.quantize else "")
    print(f"{name}: {weights}, context {ns.context}, batch {ns.batch}"
          + (f", prefill chunk {ns.prefill_chunk}" if ns.prefill_chunk else ""))
    rows = [("weights", est["weights"]), ("KV cache", est["kv_cache"]), ("working", est["working"]),
            ("total", est["total"])]
    for label, b in rows:
        print(f"  {label:<10}{b / GiB:>10.2f} GiB")
    return 0


# ---- entry point ----
_COMMANDS: list[Callable] = [_add_convert, _add_memory]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="CodeLlama inference engine tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    from .checkpoint import CheckpointError
    from .config import ConfigError
    try:
        return ns.func(ns)
    except (CLIError, CheckpointError, ConfigError, OSError, ValueError) as e:
        if os.environ.get("CODELLAMA_EXT_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
