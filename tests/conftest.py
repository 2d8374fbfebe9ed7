"""Shared fixtures. Eight fake CPU devices are requested before jax is first imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mistral_tokenizer_dir(tmp_path_factory):
    from xft_jax.models.tokenizer import mistral_v1_tokenizer_dir

    return mistral_v1_tokenizer_dir(str(tmp_path_factory.mktemp("tok") / "mistral_v1"))


@pytest.fixture(scope="session")
def mistral_tokenizer(mistral_tokenizer_dir):
    from xft_jax.models.tokenizer import load_tokenizer

    return load_tokenizer(mistral_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: hf_checkpoint(family, **overrides) -> path of a tiny random HF checkpoint."""
    from tests.hf_fixtures import make_hf_checkpoint

    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def make(family="llama", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_hf_checkpoint(str(root / f"{family}_{len(cache)}"), family,
                                            **overrides)
        return cache[key]

    return make
