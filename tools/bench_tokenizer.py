"""Times codellama_ext.CodeLlamaTokenizer against transformers' CodeLlamaTokenizerFast (and slow) in the same run.

Encodes a ~100 kB source file (Python standard-library source by default) and prints the median time of each and
the ratio ours / fast (< 1 means we are faster). Also checks that the ids agree.

    python tools/bench_tokenizer.py [--model shared/tokenizers/codellama-format-tokenizer.model] [--file F]
                                    [--size 100000] [--repeat 10]

Without --model it uses ../shared/tokenizers/codellama-format-tokenizer.model when present, else a small model
trained on the fly (tests/tokenizer_fixtures.py)."""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--file", type=Path, default=None, help="source text (default: stdlib inspect.py + others)")
    ap.add_argument("--size", type=int, default=100_000, help="characters of text to encode")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no-slow", action="store_true", help="skip the (slow) transformers slow tokenizer")
    args = ap.parse_args()

    model = args.model
    if model is None:
        real = ROOT.parent / "shared/tokenizers/codellama-format-tokenizer.model"
        if real.is_file():
            model = real
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            import tokenizer_fixtures
            model = tokenizer_fixtures.build_models(Path(tempfile.mkdtemp()))["codellama"]
    if args.file is not None:
        text = args.file.read_text()
    else:
        import textwrap
        import typing
        text = "".join(Path(m.__file__).read_text() for m in (inspect, typing, textwrap))
    while len(text) < args.size:
        text += text
    text = text[:args.size]

    from codellama_ext.tokenizer import CodeLlamaTokenizer
    ours = CodeLlamaTokenizer(model)
    import transformers
    fast = transformers.CodeLlamaTokenizerFast(vocab_file=str(model), from_slow=True)
    rows = []
    print(f"model {model} ({ours.vocab_size} pieces); text {len(text)} chars, {len(text.encode())} bytes; "
          f"python {platform.python_version()}, transformers {transformers.__version__}, {os.cpu_count()} CPUs, "
          f"median of {args.repeat}")
    ids_ours = ours.encode(text)
    ids_fast = fast.encode(text)
    print(f"ids: ours {len(ids_ours)}, fast {len(ids_fast)}, equal: {ids_ours == ids_fast}")
    t_fast = bench(lambda: fast.encode(text), args.repeat)
    rows.append(("transformers CodeLlamaTokenizerFast.encode", t_fast))
    rows.append(("codellama_ext encode (HF-compatible)", bench(lambda: ours.encode(text), args.repeat)))
    rows.append(("codellama_ext encode_meta", bench(lambda: ours.encode_meta(text, True, False), args.repeat)))
    half = len(text) // 2
    rows.append(("codellama_ext infill_ids (prefix/suffix halves)",
                 bench(lambda: ours.infill_ids(text[:half], text[half:]), args.repeat)))
    rows.append(("transformers fast encode(prefix, suffix=...)",
                 bench(lambda: fast.encode(text[:half], suffix=text[half:]), args.repeat)))
    rows.append(("codellama_ext decode", bench(lambda: ours.decode(ids_ours), args.repeat)))
    rows.append(("transformers fast decode", bench(lambda: fast.decode(ids_fast), args.repeat)))
    if not args.no_slow:
        slow = transformers.CodeLlamaTokenizer(vocab_file=str(model))
        rows.append(("transformers CodeLlamaTokenizer (slow).encode", bench(lambda: slow.encode(text),
                                                                            max(1, args.repeat // 5))))
    for name, t in rows:
        print(f"{name:50s} {t * 1e3:9.2f} ms  {len(text) / t / 1e6:7.2f} MB/s  ratio vs fast {t / t_fast:6.2f}")


if __name__ == "__main__":
    main()
