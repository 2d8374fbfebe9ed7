"""A local xft_jax checkpoint as an ensemble annotator: greedy KV-cache answers equal the
uncached reference decoding, are deterministic, cached, and counted (never guessed) when
malformed."""

import os
import shutil

import numpy as np
import pytest
from flax import nnx

from xft_jax.models import generation
from xft_jax.data import annotation, local_annotator, synthetic
from xft_jax.models import ModelConfig, hf_io
from xft_jax.models.decoder import Decoder

NEW = 6


@pytest.fixture(scope="module")
def local_ckpt(tmp_path_factory, mistral_tokenizer_dir):
    cfg = ModelConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, model_type="mistral",
                      tie_word_embeddings=True, sliding_window=4096)
    path = str(tmp_path_factory.mktemp("local") / "tiny")
    hf_io.save_pretrained(Decoder(cfg, rngs=nnx.Rngs(3)), path)
    for f in os.listdir(mistral_tokenizer_dir):
        shutil.copy(os.path.join(mistral_tokenizer_dir, f), path)
    return path


def test_answer_equals_uncached_greedy_and_is_deterministic(local_ckpt):
    ann = local_annotator.from_config({"type": "local", "name": "tiny", "path": local_ckpt,
                                       "max_new_tokens": NEW})
    msgs = [{"role": "system", "content": "You rate responses."},
            {"role": "user", "content": "Rate this: hello there. Answer with a score."}]
    ids = ann.prompt_ids(msgs)
    assert ids[0] == 1 and ann._tok.decode(ids).endswith("Assistant:")
    text = ann.complete(msgs)
    assert isinstance(text, str) and text == ann.complete(msgs)
    m = ann._decoder
    ref = generation.greedy_uncached(m.params(), m.config, np.asarray([ids]),
                                     np.ones((1, len(ids)), np.int32), NEW,
                                     opts=m.forward_options())[0].tolist()
    eos = ann._tok.eos_token_id
    ref = ref[:ref.index(eos) + 1] if eos in ref else ref
    assert text == ann._tok.decode([t for t in ref if t != eos], skip_special_tokens=True)


def test_config_errors_name_the_field(local_ckpt):
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['api_key'\]"):
        local_annotator.from_config({"type": "local", "name": "x", "path": local_ckpt,
                                     "api_key": "secret"})
    with pytest.raises(ValueError, match=r"missing field\(s\) \['path'\]"):
        local_annotator.from_config({"type": "local", "name": "x"})


def test_in_the_ensemble_malformed_counted_and_cached(local_ckpt, tmp_path):
    ann = local_annotator.LocalAnnotator("tiny", local_ckpt, max_new_tokens=NEW)
    convs = synthetic.conversations(1, seed=2)
    cache = annotation.AnswerCache(str(tmp_path / "cache.sqlite"))
    rated, rep = annotation.annotate(convs, [ann], cache, concurrency=3)
    n = 3 * 4  # axes x prompt variants
    assert rep.requests == n and ann.calls == n
    # a random model writes no parseable score: every answer is counted, none guessed
    assert sum(rep.malformed.values()) == n and rated == []
    again, rep2 = annotation.annotate(convs, [ann], cache)
    assert rep2.requests == 0 and rep2.cache_hits == n and ann.calls == n
    cache.close()
