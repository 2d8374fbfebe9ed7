"""Tokenised batches with the real Mistral tokenizer: masks, packing, truncation, resume."""

import copy
import dataclasses
import itertools

import numpy as np
import pytest

from tests.batch_checks import assert_padded_to_step
from xft_jax.data import synthetic
from xft_jax.data.encode import label_token_ids, prompt_parts
from xft_jax.data.pipeline import eval_batches, make_batches, train_batches
from xft_jax.data.schema import Conversation, RatedExample
from xft_jax.data.targets import ExplanationVocab, make_target

DIGITS = [28740, 28750, 28770, 28781, 28782]


@pytest.fixture(scope="module")
def examples():
    return synthetic.generate(40, seed=5)


def segments(batch, row):
    seg = batch["segment_ids"][row]
    return [np.flatnonzero(seg == s) for s in range(1, seg.max() + 1)]


def check_contract(batch, tok, by_target, variant="explanation"):
    """Every segment: shifted targets, masks on exactly the target text, one label."""
    b, t = batch["input_ids"].shape
    for k, dt in (("input_ids", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                  ("label_mask", np.float32), ("segment_ids", np.int32),
                  ("positions", np.int32)):
        assert batch[k].dtype == dt and batch[k].shape == (b, t), k
    seen = []
    for row in range(b):
        pad = batch["segment_ids"][row] == 0
        assert not batch["loss_mask"][row][pad].any() and not batch["label_mask"][row][pad].any()
        for idx in segments(batch, row):
            assert (np.diff(idx) == 1).all()
            ids, tg = batch["input_ids"][row][idx], batch["targets"][row][idx]
            assert (tg[:-1] == ids[1:]).all()  # targets[t] = input_ids[t+1]
            assert (batch["positions"][row][idx] == np.arange(len(idx))).all()
            assert ids[0] == tok.bos_token_id and tg[-1] == tok.eos_token_id
            lm, lab = batch["loss_mask"][row][idx], batch["label_mask"][row][idx]
            first = int(np.flatnonzero(lm)[0])
            assert lm[first:].all() and not lm[:first].any()  # prompt never in the loss
            assert lab.sum() == 1 and lm[lab == 1].all()
            digit = int(tg[lab == 1][0])
            assert digit in DIGITS
            text = tok.decode(tg[lm == 1], skip_special_tokens=True)
            prompt = tok.decode(ids[:first + 1], skip_special_tokens=True)
            match = [e for e in by_target[text] if e.conversation.response in prompt]
            assert len(match) == 1, text
            ex = match[0]
            assert ex.label("naturalness") == DIGITS.index(digit) + 1
            # the label is the first target token after the fixed prefix ▁Rating : ▁
            assert first + 3 == int(np.flatnonzero(lab)[0])
            seen.append(ex.id)
    return seen


def targets_index(examples, variant, axis="naturalness", vocab=None, seed=0):
    """target text -> the examples with that target (label_only targets repeat)."""
    out = {}
    for ex in examples:
        out.setdefault(make_target(ex, axis, variant, seed=seed, vocab=vocab), []).append(ex)
    return out


def test_label_token_ids_real_mistral(mistral_tokenizer):
    assert label_token_ids(mistral_tokenizer) == DIGITS
    assert mistral_tokenizer("Rating: 4")["input_ids"] == [1, 25181, 28747, 28705, 28781]


class MergingTokenizer:
    """Wraps the real tokenizer but fuses '▁' and '3' into one piece, as some vocabularies do."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, **kw):
        out = self.tok(text, **kw)
        ids = out["input_ids"]
        if text.endswith(": 3"):
            ids = ids[:-2] + [28770]
        return {"input_ids": ids}

    def convert_ids_to_tokens(self, ids):
        return self.tok.convert_ids_to_tokens(ids)

    def decode(self, ids):
        return self.tok.decode(ids)


def test_label_token_ids_fails_loudly(mistral_tokenizer):
    with pytest.raises(ValueError, match="label 3 is not a single token"):
        label_token_ids(MergingTokenizer(mistral_tokenizer))


@pytest.mark.parametrize("variant", ["label_only", "explanation", "bag_of_words"])
def test_padded_train_batches_obey_contract(examples, mistral_tokenizer, variant):
    batches = train_batches(examples, mistral_tokenizer, axis="naturalness", variant=variant,
                            max_len=384, batch_size=4, seed=0, num_epochs=1,
                            process_index=0, process_count=1)
    assert batches.stats.kept == 40 and batches.stats.dropped == 0
    assert batches.num_batches == 10 and batches.label_token_ids == DIGITS
    index = targets_index(examples, variant)
    seen = []
    for batch in batches:
        assert batch["input_ids"].shape == (4, 384) and "label_pos" not in batch
        seen += check_contract(batch, mistral_tokenizer, index, variant)
    assert sorted(seen) == sorted(ex.id for ex in examples)  # one epoch, each once


def test_packed_batches(examples, mistral_tokenizer):
    vocab = ExplanationVocab.from_examples(examples, "naturalness")
    batches = train_batches(examples, mistral_tokenizer, axis="naturalness",
                            variant="random_vocab", max_len=1024, batch_size=2, seed=1,
                            pack=True, num_epochs=1, vocab=vocab, process_index=0,
                            process_count=1)
    index = targets_index(examples, "random_vocab", vocab=vocab, seed=1)
    seen, rows, per_row = [], 0, []
    for batch in batches:
        seen += check_contract(batch, mistral_tokenizer, index)
        rows += 2
        per_row += [int(batch["segment_ids"][r].max()) for r in range(2)]
    assert max(per_row) >= 3  # several examples share a row
    assert len(seen) == len(set(seen)) and len(seen) >= 30  # no repeats; tail may be dropped


def test_truncation_from_the_left_and_drops(mistral_tokenizer):
    base = synthetic.generate(3, seed=0)
    long_ctx = tuple(("User", f"turn {i} " + "blah " * 30) for i in range(30))
    long_resp = "word " * 600
    exs = [dataclasses.replace(base[0], conversation=dataclasses.replace(
               base[0].conversation, context=long_ctx)),
           dataclasses.replace(base[1], conversation=dataclasses.replace(
               base[1].conversation, response=long_resp.strip())),
           base[2]]
    batches = eval_batches(exs, mistral_tokenizer, axis="on_topic", variant="explanation",
                           max_len=320, batch_size=2, process_index=0,
                           process_count=1)
    st = batches.stats
    assert (st.total, st.kept, st.truncated, st.dropped) == (3, 2, 1, 1)
    assert st.dropped_ids == [exs[1].id] and batches.example_ids == [exs[0].id, exs[2].id]
    batch = next(iter(batches))
    n = int((batch["segment_ids"][0] > 0).sum())
    assert n == 320  # cut to fit exactly
    text = mistral_tokenizer.decode(batch["input_ids"][0][:n])
    assert "turn 29 blah" in text and "turn 0 " not in text  # oldest turns went first
    head, _, tail = prompt_parts(exs[0], "on_topic")
    assert text.startswith("<s> " + head.split("\n")[0]) and tail.strip() in text
    lm = batch["loss_mask"][0] == 1
    assert mistral_tokenizer.decode(batch["targets"][0][lm], skip_special_tokens=True) == \
        make_target(exs[0], "on_topic", "explanation")


def test_eval_batches_count_every_example_once_across_hosts(examples, mistral_tokenizer):
    exs = examples[:13]
    got = {}
    for host in range(2):
        batches = eval_batches(exs, mistral_tokenizer, axis="comprehensiveness",
                               variant="label_only", max_len=384, batch_size=4,
                               process_index=host, process_count=2, buckets=[128, 256, 384])
        out = list(batches)
        assert len(out) == batches.num_batches == 2  # ceil(ceil(13/2)/4), same on both hosts
        for batch in out:
            assert batch["input_ids"].shape[1] in (128, 256, 384)
            for r in range(4):
                if not batch["valid"][r]:
                    assert batch["label"][r] == -1 and batch["example_index"][r] == -1
                    assert batch["segment_ids"][r].sum() == 0
                    continue
                ex_id = batches.example_ids[batch["example_index"][r]]
                assert ex_id not in got
                got[ex_id] = (int(batch["label"][r]), int(batch["label_pos"][r]))
                pos = batch["label_pos"][r]
                assert batch["label_mask"][r][pos] == 1 and batch["label_mask"][r].sum() == 1
                assert batch["targets"][r][pos] == DIGITS[batch["label"][r]]
    assert sorted(got) == sorted(ex.id for ex in exs)
    for ex in exs:
        assert got[ex.id][0] == ex.label("comprehensiveness") - 1


@pytest.mark.parametrize("pack", [False, True])
def test_resume_sees_exactly_the_same_batches(examples, mistral_tokenizer, pack):
    def build():
        return train_batches(examples, mistral_tokenizer, axis="on_topic", variant="shuffled",
                             max_len=640 if pack else 384, batch_size=3, seed=11, pack=pack,
                             process_index=0, process_count=1)

    it = iter(build())
    for _ in range(5):
        next(it)
    state = copy.deepcopy(it.get_state())
    expected = [next(it) for _ in range(12)]  # crosses an epoch boundary
    resumed = iter(build())
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_shuffle_seed_and_host_slices(examples, mistral_tokenizer):
    def first_ids(seed, host, count=2):
        b = train_batches(examples, mistral_tokenizer, axis="on_topic", variant="label_only",
                          max_len=384, batch_size=4, seed=seed, num_epochs=1,
                          process_index=host, process_count=count)
        return [tuple(x["input_ids"][:, :200].ravel()) for x in b]

    assert first_ids(0, 0) == first_ids(0, 0)
    assert first_ids(0, 0) != first_ids(1, 0)
    h0 = {r for batch in first_ids(0, 0) for r in [batch]}
    h1 = {r for batch in first_ids(0, 1) for r in [batch]}
    assert not h0 & h1
    eval_b = eval_batches(examples, mistral_tokenizer, axis="on_topic", max_len=384,
                          batch_size=8, process_index=0, process_count=1)
    assert list(next(iter(eval_b))["example_index"]) == list(range(8))  # eval: input order
    with pytest.raises(ValueError, match="pack=False"):
        make_batches(examples, mistral_tokenizer, axis="on_topic", max_len=384,
                     batch_size=2, train=False, pack=True, process_index=0, process_count=1)


def test_chat_template_and_tfds_records(examples, mistral_tokenizer, tmp_path):
    tok = copy.copy(mistral_tokenizer)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} "
                         "[/INST]{% endfor %}")
    b = eval_batches(examples[:4], tok, axis="naturalness", variant="explanation",
                     max_len=384, batch_size=4, process_index=0, process_count=1,
                     chat_template=True)
    batch = next(iter(b))
    check_contract(batch, tok, targets_index(examples[:4], "explanation"))
    text = tok.decode(batch["input_ids"][0])
    assert text.startswith("<s> [INST] Rate the response") and "[/INST]" in text
    plain = eval_batches(examples[:4], tok, axis="naturalness", variant="explanation",
                         max_len=384, batch_size=4, process_index=0,
                         process_count=1)                # the template only when asked for
    plain_text = tok.decode(next(iter(plain))["input_ids"][0])
    assert plain_text.startswith("<s> Rate the response") and "[INST]" not in plain_text
    with pytest.raises(ValueError, match="data.chat_template=True, but the tokenizer"):
        eval_batches(examples[:4], mistral_tokenizer, axis="naturalness", max_len=384,
                     batch_size=4, process_index=0, process_count=1,
                     chat_template=True)
    short = eval_batches(examples[:4], tok, axis="naturalness", variant="label_only",
                         max_len=150, batch_size=4, process_index=0,
                         process_count=1, chat_template=True)
    assert short.stats.truncated + short.stats.dropped > 0
    for batch in short:
        assert batch["input_ids"].shape[1] == 150
    # records from a TFDS data source give the same batches as the RatedExamples
    from xft_jax.data import export, tfds_builder
    export.export(str(tmp_path), "synthetic", examples[:6], examples[6:8], {})
    src = tfds_builder.load(str(tmp_path / "tfds"), "synthetic")
    as_list = [tfds_builder.record_to_example(src["train"][i]) for i in range(6)]
    assert sorted(as_list, key=lambda e: e.id) == sorted(examples[:6], key=lambda e: e.id)
    a = eval_batches(src["train"], mistral_tokenizer, axis="on_topic", max_len=384,
                     batch_size=6, process_index=0, process_count=1)
    c = eval_batches(as_list, mistral_tokenizer, axis="on_topic", max_len=384,
                     batch_size=6, process_index=0, process_count=1)
    for x, y in zip(a, c):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def test_no_context_example(mistral_tokenizer):
    ex = synthetic.generate(1, seed=0)[0]
    ex = RatedExample(Conversation("x:1", "x", (), "Sure."), ex.ratings)
    b = eval_batches([ex], mistral_tokenizer, axis="naturalness", max_len=256, batch_size=1,
                     process_index=0, process_count=1)
    batch = next(iter(b))
    assert batch["valid"][0] == 1 and b.stats.kept == 1


def test_training_batches_pad_to_bucket_widths(mistral_tokenizer):
    """Unpacked training rows pad to the batch's power-of-two width, not max_len; packed
    rows fill max_len."""
    from configs import tiny
    from xft_jax.data.pipeline import length_buckets
    from xft_jax.training import batches as data_lib

    c = tiny.get_config("synthetic,naturalness,explanation")
    c.data.num_synthetic, c.data.max_len, c.train.eval_every = 60, 1024, 0
    run = data_lib.build(c, mistral_tokenizer)
    it = iter(run.train.dataset)
    for _ in range(3):
        b = next(it)
        width = b["input_ids"].shape[1]
        longest = int(b["segment_ids"].sum(1).max())
        assert width in length_buckets(1024) and longest <= width < 1024
        assert width == min(w for w in length_buckets(1024) if w >= longest)
    c.data.pack = True
    packed = next(iter(data_lib.build(c, mistral_tokenizer).train.dataset))
    assert packed["input_ids"].shape[1] == 1024


def test_a_bucket_step_pads_rows_to_the_next_multiple(mistral_tokenizer):
    """data.bucket_step=N: a batch pads to the smallest multiple of N (from 64) that holds
    its longest row, training and validation alike, and the rows are those of the
    powers-of-two layout, padding aside."""
    from configs import tiny
    from xft_jax.data.pipeline import length_buckets
    from xft_jax.training import batches as data_lib

    assert length_buckets(160, step=16) == (64, 80, 96, 112, 128, 144, 160)
    assert length_buckets(150, step=32) == (64, 96, 128, 150)
    with pytest.raises(ValueError, match="bucket step -1"):
        length_buckets(160, step=-1)
    c = tiny.get_config("synthetic,naturalness,explanation")
    c.data.num_synthetic, c.data.max_len, c.train.eval_every = 60, 1024, 1
    coarse = data_lib.build(c, mistral_tokenizer)
    c.data.bucket_step = 16
    fine = data_lib.build(c, mistral_tokenizer)
    assert fine.info == coarse.info                      # the same examples, encoded alike
    for kind in ("train", "eval"):
        first4 = [list(itertools.islice(getattr(r, kind).dataset, 4)) for r in (coarse, fine)]
        widths = assert_padded_to_step(*first4, step=16)
        assert any(w % 64 for w in widths)               # finer than powers of two


def _prompts(rows):
    """Prompt ids of encoded rows (everything before the first loss position + 1)."""
    return [tuple(r["input_ids"][:int(np.flatnonzero(r["loss_mask"])[0]) + 1]) for r in rows]


def test_prompt_room_gives_every_variant_the_same_prompts(mistral_tokenizer):
    """With the study's variants as ``prompt_room``, each variant's training rows hold the
    same prompts and keep the same examples; with no room, longer targets cut more."""
    from xft_jax.data.encode import Encoder
    from xft_jax.data.targets import TARGET_VARIANTS

    exs = synthetic.generate(60, seed=3)
    vocab = ExplanationVocab.from_examples(exs, "naturalness")

    def encode(variant, room, max_len=240):
        enc = Encoder(mistral_tokenizer, axis="naturalness", variant=variant,
                      max_len=max_len, vocab=vocab, prompt_room=room)
        rows, stats = enc.encode_all(exs)
        return {exs[int(r["index"])].id: p for r, p in zip(rows, _prompts(rows))}, stats

    own = {v: encode(v, ()) for v in ("label_only", "explanation")}
    # The set-up really cuts: without room, the explanation run sees shorter prompts.
    assert own["explanation"][1].truncated > own["label_only"][1].truncated > 0
    assert own["explanation"][0] != own["label_only"][0]
    shared = {v: encode(v, TARGET_VARIANTS) for v in TARGET_VARIANTS}
    first = shared["label_only"]
    for v, (prompts, stats) in shared.items():
        assert prompts == first[0], v
        assert (stats.kept, stats.truncated, stats.dropped) == (
            first[1].kept, first[1].truncated, first[1].dropped), v
        assert stats.prompt_room[0] == v and set(stats.prompt_room) == set(TARGET_VARIANTS)
    # A run's own target always counts: a room without it still fits its target.
    rows, _ = Encoder(mistral_tokenizer, axis="naturalness", variant="explanation",
                      max_len=240, prompt_room=("label_only",)).encode_all(exs)
    assert rows and all(len(r["input_ids"]) <= 240 for r in rows)
    # Where nothing needs cutting, the room changes nothing.
    assert encode("label_only", TARGET_VARIANTS, 4096)[0] == encode("label_only", (), 4096)[0]
    with pytest.raises(ValueError, match="unknown target variants"):
        Encoder(mistral_tokenizer, axis="naturalness", variant="label_only", max_len=64,
                prompt_room=("explanations",))
    with pytest.raises(ValueError, match="random_vocab"):
        Encoder(mistral_tokenizer, axis="naturalness", variant="label_only", max_len=64,
                prompt_room=("random_vocab",))


def test_prompt_room_from_config():
    import ml_collections

    from xft_jax import config_defaults
    from xft_jax.data.targets import PAPER_VARIANTS
    from xft_jax.data.targets import prompt_room

    # a data section stored before the key existed, read as the code reads stored runs
    d = config_defaults.with_defaults({"data": {"axis": "naturalness"}}).data
    assert prompt_room(d) == PAPER_VARIANTS          # written before the key existed
    d.prompt_room = ("explanation",)
    assert prompt_room(d) == ("explanation",)
    d.prompt_room = ()
    assert prompt_room(d) == ()
    for bad in ("explanation", ("label_only", "nope")):
        d = ml_collections.ConfigDict({"prompt_room": bad})
        with pytest.raises(ValueError, match="config.data.prompt_room"):
            prompt_room(d)


def test_rubric_false_leaves_only_the_rubric_out(examples, mistral_tokenizer):
    from xft_jax.data import rubrics
    full, short = (prompt_parts(examples[0], "naturalness", rubric=r) for r in (True, False))
    assert rubrics.rubric("naturalness", 5) in full[0]
    assert rubrics.rubric("naturalness", 5) not in short[0]
    assert short[0].startswith("Rate the response") and short[1:] == full[1:]
    kw = dict(axis="naturalness", variant="label_only", max_len=512, batch_size=2,
              process_index=0, process_count=1)
    rows = {r: next(iter(eval_batches(examples[:2], mistral_tokenizer, rubric=r, **kw)))
            for r in (True, False)}
    n = {r: (rows[r]["segment_ids"][0] > 0).sum() for r in rows}
    rubric_tokens = len(mistral_tokenizer(rubrics.rubric("naturalness", 5),
                                          add_special_tokens=False)["input_ids"])
    assert n[True] - n[False] >= rubric_tokens - 2      # the rubric's tokens are gone
    assert (rows[True]["label"] == rows[False]["label"]).all()
