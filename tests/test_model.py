"""Model, config and checkpoint tests. Oracle: transformers' LlamaForCausalLM (float32, eager attention) with
random weights, saved as HF folders and as Meta folders with 1, 2 and 4 shards (tests/checkpoint_fixtures.py)."""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch

from codellama_ext.checkpoint import CheckpointError, open_checkpoint
from codellama_ext.config import ConfigError, ModelArgs, PRESETS, ffn_hidden_size, preset
from codellama_ext.model import load_model, resolve_dtype

from checkpoint_fixtures import save_hf, save_meta, tiny_hf_model

# ---------------------------------------------------------------------------------------------------------------
# models and folders (built once per module)

MODELS = {
    # dim 64, head_dim 16, GQA 4 q heads over 2 kv heads, CodeLlama 7B/13B vocabulary
    "gqa": dict(dim=64, n_heads=4, n_kv_heads=2, vocab=32016, ffn=192),
    # dim 128, head_dim 32, no GQA, 34B / Python vocabulary
    "mha": dict(dim=128, n_heads=4, n_kv_heads=4, vocab=32000, ffn=384),
}
FORMATS = ["hf", "hf-sharded", "hf-bin", "meta1", "meta2", "meta4"]


@pytest.fixture(scope="module")
def hf_models():
    return {k: tiny_hf_model(seed=i, **kw) for i, (k, kw) in enumerate(MODELS.items())}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, hf_models):
    cache = {}

    def get(model_key, fmt):
        if (model_key, fmt) not in cache:
            root = tmp_path_factory.mktemp(f"{model_key}-{fmt}")
            m = hf_models[model_key]
            if fmt == "hf":
                save_hf(m, root, "safetensors")
            elif fmt == "hf-sharded":
                save_hf(m, root, "sharded")
            elif fmt == "hf-bin":
                save_hf(m, root, "bin")
            elif fmt == "hf-bf16":
                save_hf(m, root, "safetensors", dtype=torch.bfloat16)
            else:
                save_meta(m, root, mp=int(fmt[-1]))
            cache[model_key, fmt] = str(root)
        return cache[model_key, fmt]
    return get


PROMPT = [1, 822, 3240, 29898, 29876, 1125, 13, 1678, 736, 17, 29900, 31000, 31999, 5, 42, 7]


def _hf_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------
# config


def test_ffn_formula_and_presets():
    assert [PRESETS[f"CodeLlama-{s}"].ffn_hidden for s in ("7b", "13b", "34b", "70b")] == [11008, 13824, 22016,
                                                                                            28672]
    assert ffn_hidden_size(4096, 256, 1.0) == 11008
    assert preset("CodeLlama-34b-Instruct-hf").n_kv_heads == 8
    assert preset("7b-python").vocab_size == 32000 and preset("13b-instruct").vocab_size == 32016
    assert preset("70b-instruct").rope_theta == 1e4 and preset("70b").rope_theta == 1e6
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("CodeLlama-8b")


@pytest.mark.parametrize("name,params", [("CodeLlama-7b", 6_738_546_688), ("CodeLlama-13b", 13_016_028_160),
                                         ("CodeLlama-34b", 33_743_970_304), ("CodeLlama-70b", 68_976_910_336)])
def test_real_sizes_build_on_meta_device(name, params):
    """The real architectures (fused q/k/v and gate/up) on the meta device: parameter counts of the releases."""
    from codellama_ext.model import Transformer
    model = Transformer(PRESETS[name], dtype=torch.bfloat16, device="meta", max_seq_len=16)
    n = sum(b.numel() for k, b in model.named_buffers() if "cache" not in k)
    assert n == params
    a = PRESETS[name]
    assert model.layers[0].wqkv.weight.shape == ((a.n_heads + 2 * a.n_kv_heads) * 128, a.dim)
    assert model.layers[0].w13.weight.shape == (2 * a.ffn_hidden, a.dim)


def test_config_readers(hf_models):
    cfg = hf_models["gqa"].config.to_dict()
    a = ModelArgs.from_hf_config(cfg)
    assert (a.dim, a.n_heads, a.n_kv_heads, a.ffn_hidden, a.vocab_size, a.rope_theta) == (64, 4, 2, 192, 32016, 1e6)
    m = ModelArgs.from_meta_params({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
                                    "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000},
                                   vocab_size=32016)
    assert m == PRESETS["CodeLlama-7b"]
    assert ModelArgs.from_meta_params(m.to_meta_params(), vocab_size=32016) == m


def test_hf_config_rope_parameters():
    """transformers 5.x writes rope_theta inside rope_parameters; reading only the top-level key would silently
    fall back to 1e4 for CodeLlama's 1e6."""
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 192,
            "vocab_size": 32016}
    v5 = dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    assert ModelArgs.from_hf_config(v5).rope_theta == 1e6
    assert ModelArgs.from_hf_config(dict(v5, rope_theta=1e6)).rope_theta == 1e6
    assert ModelArgs.from_hf_config(base).rope_theta == 1e4
    with pytest.raises(ConfigError, match="disagrees with rope_parameters"):
        ModelArgs.from_hf_config(dict(v5, rope_theta=1e4))
    with pytest.raises(ConfigError, match="rope_parameters .* not supported"):
        ModelArgs.from_hf_config(dict(base, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 1e6}))


@pytest.mark.parametrize("params,match", [
    ({"dim": 100, "n_layers": 2, "n_heads": 3}, "must divide dim"),
    ({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 3}, "must divide n_heads"),
    ({"dim": 64, "n_layers": 2, "n_heads": 4, "sliding_window": 3}, "unknown key"),
    ({"dim": 64, "n_heads": 4}, "missing required key 'n_layers'"),
    ({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100}, "disagrees with the checkpoint"),
    # wrong JSON types: a ConfigError naming the key, not a TypeError from the FFN formula or float()
    ({"dim": "64", "n_layers": 2, "n_heads": 4}, "dim must be a positive integer, got '64'"),
    ({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": None}, "multiple_of must be a positive integer"),
    ({"dim": 64, "n_layers": 2, "n_heads": 4, "rope_theta": None}, "rope_theta must be a number, got None"),
    ({"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": "1e-5"}, "norm_eps must be a number"),
    ({"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim_multiplier": "1.3"}, "ffn_dim_multiplier must be a number"),
])
def test_config_errors(params, match):
    with pytest.raises(ConfigError, match=match):
        ModelArgs.from_meta_params(params, vocab_size=32000)


# ---------------------------------------------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("model_key,fmt", [(m, f) for m in MODELS for f in FORMATS
                                           if not (m == "gqa" and f == "meta4")])
def test_float32_logits_match_hf(hf_models, folders, model_key, fmt):
    model = load_model(folders(model_key, fmt), dtype=torch.float32, max_seq_len=64)
    assert model.interleaved == fmt.startswith("meta")
    ours = model.logits(PROMPT)
    ref = _hf_logits(hf_models[model_key], PROMPT)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    err = _rel(ours, ref)
    print(f"{model_key} {fmt}: max rel err {err:.3g}")
    assert err <= 1e-4


@pytest.mark.parametrize("model_key", list(MODELS))
def test_bfloat16_error_within_2x_hf(hf_models, folders, model_key):
    hf = hf_models[model_key]
    ref = _hf_logits(hf, PROMPT).double()
    hf_bf16 = _hf_logits(copy.deepcopy(hf).to(torch.bfloat16), PROMPT).double()  # keep the fixture in fp32
    for fmt in ("hf", "meta2"):
        ours = load_model(folders(model_key, fmt), dtype=torch.bfloat16, max_seq_len=64).logits(PROMPT).double()
        err, base = (ours - ref).abs(), (hf_bf16 - ref).abs()
        print(f"{model_key} {fmt} bf16: max {err.max():.3g} (hf {base.max():.3g}), mean {err.mean():.3g} "
              f"(hf {base.mean():.3g})")
        assert err.max() <= 2 * base.max() + 1e-6 and err.mean() <= 2 * base.mean() + 1e-6


@pytest.mark.parametrize("model_key,fmt", [("gqa", "meta1"), ("mha", "hf")])
def test_greedy_continuation_matches_hf(hf_models, folders, model_key, fmt):
    hf = hf_models[model_key]
    model = load_model(folders(model_key, fmt), dtype=torch.float32, max_seq_len=64)
    prompt, n_new = PROMPT[:7], 32
    ids = list(prompt)
    with torch.no_grad():  # HF greedy with its own KV cache
        out = hf(torch.tensor([prompt]), use_cache=True)
        for _ in range(n_new):
            ids.append(int(out.logits[0, -1].argmax()))
            out = hf(torch.tensor([[ids[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    logits = model.forward(torch.tensor([prompt]), 0)
    ours = list(prompt)
    for step in range(n_new):
        ours.append(int(logits[0, -1].argmax()))
        if step < n_new - 1:
            logits = model.forward(torch.tensor([[ours[-1]]]), len(ours) - 1)
    assert ours == ids
    # the KV-cache path gives the same logits as a fresh full forward
    full = model.logits(ours[:-1])
    assert _rel(logits[0, -1], full[-1]) <= 1e-4


def test_batched_and_packed_forward_match_single(folders):
    model = load_model(folders("gqa", "hf"), dtype=torch.float32, max_seq_len=32, max_batch_size=3)
    a, b = PROMPT[:9], PROMPT[5:14]
    single_a, single_b = model.logits(a), model.logits(b)
    out = model.forward(torch.tensor([a[:6], b[:6]]), 0)  # rectangular prefill, slots 0 and 1
    assert _rel(out[0], single_a[:6]) <= 1e-5 and _rel(out[1], single_b[:6]) <= 1e-5
    # packed chunks of different lengths continuing at different positions, slots given explicitly
    toks = torch.tensor(a[6:9] + b[6:8])
    out = model.forward(toks, torch.tensor([6, 6]), cu_seqlens=torch.tensor([0, 3, 5]), slots=torch.tensor([0, 1]))
    assert _rel(out[:3], single_a[6:9]) <= 1e-5 and _rel(out[3:], single_b[6:8]) <= 1e-5
    # batched decode at different positions
    out = model.forward(torch.tensor([[a[8]], [b[8]]]), torch.tensor([8, 8]))
    assert _rel(out[0, 0], single_a[8]) <= 1e-5 and _rel(out[1, 0], single_b[8]) <= 1e-5
    out = model.forward(torch.tensor([b[8]]), torch.tensor([8]), cu_seqlens=torch.tensor([0, 1]),
                        slots=torch.tensor([1]))
    assert _rel(out[0], single_b[8]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_device_parity(device, tmp_path, dtype):
    """Both layouts on the device (head_dim 64: the CUDA attention kernels take 64 and 128) against HF float32."""
    hf = tiny_hf_model(seed=3, dim=128, n_heads=2, n_kv_heads=1, vocab=32016, ffn=384)
    ref = _hf_logits(hf, PROMPT).double()
    base = None
    if dtype != torch.float32:
        base = (_hf_logits(copy.deepcopy(hf).to(dtype), PROMPT).double() - ref).abs()
    for fmt, path in (("hf", save_hf(hf, tmp_path / "hf")), ("meta1", save_meta(hf, tmp_path / "meta", mp=1))):
        model = load_model(path, device=device, dtype=dtype, max_seq_len=32)
        assert model.device.type == device
        err = (model.logits(PROMPT).cpu().double() - ref).abs()
        print(f"{device} {dtype} {fmt}: max err {err.max():.3g}" + ("" if base is None else f" (hf {base.max():.3g})"))
        if base is None:
            assert err.max() <= 1e-4 * ref.abs().max()
        else:
            assert err.max() <= 2 * base.max() + 1e-6 and err.mean() <= 2 * base.mean() + 1e-6


_MEMORY_PROBE = """
import sys, torch
from codellama_ext.model import Transformer, load_model
def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
peak, orig = [0], Transformer.load_weight
def spy(self, name, t):
    peak[0] = max(peak[0], rss_anon())  # while the converted / merged tensor is alive
    orig(self, name, t)
    peak[0] = max(peak[0], rss_anon())
Transformer.load_weight = spy
before = rss_anon()
model = load_model(sys.argv[1], dtype=torch.float32, max_seq_len=8)
own = sum(b.numel() * b.element_size() for b in model.buffers())
print(peak[0] - before, own)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_load_streams_one_tensor_at_a_time(tmp_path):
    """Host memory grows by the model's own weights plus about one tensor, not by a second copy of the
    checkpoint: bf16 shards (mp 2) merged and converted to float32 one tensor at a time, in a fresh process."""
    import subprocess
    import sys
    hf = tiny_hf_model(seed=4, dim=256, n_layers=8, n_heads=4, n_kv_heads=4, vocab=512, ffn=768)
    path = save_meta(hf, tmp_path / "m", mp=2, dtype=torch.bfloat16)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path)], capture_output=True, text=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert out.returncode == 0, out.stderr
    growth, own = map(int, out.stdout.split()[-2:])
    largest = 768 * 256 * 4
    print(f"model {own / 2**20:.1f} MiB, peak anonymous growth while loading {growth / 2**20:.1f} MiB")
    assert growth <= own + 4 * largest + (8 << 20)


def test_logits_leaves_cache_untouched(folders):
    model = load_model(folders("gqa", "meta2"), dtype=torch.float32, max_seq_len=32)
    model.forward(torch.tensor([PROMPT[:5]]), 0)
    kc = model.k_cache.clone()
    model.logits(PROMPT[7:15])
    assert torch.equal(kc.view(torch.int32), model.k_cache.view(torch.int32))  # bitwise: unwritten rows may be NaN


def test_int8_quantized_close_to_float(folders):
    path = folders("mha", "hf")
    ref = load_model(path, dtype=torch.float32, max_seq_len=32).logits(PROMPT)
    q = load_model(path, dtype=torch.float32, quantize="int8", max_seq_len=32)
    assert q.layers[0].wqkv.qweight.dtype == torch.int8 and q.tok_embeddings.dtype == torch.float32
    err = _rel(q.logits(PROMPT), ref)
    print(f"int8 max rel err {err:.3g}")
    assert err < 0.05


def test_int8_refuses_a_non_finite_weight(tmp_path, hf_models):
    hf = copy.deepcopy(hf_models["mha"])
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[2, 3] = float("nan")
    path = save_hf(hf, tmp_path)
    with pytest.raises(CheckpointError, match=r"'layers\.1\.feed_forward\.w2\.weight'.*weight must be finite"):
        load_model(path, dtype=torch.float32, quantize="int8", max_seq_len=8)


def test_dtype_policy(folders):
    path = folders("gqa", "hf-bf16")
    assert load_model(path, dtype="auto", max_seq_len=8).dtype == torch.bfloat16
    assert load_model(path, dtype=torch.float16, max_seq_len=8).dtype == torch.float16
    assert load_model(path, dtype="float32", max_seq_len=8).dtype == torch.float32
    assert resolve_dtype(None, "cuda", torch.bfloat16) == torch.float16
    assert resolve_dtype(None, "cpu", torch.bfloat16) in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", "cpu", torch.float32)


def test_forward_input_errors(folders):
    model = load_model(folders("gqa", "hf"), dtype=torch.float32, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward(torch.tensor([PROMPT[:9]]), 0)
    with pytest.raises(ValueError, match="cache slots"):
        model.forward(torch.tensor([[1], [2]]), 0)
    with pytest.raises(ValueError, match="token ids"):
        model.forward(torch.tensor([[32016]]), 0)


# ---------------------------------------------------------------------------------------------------------------
# bad checkpoints: each a CheckpointError naming the file and the tensor


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def _edit_json(path, fn):
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _edit_shard(folder, idx, fn):
    f = os.path.join(folder, f"consolidated.{idx:02d}.pth")
    sd = dict(torch.load(f, weights_only=True))
    fn(sd)
    torch.save(sd, f)
    return f


def _edit_safetensors(folder, fn):
    from safetensors.torch import load_file, save_file
    f = os.path.join(folder, "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})
    return f


class _NotATensor:
    pass


def _bad(case, folders, tmp_path):
    if case == "neither":
        (tmp_path / "README").write_text("hi")
        return str(tmp_path), "neither a Meta checkpoint"
    if case == "no params.json":
        d = _copy(folders("gqa", "meta1"), tmp_path / "m")
        os.remove(os.path.join(d, "params.json"))
        return d, "params.json is missing"
    if case == "no config.json":
        d = _copy(folders("gqa", "hf"), tmp_path / "m")
        os.remove(os.path.join(d, "config.json"))
        return d, "config.json is missing"
    if case == "meta missing tensor":
        d = _copy(folders("gqa", "meta2"), tmp_path / "m")
        _edit_shard(d, 1, lambda sd: sd.pop("layers.1.ffn_norm.weight"))
        return d, r"consolidated\.01\.pth: missing tensor\(s\) 'layers\.1\.ffn_norm\.weight'"
    if case == "meta extra tensor":
        d = _copy(folders("gqa", "meta1"), tmp_path / "m")
        _edit_shard(d, 0, lambda sd: sd.__setitem__("layers.0.attention.bias", torch.zeros(3)))
        return d, r"consolidated\.00\.pth: unexpected tensor\(s\) 'layers\.0\.attention\.bias'"
    if case == "meta misnamed tensor":
        d = _copy(folders("gqa", "meta1"), tmp_path / "m")
        _edit_shard(d, 0, lambda sd: sd.__setitem__("layers.0.attention.wqq.weight",
                                                    sd.pop("layers.0.attention.wq.weight")))
        return d, r"'layers\.0\.attention\.wqq\.weight'.*missing.*'layers\.0\.attention\.wq\.weight'.*misnamed"
    if case == "meta wrong shape":
        d = _copy(folders("gqa", "meta2"), tmp_path / "m")
        _edit_shard(d, 1, lambda sd: sd.__setitem__("layers.0.attention.wo.weight", torch.zeros(64, 16)))
        return d, r"consolidated\.01\.pth: tensor 'layers\.0\.attention\.wo\.weight' has shape \[64, 16\]"
    if case == "ffn disagrees":
        d = _copy(folders("gqa", "meta1"), tmp_path / "m")
        _edit_json(os.path.join(d, "params.json"), lambda params: params.update(multiple_of=256))
        return d, r"feed_forward\.w1\.weight' has shape \[192, 64\], expected \[256, 64\].*FFN size 256"
    if case == "shard missing":
        d = _copy(folders("mha", "meta4"), tmp_path / "m")
        for i in (2, 3):
            os.remove(os.path.join(d, f"consolidated.{i:02d}.pth"))
        return d, "found 2 shard file.*4-shard checkpoint"
    if case == "shard gap":
        d = _copy(folders("gqa", "meta2"), tmp_path / "m")
        os.rename(os.path.join(d, "consolidated.01.pth"), os.path.join(d, "consolidated.02.pth"))
        return d, r"consolidated\.02\.pth: unexpected shard name"
    if case == "meta truncated":
        d = _copy(folders("gqa", "meta2"), tmp_path / "m")
        f = os.path.join(d, "consolidated.01.pth")
        os.truncate(f, os.path.getsize(f) // 2)
        return d, r"consolidated\.01\.pth: cannot be read \(truncated"
    if case == "hf truncated":
        d = _copy(folders("gqa", "hf"), tmp_path / "m")
        f = os.path.join(d, "model.safetensors")
        os.truncate(f, os.path.getsize(f) - 1000)
        return d, r"model\.safetensors: cannot be read as safetensors"
    if case == "pickle not tensors":
        d = _copy(folders("gqa", "meta1"), tmp_path / "m")
        torch.save({"tok_embeddings.weight": _NotATensor()}, os.path.join(d, "consolidated.00.pth"))
        return d, r"consolidated\.00\.pth: refused to load"
    if case == "pickle plain object":
        d = _copy(folders("gqa", "meta1"), tmp_path / "m")
        torch.save({"tok_embeddings.weight": [1, 2]}, os.path.join(d, "consolidated.00.pth"))
        return d, r"consolidated\.00\.pth: entry 'tok_embeddings\.weight' is a list, not a tensor"
    if case == "meta unknown dtype":
        d = _copy(folders("gqa", "meta1"), tmp_path / "m")
        _edit_shard(d, 0, lambda sd: sd.__setitem__("norm.weight", sd["norm.weight"].to(torch.int32)))
        return d, r"consolidated\.00\.pth: tensor 'norm\.weight' has dtype torch\.int32"
    if case == "hf unknown dtype":
        d = _copy(folders("gqa", "hf"), tmp_path / "m")
        _edit_safetensors(d, lambda sd: sd.__setitem__("model.norm.weight", sd["model.norm.weight"].to(torch.int64)))
        return d, r"model\.safetensors: tensor 'model\.norm\.weight' has dtype"
    if case == "hf wrong shape":
        d = _copy(folders("gqa", "hf"), tmp_path / "m")
        _edit_safetensors(d, lambda sd: sd.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(190, 64)))
        return d, r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[190, 64\]"
    if case == "hf misnamed":
        d = _copy(folders("gqa", "hf"), tmp_path / "m")
        _edit_safetensors(d, lambda sd: sd.__setitem__("model.layers.0.mlp.upproj.weight",
                                                       sd.pop("model.layers.0.mlp.up_proj.weight")))
        return d, r"model\.safetensors: unexpected.*upproj.*missing.*'model\.layers\.0\.mlp\.up_proj\.weight'"
    if case == "hf index lists missing file":
        d = _copy(folders("gqa", "hf-sharded"), tmp_path / "m")
        idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
        victim = sorted(set(idx["weight_map"].values()))[-1]
        os.remove(os.path.join(d, victim))
        return d, f"lists {victim}, which is missing"
    if case == "hf bad config":
        d = _copy(folders("gqa", "hf"), tmp_path / "m")
        _edit_json(os.path.join(d, "config.json"), lambda cfg: cfg.update(num_key_value_heads=3))
        return d, r"config\.json: n_kv_heads \(3\) must divide n_heads \(4\)"
    if case == "hf config not a number":
        d = _copy(folders("gqa", "hf"), tmp_path / "m")
        _edit_json(os.path.join(d, "config.json"), lambda cfg: cfg.update(rms_norm_eps=None))
        return d, r"config\.json: rms_norm_eps must be a number, got None"
    if case == "meta params not a number":
        d = _copy(folders("gqa", "meta1"), tmp_path / "m")
        _edit_json(os.path.join(d, "params.json"), lambda params: params.update(rope_theta="1e6"))
        return d, r"params\.json: rope_theta must be a number, got '1e6'"
    if case == "hf index weight_map not a dict":
        d = _copy(folders("gqa", "hf-sharded"), tmp_path / "m")
        _edit_json(os.path.join(d, "model.safetensors.index.json"),
                   lambda idx: idx.update(weight_map=sorted(set(idx["weight_map"].values()))))
        return d, r"model\.safetensors\.index\.json: 'weight_map' must map each tensor name to a file name"
    if case == "hf index file name not a string":
        d = _copy(folders("gqa", "hf-sharded"), tmp_path / "m")
        _edit_json(os.path.join(d, "model.safetensors.index.json"),
                   lambda idx: idx["weight_map"].update({"model.norm.weight": None}))
        return d, r"model\.safetensors\.index\.json: 'weight_map' must map each tensor name to a file name"
    raise AssertionError(case)


BAD_CASES = ["neither", "no params.json", "no config.json", "meta missing tensor", "meta extra tensor",
             "meta misnamed tensor", "meta wrong shape", "ffn disagrees", "shard missing", "shard gap",
             "meta truncated", "hf truncated", "pickle not tensors", "pickle plain object", "meta unknown dtype",
             "hf unknown dtype", "hf wrong shape", "hf misnamed", "hf index lists missing file", "hf bad config",
             "hf config not a number", "meta params not a number", "hf index weight_map not a dict",
             "hf index file name not a string"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_checkpoint_raises_clear_error(case, folders, tmp_path):
    path, match = _bad(case, folders, tmp_path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path, dtype=torch.float32, max_seq_len=8)
    print(f"{case}: {info.value}")


def test_open_checkpoint_reads_nothing_eagerly(folders):
    ck = open_checkpoint(folders("gqa", "meta2"))
    assert ck.format == "meta" and ck.layout == "meta" and ck.args.vocab_size == 32016
    names = [n for n, _ in ck.tensors()]
    assert len(names) == len(set(names)) == len(ck) == 1 + 9 * 2 + 2
    assert "rope.freqs" not in names


def test_convert_meta_to_hf_round_trip(hf_models, folders, tmp_path):
    """Meta (2 shards) -> HF folder: transformers loads it and gives bit-identical logits (the q/k permutation
    is exact), and our loader gives the same logits from the Meta and the converted folder."""
    from transformers import LlamaForCausalLM
    from codellama_ext.checkpoint import convert_to_hf
    src = folders("gqa", "meta2")
    out = convert_to_hf(src, tmp_path / "hf", max_shard_bytes=3 << 20)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    back = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    assert torch.equal(_hf_logits(back, PROMPT), _hf_logits(hf_models["gqa"], PROMPT))
    ours_meta = load_model(src, dtype=torch.float32, max_seq_len=32).logits(PROMPT)
    ours_hf = load_model(out, dtype=torch.float32, max_seq_len=32).logits(PROMPT)
    assert _rel(ours_hf, ours_meta) <= 1e-5
    with pytest.raises(CheckpointError, match="already exists"):
        convert_to_hf(src, out)


def test_failed_convert_leaves_nothing(folders, tmp_path, monkeypatch):
    import safetensors.torch
    from codellama_ext.checkpoint import convert_to_hf
    calls = []

    def failing_save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)
    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_to_hf(folders("gqa", "meta1"), tmp_path / "out", max_shard_bytes=3 << 20)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_estimate_memory_matches_allocation(quantize):
    from codellama_ext.model import Transformer, estimate_memory
    a = PRESETS["CodeLlama-34b"]
    model = Transformer(a, dtype=torch.float16, device="meta", max_seq_len=4096, max_batch_size=2, quantize=quantize)
    nbytes = {k: b.numel() * b.element_size() for k, b in model.named_buffers()}
    est = estimate_memory(a, torch.float16, context=4096, batch=2, quantize=quantize)
    assert est["kv_cache"] == nbytes["k_cache"] + nbytes["v_cache"]
    assert est["weights"] == sum(v for k, v in nbytes.items() if "cache" not in k)
    if quantize is None:  # 7B at 16k context in fp16: 12.55 GiB of weights, 8 GiB of cache
        e7 = estimate_memory(PRESETS["CodeLlama-7b"], torch.float16, context=16384)
        assert e7["kv_cache"] == 8 << 30 and abs(e7["weights"] / 2**30 - 12.55) < 0.01


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory read from Linux's /proc")
def test_cpu_kv_cache_takes_memory_as_it_fills():
    # 256 MiB of cache (8 slots x 64k positions) for a 2-layer model: allocated, not touched, until written
    from codellama_ext.model import Transformer

    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden=128)
    before = resident_mib()
    m = Transformer(args, dtype=torch.float32, max_seq_len=65536, max_batch_size=8)
    assert 2 * m.k_cache.numel() * 4 == 256 << 20
    assert resident_mib() - before < 32
    for name, b in m.named_buffers():
        if "cache" not in name:
            b.normal_(0, 0.02)
    first = m.forward(torch.tensor([[1, 2, 3, 4]]))[0, -1]
    assert torch.isfinite(first).all() and resident_mib() - before < 64
    # in another slot, a prefill then a decode step read only what they wrote: the whole prefill's last logits
    m.forward(torch.tensor([1, 2, 3]), [0], cu_seqlens=[0, 3], slots=[5])
    step = m.forward(torch.tensor([4]), [3], cu_seqlens=[0, 1], slots=[5])[-1]
    torch.testing.assert_close(step, first, rtol=1e-5, atol=1e-6)


def test_progress_line_on_request(folders, capsys):
    load_model(folders("gqa", "hf"), dtype=torch.float32, max_seq_len=8, progress=True)
    assert "21/21 tensors" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# loading audit: config defaults, tied embeddings, rope_scaling, pickle formats, dtype range, folder names


def _hf_reference(folder):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def test_hf_config_defaults_match_transformers():
    """Keys a config.json may leave out take LlamaConfig's defaults (rms_norm_eps is 1e-6 there, not Meta's
    1e-5), since transformers runs such a folder with them."""
    from transformers import LlamaConfig
    minimal = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 192,
               "vocab_size": 32016}
    ref = LlamaConfig.from_dict(minimal)
    ours = ModelArgs.from_hf_config(minimal)
    assert ours.norm_eps == ref.rms_norm_eps
    assert ours.rope_theta == ref.rope_theta
    assert ours.n_kv_heads == ref.num_key_value_heads
    assert ref.tie_word_embeddings is False  # ours: tied only when the key says so (Checkpoint.tied)


def test_hf_folder_without_rms_norm_eps_matches_transformers(hf_models, folders, tmp_path):
    d = _copy(folders("gqa", "hf"), tmp_path / "m")
    _edit_json(os.path.join(d, "config.json"), lambda cfg: cfg.pop("rms_norm_eps"))
    ref = _hf_logits(_hf_reference(d), PROMPT)
    assert _rel(load_model(d, dtype=torch.float32, max_seq_len=32).logits(PROMPT), ref) <= 1e-4


@pytest.mark.parametrize("stored_lm_head", [True, False])
def test_tied_embeddings_follow_transformers(folders, tmp_path, stored_lm_head):
    """tie_word_embeddings: transformers uses embed_tokens as the output matrix even when the folder also stores
    an lm_head.weight (here a different, untied one)."""
    d = _copy(folders("gqa", "hf"), tmp_path / "m")
    _edit_json(os.path.join(d, "config.json"), lambda cfg: cfg.update(tie_word_embeddings=True))
    if not stored_lm_head:
        _edit_safetensors(d, lambda sd: sd.pop("lm_head.weight"))
    ref = _hf_logits(_hf_reference(d), PROMPT)
    ours = load_model(d, dtype=torch.float32, max_seq_len=32).logits(PROMPT)
    assert _rel(ours, ref) <= 1e-4


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 4.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
                                     "linear"])
def test_hf_rope_scaling_refused(folders, tmp_path, scaling):
    """A scaled RoPE changes every rotary angle; running it as plain RoPE would be silently wrong."""
    d = _copy(folders("gqa", "hf"), tmp_path / "m")
    _edit_json(os.path.join(d, "config.json"), lambda cfg: cfg.update(rope_scaling=scaling))
    with pytest.raises(CheckpointError, match=r"config\.json: rope_scaling .* is not supported"):
        load_model(d, dtype=torch.float32, max_seq_len=8)


def test_hf_rope_scaling_default_loads_like_transformers(folders, tmp_path):
    d = _copy(folders("gqa", "hf"), tmp_path / "m")
    _edit_json(os.path.join(d, "config.json"), lambda cfg: cfg.update(rope_scaling={"rope_type": "default"}))
    ref = _hf_logits(_hf_reference(d), PROMPT)
    assert _rel(load_model(d, dtype=torch.float32, max_seq_len=32).logits(PROMPT), ref) <= 1e-4


def test_legacy_torch_save_format_loads(hf_models, folders, tmp_path):
    """Files from torch.save(_use_new_zipfile_serialization=False) cannot be memory-mapped; they are read with
    weights_only=True instead of failing as "truncated or corrupt"."""
    d = _copy(folders("gqa", "meta2"), tmp_path / "m")
    for i in range(2):
        f = os.path.join(d, f"consolidated.{i:02d}.pth")
        torch.save(torch.load(f, weights_only=True), f, _use_new_zipfile_serialization=False)
    ours = load_model(d, dtype=torch.float32, max_seq_len=32).logits(PROMPT)
    assert _rel(ours, _hf_logits(hf_models["gqa"], PROMPT)) <= 1e-4


class _Payload:
    """Unpickling this creates a folder: the test checks it never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.mark.parametrize("writer", ["zip", "legacy", "raw pickle"])
@pytest.mark.parametrize("fmt", ["meta1", "hf-bin"])
def test_malicious_pickle_never_runs(folders, tmp_path, fmt, writer):
    d = _copy(folders("gqa", fmt), tmp_path / "m")
    f = os.path.join(d, "consolidated.00.pth" if fmt == "meta1" else "pytorch_model.bin")
    marker = str(tmp_path / "payload-ran")
    obj = {"tok_embeddings.weight": _Payload(marker)}
    if writer == "raw pickle":
        with open(f, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)  # torch.save's protocol: no protocol warning
    else:
        torch.save(obj, f, _use_new_zipfile_serialization=writer == "zip")
    with pytest.raises(CheckpointError, match=rf"{os.path.basename(f)}: refused to load"):
        load_model(d, dtype=torch.float32, max_seq_len=8)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("fmt", ["meta2", "hf"])
def test_float16_overflow_is_an_error(hf_models, folders, tmp_path, fmt):
    """A stored weight beyond float16's range (65504) would become inf when loaded as float16 (and give an inf
    int8 scale); bfloat16 and float32 hold it."""
    d = _copy(folders("gqa", fmt), tmp_path / "m")
    big = 2.0 ** 17  # exact in bfloat16 and float32
    if fmt == "meta2":
        f = _edit_shard(d, 1, lambda sd: sd["layers.1.feed_forward.w2.weight"].__setitem__((0, 0), big))
        name = "layers.1.feed_forward.w2.weight"
    else:
        f = _edit_safetensors(d, lambda sd: sd["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), big))
        name = "layers.1.feed_forward.w2.weight"
    for quantize in (None, "int8"):
        with pytest.raises(CheckpointError, match=rf"{os.path.basename(f)}: tensor '{name}' holds values up to "
                                                  r"1\.311e\+05, beyond torch\.float16's range"):
            load_model(d, dtype=torch.float16, max_seq_len=8, quantize=quantize)
    for dt in (torch.bfloat16, torch.float32):
        w2 = load_model(d, dtype=dt, max_seq_len=8).layers[1].w2.weight
        assert torch.isfinite(w2).all() and w2.abs().max().item() == big


@pytest.mark.parametrize("fmt", ["meta2", "hf"])
def test_folder_name_with_glob_characters(hf_models, folders, tmp_path, fmt):
    """A folder name with "[v1]" in it: unescaped, glob read it as a character class, found no weight file and
    reported the folder as empty."""
    d = _copy(folders("gqa", fmt), tmp_path / "CodeLlama-7b [v1]")
    ours = load_model(d, dtype=torch.float32, max_seq_len=32).logits(PROMPT)
    assert _rel(ours, _hf_logits(hf_models["gqa"], PROMPT)) <= 1e-4


def test_meta_eight_shards_one_kv_head_each(tmp_path):
    """The 70B layout (SPEC §1.6): 8 kv heads over 8 shards, so each shard's wk/wv holds one kv head
    ([head_dim, dim]) while wq holds n_heads / 8 heads."""
    hf = tiny_hf_model(seed=7, dim=128, n_layers=1, n_heads=16, n_kv_heads=8, vocab=32016, ffn=384)
    d = save_meta(hf, tmp_path / "m", mp=8)
    shard = torch.load(os.path.join(d, "consolidated.07.pth"), weights_only=True)
    assert shard["layers.0.attention.wk.weight"].shape == (128 // 16, 128)
    assert shard["layers.0.attention.wq.weight"].shape == (2 * 128 // 16, 128)
    assert shard["tok_embeddings.weight"].shape == (32016, 128 // 8)
    ours = load_model(d, dtype=torch.float32, max_seq_len=32).logits(PROMPT)
    assert _rel(ours, _hf_logits(hf, PROMPT)) <= 1e-4


@pytest.mark.parametrize("variant", [{}, {"ffn_dim_multiplier": None}, {"ffn_dim_multiplier": 1.0},
                                     {"ffn_dim_multiplier": 1.3, "multiple_of": 4096}, {"vocab_size": -1},
                                     {"vocab_size": 32016}, {"n_kv_heads": None}, {"n_kv_heads": 8},
                                     {"rope_theta": 10000}, {"norm_eps": 1e-6}, {"multiple_of": 64}])
def test_meta_params_variants(variant):
    """SPEC §1.2 params.json variants against the rules written out here: absent keys take Meta's ModelArgs
    defaults, n_kv_heads None = n_heads, vocab from the embedding, FFN from §1.3."""
    import math
    params = {"dim": 8192, "n_layers": 2, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 256,
              "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000}
    params.update(variant)
    a = ModelArgs.from_meta_params(params, vocab_size=32016)
    mult, mo = params.get("ffn_dim_multiplier"), params.get("multiple_of", 256)
    h = int(2 * 4 * 8192 / 3)
    if mult is not None:
        h = int(mult * h)
    assert a.ffn_hidden == mo * math.ceil(h / mo)
    assert a.n_kv_heads == (params["n_kv_heads"] or 64)
    assert (a.vocab_size, a.norm_eps, a.rope_theta) == (32016, params["norm_eps"], params["rope_theta"])
    del params["rope_theta"], params["norm_eps"], params["multiple_of"]
    b = ModelArgs.from_meta_params(params, vocab_size=32016)
    assert (b.rope_theta, b.norm_eps, b.multiple_of) == (10000, 1e-5, 256)
