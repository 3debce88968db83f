"""Model hyper-parameters: `ModelArgs`, read from Meta's params.json or HF's config.json, and presets.

Facts: SPEC.md §1.2 (params.json keys), §1.3 (FFN size formula), §5.1 (HF config.json).
`max_seq_len` / `max_batch_size` are runtime arguments of `load_model`, not model hyper-parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any


class ConfigError(ValueError):
    """An unknown, missing or inconsistent value in params.json / config.json (or in ModelArgs)."""


def ffn_hidden_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward size (SPEC §1.3): int(2 * 4dim / 3), times the multiplier, rounded up to multiple_of."""
    h = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """CodeLlama / Llama-2 architecture. `ffn_hidden` is the SwiGLU inner size F; vocab_size -1 = not known yet."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    ffn_hidden: int | None = None  # None: from Meta's formula with multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_hidden is None:
            self._check_positive_ints("dim", "multiple_of")  # before the formula computes with them
            object.__setattr__(self, "ffn_hidden",
                               ffn_hidden_size(self.dim, self.multiple_of, self.ffn_dim_multiplier))
        self.validate()

    # ---- derived ----
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def _check_positive_ints(self, *names: str) -> None:
        for name in names:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"ModelArgs.{name} must be a positive integer, got {v!r}")

    def validate(self) -> None:
        self._check_positive_ints("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "multiple_of")
        if self.dim % self.n_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must divide dim ({self.dim})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = dim / n_heads must be even for rotary embeddings, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if not (isinstance(self.vocab_size, int) and (self.vocab_size > 0 or self.vocab_size == -1)):
            raise ConfigError(f"vocab_size must be a positive integer (or -1: unknown), got {self.vocab_size!r}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    # ---- readers ----
    @classmethod
    def from_meta_params(cls, params: dict[str, Any] | str | os.PathLike,
                         vocab_size: int | None = None) -> "ModelArgs":
        """From params.json (a dict or a path). `vocab_size` (tokenizer / embedding rows) fills a missing or -1 value
        and must agree with a positive one. Keys are Meta's ModelArgs fields (SPEC §1.2); unknown keys are errors,
        max_batch_size / max_seq_len are ignored (runtime arguments)."""
        where = "params.json"
        if not isinstance(params, dict):
            where = os.fspath(params)
            params = _read_json(where)
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope_theta"}
        runtime = {"max_batch_size", "max_seq_len"}
        unknown = sorted(set(params) - known - runtime)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; Meta's ModelArgs accepts {sorted(known | runtime)}")
        kw = {k: v for k, v in params.items() if k in known}
        for req in ("dim", "n_layers", "n_heads"):
            if req not in kw:
                raise ConfigError(f"{where}: missing required key {req!r}")
        kw["vocab_size"] = _resolve_vocab(where, kw.get("vocab_size", -1), vocab_size)
        for k in ("norm_eps", "rope_theta"):
            if k in kw:
                kw[k] = _number(where, k, kw[k])
        if kw.get("ffn_dim_multiplier") is not None:
            kw["ffn_dim_multiplier"] = _number(where, "ffn_dim_multiplier", kw["ffn_dim_multiplier"])
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | os.PathLike,
                       vocab_size: int | None = None) -> "ModelArgs":
        """From an HF LlamaForCausalLM config.json (a dict or a path), SPEC §5.1."""
        where = "config.json"
        if not isinstance(config, dict):
            where = os.fspath(config)
            config = _read_json(where)
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"{where}: model_type must be 'llama', got {model_type!r}")
        for req in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if req not in config:
                raise ConfigError(f"{where}: missing required key {req!r}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act must be 'silu', got {act!r}")
        scaling = config.get("rope_scaling")
        if scaling not in (None, {}) and not (isinstance(scaling, dict)
                                              and scaling.get("rope_type", scaling.get("type")) == "default"):
            # linear / dynamic / yarn ... change the rotary angles; running them as plain RoPE would be silently wrong
            raise ConfigError(f"{where}: rope_scaling {scaling!r} is not supported (CodeLlama has none; only "
                              f"null or rope_type 'default' can be loaded)")
        rope_theta = _hf_rope_theta(where, config)
        for k in ("attention_bias", "mlp_bias"):
            if config.get(k):
                raise ConfigError(f"{where}: {k}=true is not supported (CodeLlama has no biases)")
        hd = config.get("head_dim")
        if hd is not None and hd * config["num_attention_heads"] != config["hidden_size"]:
            raise ConfigError(f"{where}: head_dim {hd} * num_attention_heads {config['num_attention_heads']} "
                              f"!= hidden_size {config['hidden_size']}")
        kw = dict(dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
                  n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads"),
                  ffn_hidden=config["intermediate_size"],
                  vocab_size=_resolve_vocab(where, config.get("vocab_size") or -1, vocab_size),
                  # LlamaConfig's default, not Meta's 1e-5: transformers runs a config without the key at 1e-6
                  norm_eps=_number(where, "rms_norm_eps", config.get("rms_norm_eps", 1e-6)),
                  rope_theta=rope_theta)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_meta_params(self) -> dict[str, Any]:
        """params.json content; ffn_dim_multiplier / multiple_of reproduce ffn_hidden via the formula."""
        p: dict[str, Any] = {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads}
        if self.n_kv_heads != self.n_heads:
            p["n_kv_heads"] = self.n_kv_heads
        p.update(multiple_of=self.multiple_of, ffn_dim_multiplier=self.ffn_dim_multiplier,
                 norm_eps=self.norm_eps, rope_theta=self.rope_theta)
        if p["ffn_dim_multiplier"] is None:
            del p["ffn_dim_multiplier"]
        if ffn_hidden_size(self.dim, self.multiple_of, self.ffn_dim_multiplier) != self.ffn_hidden:
            raise ConfigError(f"ffn_hidden {self.ffn_hidden} is not produced by multiple_of {self.multiple_of} and "
                              f"ffn_dim_multiplier {self.ffn_dim_multiplier}: cannot write params.json")
        return p

    def to_hf_config(self) -> dict[str, Any]:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "hidden_size": self.dim, "intermediate_size": self.ffn_hidden,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
                "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                "max_position_embeddings": 16384 if self.rope_theta > 10000 else 4096,
                "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "rope_scaling": None,
                "pretraining_tp": 1, "attention_bias": False, "mlp_bias": False}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _hf_rope_theta(where: str, config: dict[str, Any]) -> float:
    """rope_theta of an HF config.json: top-level (transformers 4.x) or in rope_parameters (5.x writes
    {"rope_type": "default", "rope_theta": ...} there instead). A scaled RoPE is refused, never ignored."""
    theta = config.get("rope_theta")
    rp = config.get("rope_parameters")
    if rp not in (None, {}):
        if not isinstance(rp, dict) or rp.get("rope_type", "default") != "default":
            raise ConfigError(f"{where}: rope_parameters {rp!r} is not supported (CodeLlama uses the default RoPE)")
        if "rope_theta" in rp:
            inner = _number(where, "rope_parameters.rope_theta", rp["rope_theta"])
            if theta is not None and _number(where, "rope_theta", theta) != inner:
                raise ConfigError(f"{where}: rope_theta {theta} disagrees with rope_parameters.rope_theta "
                                  f"{rp['rope_theta']}")
            theta = inner
    return 10000.0 if theta is None else _number(where, "rope_theta", theta)


def _number(where: str, key: str, value: Any) -> float:
    """A JSON number as a float; anything else (a string, null) is a ConfigError naming the file and the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _resolve_vocab(where: str, declared: Any, observed: int | None) -> int:
    if declared is None:
        declared = -1
    if not isinstance(declared, int) or isinstance(declared, bool):
        raise ConfigError(f"{where}: vocab_size must be an integer, got {declared!r}")
    if observed is None:
        return declared
    if declared > 0 and declared != observed:
        raise ConfigError(f"{where}: vocab_size {declared} disagrees with the checkpoint's embedding rows ({observed})")
    return observed


# ---- presets (SPEC §1.2, §5.1) ----
def _preset(dim, n_layers, n_heads, n_kv_heads, vocab, theta=1e6, multiple_of=256, mult=1.0):
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                     multiple_of=multiple_of, ffn_dim_multiplier=mult, norm_eps=1e-5, rope_theta=theta)


PRESETS: dict[str, ModelArgs] = {
    "CodeLlama-7b": _preset(4096, 32, 32, 32, 32016),
    "CodeLlama-7b-Python": _preset(4096, 32, 32, 32, 32000),
    "CodeLlama-7b-Instruct": _preset(4096, 32, 32, 32, 32016),
    "CodeLlama-13b": _preset(5120, 40, 40, 40, 32016),
    "CodeLlama-13b-Python": _preset(5120, 40, 40, 40, 32000),
    "CodeLlama-13b-Instruct": _preset(5120, 40, 40, 40, 32016),
    "CodeLlama-34b": _preset(8192, 48, 64, 8, 32000),
    "CodeLlama-34b-Python": _preset(8192, 48, 64, 8, 32000),
    "CodeLlama-34b-Instruct": _preset(8192, 48, 64, 8, 32000),
    # 70B: FFN 28672 from multiple_of 4096, multiplier 1.3 (SPEC §1.2). Python's theta is [U] in SPEC; taken as
    # Instruct's (README: the 70B Python and Instruct models do not support 100k contexts).
    "CodeLlama-70b": _preset(8192, 80, 64, 8, 32016, multiple_of=4096, mult=1.3),
    "CodeLlama-70b-Python": _preset(8192, 80, 64, 8, 32016, theta=1e4, multiple_of=4096, mult=1.3),
    "CodeLlama-70b-Instruct": _preset(8192, 80, 64, 8, 32016, theta=1e4, multiple_of=4096, mult=1.3),
}

# Meta shard counts (SPEC §1.1) per size.
SHARDS = {"7b": 1, "13b": 2, "34b": 4, "70b": 8}


def preset(name: str) -> ModelArgs:
    """Preset by name, case-insensitive, with or without "-hf" (e.g. "CodeLlama-34b-Instruct-hf", "7b-python")."""
    key = name.strip().lower().removesuffix("-hf")
    if not key.startswith("codellama-"):
        key = "codellama-" + key
    for k, v in PRESETS.items():
        if k.lower() == key:
            return v
    raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
