"""The embedded default model (issue 6): shipped in the package, loaded with no path, and its greedy output for
fixed prompts is a golden value (token ids), on CPU and on CUDA (float32 on both, so both give the same ids).

The golden ids are also checked against an independent oracle: transformers' LlamaForCausalLM.generate on the
model converted to HF format. When the shipped weights are retrained (tools/train_default_model.py), regenerate
the golden lists with `PYTHONPATH=. python tests/test_default_model.py` and paste its output below."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codellama_ext import CodeLlama
from codellama_ext.api import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
COMPLETE_PROMPT = "def is_palindrome(s):\n"
INFILL_PREFIX = "def area(width, height):\n"
INFILL_SUFFIX = "\n    return result\n"
N_NEW = 24

# --- golden values: `PYTHONPATH=. python tests/test_default_model.py` prints them for the shipped weights ---
GOLDEN_COMPLETE = [261, 371, 996, 320, 981, 634, 1002, 4081, 1055, 328, 1205, 440, 328, 3631, 13, 261, 4015, 4002,
                   362, 328, 1744, 447, 320, 839]
GOLDEN_INFILL = [260, 384, 978, 13, 13, 13, 293, 320, 631, 330, 4015, 1461, 4019, 906, 1585, 283, 13, 260, 371,
                 4049, 631, 330, 4015, 3511]
# ---


def greedy_ids(llm: CodeLlama) -> tuple[list[int], list[int]]:
    tok = llm.tokenizer
    complete = llm.generate([tok.encode_meta(COMPLETE_PROMPT, bos=True, eos=False)], max_new_tokens=N_NEW,
                            temperature=0.0)[0].tokens
    infill = llm.generate([tok.infill_ids(INFILL_PREFIX, INFILL_SUFFIX)], max_new_tokens=N_NEW, temperature=0.0,
                          stop_ids=[tok.eot_id])[0].tokens
    return list(complete), list(infill)


@pytest.fixture(scope="module")
def cpu_llm():
    return CodeLlama.from_pretrained(dtype=torch.float32, max_seq_len=256, max_batch_size=1)


def test_shipped_files():
    names = sorted(p.name for p in DEFAULT_MODEL_DIR.iterdir())
    assert {"params.json", "consolidated.00.pth", "tokenizer.model", "MODEL_CARD.md"} <= set(names), names
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert size < 40e6, f"the default model folder is {size / 1e6:.1f} MB; issue 6 allows at most 40 MB"
    assert "## Held-out metrics" in (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()


def test_loads_with_no_path(cpu_llm):
    tok = cpu_llm.tokenizer
    assert Path(tok.vocab_file).parent == DEFAULT_MODEL_DIR
    assert tok.supports_infilling and tok.eot_id is not None
    assert cpu_llm.args.n_kv_heads < cpu_llm.args.n_heads and cpu_llm.args.rope_theta == 1e6  # GQA, CodeLlama's theta


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_golden_ids(device, cpu_llm):
    llm = cpu_llm if device == "cpu" else CodeLlama.from_pretrained(device=device, dtype=torch.float32,
                                                                    max_seq_len=256, max_batch_size=1)
    complete, infill = greedy_ids(llm)
    assert complete == GOLDEN_COMPLETE
    assert infill == GOLDEN_INFILL


def test_text_api_matches_the_ids(cpu_llm):
    tok = cpu_llm.tokenizer
    assert cpu_llm.complete(COMPLETE_PROMPT, max_new_tokens=N_NEW) == tok.decode_meta(GOLDEN_COMPLETE)
    middle = cpu_llm.infill(INFILL_PREFIX, INFILL_SUFFIX, max_new_tokens=N_NEW)
    assert middle == tok.decode_infill(GOLDEN_INFILL)
    assert cpu_llm(INFILL_PREFIX + "<FILL_ME>" + INFILL_SUFFIX, max_new_tokens=N_NEW) == \
        INFILL_PREFIX + middle + INFILL_SUFFIX


def test_transformers_generate_agrees(cpu_llm, tmp_path):
    """Independent oracle: the default model converted to HF, greedy-decoded by transformers."""
    transformers = pytest.importorskip("transformers")
    from codellama_ext import convert_to_hf
    convert_to_hf(DEFAULT_MODEL_DIR, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tok = cpu_llm.tokenizer
    for prompt, stop, golden in ((tok.encode_meta(COMPLETE_PROMPT, bos=True, eos=False), tok.eos_id,
                                  GOLDEN_COMPLETE),
                                 (tok.infill_ids(INFILL_PREFIX, INFILL_SUFFIX), tok.eot_id, GOLDEN_INFILL)):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                          eos_token_id=stop, pad_token_id=stop)[0, len(prompt):].tolist()
        assert (out[:out.index(stop)] if stop in out else out) == golden


@pytest.mark.parametrize("command, text", [("infill", INFILL_PREFIX + "<FILL_ME>" + INFILL_SUFFIX),
                                           ("complete", COMPLETE_PROMPT)])
def test_cli_with_only_a_prompt(command, text):
    """`codellama-ext infill TEXT` / `complete PROMPT`, nothing else: the default model on the default device."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "codellama_ext.cli", command, text], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    llm = CodeLlama.from_pretrained(device="cuda" if torch.cuda.is_available() else "cpu", max_seq_len=512,
                                    max_batch_size=1)
    want = llm.infill(text, max_new_tokens=256) if command == "infill" else llm.complete(text, max_new_tokens=256)
    assert run.stdout.rstrip("\n") == want.rstrip("\n")


def test_package_data_includes_the_model(tmp_path):
    """What `pip install .` copies: setuptools' build_py with the package_data of setup.py."""
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, CODELLAMA_CPU_ONLY="1"))
    assert run.returncode == 0, run.stderr
    shipped = sorted(p.name for p in (tmp_path / "codellama_ext" / "default_model").iterdir())
    assert shipped == sorted(p.name for p in DEFAULT_MODEL_DIR.iterdir())


if __name__ == "__main__":
    ids = greedy_ids(CodeLlama.from_pretrained(dtype=torch.float32, max_seq_len=256, max_batch_size=1))
    print(f"GOLDEN_COMPLETE = {ids[0]}\nGOLDEN_INFILL = {ids[1]}")
