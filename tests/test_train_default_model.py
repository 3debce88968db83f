"""tools/train_default_model.py, end to end on a tiny slice (issue 6): prepare -> train (a few steps of a tiny
model) -> export -> evaluate, so the script that made the shipped model cannot rot.

Oracles: the FIM rows against CodeLlamaTokenizer.infill_ids / encode_infilling on the cut texts; the training
model against the engine (codellama_ext.load_model) on the exported folder; the export against Meta's
state-dict names and shapes (codellama_ext.checkpoint.expected_shapes)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import codellama_ext
from codellama_ext.checkpoint import expected_shapes, verify_checklist
from codellama_ext.config import ModelArgs

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--max-files", "60", "--vocab-size", "700", "--dim", "64", "--n-layers", "2", "--head-dim", "32",
        "--n-kv-heads", "1", "--multiple-of", "32", "--seq-len", "64", "--batch-size", "4", "--steps", "3",
        "--warmup", "1", "--eval-tokens", "256", "--eval-infill", "3", "--max-new", "4"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_default_model", ROOT / "tools" / "train_default_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(script, tmp_path_factory):
    """All four stages once; returns (work dir, exported folder)."""
    root = tmp_path_factory.mktemp("default_model")
    work, out = root / "work", root / "model"
    script.main(["--work", str(work), "--out", str(out)] + TINY)
    return work, out


def test_prepare_outputs(run):
    work, _ = run
    meta = json.loads((work / "meta.json").read_text())
    ids = np.load(work / "train_ids.npy")
    offsets = np.load(work / "train_offsets.npy")
    held = json.loads((work / "heldout.json").read_text())
    assert ids.dtype == np.uint16 and len(ids) == offsets[-1] == meta["train_tokens"]
    assert meta["train_files"] + meta["heldout_files"] == 60 and len(held) == meta["heldout_files"] >= 1
    tok = codellama_ext.CodeLlamaTokenizer(work / "tokenizer.model")
    assert tok.supports_infilling and tok.eot_id == tok.n_words - 16 + 10  # CodeLlama's relative places
    assert (tok.bos_id, tok.eos_id, tok.unk_token_id) == (1, 2, 0)
    # each training document is <s> + the Meta encoding of one file + </s>
    first = ids[offsets[0]:offsets[1]].tolist()
    assert first[0] == 1 and first[-1] == 2
    assert tok.decode_meta(first[1:-1]).startswith(("#", '"', "import", "from", "'"))


def test_fim_rows_are_infill_ids(script, run):
    """Every FIM example equals infill_ids(prefix, suffix, suffix_first) + encode_infilling(middle) + [<EOT>]
    of the texts its cuts make, and the three texts partition the window's text."""
    work, _ = run
    sampler = script.FIMSampler(work, 256, 1.0, seed=7)
    tok = sampler.tok
    checked = 0
    for i in range(300):
        w = sampler.window(240)
        cut = sampler.cut_points(w, single_line=i % 2 == 0)
        if cut is None:
            continue
        a, b = cut
        spm = (i // 2) % 2 == 1
        text = tok.decode_meta(w.tolist())
        assert tok.encode_meta(text, bos=False, eos=False) == w.tolist()
        pre, mid, suf = tok.decode_meta(w[:a].tolist()), tok.decode_infill(w[a:b].tolist()), \
            tok.decode_infill(w[b:].tolist())
        assert pre + mid + suf == text
        if i % 2 == 0:
            assert pre.endswith("\n") and mid.strip() and "\n" not in mid and (suf == "" or suf.startswith("\n"))
        want = tok.infill_ids(pre, suf, suffix_first=spm) + tok.encode_infilling(mid) + [tok.eot_id]
        assert sampler.fim_ids(w, a, b, spm).tolist() == want
        checked += 1
    assert checked > 200
    rows = sampler.batch(3)
    assert rows.shape == (3, 257) and rows.dtype == torch.int64


def test_export_is_a_meta_folder(run):
    _, out = run
    params = json.loads((out / "params.json").read_text())
    args = ModelArgs.from_meta_params(params)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.rope_theta) == (64, 2, 2, 1, 1e6)
    sd = torch.load(out / "consolidated.00.pth", map_location="cpu", weights_only=True)
    assert type(sd) is dict and all(t.dtype == torch.bfloat16 for t in sd.values())
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(args)
    assert (out / "tokenizer.model").read_bytes() == (out.parent / "work" / "tokenizer.model").read_bytes()
    # checklist.chk covers every file, MODEL_CARD.md (written by evaluate, after export) included
    assert verify_checklist(out) == sorted(p.name for p in out.iterdir() if p.name != "checklist.chk")


def test_training_model_matches_the_engine(script, run):
    """The model the script trains (its own pure-torch code) computes what the engine computes from the export."""
    work, out = run
    args = ModelArgs.from_meta_params(json.loads((out / "params.json").read_text()))
    sd = torch.load(out / "consolidated.00.pth", map_location="cpu", weights_only=True)
    train_model = script.TrainModel(args, 64)
    train_model.load_state_dict({k: v.float() for k, v in sd.items()})
    engine = codellama_ext.load_model(out, dtype=torch.float32, max_seq_len=64)
    ids = np.load(work / "train_ids.npy")[:40].astype(np.int64)
    with torch.no_grad():
        want = train_model(torch.from_numpy(ids)[None])[0]
    got = engine.logits(ids)
    print("max |logit diff|", (got - want).abs().max().item())
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_evaluate_writes_the_model_card(run):
    _, out = run
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 3 and info["tokens"] == 3 * 4 * 64
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Held-out metrics" in card and "What it can and cannot do" in card
    ppl = float(card.split("perplexity per token")[1].split("|")[2])
    assert math.isfinite(ppl) and 1 < ppl < 2 * 700  # an untrained model is near uniform over the vocabulary


def test_bad_arguments_are_clear_errors(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--stages", "prepare,fly"])
    assert "--stages: unknown stage(s) ['fly']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--minutes", "3", "--steps", "5"])
    assert "--minutes and --steps are exclusive" in capsys.readouterr().err
