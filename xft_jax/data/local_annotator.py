"""A local xft_jax checkpoint as an annotator of the LLM ensemble.

The chat messages are rendered with the tokenizer's chat template (or, for a tokenizer
without one, as a plain "User: ... / Assistant:" transcript), then decoded with the jitted
KV-cache generator. The model is loaded once and shared by the annotation pool's threads;
one request runs at a time, so answers are the same whatever the concurrency. Prompt
lengths are bucketed to powers of two so few shapes compile.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from xft_jax import lora as lora_lib
from xft_jax.data.openai_client import AnnotatorError
from xft_jax.models import generation, hf_io
from xft_jax.models.tokenizer import load_tokenizer

LOCAL_FIELDS = {"type", "name", "path", "adapter", "tokenizer", "dtype", "max_new_tokens",
                "max_prompt_len", "temperature", "top_p", "seed"}


class LocalAnnotator:
    """``complete(messages) -> str`` from a HF safetensors checkpoint (+ PEFT adapter)."""

    url = None
    api_key_env = None

    def __init__(self, name: str, path: str, *, adapter: str | None = None,
                 tokenizer: str | None = None, dtype: str = "float32",
                 max_new_tokens: int = 128, max_prompt_len: int = 4096,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 model=None, tokenizer_obj=None):
        if not name or "/" in name:
            raise ValueError(f"annotator name {name!r} must be non-empty without '/'")
        self.name, self.model = name, path
        self.max_new_tokens, self.max_prompt_len = int(max_new_tokens), int(max_prompt_len)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self._decoder = model if model is not None else hf_io.load_pretrained(
            path, dtype=jnp.dtype(dtype))
        if adapter:
            lora_lib.load_peft_adapter(self._decoder, adapter)
        self._tok = tokenizer_obj if tokenizer_obj is not None else load_tokenizer(
            tokenizer or path)
        self._key = jax.random.key(seed)
        self._lock = threading.Lock()
        self._fns: dict[int, object] = {}
        self.calls = 0

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        tok = self._tok
        if getattr(tok, "chat_template", None):
            # The rendered template carries its own special tokens; the tokenizer adds none.
            text = tok.apply_chat_template(messages, add_generation_prompt=True,
                                           tokenize=False)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
        return list(tok(text + "\n\nAssistant:", add_special_tokens=True)["input_ids"])

    def _generate_fn(self, bucket: int):
        if bucket not in self._fns:
            m = self._decoder
            self._fns[bucket] = generation.make_generate_fn(
                m.config, m.forward_options(), max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, top_p=self.top_p,
                eos_id=self._tok.eos_token_id, pad_id=0)
        return self._fns[bucket]

    def complete(self, messages: list[dict]) -> str:
        ids = self.prompt_ids(messages)
        if len(ids) > self.max_prompt_len:
            raise AnnotatorError(f"{self.name}: prompt of {len(ids)} tokens exceeds "
                                 f"max_prompt_len={self.max_prompt_len}", "prompt too long")
        bucket = max(64, 1 << (len(ids) - 1).bit_length())
        prompt = np.zeros((1, bucket), np.int32)
        mask = np.zeros((1, bucket), np.int32)
        prompt[0, bucket - len(ids):] = ids          # left-padded
        mask[0, bucket - len(ids):] = 1
        with self._lock:
            self.calls += 1
            key = jax.random.fold_in(self._key, self.calls)
            out = self._generate_fn(bucket)(self._decoder.params(), self._decoder.lora_params(),
                                           jnp.asarray(prompt), jnp.asarray(mask), key)
            tokens = np.asarray(out["tokens"][0])[: int(out["lengths"][0])]
        eos = self._tok.eos_token_id
        return self._tok.decode([t for t in tokens.tolist() if t != eos],
                                skip_special_tokens=True)


def from_config(cfg: dict) -> LocalAnnotator:
    """A local annotator from an annotators.json entry with ``"type": "local"``."""
    unknown = sorted(set(cfg) - LOCAL_FIELDS)
    if unknown:
        raise ValueError(f"annotator {cfg.get('name')!r}: unknown field(s) {unknown}")
    missing = [k for k in ("name", "path") if k not in cfg]
    if missing:
        raise ValueError(f"annotator config {cfg}: missing field(s) {missing}")
    kwargs = {k: v for k, v in cfg.items() if k not in ("type", "name", "path")}
    return LocalAnnotator(cfg["name"], cfg["path"], **kwargs)
