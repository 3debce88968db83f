"""The generation commands of `codellama-ext` (issue 5) end to end on tiny model folders: complete / infill / chat
print what the Python API returns (argument, stdin, --stop, the interactive chat), every error is one line with
the documented exit status, and the generation benchmark runs at its tiny shape on a checkpoint that transformers
reads to the same logits."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from codellama_ext.cli import main

from checkpoint_fixtures import save_meta, tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = "import os\ndef read_file(path):\n    with open(path) as f:\n"
GAP = "def add(a, b):\n    <FILL_ME>\n    return c\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Meta folders of random GQA models: "infill" with the CodeLlama pieces (7B/13B layout), "base" without
    (34B / -Python: no infilling); each with its SentencePiece tokenizer.model."""
    import sentencepiece as spm
    from tokenizer_fixtures import build_models
    root = tmp_path_factory.mktemp("cli_generate")
    toks = build_models(root)
    out = {}
    for name, tok in (("infill", toks["codellama"]), ("base", toks["base"])):
        sp = spm.SentencePieceProcessor(model_file=str(tok))
        # head_dim 64: the CUDA attention kernels take 64 or 128 (test_complete_on_device runs on CUDA too)
        model = tiny_hf_model(seed=5, dim=128, n_layers=2, n_heads=2, n_kv_heads=1, vocab=sp.get_piece_size(),
                              ffn=384, init=0.5)
        out[name] = save_meta(model, str(root / name))
        shutil.copyfile(tok, os.path.join(out[name], "tokenizer.model"))
        out[name + ":oracle"] = (model, sp)
    return out


@pytest.fixture(scope="module")
def llm(folders):
    from codellama_ext import CodeLlama
    return CodeLlama.from_pretrained(folders["infill"])


class _Stdin(io.StringIO):
    def __init__(self, text: str, tty: bool):
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def run_cli(capsys, monkeypatch, *argv, stdin: str | None = None, tty: bool = False):
    """main(argv) with stdin replaced (a terminal when tty); returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", _Stdin(stdin or "", tty))
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def on_cpu(folder) -> list[str]:
    """--model and --device cpu: the `llm` fixture runs on the CPU (the CLI's default device is CUDA when present)."""
    return ["--model", str(folder), "--device", "cpu"]


def one_line_error(err: str, *words: str) -> None:
    assert err.startswith("codellama-ext: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


# ---- complete ----
def test_complete_argument_and_stdin(folders, llm, capsys, monkeypatch):
    want = llm.complete(CODE, max_new_tokens=12)
    assert want, "the tiny model should generate some text"
    rc, out, err = run_cli(capsys, monkeypatch, "complete", CODE, *on_cpu(folders["infill"]),
                           "--max-new-tokens", 12)
    assert (rc, out, err) == (0, want, "")
    for argv in (["complete"], ["complete", "-"]):  # absent or '-': read from a non-terminal stdin
        rc, out, _ = run_cli(capsys, monkeypatch, *argv, *on_cpu(folders["infill"]), "--max-new-tokens", 12,
                             stdin=CODE)
        assert (rc, out) == (0, want)


def test_complete_matches_transformers(folders, capsys, monkeypatch):
    """Independent oracle: transformers' greedy generate on the same weights, ids from SentencePiece itself,
    the new ids (up to EOS) decoded by SentencePiece as Meta's generate does."""
    model, sp = folders["infill:oracle"]
    ids = torch.tensor([[sp.bos_id()] + sp.encode(CODE)])
    with torch.no_grad():
        new = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=sp.eos_id(),
                             pad_token_id=sp.eos_id(), attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    new = new[:new.index(sp.eos_id())] if sp.eos_id() in new else new
    rc, out, _ = run_cli(capsys, monkeypatch, "complete", CODE, *on_cpu(folders["infill"]), "--dtype", "float32",
                         "--max-new-tokens", 12)
    assert (rc, out) == (0, sp.decode(new))


def test_complete_on_device(folders, device, capsys, monkeypatch):
    """The CLI on each device prints what the API gives on that device (greedy)."""
    from codellama_ext import CodeLlama
    want = CodeLlama.from_pretrained(folders["infill"], device=device, max_batch_size=1).complete(
        CODE, max_new_tokens=12)
    rc, out, _ = run_cli(capsys, monkeypatch, "complete", CODE, "--model", folders["infill"], "--device", device,
                         "--max-new-tokens", 12)
    assert (rc, out) == (0, want)


def test_missing_default_model_is_one_line(capsys, monkeypatch, tmp_path):
    from codellama_ext import api
    monkeypatch.setattr(api, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    rc, out, err = run_cli(capsys, monkeypatch, "complete", CODE, "--device", "cpu")
    assert rc == 1 and out == ""
    one_line_error(err, "default model")


def test_complete_sampling_flags_match_api(folders, llm, capsys, monkeypatch):
    kw = dict(max_new_tokens=10, temperature=0.8, top_p=0.95, top_k=40, repetition_penalty=1.3, presence_penalty=0.5,
              frequency_penalty=-0.25, seed=7)
    want = llm.complete(CODE, **kw)
    rc, out, _ = run_cli(capsys, monkeypatch, "complete", CODE, *on_cpu(folders["infill"]), "--max-new-tokens", 10,
                         "--temperature", 0.8, "--top-p", 0.95, "--top-k", 40, "--repetition-penalty", 1.3,
                         "--presence-penalty", 0.5, "--frequency-penalty", -0.25, "--seed", 7)
    assert (rc, out) == (0, want)


def test_prompt_lookup_flag(folders, llm, capsys, monkeypatch):
    rc, out, _ = run_cli(capsys, monkeypatch, "complete", CODE, *on_cpu(folders["infill"]), "--max-new-tokens", 16,
                         "--prompt-lookup", 4)
    assert (rc, out) == (0, llm.complete(CODE, max_new_tokens=16))
    rc, out, err = run_cli(capsys, monkeypatch, "complete", CODE, *on_cpu(folders["infill"]), "--prompt-lookup", 4,
                           "--temperature", 0.5)
    assert rc == 1 and out == ""
    one_line_error(err, "prompt_lookup", "temperature 0")


def test_complete_stop_strings_cut_exactly(folders, llm, capsys, monkeypatch):
    full = llm.complete(CODE, max_new_tokens=24)
    assert len(full) >= 8, f"need a longer continuation to cut: {full!r}"
    first, second = full[5:7], full[3:5]  # the earlier occurrence wins, whichever flag names it
    cut = full[:min(full.index(first), full.index(second))]
    rc, out, _ = run_cli(capsys, monkeypatch, "complete", CODE, *on_cpu(folders["infill"]),
                         "--max-new-tokens", 24, "--stop", first, "--stop", second)
    assert (rc, out) == (0, cut)
    assert out == llm.complete(CODE, max_new_tokens=24, stop=[first, second])


def test_complete_piped_through_a_real_process(folders, llm):
    """The installed entry point, stdin a pipe: the streamed bytes are the API's text."""
    want = llm.complete(CODE, max_new_tokens=8)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "codellama_ext.cli", "complete", *on_cpu(folders["infill"]),
                        "--max-new-tokens", "8"], input=CODE, capture_output=True, text=True, env=env, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, want, "")


# ---- infill ----
def test_infill_fill_me_suffix_and_whole(folders, llm, capsys, monkeypatch):
    prefix, suffix = GAP.split("<FILL_ME>")
    middle = llm.infill(prefix, suffix, max_new_tokens=10)
    rc, out, _ = run_cli(capsys, monkeypatch, "infill", GAP, *on_cpu(folders["infill"]), "--max-new-tokens", 10)
    assert (rc, out) == (0, middle)
    rc, out, _ = run_cli(capsys, monkeypatch, "infill", prefix, "--suffix", suffix, *on_cpu(folders["infill"]),
                         "--max-new-tokens", 10)
    assert (rc, out) == (0, middle)
    rc, out, _ = run_cli(capsys, monkeypatch, "infill", "--whole", *on_cpu(folders["infill"]),
                         "--max-new-tokens", 10, stdin=GAP)
    assert (rc, out) == (0, prefix + middle + suffix)
    assert out == llm(GAP, max_new_tokens=10)  # the pipeline-style call fills the same gap
    rc, out, _ = run_cli(capsys, monkeypatch, "infill", GAP, "--suffix-first", *on_cpu(folders["infill"]),
                         "--max-new-tokens", 10)
    assert (rc, out) == (0, llm.infill(prefix, suffix, suffix_first=True, max_new_tokens=10))


# ---- chat ----
def test_chat_one_turn(folders, llm, capsys, monkeypatch):
    msgs = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Sort a list."}]
    want = llm.chat(msgs, max_new_tokens=10)
    rc, out, _ = run_cli(capsys, monkeypatch, "chat", "--system", msgs[0]["content"], "--message",
                         msgs[1]["content"], *on_cpu(folders["infill"]), "--max-new-tokens", 10)
    assert (rc, out) == (0, want)
    rc, out, _ = run_cli(capsys, monkeypatch, "chat", "--system", msgs[0]["content"], *on_cpu(folders["infill"]),
                         "--max-new-tokens", 10, stdin=msgs[1]["content"])  # piped stdin: one turn
    assert (rc, out) == (0, want)


def test_chat_interactive_keeps_the_conversation(folders, llm, capsys, monkeypatch):
    q1, q2 = "Write hello world in C.", "Now in Rust."
    a1 = llm.chat([{"role": "user", "content": q1}], max_new_tokens=6)
    a2 = llm.chat([{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                   {"role": "user", "content": q2}], max_new_tokens=6)
    a3 = llm.chat([{"role": "user", "content": q1}], max_new_tokens=6)  # after /reset: a fresh conversation
    rc, out, err = run_cli(capsys, monkeypatch, "chat", *on_cpu(folders["infill"]), "--max-new-tokens", 6,
                           stdin=f"{q1}\n\n{q2}\n/reset\n{q1}\n", tty=True)  # Ctrl-D (EOF) ends it
    assert rc == 0
    assert out == f">>> {a1}\n>>> >>> {a2}\n>>> >>> {a3}\n>>> "  # an empty line is skipped
    rc, out, _ = run_cli(capsys, monkeypatch, "chat", *on_cpu(folders["infill"]), "--max-new-tokens", 6,
                         stdin=f"/exit\n{q1}\n", tty=True)
    assert (rc, out) == (0, ">>> ")


def test_chat_interactive_skips_a_line_that_is_not_utf8(folders, llm, capsys, monkeypatch):
    """A terminal in another encoding: the line is refused with a note, the chat goes on."""
    q1 = "Write hello world in C."
    a1 = llm.chat([{"role": "user", "content": q1}], max_new_tokens=6)
    rc, out, err = run_cli(capsys, monkeypatch, "chat", *on_cpu(folders["infill"]), "--max-new-tokens", 6,
                           stdin=f"caf\udce9\n{q1}\n", tty=True)
    assert (rc, out) == (0, f">>> >>> {a1}\n>>> ")
    assert "the message is not valid UTF-8 (byte 0xe9 at character 3)" in err


# ---- errors: one line, exit 1 (found while running) or 2 (bad command line) ----
@pytest.mark.parametrize("argv, status, words", [
    (["complete", "x", "--model", "/no/such/folder"], 1, ["--model", "no such folder"]),
    (["complete", "x", "--temperature", "-1"], 2, ["--temperature", "-1"]),
    (["complete", "x", "--top-p", "0"], 2, ["--top-p"]),
    (["complete", "x", "--top-k", "-3"], 2, ["--top-k"]),
    (["complete", "x", "--max-new-tokens", "0"], 2, ["--max-new-tokens"]),
    (["complete", "x", "--repetition-penalty", "nan"], 2, ["--repetition-penalty"]),
    (["complete", "x", "--presence-penalty", "2.5"], 2, ["--presence-penalty", "[-2, 2]"]),
    (["complete", "x", "--device", "tpu"], 2, ["--device", "tpu"]),
    (["complete", "x", "--quantize", "int4"], 2, ["--quantize"]),
    (["chat", "--bogus"], 2, ["--bogus"]),
    (["bench", "--shape", "huge"], 1, ["--shape", "huge"]),
    (["bench", "--new-tokens", "1"], 1, ["--new-tokens"]),
    # argv bytes that are not UTF-8 reach Python as lone surrogates, which the tokenizer cannot encode
    (["complete", "def f(\udcff):"], 2, ["PROMPT", "not valid UTF-8", "0xff"]),
    (["infill", "x", "--suffix", "\udce9"], 2, ["--suffix", "not valid UTF-8"]),
])
def test_bad_flags_are_one_line(argv, status, words, capsys, monkeypatch):
    rc, out, err = run_cli(capsys, monkeypatch, *argv)
    assert rc == status and out == ""
    one_line_error(err, *words)


def test_errors_found_while_running(folders, capsys, monkeypatch):
    m = folders["infill"]
    rc, _, err = run_cli(capsys, monkeypatch, "complete", CODE * 20, *on_cpu(m), "--max-seq-len", 32)
    assert rc == 1
    one_line_error(err, "context")
    rc, _, err = run_cli(capsys, monkeypatch, "complete", *on_cpu(m), tty=True)  # no prompt, stdin a terminal
    assert rc == 1
    one_line_error(err, "PROMPT", "stdin")
    rc, _, err = run_cli(capsys, monkeypatch, "infill", "def f(): pass", *on_cpu(m))
    assert rc == 1
    one_line_error(err, "<FILL_ME>")
    rc, _, err = run_cli(capsys, monkeypatch, "infill", GAP, "--suffix", "x", *on_cpu(m))
    assert rc == 1
    one_line_error(err, "--suffix")
    rc, _, err = run_cli(capsys, monkeypatch, "infill", GAP, *on_cpu(folders["base"]))
    assert rc == 1
    one_line_error(err, "infill")
    rc, _, err = run_cli(capsys, monkeypatch, "complete", *on_cpu(m), stdin="x = '\udce9t\udce9'\n")  # Latin-1 on stdin
    assert rc == 1
    one_line_error(err, "PROMPT (stdin)", "not valid UTF-8", "0xe9")


def test_cpu_only_build_on_a_gpu_machine(folders, capsys, monkeypatch):
    # a GPU but an extension built without CUDA kernels: the default device is the CPU; asking for cuda is one line
    from codellama_ext import _C
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_C, "with_cuda", False)
    rc, out, _ = run_cli(capsys, monkeypatch, "complete", CODE, "--model", folders["infill"], "--dtype", "float32",
                         "--max-new-tokens", "4")
    assert rc == 0 and out
    rc, _, err = run_cli(capsys, monkeypatch, "complete", CODE, "--model", folders["infill"], "--device", "cuda")
    assert rc == 1
    one_line_error(err, "--device cuda", "no CUDA kernels")


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 6144000000000 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nSee documentation for Memory Management"),
], ids=["cpu", "cuda"])
def test_out_of_memory_is_one_line(error, capsys, monkeypatch):
    """A model or --max-seq-len too big for the memory: torch raises a RuntimeError (CPU) or OutOfMemoryError
    (CUDA) while allocating the weights or the KV cache. Raised here without allocating anything."""
    from codellama_ext.api import CodeLlama

    def allocate(*args, **kwargs):
        raise error
    monkeypatch.setattr(CodeLlama, "from_pretrained", allocate)
    rc, out, err = run_cli(capsys, monkeypatch, "complete", CODE, "--device", "cpu")
    assert rc == 1 and out == ""
    one_line_error(err, "out of memory", "--max-seq-len", "--quantize int8")


def test_output_closed_by_its_reader_ends_quietly(folders):
    """`codellama-ext complete ... | head -c 1`: the reader is gone before the first write, so the write fails with
    EPIPE. That is not an error to report: no message, the status of a process killed by SIGPIPE."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "codellama_ext.cli", "complete", CODE, *on_cpu(folders["infill"]),
                          "--max-new-tokens", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert (p.wait(timeout=120), err) == (141, "")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches the process's mapped libraries in /proc")
def test_interrupt_while_torch_loads_is_one_line(folders):
    """Ctrl-C in the seconds torch's import takes (before any model work): the same one line and status 130 as an
    interrupt later, not a traceback from inside the import."""
    import signal
    import time
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "codellama_ext.cli", "complete", CODE, *on_cpu(folders["infill"]),
                          "--max-new-tokens", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/maps") as maps:
            if "libtorch" in maps.read():  # torch's import has begun: main() runs, no model work yet
                break
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert (p.returncode, err.decode()) == (130, "codellama-ext: interrupted\n")


# ---- benchmark ----
def test_benchmark_checkpoint_is_the_same_model_for_both(tmp_path):
    """The random Meta folder the benchmark writes, read by our loader and by transformers: same logits."""
    from codellama_ext.benchmark import SHAPES, hf_from_meta, write_random_meta
    from codellama_ext.model import load_model
    folder = write_random_meta(str(tmp_path / "ck"), SHAPES["small"], torch.float32)
    ids = torch.tensor([[1, 450, 4086, 17, 29900, 32015, 9]])
    ours = load_model(folder, dtype=torch.float32, max_seq_len=16).logits(ids)
    hf = hf_from_meta(folder, torch.float32, "cpu")
    with torch.no_grad():
        theirs = hf(ids).logits.float()
    err = (ours - theirs).abs().max().item()
    print(f"benchmark checkpoint: max |ours - transformers| logit {err:.3g}")
    assert err < 1e-4


def test_bench_small_preset(capsys, monkeypatch, tmp_path):
    rc, out, err = run_cli(capsys, monkeypatch, "bench", "--shape", "small", "--dtype", "float32", "--device", "cpu",
                           "--batch", 1, 2, "--new-tokens", 4, "--prompt-len", 6, "--prefill", 12,
                           "--workdir", tmp_path)
    assert rc == 0, err
    assert os.listdir(tmp_path) == []  # the temporary checkpoint is removed
    assert re.search(r"measured read bandwidth: [0-9.]+ GB/s", out)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| small ")]
    got = {(r[1].strip(), r[2].strip()) for r in rows}
    assert got == {(w, m) for w in ("float32", "float32 + int8")
                   for m in ("decode b=1 (tok/s)", "decode b=2 (tok/s)", "prefill 12 (ms)",
                             "prefill 12, prefix held (ms)")}, out
    for _, _, measure, ours, peer, ratio, share in rows:
        assert float(ours) > 0 and ("%" in share) == measure.strip().startswith("decode")
        if "held" in measure:  # ours only: transformers' generate keeps no cache between calls
            assert peer.strip() == ratio.strip() == ""
        else:
            assert float(peer) > 0 and ratio.strip().endswith("x")
