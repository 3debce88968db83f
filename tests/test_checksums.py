"""Opt-in checksum verification of Meta folders against their checklist.chk (md5sum output, as Meta's downloads
ship it): load_model / CodeLlama.from_pretrained(verify_checksums=True), `--verify-checksums` on the command line,
and the default model's own list. The lists here are written with hashlib in md5sum's format, independently of
the code under test."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest
import torch

from codellama_ext import CodeLlama
from codellama_ext.api import DEFAULT_MODEL_DIR
from codellama_ext.checkpoint import CHECKLIST, CheckpointError, read_checklist, verify_checklist
from codellama_ext.cli import main
from codellama_ext.model import load_model

from checkpoint_fixtures import save_hf, save_meta, tiny_hf_model

PROMPT = [1, 22, 333, 4, 55, 6, 77, 8]
SHAPE = dict(dim=64, n_heads=4, n_kv_heads=2, vocab=512, ffn=192)


def md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def write_checklist(folder, names=None) -> None:
    names = sorted(n for n in os.listdir(folder) if n != CHECKLIST) if names is None else names
    with open(os.path.join(folder, CHECKLIST), "w") as f:
        f.writelines(f"{md5(os.path.join(folder, n))}  {n}\n" for n in names)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two random checkpoints of equal shapes, Meta folders of 2 shards, each with its checklist.chk."""
    root = tmp_path_factory.mktemp("checksums")
    folders = []
    for seed in (0, 1):
        folder = save_meta(tiny_hf_model(seed=seed, **SHAPE), str(root / f"model{seed}"), mp=2)
        write_checklist(folder)
        folders.append(folder)
    return folders


@pytest.fixture
def good(pair, tmp_path):
    """A private copy of the first checkpoint, free to corrupt."""
    return shutil.copytree(pair[0], tmp_path / "model")


def _logits(folder, **kw):
    return load_model(folder, dtype=torch.float32, max_seq_len=16, **kw).logits(PROMPT)


def test_good_folder_verifies_and_loads_the_same(pair):
    assert verify_checklist(pair[0]) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    torch.testing.assert_close(_logits(pair[0], verify_checksums=True), _logits(pair[0]), rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_corrupt_shard_names_the_file_and_both_md5s(good, damage):
    shard = good / "consolidated.01.pth"
    expected = md5(shard)
    data = bytearray(shard.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2:]
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="consolidated.01.pth") as e:
        load_model(good, verify_checksums=True)
    assert expected in str(e.value) and md5(shard) in str(e.value)
    assert "consolidated.00.pth" not in str(e.value) and "params.json" not in str(e.value)


def test_shards_of_two_checkpoints_are_caught(pair, good):
    """Equal shapes load silently without verification, into a model that is neither checkpoint."""
    shutil.copyfile(os.path.join(pair[1], "consolidated.01.pth"), good / "consolidated.01.pth")
    mixed = _logits(good)
    assert not torch.allclose(mixed, _logits(pair[0])) and not torch.allclose(mixed, _logits(pair[1]))
    with pytest.raises(CheckpointError, match=r"checksum mismatch.*consolidated\.01\.pth"):
        load_model(good, verify_checksums=True)


def test_files_the_loader_reads_must_be_listed(good):
    write_checklist(good, ["consolidated.00.pth", "params.json"])
    with pytest.raises(CheckpointError, match=r"does not list 'consolidated\.01\.pth'"):
        load_model(good, verify_checksums=True)
    write_checklist(good)
    shutil.copyfile(DEFAULT_MODEL_DIR / "tokenizer.model", good / "tokenizer.model")
    with pytest.raises(CheckpointError, match=r"does not list 'tokenizer\.model'"):
        verify_checklist(good)


def test_listed_files_that_are_missing(good):
    with open(good / CHECKLIST, "a") as f:  # files the loader does not read may be absent (Meta lists LICENSE)
        f.write(f"{'0' * 32}  LICENSE\n{'1' * 32}  tokenizer.model\n")
    assert verify_checklist(good) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    os.remove(good / "consolidated.01.pth")  # a shard gone would load as a 1-shard checkpoint
    with pytest.raises(CheckpointError, match=r"'consolidated\.01\.pth' listed in checklist\.chk but missing"):
        verify_checklist(good)


def test_md5sum_formats_are_read(good):
    """md5sum's binary marker, ./ names, upper-case hex, CRLF, trailing blanks and blank lines."""
    a, b, c = (f"{md5(good / n)}" for n in ("consolidated.00.pth", "consolidated.01.pth", "params.json"))
    (good / CHECKLIST).write_bytes(f"\n{a.upper()} *consolidated.00.pth\r\n{b}  ./consolidated.01.pth  \n\n"
                                   f"{c}  params.json\t\n\n".encode())
    assert read_checklist(good / CHECKLIST) == {"consolidated.00.pth": a, "consolidated.01.pth": b,
                                                "params.json": c}
    verify_checklist(good)


@pytest.mark.parametrize("bad_line", ["<!DOCTYPE html>", f"{'a' * 31}  params.json", f"{'a' * 32} params.json",
                                      f"{'g' * 32}  params.json", f"{'a' * 32}  "])
def test_malformed_line_is_named_by_number(good, bad_line):
    lines = (good / CHECKLIST).read_text().splitlines()
    lines.insert(1, bad_line)
    (good / CHECKLIST).write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match=r"checklist\.chk: line 2 is not"):
        load_model(good, verify_checksums=True)


def test_conflicting_entries(good):
    with open(good / CHECKLIST, "a") as f:
        f.write(f"{'0' * 32}  params.json\n")
    with pytest.raises(CheckpointError, match="line 4 lists params.json again"):
        verify_checklist(good)


def test_nothing_to_verify_against(good, tmp_path):
    hf = save_hf(tiny_hf_model(seed=0, **SHAPE), str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="HF folders carry none, so there is nothing to verify against"):
        load_model(hf, verify_checksums=True)
    load_model(hf, max_seq_len=16)  # still loads without verification
    os.remove(good / CHECKLIST)
    with pytest.raises(CheckpointError, match="no checklist.chk .* nothing to verify against"):
        load_model(good, verify_checksums=True)


def test_progress_lines(pair, capsys):
    load_model(pair[0], max_seq_len=16, progress=True, verify_checksums=True)
    err = capsys.readouterr().err
    assert "verifying model0:" in err and "tensors" in err.splitlines()[-1]


# ---- the default model ----
def test_default_model_verifies():
    names = sorted(p.name for p in DEFAULT_MODEL_DIR.iterdir() if p.name != CHECKLIST)
    assert sorted(read_checklist(DEFAULT_MODEL_DIR / CHECKLIST)) == names  # every file, the card included
    assert verify_checklist(DEFAULT_MODEL_DIR) == names
    if shutil.which("md5sum"):  # the list is md5sum's own format
        run = subprocess.run(["md5sum", "--strict", "-c", CHECKLIST], cwd=DEFAULT_MODEL_DIR, capture_output=True,
                             text=True)
        assert run.returncode == 0, run.stdout + run.stderr
    llm = CodeLlama.from_pretrained(dtype=torch.float32, max_seq_len=32, max_batch_size=1, verify_checksums=True)
    assert llm.complete("def f(x):\n", max_new_tokens=2) == \
        CodeLlama.from_pretrained(dtype=torch.float32, max_seq_len=32, max_batch_size=1).complete(
            "def f(x):\n", max_new_tokens=2)


def test_from_pretrained_verifies_before_reading_the_tokenizer(tmp_path):
    folder = shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model")
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match=r"checksum mismatch.*tokenizer\.model"):
        CodeLlama.from_pretrained(folder, verify_checksums=True)


# ---- command line ----
def test_cli_verify_checksums(pair, good, tmp_path, capsys):
    assert main(["complete", "def f(x):", "--max-new-tokens", "2", "--device", "cpu", "--verify-checksums"]) == 0
    out, err = capsys.readouterr()
    assert out and err == ""
    assert main(["convert", "--input_dir", pair[0], "--output_dir", str(tmp_path / "hf"),
                 "--verify-checksums"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    capsys.readouterr()

    data = bytearray((good / "consolidated.00.pth").read_bytes())
    data[-100] ^= 0xFF
    (good / "consolidated.00.pth").write_bytes(bytes(data))
    for argv in (["complete", "def f(x):", "--model", str(good), "--device", "cpu", "--verify-checksums"],
                 ["convert", "--input_dir", str(good), "--output_dir", str(tmp_path / "o"), "--verify-checksums"]):
        assert main(argv) == 1
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1, err
        assert lines[0].startswith("codellama-ext: error: ") and "checksum mismatch" in lines[0]
        assert "consolidated.00.pth" in lines[0]
    assert not (tmp_path / "o").exists()
