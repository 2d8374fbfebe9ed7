"""Target variants: label first, pseudo-explanations keep vocabulary and length only."""

import collections

import numpy as np
import pytest

from xft_jax.data import synthetic
from xft_jax.data.targets import (TARGET_VARIANTS, ExplanationVocab, make_target,
                                  target_length_stats)


@pytest.fixture(scope="module")
def examples():
    return synthetic.generate(200, seed=0)


def test_label_only_and_explanation(examples):
    ex = examples[0]
    label = ex.label("naturalness")
    assert make_target(ex, "naturalness", "label_only") == f"Rating: {label}"
    assert make_target(ex, "naturalness", "explanation") == (
        f"Rating: {label}\nExplanation: {ex.explanation('naturalness')}")


def test_pseudo_variants(examples):
    vocab = ExplanationVocab.from_examples(examples, "comprehensiveness")
    for ex in examples[:50]:
        label = ex.label("comprehensiveness")
        words = ex.explanation("comprehensiveness").split()
        out = {v: make_target(ex, "comprehensiveness", v, seed=7, vocab=vocab)
               for v in TARGET_VARIANTS}
        for v, text in out.items():  # the label is always first, same prefix
            assert text.startswith(f"Rating: {label}")
        bodies = {v: t.split("\nExplanation: ", 1)[1].split(" ") for v, t in out.items()
                  if v != "label_only"}
        assert sorted(bodies["shuffled"]) == sorted(words)
        assert set(bodies["bag_of_words"]) <= set(words)
        assert set(bodies["random_vocab"]) <= set(vocab.words)
        assert {len(b) for b in bodies.values()} == {len(words)}
    # shuffled really reorders long explanations; seeded and reproducible
    long = [ex for ex in examples if len(ex.explanation("on_topic").split()) > 12]
    shuffled = [make_target(ex, "on_topic", "shuffled", seed=1) for ex in long]
    assert sum(s.endswith(ex.explanation("on_topic")) for s, ex in zip(shuffled, long)) == 0
    assert shuffled == [make_target(ex, "on_topic", "shuffled", seed=1) for ex in long]
    assert shuffled != [make_target(ex, "on_topic", "shuffled", seed=2) for ex in long]


def test_random_vocab_samples_by_frequency(examples):
    vocab = ExplanationVocab.from_texts(["a a a a a a a a a b"] * 10)
    drawn = collections.Counter(vocab.sample(np.random.default_rng(0), 5000))
    assert 0.85 < drawn["a"] / 5000 < 0.95
    with pytest.raises(ValueError, match="random_vocab needs vocab"):
        make_target(examples[0], "on_topic", "random_vocab")
    with pytest.raises(ValueError, match="unknown target variant"):
        make_target(examples[0], "on_topic", "summary")


def test_length_stats_per_variant(examples, mistral_tokenizer):
    stats = target_length_stats(examples, "naturalness", tokenizer=mistral_tokenizer)
    assert set(stats) == set(TARGET_VARIANTS)
    assert stats["label_only"]["words"]["max"] == 2
    assert stats["label_only"]["tokens"]["max"] == 4  # ▁Rating : ▁ d
    for v in ("shuffled", "bag_of_words", "random_vocab"):
        assert stats[v]["words"] == stats["explanation"]["words"]
    assert stats["explanation"]["tokens"]["mean"] > stats["label_only"]["tokens"]["mean"] + 5
