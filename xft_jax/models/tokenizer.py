"""Tokenizer loading: transformers AutoTokenizer, never with remote code.

``mistral_v1_tokenizer_dir`` materialises the real Mistral-7B-v0.1 sentencepiece model
shipped inside the ``mistral-common`` package, so the demo and the tests use the true
tokenisation offline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from xft_jax.errors import MissingPathError
from xft_jax.models import gguf_io

_MISTRAL_V1_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": True,
    "model_max_length": 32768,
}


def load_tokenizer(path: str):
    """AutoTokenizer from a directory with tokenizer.json or a sentencepiece tokenizer.model,
    or the tokenizer described by a ``.gguf`` file's metadata."""
    from transformers import AutoTokenizer

    if gguf_io.is_gguf(path):
        return gguf_io.gguf_tokenizer(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"{path}: tokenizer directory not found")
    names = set(os.listdir(path))
    if not names & {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json"}:
        raise MissingPathError(
            f"{path}: no tokenizer.json, tokenizer.model or tokenizer_config.json found")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def mistral_v1_tokenizer_dir(dest: str | None = None) -> str:
    """Writes (once) a tokenizer directory holding Mistral-7B-v0.1's sentencepiece model."""
    import mistral_common

    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: mistral-common does not ship tokenizer.model.v1")
    dest = dest or os.path.join(tempfile.gettempdir(), "xft_jax_mistral_v1_tokenizer")
    if os.path.exists(os.path.join(dest, "tokenizer_config.json")):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(dest)))
    shutil.copyfile(src, os.path.join(tmp, "tokenizer.model"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(_MISTRAL_V1_CONFIG, f, indent=2)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
