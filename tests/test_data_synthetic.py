"""The synthetic corpus: deterministic, fast, ratings that follow the construction."""

import collections
import time

import numpy as np

from xft_jax.data import synthetic
from xft_jax.data.schema import AXES, RatedExample
from xft_jax.data.splits import build_datasets, sample_split


def test_generate_is_deterministic_prefix_stable_and_fast():
    t = time.perf_counter()
    items = synthetic.generate(3000, seed=0)
    elapsed = time.perf_counter() - t
    assert elapsed < 5.0, elapsed
    assert len(items) == 3000 and all(isinstance(x, RatedExample) for x in items)
    assert synthetic.generate(50, seed=0) == items[:50]
    other = synthetic.generate(50, seed=1)
    assert [x.conversation for x in other] != [x.conversation for x in items[:50]]
    assert len({x.id for x in items}) == 3000
    assert {x.conversation.source for x in items} == {"synthetic"}


def test_ratings_follow_the_construction_with_noise():
    items = synthetic.generate(1200, seed=3)
    levels = synthetic.true_levels(1200, seed=3)
    for axis in AXES:
        labels = np.array([x.label(axis) for x in items])
        truth = np.array([lv[axis] for lv in levels])
        assert set(labels) == {1, 2, 3, 4, 5}
        exact = (labels == truth).mean()
        assert 0.8 < exact < 1.0, (axis, exact)  # mostly right, but noisy
        assert np.abs(labels - truth).max() <= 2
    # the ensemble: 3 annotators x 4 variants, occasional malformed answers dropped
    n_scores = collections.Counter(len(x.ratings["naturalness"].scores) for x in items)
    assert max(n_scores) == 12 and min(n_scores) < 12
    raters = {r.split("/")[0] for x in items[:20] for r in x.ratings["on_topic"].raters}
    assert raters == {a[0] for a in synthetic.ANNOTATORS}


def test_factors_are_visible_in_text_and_explanations():
    items = synthetic.generate(600, seed=0)
    levels = synthetic.true_levels(600, seed=0)
    # the explanation names the factor behind the score
    for x, lv in zip(items, levels):
        if lv["comprehensiveness"] == 5 and x.label("comprehensiveness") == 5:
            assert "all four points" in x.explanation("comprehensiveness")
        if lv["on_topic"] == 1:
            assert "only about" in x.explanation("on_topic")
    fluent = [x.conversation.response for x, lv in zip(items, levels) if lv["naturalness"] == 5]
    broken = [x.conversation.response for x, lv in zip(items, levels) if lv["naturalness"] == 1]
    assert all(r[0].isupper() and r.endswith(".") for r in fluent)
    assert sum(r.endswith(".") for r in broken) < len(broken) / 2
    # six domains, with varied explanation templates
    assert len({x.conversation.context[-1][0] for x in items}) >= 4
    assert len({x.explanation("naturalness") for x in items}) > 20


def test_pretraining_texts_and_split():
    texts = synthetic.pretraining_texts(100, seed=0)
    assert len(texts) == 100 and all(": " in t for t in texts)
    rated = {x.conversation.response for x in synthetic.generate(100, seed=0)}
    assert len(rated & {t.rsplit("Assistant: ", 1)[-1] for t in texts}) < 10
    parts = sample_split(synthetic.generate(900, 0))
    assert 0.25 < len(parts["test"]) / 900 < 0.42
    d = build_datasets("synthetic", num_synthetic=900, num_train=100, num_test=50)
    assert len(d.train) == 100 and len(d.test) == 50
    assert not {x.id for x in d.train} & {x.id for x in d.test}
    assert d.train == parts["train"][:100]
