"""ModelConfig: the one description of a Llama / Mistral / Qwen2 decoder, read from and
written to a Hugging Face ``config.json``.

The three families differ only by options here (GQA, head_dim, rope variant, sliding
window, qkv bias, tied embeddings), so a single decoder module serves all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from xft_jax.errors import UserError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


class ConfigError(UserError, ValueError):
    """A config.json this project cannot represent faithfully."""


_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim",
             "max_position_embeddings", "sliding_window", "bos_token_id", "pad_token_id")
_FLOAT_KEYS = ("rms_norm_eps", "rope_theta")


def _check_types(d: dict[str, Any], source: str) -> None:
    """A value of the wrong JSON type is named with its file and key here, instead of
    failing later with an error that names neither."""
    for key in _INT_KEYS:
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{source}: {key}={v!r} must be an integer")
        if key not in ("bos_token_id", "pad_token_id") and v is not None and v <= 0 and (
                key != "sliding_window"):
            raise ConfigError(f"{source}: {key}={v!r} must be positive")
    for key in _FLOAT_KEYS:
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{source}: {key}={v!r} must be a number")
    eos = d.get("eos_token_id")
    for v in eos if isinstance(eos, list) else [eos]:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{source}: eos_token_id={eos!r} must be an integer or a list "
                              f"of integers")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Rope scaling as a sorted tuple of (key, value) so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {rope_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def architecture(self) -> str:
        return {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.model_type]

    def hash(self) -> str:
        """Stable short hash, recorded in LoRA checkpoints to catch a base-model mismatch."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ HF reading
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        family = None
        for a in archs:
            if a in SUPPORTED_ARCHITECTURES:
                family = SUPPORTED_ARCHITECTURES[a]
        if family is None and model_type in SUPPORTED_ARCHITECTURES.values() and not archs:
            family = model_type
        if family is None:
            raise ConfigError(
                f"{source}: unsupported architecture {archs or model_type!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")

        def need(key):
            if key not in d:
                raise ConfigError(f"{source}: missing required key {key!r}")
            return d[key]

        _check_types(d, source)

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        if d.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=True is not supported")
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = d.get("head_dim") or hidden // heads

        # Rope: v4 keeps rope_theta + rope_scaling; v5 keeps both in rope_parameters.
        rope_params = d.get("rope_parameters")
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        if isinstance(rope_params, dict) and rope_params:
            if "full_attention" in rope_params or "sliding_attention" in rope_params:
                raise ConfigError(f"{source}: per-layer-type rope_parameters are not supported")
            rope_theta = rope_params.get("rope_theta", rope_theta)
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        rope_scaling = dict(rope_scaling or {})
        if "type" in rope_scaling and "rope_type" not in rope_scaling:
            rope_scaling["rope_type"] = rope_scaling.pop("type")
        rope_scaling.pop("type", None)
        rope_type = rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{source}: rope_scaling type {rope_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)})")
        if rope_type == "default":
            rope_scaling = {}
        for k in ("partial_rotary_factor", "attention_factor"):
            if rope_scaling.get(k) not in (None, 1.0):
                raise ConfigError(f"{source}: rope {k}={rope_scaling[k]} is not supported")

        sliding = None
        if family == "mistral":
            sliding = d.get("sliding_window")
        elif family == "qwen2" and d.get("use_sliding_window"):
            raise ConfigError(f"{source}: Qwen2 use_sliding_window=True is not supported")
        qkv_bias = family == "qwen2" or bool(d.get("attention_bias", False))
        o_bias = family != "qwen2" and bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=tuple(sorted(rope_scaling.items())),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            sliding_window=int(sliding) if sliding else None,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            model_type=family,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: no config.json found")
        with open(file, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file}: not valid JSON ({e})") from e
        return cls.from_hf_dict(d, source=file)

    # ------------------------------------------------------------------ HF writing
    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers v4-style config.json (v5 reads it too)."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict or None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            d["use_sliding_window"] = False
        else:
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = False
        return d

    def save(self, path: str) -> None:
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
