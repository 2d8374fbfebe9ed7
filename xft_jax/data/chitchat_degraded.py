"""Rated examples built from real human conversations: the demo's and mini-study's corpus.

Each item is one chat of the BYU Chit-Chat Challenge (the ``chitchat`` source, from the
installed ``chitchat-dataset`` package): one real turn of context and the real next turn
as the response, which is then degraded in a controlled way, one factor per axis:

* comprehensiveness: the reply breaks off early (level 5 keeps all its words, 1 about a
  seventh of them);
* on_topic: part of the reply, or all of it, is a turn taken from another chat of the
  same split (none = 5, all = 1);
* naturalness: a share of its words is faulty (5 as written, 4 about one word in seven
  misspelt, 3 a third misspelt, repeated or dropped, 2 three in five, 1 as many and the
  words in random order).

The labels therefore follow from the degradations, not from any person's judgment of the
real turns (which are casual chat, typos included). The simulated annotator ensemble of
``synthetic.py`` rates every item and axis through the real aggregation code, and its
explanations name specifics of the item — the words repeated or dropped, where the reply
breaks off, what the intruding turn is about — so an explanation says more than its label.
Deterministic in ``seed``; item i is the same whatever ``num_items`` is, and all items of
one chat share an id group (``id_hash.split_key``), so a chat never spans two splits.

    generate(num_items, seed) -> list[RatedExample]
"""

from __future__ import annotations

import functools
import random
import re

from xft_jax.data import sources
from xft_jax.data.id_hash import split_of
from xft_jax.data.aggregate import aggregate_axis
from xft_jax.data.schema import AXES, Conversation, RatedExample
from xft_jax.data.synthetic import axis_levels, framed, simulated_answers, tone

SOURCE = "chitchat_degraded"
DEFAULT_NUM_ITEMS = 2000
CONTEXT_TURNS = 1                            # short prompts: a CPU demo pays per token
MIN_REPLY_WORDS, MAX_REPLY_WORDS = 8, 30     # a reply long enough to degrade visibly
MAX_CONTEXT_WORDS = 30
KEEP_FRACTION = {5: 1.0, 4: 0.75, 3: 0.5, 2: 0.3, 1: 0.15}      # comprehensiveness
FOREIGN_FRACTION = {5: 0.0, 4: 0.3, 3: 0.5, 2: 0.75, 1: 1.0}    # on_topic
# naturalness: the share of words with a fault (misspelt; from 3 down also repeated or
# dropped); level 1 also scrambles the word order
ERROR_SHARE = {5: 0.0, 4: 0.15, 3: 0.35, 2: 0.6, 1: 0.6}
_STOP = frozenset("""a an and are as at be been but by can could did do does doing for from
had has have he her hers him his how i i'm im if in into is it it's its just like me my no
not of on or our so than that that's the their them then there they this to too up us was
we were what when where which who why will with would you your yeah yes oh ok okay really
very well lol haha hey hi hello dont don't about get got go going know think""".split())


@functools.lru_cache(maxsize=2)
def _chats(path: str | None) -> tuple[tuple[str, tuple], ...]:
    """(chat key, all turns) of every rateable chat, in id order."""
    out = []
    for conv in sources.load_source("chitchat", path):
        last = "B" if conv.context[-1][0] == "A" else "A"
        out.append((conv.id.split(":", 1)[1], tuple(conv.context) + ((last, conv.response),)))
    out.sort()
    return tuple(out)


def _n_words(text: str) -> int:
    return len(text.split())


def _cuts(turns: tuple) -> list[int]:
    """Turn indices usable as the response: a reply of MIN..MAX words after
    ``CONTEXT_TURNS`` short turns."""
    return [t for t in range(CONTEXT_TURNS, len(turns))
            if MIN_REPLY_WORDS <= _n_words(turns[t][1]) <= MAX_REPLY_WORDS
            and all(1 <= _n_words(turns[j][1]) <= MAX_CONTEXT_WORDS
                    for j in range(t - CONTEXT_TURNS, t))]


def content_words(text: str, k: int = 3) -> list[str]:
    """Up to ``k`` distinct words of ``text`` that are not function words, in order."""
    out = []
    for w in re.findall(r"[A-Za-z][A-Za-z']+", text):
        lw = w.lower()
        if lw not in _STOP and len(lw) > 2 and lw not in out:
            out.append(lw)
        if len(out) == k:
            break
    return out


def _quote(words: list[str], k: int = 4) -> str:
    return " ".join(words[:k]) + (" ..." if len(words) > k else "")


def _misspell(rng: random.Random, word: str) -> str:
    """A typing slip: two neighbouring letters swapped, or one doubled in a short word."""
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if len(letters) >= 4:
        i = rng.randrange(1, len(letters) - 2)
        j, k = letters[i], letters[i + 1]
        if word[j] != word[k]:
            return word[:j] + word[k] + word[j] + word[k + 1:]
    if letters:
        j = rng.choice(letters)
        return word[:j + 1] + word[j] + word[j + 1:]
    return word + word[-1:]


def _corrupt(rng: random.Random, words: list[str], level: int) -> tuple[list[str], dict]:
    """Degrades fluency by a share of faulty words that grows as the level falls (level 1
    also loses its word order), and records every fault, for the explanations."""
    facts: dict = {"misspelt": [], "repeated": [], "dropped": []}
    if level == 5:
        return list(words), facts
    n_faults = max(1, round(len(words) * ERROR_SHARE[level]))
    faulty = set(rng.sample(range(len(words)), min(n_faults, len(words))))
    kinds = ("misspelt",) if level == 4 else ("misspelt", "repeated", "dropped")
    out = []
    for i, w in enumerate(words):
        kind = rng.choice(kinds) if i in faulty else None
        if kind == "misspelt":
            out.append(_misspell(rng, w))
            facts["misspelt"].append((w, out[-1]))
        elif kind == "repeated":
            out += [w, w]
            facts["repeated"].append(w)
        elif kind == "dropped":
            facts["dropped"].append(w)
        else:
            out.append(w)
    if not out:
        out, facts["dropped"] = words[:1], facts["dropped"][1:]
    if level == 1:
        rng.shuffle(out)
    return out, facts


def _explain(rng: random.Random, axis: str, perceived: int, f: dict, level: int) -> str:
    """A one or two sentence explanation naming specifics of this item."""
    verdict = tone(rng, perceived)
    if axis == "naturalness":
        n = f["naturalness"]
        if level == 5:
            body = f"The reply reads like a person wrote it: \"{_quote(f['reply'], 5)}\""
        else:
            faults = ([f'"{bad}" for "{good}"' for good, bad in n["misspelt"]]
                      + [f'"{w}" twice' for w in n["repeated"]]
                      + [f'no "{w}"' for w in n["dropped"]])
            faults = ", ".join(rng.sample(faults, min(2, len(faults))))
            body = (f"The reply is a jumble of words in no sensible order, with slips such "
                    f"as {faults}" if level == 1 else f"The reply has slips: {faults}")
    elif axis == "comprehensiveness":
        if f["kept"] >= f["real_words"]:
            body = f"The reply says all it set out to say ({f['real_words']} words)"
        elif f["kept"] == 0:
            body = "None of the reply answers the last turn; it is another chat's turn"
        else:
            body = (f"The reply breaks off after \"{_quote(f['kept_tail'], 3)}\", leaving "
                    f"out about {f['real_words'] - f['kept']} of its {f['real_words']} words")
    else:
        topic = ", ".join(f["foreign_topic"]) or "something else"
        asked = ", ".join(f["context_topic"]) or "the conversation"
        if not f["foreign"]:
            body = f"The reply follows on from the last turn about {asked}"
        elif f["kept"] == 0:
            body = f"The reply is about {topic}, which has nothing to do with {asked}"
        else:
            body = (f"The reply drifts from {asked} to {topic} (\"{_quote(f['foreign'], 4)}\""
                    f" comes from another chat)")
    return framed(rng, verdict, body)


class _Corpus:
    """The chats of one ``chitchat`` file, each with its usable cuts and split."""

    def __init__(self, path: str | None):
        self.chats = [(k, turns, _cuts(turns)) for k, turns in _chats(path)]
        self.chats = [c for c in self.chats if c[2]]
        if not self.chats:
            raise sources.DataError(f"{path or 'chitchat'}: no chat has a usable reply of "
                                    f"{MIN_REPLY_WORDS}-{MAX_REPLY_WORDS} words")
        self.by_split: dict[str, list[int]] = {"train": [], "test": []}
        for i, (key, _, _) in enumerate(self.chats):
            self.by_split[split_of(self._id(key, 0, 0))].append(i)

    @functools.lru_cache(maxsize=4)
    def _order(self, seed: int) -> list[int]:
        return random.Random(f"xft_jax.{SOURCE}:order:{seed}").sample(
            range(len(self.chats)), len(self.chats))

    @staticmethod
    def _id(key: str, seed: int, index: int) -> str:
        return f"{SOURCE}:{key}#{seed}:{index:07d}"

    def item(self, seed: int, index: int) -> tuple[RatedExample, dict]:
        rng = random.Random(f"xft_jax.{SOURCE}:{seed}:{index}")
        key, turns, cuts = self.chats[self._order(seed)[index % len(self.chats)]]
        t = rng.choice(cuts)
        levels = axis_levels(rng)
        real = turns[t][1].split()
        kept = max(1, round(len(real) * KEEP_FRACTION[levels["comprehensiveness"]]))
        share = FOREIGN_FRACTION[levels["on_topic"]]
        foreign: list[str] = []
        if share:
            item_id = self._id(key, seed, index)
            pool = [i for i in self.by_split[split_of(item_id)] if self.chats[i][0] != key]
            _, oturns, ocuts = self.chats[rng.choice(pool)]
            other = oturns[rng.choice(ocuts)][1].split()
            if share >= 1.0:
                kept, foreign = 0, other
            else:  # the foreign words make up ``share`` of the reply
                foreign = other[:max(2, round(kept * share / (1 - share)))]
        reply = real[:kept] + foreign
        words, nat = _corrupt(rng, reply, levels["naturalness"])
        context = tuple(turns[t - CONTEXT_TURNS:t])
        conv = Conversation(id=self._id(key, seed, index), source=SOURCE, context=context,
                            response=" ".join(words))
        facts = {"reply": words, "naturalness": nat, "kept": kept, "real_words": len(real),
                 "kept_tail": real[:kept][-3:], "foreign": foreign,
                 "foreign_topic": content_words(" ".join(foreign)),
                 "context_topic": content_words(context[-1][1])}
        ratings = {axis: aggregate_axis(simulated_answers(
            rng, levels[axis],
            lambda r, p, a=axis: _explain(r, a, p, facts, levels[a]))) for axis in AXES}
        return RatedExample(conversation=conv, ratings=ratings), levels


def generate(num_items: int = DEFAULT_NUM_ITEMS, seed: int = 0,
             path: str | None = None) -> list[RatedExample]:
    """``num_items`` degraded real chats rated on all axes by the simulated ensemble
    (``path``: a chitchat-dataset JSON file; None reads the installed package's)."""
    corpus = _Corpus(path)
    return [corpus.item(seed, i)[0] for i in range(num_items)]


def true_levels(num_items: int, seed: int = 0, path: str | None = None) -> list[dict]:
    """The degradation levels behind each item (what a perfect rater would say)."""
    corpus = _Corpus(path)
    return [corpus.item(seed, i)[1] for i in range(num_items)]


__all__ = ["generate", "true_levels", "content_words", "SOURCE", "DEFAULT_NUM_ITEMS"]
