"""The demo's corpus from real chitchat turns: deterministic, one chat per split, labels that
follow the degradations, explanations that name specifics of the item, bad files named."""

import json
import subprocess
import sys

import numpy as np
import pytest

from xft_jax.data import chitchat_degraded as cd
from xft_jax.data import sources, splits
from xft_jax.data.readers import DataError
from xft_jax.data.schema import AXES

N = 240


@pytest.fixture(scope="module")
def items():
    return cd.generate(N, seed=0)


def test_items_are_real_chitchat_turns_and_deterministic(items):
    chats = {c.id.split(":", 1)[1]: c for c in sources.load_source("chitchat")}
    real_turns = {t for c in chats.values() for _, t in c.context + (("", c.response),)}
    for ex in items[:40]:
        key = ex.id.split(":", 1)[1].split("#")[0]
        assert key in chats                                   # an existing chat
        assert all(t in real_turns for _, t in ex.conversation.context)   # real context
        assert ex.conversation.source == cd.SOURCE
    again = cd.generate(20, seed=0)
    assert [e.to_dict() for e in again] == [e.to_dict() for e in items[:20]]  # prefix-stable
    other = cd.generate(20, seed=1)
    assert [e.id for e in other] != [e.id for e in items[:20]]


def test_a_chat_never_spans_two_splits(items):
    parts = splits.sample_split(items + cd.generate(N + 40, seed=0)[N:])
    train_keys = {splits.split_key(e.id) for e in parts["train"]}
    test_keys = {splits.split_key(e.id) for e in parts["test"]}
    assert not train_keys & test_keys and parts["test"]


def test_labels_follow_the_degradation_levels(items):
    levels = cd.true_levels(N, seed=0)
    for axis in AXES:
        lab = np.array([e.ratings[axis].label for e in items])
        lev = np.array([lv[axis] for lv in levels])
        assert np.corrcoef(lab, lev)[0, 1] > 0.8, axis       # noisy annotators, real signal
        assert len(set(lab)) == 5
    for ex, lv in zip(items, levels):
        if lv["naturalness"] == 5 and lv["on_topic"] == 5 and lv["comprehensiveness"] == 5:
            assert any(ex.conversation.response == t for t in _all_turns())  # untouched


def _all_turns():
    return {c.response for c in sources.load_source("chitchat")} | {
        t for c in sources.load_source("chitchat") for _, t in c.context}


def test_explanations_name_specifics_of_the_item(items):
    levels = cd.true_levels(N, seed=0)
    named = 0
    for ex, lv in zip(items, levels):
        text = ex.ratings["naturalness"].explanation
        if lv["naturalness"] == 4:
            # the misspelt word the annotators name is in the response, in place of the
            # word it stands for
            bad, good = text.split('slips: "')[1].split('"')[0], text.split('for "')[1].split('"')[0]
            assert bad in ex.conversation.response.split() and bad != good
            named += 1
        if lv["on_topic"] < 5 and lv["on_topic"] > 1:
            assert "comes from another chat" in ex.ratings["on_topic"].explanation
    assert named > 10
    # two items with the same label get different explanations (beyond the label)
    by_label = {}
    for ex in items:
        by_label.setdefault(ex.ratings["naturalness"].label, set()).add(
            ex.ratings["naturalness"].explanation)
    assert all(len(v) > 10 for v in by_label.values())


def test_faulty_words_grow_as_the_naturalness_level_falls():
    import random
    words = ("I have been thinking about moving to the coast because the winters here "
             "are long and dark").split()
    shares = {}
    for level in (5, 4, 3, 2, 1):
        faults = []
        for k in range(50):
            out, f = cd._corrupt(random.Random(k), words, level)
            faults.append(len(f["misspelt"]) + len(f["repeated"]) + len(f["dropped"]))
            if level == 5:
                assert out == words
            if level == 4:
                assert not f["repeated"] and not f["dropped"] and len(out) == len(words)
            for good, bad in f["misspelt"]:
                assert bad != good
        shares[level] = np.mean(faults) / len(words)
    assert shares[5] == 0 < shares[4] < shares[3] < shares[2]
    for level in (4, 3, 2, 1):     # exactly the level's share of the words, rounded
        assert shares[level] * len(words) == round(len(words) * cd.ERROR_SHARE[level])
    out, _ = cd._corrupt(random.Random(0), words, 1)
    assert out != words                                     # level 1 also loses its order


def test_content_words_skip_function_words():
    assert cd.content_words("Oh I really love my dog Rex and hiking") == ["love", "dog", "rex"]


def test_a_bad_chitchat_file_is_named(tmp_path):
    bad = tmp_path / "chats.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="chats.json"):
        cd.generate(3, path=str(bad))
    empty = tmp_path / "short.json"
    empty.write_text(json.dumps({"c1": {"messages": [[{"text": "hi", "sender": "a"}],
                                                     [{"text": "yo", "sender": "b"}]]}}))
    with pytest.raises(DataError, match="no chat has a usable reply"):
        cd.generate(3, path=str(empty))


def test_generated_source_builds_splits_and_refuses_a_path():
    s = splits.build_datasets(cd.SOURCE, num_synthetic=60, validation_fraction=0.1)
    assert s.train and s.test and s.origin == "chitchat_degraded(n=60, seed=0)"
    with pytest.raises(DataError, match="generated"):
        list(sources.iter_source(cd.SOURCE))
