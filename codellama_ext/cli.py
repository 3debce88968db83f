"""The `codellama-ext` command line: checkpoint conversion and a memory calculator (issue 4), generation and its
benchmark (issue 5).

    codellama-ext convert --input_dir META_DIR --model_size 7B --output_dir OUT         # Meta -> HF
    codellama-ext convert --input_dir HF_DIR --output_dir OUT --to meta                 # HF -> Meta
    codellama-ext memory --model-size 7B --dtype float16 --context 16384 --batch 1 [--quantize int8]
    codellama-ext complete "def fib(n):" [--model DIR] [--max-new-tokens 64] [--stop "\n\n"]   (issue 5)
    codellama-ext infill "def f(x):\n    <FILL_ME>\n    return y"   (or: infill PREFIX --suffix SUFFIX)
    codellama-ext chat [--system TEXT] [--message TEXT]           # an interactive chat without --message
    codellama-ext bench [--shape 1.1b] [--dtype bfloat16] [--batch 1 8] ...   # generation benchmark
    codellama-ext serve [--model DIR] [--port 8000]               # OpenAI-style HTTP API (server.py)

Generation commands read the prompt from stdin when it is '-' or absent and stdin is not a terminal, stream the
text to stdout as it is generated, and show a loading progress line on stderr when stderr is a terminal.

Every user error is one line on stderr, `codellama-ext: error: ...`: exit status 2 for a bad command line
(argparse), 1 for anything else (missing folder, CheckpointError, ConfigError, I/O, out of memory), 130 for Ctrl-C.
Output cut short by its reader (`| head`) ends quietly with status 141, as SIGPIPE would. Set CODELLAMA_EXT_DEBUG=1
to get the traceback instead. New subcommands register themselves in `_COMMANDS` (one `_add_<name>` function each).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
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
def _int_at_least(lo: int, rule: str):
    """An argparse type for an integer >= lo; `rule` names it in the error ("a positive integer")."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {rule}, got {s!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


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
    _verify_argument(p)
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
    from .checkpoint import convert_to_hf, convert_to_meta, open_checkpoint, verify_checklist
    src = ns.input_dir
    if not os.path.exists(src):
        raise CLIError(f"--input_dir {src}: no such folder")
    if not os.path.isdir(src):
        raise CLIError(f"--input_dir {src}: not a folder")
    if os.path.exists(ns.output_dir):
        raise CLIError(f"--output_dir {ns.output_dir}: already exists; choose a new output folder")
    if ns.verify_checksums:
        verify_checklist(src)
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


# ---- generation: complete, infill, chat (issue 5) ----
def _float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """An argparse type for a float in [lo, hi] (an open end excludes its bound; hi may be inf)."""
    rule = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            v = float("nan")
        if not ((lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
            raise argparse.ArgumentTypeError(f"expected a number in {rule}, got {s!r}")
        return v
    return parse


def _device(s: str) -> str:
    import torch
    try:
        kind = torch.device(s).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {s!r}")
    return s


def _check_utf8(text: str, what: str) -> str:
    """text, unless it came from bytes that are not UTF-8: Python decodes argv and stdin with surrogateescape, and
    the tokenizer cannot encode the lone surrogates that leaves."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CLIError(f"{what} is not valid UTF-8 (byte 0x{ord(text[e.start]) - 0xDC00:02x} at character "
                       f"{e.start})") from None
    return text


def _text(s: str) -> str:
    """An argparse type for text given to the model."""
    try:
        return _check_utf8(s, "the text")
    except CLIError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _verify_argument(p) -> None:
    p.add_argument("--verify-checksums", "--verify_checksums", dest="verify_checksums", action="store_true",
                   help="before loading, check the folder's files against its checklist.chk (the md5 list of "
                        "Meta's downloads; an error if a file differs, is not listed, or there is no list)")


def _model_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help="model folder, Meta or HF format, with tokenizer.model (default: the embedded model)")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--dtype", choices=("auto",) + _DTYPES, default=None,
                   help="activation/weight dtype (default: float16 on CUDA, bfloat16 or float32 on CPU; "
                        "auto: as stored)")
    p.add_argument("--quantize", choices=("int8",), default=None, help="int8 linear weights")
    _verify_argument(p)
    p.add_argument("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=_positive_int, default=None,
                   help="context window in tokens, prompt included (default: the model's, at most 4096)")


def _sampling_arguments(p) -> None:
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=_positive_int,
                   default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=_float_in(0, float("inf"), hi_open=True), default=0.0,
                   help="0 = greedy (default 0)")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=_float_in(0, 1, lo_open=True), default=0.9,
                   help="nucleus sampling mass, in (0, 1] (default 0.9)")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=_non_negative_int, default=0,
                   help="sample among the k most likely tokens; 0 = all (default 0)")
    p.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty",
                   type=_float_in(0, float("inf"), lo_open=True, hi_open=True), default=1.0,
                   help="> 1 discourages repeating tokens (default 1.0: off)")
    p.add_argument("--presence-penalty", "--presence_penalty", dest="presence_penalty", type=_float_in(-2, 2),
                   default=0.0, help="OpenAI's: subtracted from the logit of every token generated so far, "
                                     "in [-2, 2] (default 0: off)")
    p.add_argument("--frequency-penalty", "--frequency_penalty", dest="frequency_penalty", type=_float_in(-2, 2),
                   default=0.0, help="OpenAI's: times how often a token was generated so far, subtracted from its "
                                     "logit, in [-2, 2] (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (same device and dtype)")
    p.add_argument("--stop", action="append", type=_text, default=None, metavar="TEXT",
                   help="stop when this text is generated (repeatable; the text is not printed)")
    p.add_argument("--prompt-lookup", "--prompt_lookup", dest="prompt_lookup", type=_non_negative_int, default=0,
                   metavar="N", help="greedy only: draft up to N tokens by copying from the prompt and output, "
                                     "checked in one forward (same text, faster where code repeats; default 0: off)")


def _generation_parser(sub, name: str, **kw):
    p = sub.add_parser(name, **kw)
    _model_arguments(p)
    _sampling_arguments(p)
    return p


def _add_complete(sub) -> None:
    p = _generation_parser(sub, "complete", help="continue a prompt (code completion)",
                           description="Prints the model's continuation of PROMPT as it is generated. Stops at "
                                       "the end-of-sequence token, a --stop text, or --max-new-tokens.")
    p.add_argument("prompt", nargs="?", type=_text, default=None, metavar="PROMPT",
                   help="the prompt; '-' or absent: stdin")
    p.set_defaults(func=_run_complete)


def _add_infill(sub) -> None:
    p = _generation_parser(sub, "infill", help="fill in the middle of code (<FILL_ME>)",
                           description="Prints the code that belongs at <FILL_ME> in TEXT (or between TEXT and "
                                       "--suffix) as it is generated; --whole prints TEXT with the filling in "
                                       "place. Needs a model with infilling tokens (7B/13B, not 34B or -Python).")
    p.add_argument("text", nargs="?", type=_text, default=None, metavar="TEXT",
                   help="code containing <FILL_ME> once, or the prefix when --suffix is given; '-' or absent: stdin")
    p.add_argument("--suffix", type=_text, default=None,
                   help="the code after the gap (then TEXT is the code before it)")
    p.add_argument("--suffix-first", "--suffix_first", dest="suffix_first", action="store_true",
                   help="suffix-prefix-middle prompt order (SPM) instead of prefix-suffix-middle")
    p.add_argument("--whole", action="store_true", help="print the whole text with the gap filled")
    p.set_defaults(func=_run_infill)


def _add_chat(sub) -> None:
    p = _generation_parser(sub, "chat", help="chat with an Instruct model (interactive, streaming)",
                           description="Without --message: an interactive chat when stdin is a terminal (/exit "
                                       "or Ctrl-D ends it, /reset forgets the conversation), else one turn with "
                                       "stdin as the message. With --message: one turn, the reply printed.")
    p.add_argument("--message", type=_text, default=None,
                   help="one user message ('-': stdin); prints the reply and exits")
    p.add_argument("--system", type=_text, default=None, help="a system prompt")
    p.set_defaults(func=_run_chat)


def _read_input(value: str | None, what: str) -> str:
    """The argument, or stdin when it is '-' or absent and stdin is not a terminal."""
    if value is not None and value != "-":
        return value
    if value is None and sys.stdin.isatty():
        raise CLIError(f"{what}: give it as an argument or pipe it on stdin")
    return _check_utf8(sys.stdin.read(), f"{what} (stdin)")


def _resolve_device(ns) -> str:
    """--device, or cuda when there is a GPU and this build has CUDA kernels, else cpu; a CUDA device that is not
    there, or a CPU-only build asked for one, is a user error."""
    import torch
    from . import _C
    device = ns.device or ("cuda" if torch.cuda.is_available() and _C.with_cuda else "cpu")
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: no CUDA device is available")
        if not _C.with_cuda:
            raise CLIError(f"--device {device}: this build of codellama_ext has no CUDA kernels (it was built "
                           f"without a CUDA toolkit or with CODELLAMA_CPU_ONLY=1; reinstall to get them)")
    return device


def _load(ns, max_batch_size: int = 1):
    from .api import CodeLlama
    if ns.model is not None and not os.path.isdir(ns.model):
        raise CLIError(f"--model {ns.model}: no such folder")
    device = _resolve_device(ns)
    return CodeLlama.from_pretrained(ns.model, device=device, dtype=ns.dtype, quantize=ns.quantize,
                                     max_seq_len=ns.max_seq_len, max_batch_size=max_batch_size, progress=sys.stderr.isatty(),
                                     verify_checksums=ns.verify_checksums)


def _sampling(ns) -> dict:
    return {k: getattr(ns, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                                        "presence_penalty", "frequency_penalty", "seed", "stop", "prompt_lookup")}


def _write_stream(deltas, newline: bool | None = None) -> str:
    """Writes text deltas to stdout as they come, then a newline if asked (default: on a terminal, so that piped
    output is exactly the generated text); returns the text."""
    text = []
    for d in deltas:
        sys.stdout.write(d)
        sys.stdout.flush()
        text.append(d)
    if sys.stdout.isatty() if newline is None else newline:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


def _run_complete(ns) -> int:
    prompt = _read_input(ns.prompt, "PROMPT")
    llm = _load(ns)
    _write_stream(llm.stream(prompt, mode="complete", **_sampling(ns)))
    return 0


FILL = "<FILL_ME>"


def _run_infill(ns) -> int:
    text = _read_input(ns.text, "TEXT")
    if ns.suffix is None:
        if text.count(FILL) != 1:
            raise CLIError(f"TEXT must contain {FILL} exactly once (found {text.count(FILL)}), or give --suffix")
        prefix, suffix = text.split(FILL)
    elif FILL in text:
        raise CLIError(f"TEXT contains {FILL} and --suffix is given: use one or the other")
    else:
        prefix, suffix = text, ns.suffix
    llm = _load(ns)
    deltas = llm.stream(prefix, mode="infill", suffix=suffix, suffix_first=ns.suffix_first, **_sampling(ns))
    if ns.whole:
        deltas = itertools.chain([prefix], deltas, [suffix])
    _write_stream(deltas)
    return 0


def _run_chat(ns) -> int:
    history = [] if ns.system is None else [{"role": "system", "content": ns.system}]
    if ns.message is not None or not sys.stdin.isatty():
        message = _read_input(ns.message if ns.message is not None else "-", "--message")
        llm = _load(ns)
        _write_stream(llm.stream(history + [{"role": "user", "content": message}], mode="chat", **_sampling(ns)))
        return 0
    llm = _load(ns)
    print("chat: /exit or Ctrl-D to end, /reset to forget the conversation", file=sys.stderr)
    while True:
        try:
            message = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not message.strip():
            continue
        try:
            _check_utf8(message, "the message")
        except CLIError as e:  # a typo on the terminal ends neither the chat nor its history
            print(f"{PROG}: {e}", file=sys.stderr)
            continue
        if message.strip() == "/exit":
            return 0
        if message.strip() == "/reset":
            history = history[:1] if ns.system is not None else []
            continue
        turn = history + [{"role": "user", "content": message}]
        try:
            reply = _write_stream(llm.stream(turn, mode="chat", **_sampling(ns)), newline=True)
        except KeyboardInterrupt:  # stops this reply (the stream is closed, its slot freed), keeps the chat
            print("\n(interrupted)", file=sys.stderr)
            continue
        history = turn + [{"role": "assistant", "content": reply}]


# ---- bench ----
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="generation benchmark: ours against transformers on a random-weight model",
                       description="Decode tokens/s at each --batch and prefill time of each --prefill length, "
                                   "our generate against transformers' on the same random-weight checkpoint in "
                                   "the same run, with the ratio and the decode's share of the measured read "
                                   "bandwidth; a markdown table. Details: codellama_ext/benchmark.py.")
    p.add_argument("--shape", "--preset", dest="shape", nargs="+", default=None,
                   help="model shapes: small, 1.1b (dim 2048, 22 layers, GQA 32/4), 7b (default: 1.1b, plus 7b "
                        "on CUDA)")
    p.add_argument("--dtype", nargs="+", choices=_DTYPES, default=None,
                   help="weight/activation dtypes (default: float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--batch", nargs="+", type=_positive_int, default=[1, 8], help="decode batch sizes (default 1 8)")
    p.add_argument("--new-tokens", "--new_tokens", dest="new_tokens", type=_positive_int, default=None,
                   help="new tokens per decode measurement, at least 2 (default 128 on CUDA, 16 on CPU)")
    p.add_argument("--prompt-len", "--prompt_len", dest="prompt_len", type=_positive_int, default=16,
                   help="prompt tokens before the decode measurement (default 16)")
    p.add_argument("--prefill", nargs="*", type=_positive_int, default=[128, 2048],
                   help="prompt lengths whose prefill is timed (default 128 2048; give none to skip)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip our int8 runs")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers (ours only)")
    p.add_argument("--repeats", type=_positive_int, default=1, help="timed runs per number, median (default 1)")
    p.add_argument("--workdir", default=None, help="folder for the temporary checkpoint (default: $TMPDIR)")
    p.set_defaults(func=_run_bench)


def _run_bench(ns) -> int:
    import torch
    from .benchmark import SHAPES, run_benchmark
    unknown = [s for s in ns.shape or () if s not in SHAPES]
    if unknown:
        raise CLIError(f"--shape {unknown[0]!r}: expected one of {', '.join(SHAPES)}")
    device = _resolve_device(ns)
    cuda = torch.device(device).type == "cuda"
    new_tokens = ns.new_tokens or (128 if cuda else 16)
    if new_tokens < 2:
        raise CLIError(f"--new-tokens must be at least 2 (decode speed is timed over tokens 2..N), got {new_tokens}")
    if ns.workdir is not None and not os.path.isdir(ns.workdir):
        raise CLIError(f"--workdir {ns.workdir}: no such folder")
    run_benchmark(ns.shape or (["1.1b", "7b"] if cuda else ["1.1b"]), ns.dtype or (["float16"] if cuda else
                  ["bfloat16"]), device, ns.batch, new_tokens, ns.prompt_len, ns.prefill, int8=ns.int8, hf=ns.hf,
                  repeats=ns.repeats, workdir=ns.workdir)
    return 0


# ---- serve ----
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an HTTP server with OpenAI's completions and chat-completions API",
                       description="Serves the model over HTTP: POST /v1/completions (with 'suffix' or <FILL_ME>: "
                                   "infilling) and /v1/chat/completions, GET /v1/models and /health, in OpenAI's "
                                   "format (codellama_ext/server.py). Concurrent requests decode together. Ctrl-C "
                                   "stops it.")
    _model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                         "only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=_non_negative_int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size", type=_positive_int, default=8,
                   help="requests decoded together; more wait for a free slot (default 8)")
    p.add_argument("--prefill-chunk", "--prefill_chunk", dest="prefill_chunk", type=_non_negative_int, default=None,
                   help="prompt tokens prefilled per step while other requests decode (default 32 on a CPU, 512 on "
                        "a GPU; 0: whole prompts, which stalls the other streams for a long prompt's prefill)")
    p.add_argument("--name", default=None, help="the model name in responses (default: the folder's name)")
    p.add_argument("--quiet", action="store_true", help="no access log on stderr")
    p.set_defaults(func=_run_serve)


def _run_serve(ns) -> int:
    from .server import make_server
    llm = _load(ns, max_batch_size=ns.max_batch_size)
    if ns.prefill_chunk is not None:
        llm.engine.prefill_chunk = ns.prefill_chunk or None
    name = ns.name or (os.path.basename(os.path.normpath(ns.model)) if ns.model else "codellama-ext-default")
    server = make_server(llm, ns.host, ns.port, name, log=not ns.quiet)
    host, port = server.server_address[:2]
    chunk = llm.engine.prefill_chunk
    print(f"{PROG}: serving {name} on http://{host}:{port} (POST /v1/completions, /v1/chat/completions; a prompt "
          f"joining others is prefilled {f'{chunk} tokens per step' if chunk else 'whole'})", file=sys.stderr,
          flush=True)
    with server:
        server.serve_forever()
    return 0


# ---- entry point ----
_COMMANDS: list[Callable] = [_add_convert, _add_memory, _add_complete, _add_infill, _add_chat, _add_bench,
                             _add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="CodeLlama inference engine tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for add in _COMMANDS:
        add(sub)
    return parser


def _out_of_memory(e: BaseException) -> bool:
    """torch reports a failed CUDA allocation as OutOfMemoryError but a failed CPU one as a plain RuntimeError."""
    import torch
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def main(argv: Sequence[str] | None = None) -> int:
    try:  # from the start: torch's import alone takes seconds, and Ctrl-C then must not print a traceback
        return _run(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    from .checkpoint import CheckpointError
    from .config import ConfigError
    try:
        return ns.func(ns)
    except BrokenPipeError:
        # The reader went away (`| head`): no error to report. Exit as a process killed by SIGPIPE would, with
        # stdout on /dev/null so that the interpreter's last flush of the unwritten text does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (CLIError, CheckpointError, ConfigError, OSError, ValueError, MemoryError, RuntimeError) as e:
        if os.environ.get("CODELLAMA_EXT_DEBUG") or (isinstance(e, RuntimeError) and not _out_of_memory(e)):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if _out_of_memory(e):
            msg = (f"out of memory ({msg}); a smaller --max-seq-len, --quantize int8 or a 16-bit --dtype needs "
                   f"less ('{PROG} memory' estimates it)")
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
