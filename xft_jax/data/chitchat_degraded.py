"""Rated examples built from real human conversations: the demo's and mini-study's corpus.

Each item is one chat of the BYU Chit-Chat Challenge (the ``chitchat`` source, from the
installed ``chitchat-dataset`` package): one real turn of context and the real next turn
as the response, which is then degraded in a controlled way, one factor per axis:

* comprehensiveness: the reply breaks off early (level 5 keeps all its words, 1 about a
  seventh of them);
* on_topic: part of the reply, or all of it, is a turn taken from another chat of the
  same split (none = 5, all = 1);
* naturalness: its phrasing is corrupted (5 as written, 4 a filler word, 3 repeated words
  and lost punctuation, 2 dropped words too, 1 the words in random order).

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
FILLERS = ("um,", "like,", "you know,", "kinda", "basically")
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


def _corrupt(rng: random.Random, words: list[str], level: int) -> tuple[list[str], dict]:
    """Degrades fluency and records what was done, for the explanations."""
    facts: dict = {"filler": None, "repeated": [], "dropped": []}
    if level == 5:
        return words, facts
    if level == 4:
        out = list(words)
        out[0] = out[0].lower()
        at = rng.randrange(1, len(out) + 1)
        facts["filler"], facts["after"] = rng.choice(FILLERS), out[at - 1]
        out.insert(at, facts["filler"])
        return out, facts
    out = []
    for w in words:
        r = rng.random()
        if level <= 2 and r < 0.3:
            facts["dropped"].append(w)
            continue
        out.append(w.rstrip(".,!?") if rng.random() < 0.5 else w)
        if r > 0.8:
            out.append(out[-1])
            facts["repeated"].append(out[-1])
    if not out:
        out, facts["dropped"] = words[:1], facts["dropped"][1:]
    if level == 1:
        rng.shuffle(out)
    if level <= 2:
        out = [w.upper() if rng.random() < 0.15 else w.lower() for w in out]
    return out, facts


def _explain(rng: random.Random, axis: str, perceived: int, f: dict, level: int) -> str:
    """A one or two sentence explanation naming specifics of this item."""
    verdict = tone(rng, perceived)
    if axis == "naturalness":
        n = f["naturalness"]
        if level == 5:
            body = f"The reply reads like a person wrote it: \"{_quote(f['reply'], 5)}\""
        elif level == 4:
            body = (f"The reply is fluent except for the filler \"{n['filler']}\" after "
                    f"\"{n['after']}\"")
        elif level == 1:
            body = (f"The reply is a jumble of words in no sensible order, e.g. "
                    f"\"{_quote(f['reply'], 5)}\"")
        else:
            rep = ", ".join(f'"{w}"' for w in dict.fromkeys(
                w.lower() if level == 2 else w for w in n["repeated"])) or "no word"
            body = f"The reply repeats {rep} and loses its punctuation"
            if level == 2:
                drop = ", ".join(f'"{w}"' for w in n["dropped"][:3]) or "words"
                body += f", and words such as {drop} are missing"
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
