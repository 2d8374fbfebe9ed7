"""A generated corpus whose ratings follow from how each response was built.

Six domains styled after the six sources. Every item asks for four points; the response
is then built from three factors, one per axis:

* comprehensiveness: how many of the four points it answers (level = 1 + covered),
* on_topic: how many sentences drift to an unrelated subject (none = 5, all = 1),
* naturalness: how badly the phrasing is corrupted (clean = 5, word salad = 1).

Three simulated annotators with their own bias and noise rate each item and axis under
the four prompt variants (1-4 and 1-5 scales), and the real aggregation code
(``aggregate.py``) turns their answers into labels and explanations. Deterministic in
``seed``; item i is the same whatever ``num_items`` is.

    generate(num_items, seed) -> list[RatedExample]
    conversations(num_items, seed) -> list[Conversation]
    pretraining_texts(num_items, seed) -> list[str]
"""

from __future__ import annotations

import random

from xft_jax.data.aggregate import ScoredAnswer, aggregate_axis, rescale
from xft_jax.data.schema import AXES, Conversation, RatedExample

DEFAULT_NUM_ITEMS = 3000
VARIANTS = ("scale4", "scale4_examples", "scale5", "scale5_examples")
# name, bias, noise sd, probability of a malformed (excluded) answer
ANNOTATORS = (("sim-lenient", 0.3, 0.45, 0.02), ("sim-strict", -0.3, 0.45, 0.02),
              ("sim-noisy", 0.0, 0.8, 0.05))

# domain -> (subjects, aspects); an aspect is (short name, how it is asked, answer).
_DOMAINS = {
    "open_chat": (
        ("black holes", "the history of Rome", "jazz music", "composting", "volcanoes",
         "the Mediterranean diet", "chess openings", "coral reefs", "impressionist painting",
         "the stock market"),
        (("origins", "where interest in {s} comes from",
          "Interest in {s} goes back at least {n} hundred years."),
         ("importance", "why {s} matters", "{S} matters because it changes how people see "
                                           "everyday things."),
         ("misconceptions", "what people often get wrong",
          "A common mistake is to think {s} is simple, when it takes years to understand."),
         ("getting started", "how a beginner should start",
          "A beginner can start with {n} short sessions a week on the basics."),
         ("resources", "which resource to read first",
          "A good first step is an introductory book with plenty of pictures."),
         ("surprises", "one surprising fact", "Surprisingly, experts still argue about "
                                              "parts of {s} today."))),
    "assistant_help": (
        ("bake sourdough bread", "change a flat tire", "write a cover letter",
         "plant tomatoes", "set up a home network", "train a puppy to sit", "paint a bedroom",
         "start running", "fix a leaky faucet", "organise a garage"),
        (("tools", "what tools I need", "For this you only need a few basic tools you "
                                        "probably already own."),
         ("time", "how long it takes", "Expect it to take about {n} hours the first time."),
         ("first step", "what the first step is", "The first step is to clear some space "
                                                  "and read through the whole plan."),
         ("mistakes", "which mistake to avoid", "The most common mistake is rushing the "
                                                "preparation."),
         ("safety", "whether it is safe", "It is safe as long as you go slowly and wear "
                                          "gloves."),
         ("cost", "how much it costs", "Most people spend around {n}0 dollars in total."))),
    "product_qa": (
        ("wireless headphones", "coffee grinder", "hiking backpack", "electric kettle",
         "desk lamp", "air fryer", "yoga mat", "bluetooth speaker", "robot vacuum",
         "travel pillow"),
        (("battery life", "how long the battery lasts", "The battery lasts about {n} hours "
                                                        "on a full charge."),
         ("price", "whether it is worth the price", "At roughly {n}0 dollars it is good value "
                                                    "for the build quality."),
         ("size", "how big it is", "It is about {n} inches across and fits in a bag."),
         ("warranty", "what the warranty covers", "The warranty covers parts and repairs for "
                                                  "{n} years."),
         ("cleaning", "how easy it is to clean", "It wipes clean in a minute with a damp "
                                                 "cloth."),
         ("noise", "how loud it is", "It is quiet enough to use while someone sleeps "
                                     "nearby."))),
    "reading_qa": (
        ("Mia", "Tom", "Grandpa Joe", "Lena", "Sam", "Aunt Rosa", "Ben", "Priya", "Omar",
         "Kate"),
        (("home", "where {s} lived", "{S} lived in a small house by the river."),
         ("pet", "what pet {s} had", "{S} had an old grey cat named Pepper."),
         ("day", "which day {s} went shopping", "{S} went shopping every Saturday."),
         ("purchase", "what {s} bought", "{S} bought {n} loaves of bread and some apples."),
         ("weather", "what the weather was like", "It rained all afternoon, so the streets "
                                                  "were empty."),
         ("ending", "how the story ends", "In the end {s} stayed home and baked a pie."))),
    "movie_dialogue": (
        ("Jack", "Rose", "Vince", "Mallory", "Eddie", "Nora", "Frank", "Iris", "Leo", "Dana"),
        (("whereabouts", "where you were last night", "I was at the bus station until "
                                                      "midnight, I swear."),
         ("stranger", "who that guy was", "That guy was my cousin from Ohio, nobody "
                                          "important."),
         ("car", "why you took my car", "I took the car because mine would not start."),
         ("return", "when you are coming back", "I will be back in {n} days, maybe sooner."),
         ("money", "what happened to the money", "The money is in the glove box, every "
                                                 "dollar of it."),
         ("phone", "why you did not call", "My phone died and I did not know your number "
                                           "by heart."))),
    "tech_support": (
        ("my laptop will not turn on", "the printer shows an error", "the Wi-Fi keeps "
         "dropping", "my phone battery drains fast", "email is not syncing", "the screen "
         "flickers", "the app crashes at start", "my mouse is lagging",
         "updates fail to install", "the speakers crackle"),
        (("cause", "what is causing it", "This usually happens because a driver is out of "
                                         "date."),
         ("fix", "how to fix it", "Restart the device, then install the latest update from "
                                  "settings."),
         ("duration", "how long the fix takes", "The whole fix takes about {n} minutes."),
         ("data", "whether my files are safe", "Your files are safe; nothing is deleted by "
                                               "these steps."),
         ("support", "when to call support", "Call support if it still fails after {n} "
                                             "restarts."),
         ("prevention", "how to stop it happening again", "Turning on automatic updates "
                                                          "prevents it from coming back."))),
}
DOMAINS = tuple(_DOMAINS)


def _fill(template: str, subject: str, n: int) -> str:
    return template.format(s=subject, S=subject[0].upper() + subject[1:], n=n)


def _context(rng: random.Random, domain: str, subject: str, asks: list[str]) -> list:
    ask = f"{', '.join(asks[:-1])} and {asks[-1]}"
    if domain == "open_chat":
        turns = [("User", "Hi there!"), ("Assistant", "Hello! What would you like to talk "
                                                      "about?")] if rng.random() < 0.5 else []
        return turns + [("User", f"Tell me about {subject}. I want to know {ask}.")]
    if domain == "assistant_help":
        return [("User", f"I need to {subject}. Can you tell me {ask}?")]
    if domain == "product_qa":
        return [("Reviews", f"- Bought this {subject} last month.\n- Does the job for me."),
                ("Customer", f"About this {subject}: I would like to know {ask}.")]
    if domain == "reading_qa":
        story = (f"{subject} lived in a small house by the river with an old grey cat named "
                 f"Pepper. Every Saturday {subject} walked to the market. One day it rained "
                 f"all afternoon, so {subject} stayed home and baked a pie.")
        return [("Story", story), ("User", "Who is the story about?"),
                ("Assistant", subject), ("User", f"Now tell me {ask}.")]
    if domain == "movie_dialogue":
        other = rng.choice([n for n in _DOMAINS["movie_dialogue"][0] if n != subject])
        return [(other, f"{subject}! Finally. Sit down."), (subject, "What is this about?"),
                (other, f"Tell me {ask}.")]
    return [("User", f"Hi, {subject}. Please explain {ask}.")]


def _off_topic(rng: random.Random, domain: str, count: int) -> tuple[list[str], str]:
    other = rng.choice([d for d in DOMAINS if d != domain])
    subjects, aspects = _DOMAINS[other]
    subject = rng.choice(subjects)
    picked = rng.sample(aspects, count)
    return [_fill(a[2], subject, rng.randint(2, 9)) for a in picked], subject


_FILLERS = ("um,", "like,", "you know,", "kinda", "basically")


def _corrupt(rng: random.Random, text: str, level: int) -> str:
    """Degrades fluency: 5 clean, 4 casual slips, 3 repeats, 2 dropped words, 1 salad."""
    if level == 5:
        return text
    words = text.split()
    if level == 4:
        words[0] = words[0].lower()
        words.insert(rng.randrange(1, len(words)), rng.choice(_FILLERS))
        return " ".join(words)
    out = []
    for w in words:
        r = rng.random()
        if level <= 2 and r < 0.3:
            continue  # dropped word
        out.append(w.rstrip(".,") if level <= 3 and rng.random() < 0.5 else w)
        if r > 0.8:
            out.append(out[-1])  # stutter
    if level == 1:
        rng.shuffle(out)
    if level <= 2:
        out = [w.upper() if rng.random() < 0.15 else w.lower() for w in out]
    return " ".join(out or words[:1])


def axis_levels(rng: random.Random) -> dict[str, int]:
    on_topic = rng.randint(1, 5)
    comp = 1 if on_topic == 1 else rng.randint(1, 2 if on_topic == 2 else 5)
    return {"naturalness": rng.randint(1, 5), "comprehensiveness": comp, "on_topic": on_topic}


def _item(seed: int, index: int):
    rng = random.Random(f"xft_jax.synthetic:{seed}:{index}")
    domain = DOMAINS[index % len(DOMAINS)] if index < len(DOMAINS) else rng.choice(DOMAINS)
    subjects, aspects = _DOMAINS[domain]
    subject = rng.choice(subjects)
    asked = rng.sample(aspects, 4)
    levels = axis_levels(rng)
    covered = rng.sample(asked, levels["comprehensiveness"] - 1)
    n_off = {5: 0, 4: 1, 3: 2, 2: 3, 1: 3}[levels["on_topic"]]
    sentences = [_fill(a[2], subject, rng.randint(2, 9)) for a in covered]
    off, off_subject = _off_topic(rng, domain, n_off) if n_off else ([], "")
    if levels["on_topic"] > 1 and not sentences:
        sentences.append(f"Good question, there is a lot to say about {subject}.")
    sentences += off
    rng.shuffle(sentences)
    response = _corrupt(rng, " ".join(sentences), levels["naturalness"])
    conv = Conversation(id=f"synthetic:{seed}:{index:07d}", source="synthetic",
                        context=tuple(_context(rng, domain, subject,
                                               [_fill(a[1], subject, 0) for a in asked])),
                        response=response)
    facts = {"subject": subject, "asked": [a[0] for a in asked],
             "covered": [a[0] for a in covered], "off": n_off, "off_subject": off_subject,
             "sentences": len(sentences)}
    return rng, conv, levels, facts


_TONE = {1: ("very poor", "unacceptable"), 2: ("poor", "weak"), 3: ("mediocre", "middling"),
         4: ("good", "solid"), 5: ("excellent", "very good")}
_NATURAL = {5: "reads fluently, with natural grammar and phrasing",
            4: "is mostly fluent but has casual slips such as filler words",
            3: "is understandable but awkward, with repeated words and missing punctuation",
            2: "is hard to read because words are missing and repeated",
            1: "is a jumble of words in no sensible order"}


def _explain(rng: random.Random, axis: str, perceived: int, facts: dict, level: int) -> str:
    """A one or two sentence explanation that names the factor behind the score."""
    verdict = tone(rng, perceived)
    if axis == "naturalness":
        body = f"The response {_NATURAL[level]}"
    elif axis == "comprehensiveness":
        cov, asked = facts["covered"], facts["asked"]
        missing = [a for a in asked if a not in cov]
        if not cov:
            body = f"The response answers none of the four points asked ({', '.join(asked)})"
        elif not missing:
            body = f"The response covers all four points asked: {', '.join(cov)}"
        else:
            body = (f"The response covers {len(cov)} of the 4 points ({', '.join(cov)}) but "
                    f"leaves out {', '.join(missing)}")
    elif facts["off"] == 0:
        body = f"The response stays on {facts['subject']} the whole time"
    elif facts["off"] >= facts["sentences"]:
        body = (f"The response talks only about {facts['off_subject']}, which has nothing to "
                f"do with {facts['subject']}")
    else:
        body = (f"The response drifts to {facts['off_subject']} in {facts['off']} of its "
                f"{facts['sentences']} sentences instead of sticking to {facts['subject']}")
    return framed(rng, verdict, body)


def framed(rng: random.Random, tone: str, body: str) -> str:
    """An annotator's wording around the reason ``body``: a verdict in ``tone`` first,
    after it, or neither."""
    opener = rng.choice(("", f"Overall {tone}. ", f"{tone.capitalize()} on this axis. "))
    closer = rng.choice((".", f", so the score is {tone}.", "; that decides the rating."))
    return f"{opener}{body}{closer}"


def tone(rng: random.Random, perceived: int) -> str:
    """A verdict word for a perceived level 1..5."""
    return rng.choice(_TONE[perceived])


def simulated_answers(rng: random.Random, level: int, explain) -> list[ScoredAnswer]:
    """The simulated ensemble's answers for one item and axis whose construction level is
    ``level``: each annotator perceives the level through its bias and noise, scores it on
    each prompt variant's scale, and explains with ``explain(rng, perceived)``."""
    answers = []
    for name, bias, sd, p_bad in ANNOTATORS:
        for variant in VARIANTS:
            if rng.random() < p_bad:
                continue  # a malformed answer: excluded, as in the real run
            latent = level + bias + rng.gauss(0.0, sd)
            scale = 4 if variant.startswith("scale4") else 5
            score = min(scale, max(1, round(1 + (latent - 1) * (scale - 1) / 4)))
            perceived = min(5, max(1, round(latent)))
            answers.append(ScoredAnswer(name, variant, rescale(score, scale),
                                        explain(rng, perceived)))
    return answers


def _rate(rng: random.Random, axis: str, level: int, facts: dict) -> list[ScoredAnswer]:
    return simulated_answers(
        rng, level, lambda r, perceived: _explain(r, axis, perceived, facts, level))


def generate(num_items: int, seed: int = 0) -> list[RatedExample]:
    """``num_items`` synthetic conversations rated on all axes by the simulated ensemble."""
    out = []
    for i in range(num_items):
        rng, conv, levels, facts = _item(seed, i)
        ratings = {axis: aggregate_axis(_rate(rng, axis, levels[axis], facts)) for axis in AXES}
        out.append(RatedExample(conversation=conv, ratings=ratings))
    return out


def true_levels(num_items: int, seed: int = 0) -> list[dict[str, int]]:
    """The construction levels behind each item (what a perfect rater would say)."""
    return [_item(seed, i)[2] for i in range(num_items)]


def conversations(num_items: int, seed: int = 0) -> list[Conversation]:
    """The same items as ``generate`` without ratings (cheap)."""
    return [_item(seed, i)[1] for i in range(num_items)]


def render_dialogue(conv: Conversation, responder: str = "Assistant") -> str:
    """Plain dialogue text: one 'Speaker: text' line per turn, the response last."""
    lines = [f"{s}: {t}" for s, t in conv.context]
    return "\n".join(lines + [f"{responder}: {conv.response}"])


def pretraining_texts(num_items: int, seed: int = 0) -> list[str]:
    """Unlabelled dialogue text for language-model pre-training of small demo models.

    Uses a seed stream disjoint from ``generate``'s so no rated item leaks into it.
    """
    return [render_dialogue(c) for c in conversations(num_items, seed=-1 - seed)]
