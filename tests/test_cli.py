"""The `codellama-ext` command line (issue 4): memory calculator numbers, Meta -> HF -> Meta conversion through
the CLI checked against transformers' LlamaForCausalLM and our loader, and one-line user errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from codellama_ext.cli import main
from codellama_ext.model import load_model

from checkpoint_fixtures import save_meta, tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [1, 822, 3240, 29898, 29876, 1125, 13, 1678, 736, 17, 29900, 31000, 32015, 5, 42, 7]


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def gib(out: str, label: str) -> float:
    return float(re.search(rf"^\s*{label}\s+([0-9.]+) GiB$", out, re.M).group(1))


# ---- memory ----
def test_memory_7b_fp16_16k(capsys):
    rc, out, err = run_cli(capsys, "memory", "--model-size", "7B", "--dtype", "float16", "--context", "16384",
                           "--batch", "1")
    assert rc == 0 and err == ""
    assert "CodeLlama-7b" in out
    # 2 (k, v) * 32 layers * 16384 tokens * 32 kv heads * 128 * 2 bytes = 8 GiB exactly
    assert gib(out, "KV cache") == 8.00
    assert 12.5e9 <= gib(out, "weights") * 2**30 <= 13.5e9
    total = gib(out, "total")
    assert abs(total - (gib(out, "weights") + gib(out, "KV cache") + gib(out, "working"))) <= 0.011

    rc, out8, _ = run_cli(capsys, "memory", "--model-size", "7B", "--dtype", "float16", "--context", "16384",
                          "--quantize", "int8")
    assert rc == 0
    assert gib(out8, "weights") < 0.6 * gib(out, "weights") and gib(out8, "KV cache") == 8.00
    assert gib(out8, "total") < total


def test_memory_batch_and_presets(capsys):
    rc, out, _ = run_cli(capsys, "memory", "--model_size", "34B-Instruct", "--context", "4096", "--batch", "2",
                         "--dtype", "bfloat16")
    assert rc == 0 and "CodeLlama-34b-Instruct" in out
    assert gib(out, "KV cache") == 2 * 48 * 2 * 4096 * 8 * 128 * 2 / 2**30  # GQA: 8 kv heads


# ---- conversion ----
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random GQA model and its Meta folder with 2 shards (plus a SentencePiece tokenizer.model)."""
    from tokenizer_fixtures import build_models
    model = tiny_hf_model(seed=3, dim=64, n_heads=4, n_kv_heads=2, vocab=32016, ffn=192)
    root = tmp_path_factory.mktemp("cli")
    meta = save_meta(model, str(root / "meta2"), mp=2)
    (root / "tok").mkdir()
    tok = build_models(root / "tok")["codellama"]
    shutil.copyfile(tok, os.path.join(meta, "tokenizer.model"))
    with torch.no_grad():
        hf_logits = model(torch.tensor([PROMPT])).logits[0].float()
    return {"model": model, "meta": meta, "hf_logits": hf_logits, "root": root}


def test_convert_meta_to_hf_to_meta(tiny, tmp_path, capsys):
    from transformers import LlamaForCausalLM
    hf = str(tmp_path / "hf")
    rc, out, err = run_cli(capsys, "convert", "--input_dir", tiny["meta"], "--model_size", "tiny",
                           "--output_dir", hf, "--max_shard_size", "3MB")
    assert rc == 0, err
    assert "ignored" in err  # unknown size: a note, the folder's params are used
    files = sorted(os.listdir(hf))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json"} <= set(files)
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary folder left

    back = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(back(torch.tensor([PROMPT])).logits[0].float(), tiny["hf_logits"])
    ours_meta = load_model(tiny["meta"], dtype=torch.float32, max_seq_len=32).logits(PROMPT)
    ours_hf = load_model(hf, dtype=torch.float32, max_seq_len=32).logits(PROMPT)
    assert (ours_hf - ours_meta).norm() <= 1e-5 * ours_meta.norm()

    # HF -> Meta: plain tensors, q/k rows back in Meta order: identical logits through our loader
    meta = str(tmp_path / "meta")
    rc, out, err = run_cli(capsys, "convert", "--input_dir", hf, "--output_dir", meta, "--to", "meta")
    assert rc == 0, err
    assert sorted(os.listdir(meta)) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    params = json.load(open(os.path.join(meta, "params.json")))
    assert params["dim"] == 64 and params["n_kv_heads"] == 2 and params["vocab_size"] == 32016
    sd = torch.load(os.path.join(meta, "consolidated.00.pth"), weights_only=True)
    src = [torch.load(os.path.join(tiny["meta"], f"consolidated.0{i}.pth"), weights_only=True) for i in range(2)]
    assert torch.equal(sd["layers.1.attention.wk.weight"],
                       torch.cat([s["layers.1.attention.wk.weight"] for s in src]))
    assert torch.equal(load_model(meta, dtype=torch.float32, max_seq_len=32).logits(PROMPT), ours_meta)


def test_converted_tokenizer_loads_in_transformers(tiny, tmp_path, capsys):
    from transformers import CodeLlamaTokenizer as HFTokenizer
    from codellama_ext import CodeLlamaTokenizer
    hf = str(tmp_path / "hf")
    assert run_cli(capsys, "convert", "--input_dir", tiny["meta"], "--output_dir", hf, "--dtype", "bfloat16")[0] == 0
    assert json.load(open(os.path.join(hf, "config.json")))["torch_dtype"] == "bfloat16"
    cfg = json.load(open(os.path.join(hf, "tokenizer_config.json")))
    assert cfg["tokenizer_class"] == "CodeLlamaTokenizer" and len(cfg["additional_special_tokens"]) == 4
    text = "def f(x):\n    return x + 1"
    ours = CodeLlamaTokenizer(os.path.join(hf, "tokenizer.model"))
    assert HFTokenizer.from_pretrained(hf).encode(text) == ours.encode(text)
    # HF -> HF (re-sharding / dtype change): the input's tokenizer files are carried over
    with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
        json.dump(dict(cfg, model_max_length=4096), f)
    hf2 = str(tmp_path / "hf2")
    assert run_cli(capsys, "convert", "--input_dir", hf, "--output_dir", hf2)[0] == 0
    assert json.load(open(os.path.join(hf2, "tokenizer_config.json")))["model_max_length"] == 4096
    assert os.path.isfile(os.path.join(hf2, "special_tokens_map.json"))


# ---- errors: one line, exit 1 (ours) or 2 (argparse), no traceback ----
def _one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("codellama-ext: error: "), err
    for n in needles:
        assert n in lines[0], err


def test_errors(tiny, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "convert", "--input_dir", str(tmp_path / "nope"), "--output_dir",
                           str(tmp_path / "o"))
    assert rc == 1 and out == ""
    _one_line_error(err, "no such folder", "nope")

    exists = tmp_path / "exists"
    exists.mkdir()
    rc, _, err = run_cli(capsys, "convert", "--input_dir", tiny["meta"], "--output_dir", str(exists))
    assert rc == 1
    _one_line_error(err, "already exists")

    rc, _, err = run_cli(capsys, "convert", "--input_dir", tiny["meta"], "--output_dir", str(tmp_path / "o"),
                         "--model_size", "7B")
    assert rc == 1
    _one_line_error(err, "--model_size 7B", "4096")
    assert not (tmp_path / "o").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli(capsys, "convert", "--input_dir", str(empty), "--output_dir", str(tmp_path / "o"))
    assert rc == 1
    _one_line_error(err, "neither a Meta checkpoint")  # CheckpointError

    rc, _, err = run_cli(capsys, "memory", "--model-size", "7B", "--dtype", "float8")
    assert rc == 2
    _one_line_error(err, "--dtype", "float8")
    rc, _, err = run_cli(capsys, "memory", "--model-size", "7B", "--context", "0")
    assert rc == 2
    _one_line_error(err, "--context")
    rc, _, err = run_cli(capsys, "memory", "--model-size", "7B", "--model", tiny["meta"])
    assert rc == 2
    _one_line_error(err, "not allowed with")
    rc, _, err = run_cli(capsys, "memory", "--model-size", "9B")
    assert rc == 1
    _one_line_error(err, "unknown preset")  # ConfigError
    rc, _, err = run_cli(capsys, "frobnicate")
    assert rc == 2
    _one_line_error(err, "frobnicate")


def test_memory_from_folder_and_subprocess(tiny):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "codellama_ext.cli", "memory", "--model", tiny["meta"], "--context", "1024",
           "--dtype", "float32"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert tiny["meta"] in r.stdout
    # 2 * 2 layers * 1024 tokens * 2 kv heads * 16 * 4 bytes
    assert f"{2 * 2 * 1024 * 2 * 16 * 4 / 2**30:.2f} GiB" in r.stdout
    r = subprocess.run(cmd[:4] + ["--model", tiny["meta"] + "-missing"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    _one_line_error(r.stderr, "no such folder")


def test_failed_convert_to_meta_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "convert", "--input_dir", tiny["meta"], "--output_dir", str(out), "--to", "meta")
    assert rc == 1
    _one_line_error(err, "No space left")
    assert os.listdir(tmp_path) == []
