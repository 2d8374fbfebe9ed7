"""Canonical records and ensemble aggregation."""

import pytest

from xft_jax.data.aggregate import (AggregationError, ScoredAnswer, aggregate_axis,
                                    annotator_agreement, rescale, to_label)
from xft_jax.data.schema import AXES, AxisRating, Conversation, RatedExample, SchemaError


def conv(**kw):
    d = dict(id="s:1", source="s", context=[("User", "hi")], response="hello")
    d.update(kw)
    return Conversation(**d)


def rating(label=3, **kw):
    d = dict(scores=(3.0,), raters=("a/scale5",), mean=3.0, spread=0.0, median=3.0,
             majority=3, label=label, agreement=1.0, explanation="fine")
    d.update(kw)
    return AxisRating(**d)


def test_conversation_validation_messages():
    assert conv().context == (("User", "hi"),)
    with pytest.raises(SchemaError, match=r"'s:1': response is empty"):
        conv(response="  ")
    with pytest.raises(SchemaError, match="context turn 0 must be a"):
        conv(context=["hi"])
    with pytest.raises(SchemaError, match="context turn 0 text must be a string"):
        conv(context=[("User", 3)])
    with pytest.raises(SchemaError, match="conversation id is empty"):
        conv(id="")


def test_rated_example_validation_and_round_trip():
    ex = RatedExample(conv(), {a: rating() for a in AXES})
    assert RatedExample.from_dict(ex.to_dict()) == ex
    assert ex.label("on_topic") == 3 and ex.explanation("naturalness") == "fine"
    with pytest.raises(SchemaError, match="label 6 is not an integer in 1..5"):
        rating(label=6)
    with pytest.raises(SchemaError, match="label 0 is not"):
        rating(label=0)
    with pytest.raises(SchemaError, match=r"unknown axis \['fluency'\]"):
        RatedExample(conv(), {**{a: rating() for a in AXES}, "fluency": rating()})
    with pytest.raises(SchemaError, match=r"no rating for axis \['on_topic'\]"):
        RatedExample(conv(), {a: rating() for a in AXES[:2]})
    with pytest.raises(SchemaError, match="unknown axis 'fluency'"):
        ex.label("fluency")
    with pytest.raises(SchemaError, match="explanation is empty"):
        rating(explanation="")
    with pytest.raises(SchemaError, match="score 6.0 outside"):
        rating(scores=(6.0,))
    bad = ex.to_dict()
    del bad["ratings"]["naturalness"]["median"]
    with pytest.raises(SchemaError, match=r"axis 'naturalness': missing field\(s\) \['median'\]"):
        RatedExample.from_dict(bad)


def test_rescale_and_rounding():
    assert [rescale(s, 4) for s in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    assert [rescale(s, 5) for s in range(1, 6)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError):
        rescale(5, 4)
    with pytest.raises(ValueError):
        rescale(2.5, 5)
    assert [to_label(x) for x in (0.2, 1.49, 2.5, 3.5, 4.49, 7.0)] == [1, 1, 3, 4, 4, 5]


def test_scale4_anchors_agree_with_the_rubric_text():
    """A 1..4 score maps to the 1..5 score whose rubric line carries the same words."""
    from xft_jax.data import rubrics
    from xft_jax.data.schema import AXES

    for axis in AXES:
        five = dict(line.split(" = ", 1) for line in rubrics.rubric(axis, 5).splitlines()[1:])
        four = dict(line.split(" = ", 1) for line in rubrics.rubric(axis, 4).splitlines()[1:])
        assert len(four) == 4 and len(five) == 5
        for s4, text in four.items():
            assert five[str(int(rescale(int(s4), 4)))] == text, (axis, s4)


def test_aggregate_axis_statistics():
    answers = [ScoredAnswer("m1", "scale5", 4.0, "good but long"),
               ScoredAnswer("m1", "scale4", rescale(3, 4), "solid"),
               ScoredAnswer("m2", "scale5", 2.0, "off"),
               ScoredAnswer("m2", "scale5_examples", 4.0, "")]
    r = aggregate_axis(answers)
    mean = (4 + 4 + 2 + 4) / 4      # the 4-point "3" is the rubric's 5-point 4
    assert r.mean == pytest.approx(mean) and r.label == 4   # 3.5 rounds half up
    assert r.median == pytest.approx(4.0)
    assert r.majority == 4  # rounded votes: 4, 4, 2, 4
    assert r.agreement == 0.75
    assert r.spread == pytest.approx((sum((s - mean) ** 2 for s in r.scores) / 4) ** 0.5)
    assert r.raters == ("m1/scale5", "m1/scale4", "m2/scale5", "m2/scale5_examples")
    # closest to the consensus 3.5: the first of the 4.0 answers
    assert r.explanation == "good but long"
    assert aggregate_axis(answers, "A summary.").explanation == "A summary."
    with pytest.raises(AggregationError):
        aggregate_axis([])
    with pytest.raises(AggregationError, match="no answer carries an explanation"):
        aggregate_axis([ScoredAnswer("m", "scale5", 3.0, "")])


def test_annotator_agreement():
    r = aggregate_axis([ScoredAnswer("a", "scale5", 4.0, "x"),
                        ScoredAnswer("b", "scale5", 2.0, "y"),
                        ScoredAnswer("a", "scale4", 5.0, "z")])
    assert r.label == 4
    ex = RatedExample(conv(), {ax: r for ax in AXES})
    agree = annotator_agreement([ex])
    assert agree["a"]["on_topic"] == 0.5 and agree["b"]["naturalness"] == 0.0
