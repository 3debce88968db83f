"""Every command in README.md runs (issue 6: nothing shown there may rot). The set-up, test and CMake commands
are .ci/run's own steps; everything else runs here, verbatim, in a scratch folder where the checkpoint README
names (CodeLlama-7b, a Meta folder) is a tiny random model with a CodeLlama-format tokenizer. One substitution:
`--model_size 7B` is dropped from `convert`, since the stand-in is not 7B (that check has its own tests in
test_cli.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
RUN_BY_CI = ("bash tools/install.sh", "python -m pytest", "cmake ")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def shell_lines() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            if line.startswith("bash tools/install.sh && "):
                line = line.split(" && ", 1)[1]  # the quick start's main job
            if line.strip() and not line.startswith(RUN_BY_CI):
                lines.append(line.replace(" --model_size 7B", ""))
    return lines


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    import sentencepiece as spm
    from checkpoint_fixtures import save_meta, tiny_hf_model
    from tokenizer_fixtures import build_models
    d = tmp_path_factory.mktemp("readme")
    (d / "tokenizers").mkdir()
    tok = build_models(d / "tokenizers")["codellama"]
    vocab = spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()
    model = tiny_hf_model(seed=1, dim=128, n_layers=2, n_heads=2, n_kv_heads=1, vocab=vocab, ffn=384)
    save_meta(model, str(d / "CodeLlama-7b"))
    shutil.copyfile(tok, d / "CodeLlama-7b" / "tokenizer.model")
    bin_dir = d / "bin"  # `codellama-ext` as pip installs it, for checkouts built in place
    bin_dir.mkdir()
    (bin_dir / "codellama-ext").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m codellama_ext.cli "$@"\n')
    (bin_dir / "codellama-ext").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", CUDA_VISIBLE_DEVICES="")
    return d, env


def test_readme_has_the_two_command_quick_start():
    quick = blocks("bash")[0].strip().splitlines()
    assert len(quick) == 2 and quick[0].startswith("bash tools/install.sh && codellama-ext infill ")
    assert quick[1] == "python -m pytest -q tests"
    assert "python -m pytest -q tests" in (ROOT / ".ci" / "run").read_text()


def test_quick_start_prints_what_readme_says(scratch):
    """The quick start's main job on the shipped default model: README says it fills the main guard's call."""
    d, env = scratch
    main_job = blocks("bash")[0].splitlines()[0].split(" && ", 1)[1]
    run = subprocess.run(["bash", "-c", main_job], cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.endswith('if __name__ == "__main__":\n    unittest.main()\n'), run.stdout
    assert "`unittest.main()` under the main guard" in README


def test_memory_total_is_what_readme_says(capsys):
    """README quotes the total of its `memory` command (7B, fp16, 16k context); the command must print it."""
    from codellama_ext.cli import main
    said = re.search(r"7B, fp16, 16k context: ([0-9.]+) GiB in all", README)
    line = next(x for x in shell_lines() if x.startswith("codellama-ext memory "))
    assert said and "--model-size 7B --dtype float16 --context 16384" in line
    assert main(line.split("#")[0].split()[1:]) == 0
    total = float(re.search(r"^\s*total\s+([0-9.]+) GiB$", capsys.readouterr().out, re.M).group(1))
    assert f"{total:.1f}" == said.group(1), (total, said.group(1))


def test_shell_commands(scratch):
    d, env = scratch
    lines = shell_lines()
    assert len(lines) >= 8
    for line in lines:  # in order: the HF -> Meta conversion reads the Meta -> HF output
        run = subprocess.run(["bash", "-c", line], cwd=d, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{line}\n{run.stderr[-2000:]}"


def test_serving_commands(scratch):
    """README's serving block: the server in one terminal, the curl request in another."""
    import json
    import signal
    import time
    d, env = scratch
    serve, request = (line.split("#")[0].strip() for line in blocks("sh")[0].strip().splitlines())
    assert "--port 8000" in serve and "localhost:8000/" in request
    proc = subprocess.Popen(["bash", "-c", f"exec {serve.replace('--port 8000', '--port 0')} --quiet"], cwd=d,
                            env=env, stderr=subprocess.PIPE, text=True)  # port 0: a free one, printed
    try:
        port = re.search(r"on http://[\d.]+:(\d+)", proc.stderr.readline()).group(1)
        request = request.replace("localhost:8000/", f"localhost:{port}/")
        for _ in range(50):  # the line is printed once the socket listens; allow for a slow machine anyway
            run = subprocess.run(["bash", "-c", request], cwd=d, env=env, capture_output=True, text=True,
                                 timeout=120)
            if run.stdout:
                break
            time.sleep(0.2)
        assert json.loads(run.stdout)["choices"][0]["finish_reason"] in ("stop", "length"), run.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_blocks(scratch, index):
    d, env = scratch
    run = subprocess.run([sys.executable, "-c", blocks("python")[index]], cwd=d, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
