"""Adapters from the paper's six public sources (plus ``chitchat`` and ``synthetic``) to
``Conversation``s.

Each adapter reads its source's own row schema, from the Hugging Face Hub through
``datasets.load_dataset`` when no path is given (``chitchat``: the ``chitchat-dataset``
package's own JSON file), or from local files in the same schema (json/jsonl/parquet/csv,
a TFDS builder directory, or Cornell's raw ``movie_*.txt``).
Ids are deterministic: the source's own key where it has one, else a content hash.
Items that share a prompt get ids ``<group>#<k>`` so the hashed split keeps them
together (see ``splits.py``).

    load_source(name, path=None, limit=None, on_error="raise", report=None) -> list
    SOURCES: name -> Source
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Callable, Iterable, Iterator

from xft_jax.data import synthetic
from xft_jax.data.readers import DataError, ErrorPolicy, LoadReport, RowError, iter_rows
from xft_jax.data.schema import Conversation, SchemaError



@dataclasses.dataclass(frozen=True)
class NotRateable:
    """A well-formed row that holds nothing to rate (e.g. a chat nobody answered): counted
    as skipped with ``reason`` whatever the error policy, never dropped silently."""

    reason: str


Item = Conversation | RowError | NotRateable


def _hash(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def _text(row: dict, key: str, *, where: str = "") -> str:
    """A string field (bytes from TFDS are decoded); RowError if missing or mistyped."""
    if key not in row or row[key] is None:
        raise RowError(f"missing field: {where}{key!r}")
    value = row[key]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RowError(f"not valid UTF-8: field {where}{key!r}") from None
    if not isinstance(value, str):
        raise RowError(f"wrong type: field {where}{key!r} must be a string, got "
                       f"{type(value).__name__}")
    return value


def _list(row: dict, key: str, *, optional: bool = False) -> list:
    """A list field; JSON-encoded lists (CSV cells) and numpy arrays are accepted."""
    if key not in row or row[key] is None:
        if optional:
            return []
        raise RowError(f"missing field: {key!r}")
    value = row[key]
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"malformed JSON: in field {key!r}: {e.msg}") from None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RowError(f"wrong type: field {key!r} must be a list, got {type(value).__name__}")
    return list(value)


def _conv(id_: str, source: str, context, response: str) -> Item:
    try:
        return Conversation(id=id_, source=source, context=tuple(context), response=response)
    except SchemaError as e:
        reason = str(e).split(": ", 1)[-1]
        kind = "empty response" if reason == "response is empty" else "invalid item"
        return RowError(f"{kind}: {id_}: {reason}")


# --- chatbot_arena: lmsys/chatbot_arena_conversations ------------------------------------

_ROLES = {"user": "User", "assistant": "Assistant", "system": "System"}


def chatbot_arena(row: dict) -> list[Item]:
    """One item per model response: the last assistant message of each side (a and b)."""
    qid = str(row["question_id"]) if row.get("question_id") else None
    out = []
    for side in ("a", "b"):
        messages = _list(row, f"conversation_{side}")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise RowError(f"wrong type: conversation_{side}[{i}] must be an object")
            role = _text(m, "role", where=f"conversation_{side}[{i}].")
            turns.append((_ROLES.get(role, role.capitalize()),
                          _text(m, "content", where=f"conversation_{side}[{i}].")))
        last = max((i for i, t in enumerate(turns) if t[0] == "Assistant"), default=None)
        if last is None:
            raise RowError(f"missing field: no assistant message in conversation_{side}")
        group = qid or _hash(json.dumps(turns[:last]))
        out.append(_conv(f"chatbot_arena:{group}#{side}", "chatbot_arena", turns[:last],
                         turns[last][1]))
    return out


# --- hh_rlhf_chosen / hh_rlhf_rejected: Anthropic/hh-rlhf --------------------------------

_HH_MARK = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str) -> list[tuple[str, str]]:
    """Splits '\\n\\nHuman: ...\\n\\nAssistant: ...' into (speaker, text) turns."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _HH_MARK.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError("not an hh-rlhf transcript: expected '\\n\\nHuman: ...\\n\\n"
                       "Assistant: ...'")
    return [("User" if parts[i] == "Human" else "Assistant", parts[i + 1].strip())
            for i in range(1, len(parts), 2)]


def _hh_rlhf(field: str) -> Callable[[dict], list[Item]]:
    source = f"hh_rlhf_{field}"

    def convert(row: dict) -> list[Item]:
        transcript = _text(row, field)
        turns = parse_hh_transcript(transcript)
        if turns[-1][0] != "Assistant":
            raise RowError(f"missing field: {field!r} transcript does not end with an "
                           "Assistant turn")
        if any(not t for _, t in turns[:-1]):
            raise RowError(f"invalid item: {field!r} transcript has an empty turn")
        return [_conv(f"{source}:{_hash(transcript)}", source, turns[:-1], turns[-1][1])]

    convert.__doc__ = f"The last Assistant turn of the {field!r} transcript is the response."
    return convert


# --- amazon_qa: AmazonQA (Gupta et al. 2019) ---------------------------------------------

def amazon_qa(row: dict) -> list[Item]:
    """One item per answer to ``questionText``; review snippets become a context turn."""
    question = _text(row, "questionText")
    snippets = _list(row, "review_snippets", optional=True)
    if not all(isinstance(s, str) for s in snippets):
        raise RowError("wrong type: review_snippets must be a list of strings")
    context = []
    if any(s.strip() for s in snippets):
        context.append(("Reviews", "\n".join(f"- {s.strip()}" for s in snippets if s.strip())))
    context.append(("Customer", question))
    group = (f"{row.get('asin', '')}:{row['qid']}" if row.get("qid") not in (None, "")
             else _hash(question))
    out = []
    for j, a in enumerate(_list(row, "answers")):
        if not isinstance(a, dict):
            raise RowError(f"wrong type: answers[{j}] must be an object")
        out.append(_conv(f"amazon_qa:{group}#{j}", "amazon_qa", context,
                         _text(a, "answerText", where=f"answers[{j}].")))
    if not out:
        raise RowError("missing field: 'answers' is empty")
    return out


# --- coqa: stanfordnlp/coqa, TFDS coqa, or the original coqa-*-v1.0.json ---------------

def coqa(row: dict) -> list[Item]:
    """Story + question/answer history; the last answer is the response."""
    story = _text(row, "story")
    raw_q = _list(row, "questions")
    answers = row.get("answers")
    if isinstance(answers, dict):  # HF / TFDS layout: {"input_text": [...], ...}
        raw_a = _list(answers, "input_text")
    else:  # original layout: [{"input_text": ..., "turn_id": ...}, ...]
        raw_a = _list(row, "answers")
    questions = [q if isinstance(q, (str, bytes)) else
                 (q.get("input_text") if isinstance(q, dict) else None) for q in raw_q]
    answers_t = [a if isinstance(a, (str, bytes)) else
                 (a.get("input_text") if isinstance(a, dict) else None) for a in raw_a]
    questions = [_text({"q": q}, "q", where="questions[].") for q in questions]
    answers_t = [_text({"a": a}, "a", where="answers[].") for a in answers_t]
    if not questions or len(questions) != len(answers_t):
        raise RowError(f"invalid item: {len(questions)} questions but {len(answers_t)} answers")
    context = [("Story", story)]
    for q, a in zip(questions[:-1], answers_t[:-1]):
        context += [("User", q), ("Assistant", a)]
    context.append(("User", questions[-1]))
    key = str(row["id"]) if row.get("id") else _hash(story, *questions)
    return [_conv(f"coqa:{key}", "coqa", context, answers_t[-1])]


# --- cornell_movie: Cornell Movie-Dialogs -------------------------------------------------

def cornell_movie(row: dict) -> list[Item]:
    """One item per conversation: the earlier lines are context, the last line the response.

    Reads the HF ``cornell_movie_dialog`` row (``utterance.text``; speakers alternate
    between ``characterName1`` and ``characterName2``) or a row built from the raw files
    (``lines``: [(speaker, text)]).
    """
    if "lines" in row:
        lines = [tuple(x) for x in row["lines"]]
        key = row["key"]
    else:
        utt = row.get("utterance")
        if not isinstance(utt, dict):
            raise RowError("missing field: 'utterance' (with 'text' and 'LineID')")
        texts = [_text({"t": t}, "t", where="utterance.text[].") for t in _list(utt, "text")]
        names = [row.get("characterName1") or "A", row.get("characterName2") or "B"]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        lines = [(names[i % 2].strip().title() or "AB"[i % 2], t) for i, t in enumerate(texts)]
        ids = _list(utt, "LineID", optional=True)
        key = f"{row.get('movieID', '')}:{ids[0] if ids else _hash(*texts)}"
    if len(lines) < 2:
        raise RowError("invalid item: a conversation needs at least two lines")
    return [_conv(f"cornell_movie:{key}", "cornell_movie", lines[:-1], lines[-1][1])]


_SEP = " +++$+++ "


def _cornell_raw_rows(directory: str, policy: ErrorPolicy) -> Iterator[tuple[str, dict]]:
    """Rows from the raw corpus (ISO-8859-1, as distributed): one per conversation."""
    lines = {}
    path = os.path.join(directory, "movie_lines.txt")
    with open(path, encoding="iso-8859-1") as f:
        for n, raw in enumerate(f, start=1):
            parts = raw.rstrip("\n").split(_SEP)
            if len(parts) != 5:
                policy.report.rows += 1
                policy.fail(f"{path}:{n}", f"missing field: expected 5 '{_SEP.strip()}' "
                                           f"fields, got {len(parts)}")
                continue
            lines[parts[0]] = (parts[3].strip().title() or parts[1], parts[4].strip())
    path = os.path.join(directory, "movie_conversations.txt")
    with open(path, encoding="iso-8859-1") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            parts = raw.rstrip("\n").split(_SEP)
            try:
                ids = ast.literal_eval(parts[3]) if len(parts) == 4 else None
            except (ValueError, SyntaxError):
                ids = None
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                policy.report.rows += 1
                policy.fail(where, "malformed line: expected 'c1 +++$+++ c2 +++$+++ movie "
                                   "+++$+++ [line ids]'")
                continue
            missing = [i for i in ids if i not in lines]
            if missing:
                policy.report.rows += 1
                policy.fail(where, f"missing field: line id(s) {missing} not in movie_lines.txt")
                continue
            yield where, {"key": f"{parts[2]}:{ids[0]}", "lines": [lines[i] for i in ids]}


# --- chitchat: BYU Chit-Chat Challenge (the ``chitchat-dataset`` package, MIT) --------------

def chitchat(row: dict) -> list[Item]:
    """One item per chat: the earlier turns are context, the last turn the response.

    A row is one chat as the package stores it, ``{"messages": [[{"text", "sender", ...},
    ...], ...]}`` plus its ``id`` (the package's key): a turn is one sender's consecutive
    messages, joined by spaces. Speakers are named "A" and "B" in order of appearance.
    A chat in which only one person wrote holds no reply, and one with a turn of blank
    messages only has a gap no rater can judge: both are ``NotRateable`` (the package
    holds 3,150 and 10 of them), counted and named in the load report.
    """
    key = _text(row, "id")
    turns = []
    senders: dict[str, str] = {}
    for i, turn in enumerate(_list(row, "messages")):
        if not isinstance(turn, (list, tuple)) or not turn:
            raise RowError(f"wrong type: messages[{i}] must be a non-empty list of messages")
        texts, who = [], set()
        for j, m in enumerate(turn):
            if not isinstance(m, dict):
                raise RowError(f"wrong type: messages[{i}][{j}] must be an object")
            texts.append(_text(m, "text", where=f"messages[{i}][{j}].").strip())
            who.add(_text(m, "sender", where=f"messages[{i}][{j}]."))
        if len(who) != 1:
            raise RowError(f"invalid item: messages[{i}] mixes senders {sorted(who)}")
        sender = who.pop()
        if sender not in senders:
            if len(senders) == 2:
                raise RowError(f"invalid item: messages[{i}] has a third sender")
            senders[sender] = "AB"[len(senders)]
        turns.append((senders[sender], " ".join(t for t in texts if t)))
    if len(senders) < 2:
        return [NotRateable(f"no reply: only one person wrote in chat {key}")]
    blank = [i for i, (_, text) in enumerate(turns) if not text]
    if blank:
        return [NotRateable(f"blank turn: messages{blank} of chat {key} hold only empty "
                            f"messages")]
    return [_conv(f"chitchat:{key}", "chitchat", turns[:-1], turns[-1][1])]


def chitchat_package_file() -> str:
    """The JSON file inside the installed ``chitchat-dataset`` wheel."""
    try:
        import chitchat_dataset
    except ImportError:
        raise DataError("chitchat: the chitchat-dataset package is not installed "
                        "(pip install chitchat-dataset), or pass a path") from None
    return os.path.join(os.path.dirname(os.path.abspath(chitchat_dataset.__file__)),
                        "dataset.json")


def _chitchat_rows(path: str, policy: ErrorPolicy) -> Iterator[tuple[str, dict]]:
    """Rows of the package's layout: one JSON object mapping chat id -> chat."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        policy.report.rows += 1
        policy.fail(f"{path}:1", f"not valid UTF-8: byte 0x{data[e.start]:02x} "
                                 f"(whole file unreadable)")
        return
    except json.JSONDecodeError as e:
        policy.report.rows += 1
        policy.fail(f"{path}:{e.lineno}", f"malformed JSON: {e.msg} at column {e.colno} "
                                          "(whole file unreadable)")
        return
    if not isinstance(doc, dict):
        policy.report.rows += 1
        policy.fail(f"{path}:1", "wrong type: expected a JSON object mapping chat id -> "
                                 "chat (the chitchat-dataset layout)")
        return
    for key, chat in doc.items():
        where = f"{path}:chat {key}"
        if not isinstance(chat, dict):
            policy.report.rows += 1
            policy.fail(where, f"wrong type: expected a JSON object, got "
                               f"{type(chat).__name__}")
            continue
        yield where, {**chat, "id": key}


# --- registry and loader -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    """A named source: its Hub dataset and the function that converts one of its rows."""

    name: str
    hub_name: str | None
    convert: Callable[[dict], list[Item]]
    description: str


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("chatbot_arena", "lmsys/chatbot_arena_conversations", chatbot_arena,
           "Chatbot Arena: conversation_a/conversation_b message lists"),
    Source("hh_rlhf_chosen", "Anthropic/hh-rlhf", _hh_rlhf("chosen"),
           "HH-RLHF 'chosen' transcripts"),
    Source("hh_rlhf_rejected", "Anthropic/hh-rlhf", _hh_rlhf("rejected"),
           "HH-RLHF 'rejected' transcripts"),
    Source("amazon_qa", None, amazon_qa,
           "AmazonQA: questionText, answers[].answerText, review_snippets"),
    Source("coqa", "stanfordnlp/coqa", coqa, "CoQA: story with question/answer history"),
    Source("cornell_movie", "cornell_movie_dialog", cornell_movie,
           "Cornell Movie-Dialogs: consecutive lines of one conversation"),
    Source("chitchat", None, chitchat,
           "BYU Chit-Chat Challenge human-human chats (chitchat-dataset package)"),
    Source("synthetic", None, lambda row: [], "generated offline, see synthetic.py"),
    Source("chitchat_degraded", None, lambda row: [],
           "real chitchat turns, degraded and rated offline, see chitchat_degraded.py"),
)}
# Sources whose rated examples are generated (``splits.build_datasets``), with no data.path.
GENERATED = ("synthetic", "chitchat_degraded")


def _hub_rows(src: Source, split: str) -> Iterator[tuple[str, dict]]:
    if src.hub_name is None:
        raise DataError(f"{src.name}: no Hugging Face Hub dataset; pass --path to local files")
    import datasets

    ds = datasets.load_dataset(src.hub_name, split=split)
    for i, row in enumerate(ds):
        yield f"{src.hub_name}[{split}]:row {i + 1}", row


def _tfds_version_dir(path: str, name: str) -> str | None:
    """``path`` itself if it is a TFDS dataset directory, else ``path/name/<latest>``."""
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    base = os.path.join(path, name)
    if not os.path.isdir(base):
        return None
    versions = [v for v in os.listdir(base)
                if os.path.isfile(os.path.join(base, v, "dataset_info.json"))]
    if not versions:
        return None
    latest = max(versions, key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))
    return os.path.join(base, latest)


def _tfds_rows(directory: str, split: str) -> Iterator[tuple[str, dict]]:
    import tensorflow_datasets as tfds

    ds = tfds.builder_from_directory(directory).as_data_source(split=split)
    for i in range(len(ds)):
        yield f"{directory}[{split}]:record {i + 1}", ds[i]


def _rows(src: Source, path: str | None, split: str, policy: ErrorPolicy):
    tfds_dir = _tfds_version_dir(path, src.name) if path and os.path.isdir(path) else None
    if src.name == "chitchat" and (path is None or path.endswith(".json")):
        rows = _chitchat_rows(chitchat_package_file() if path is None else path, policy)
    elif path is None:
        rows = _hub_rows(src, split)
    elif tfds_dir is not None:
        rows = _tfds_rows(tfds_dir, split)
    elif src.name == "cornell_movie" and os.path.isfile(os.path.join(path, "movie_lines.txt")):
        rows = _cornell_raw_rows(path, policy)
    else:
        yield from iter_rows(path, policy)
        return
    for where, row in rows:
        policy.report.rows += 1
        yield where, row


def iter_source(name: str, path: str | None = None, *, on_error: str = "raise",
                report: LoadReport | None = None, split: str = "train"
                ) -> Iterator[Conversation]:
    """Streams a source's conversations; see ``load_source``."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known: {sorted(SOURCES)}")
    policy = ErrorPolicy(on_error, report)
    if name == "synthetic":
        if path is not None:
            raise DataError(f"{path}: the synthetic source is generated; it takes no path")
        for c in synthetic.conversations(synthetic.DEFAULT_NUM_ITEMS, seed=0):
            policy.report.items += 1
            yield c
        return
    if name == "chitchat_degraded":
        raise DataError("chitchat_degraded: generated as rated examples "
                        "(xft_jax.data.chitchat_degraded.generate); its conversations come "
                        "from the chitchat source")
    src = SOURCES[name]
    seen: dict[str, tuple[Conversation, str]] = {}
    for where, row in _rows(src, path, split, policy):
        try:
            items = src.convert(row)
        except RowError as e:
            policy.fail(where, str(e))
            continue
        for item in items:
            if isinstance(item, RowError):
                policy.fail(where, str(item))
            elif isinstance(item, NotRateable):
                policy.report.add_skip(where, item.reason)
            elif item.id in seen:
                if seen[item.id][0] != item:
                    # Not a bad row that can be skipped: either copy may be the right one,
                    # and the other was already kept, so this stops even with on_error=skip.
                    raise DataError(f"{where}: duplicate id: {item.id} with different "
                                    f"content than at {seen[item.id][1]}; ids must name one "
                                    f"conversation (fix or remove one of the two rows)")
                policy.report.duplicates += 1
            else:
                seen[item.id] = (item, where)
                policy.report.items += 1
                yield item


def load_source(name: str, path: str | None = None, limit: int | None = None,
                on_error: str = "raise", report: LoadReport | None = None,
                split: str = "train") -> list[Conversation]:
    """Reads up to ``limit`` conversations of source ``name``.

    ``path``: None reads the Hub dataset (``split``; for ``chitchat`` the installed
    package's file); a file or directory reads local
    rows in the source's schema; a TFDS dataset directory, or a TFDS data_dir holding
    ``<name>/<version>/`` (e.g. a prepared ``coqa``), reads its ``split``.
    ``on_error``: "raise" stops at the first bad row with ``DataError("file:line: why")``;
    "skip" counts it in ``report`` (a ``LoadReport``; pass one in to inspect it).
    Identical rows repeated in a source (same id, same content) are merged and counted.
    """
    report = report if report is not None else LoadReport()
    out = []
    if limit is not None and limit <= 0:
        return out
    for conv in iter_source(name, path, on_error=on_error, report=report, split=split):
        out.append(conv)
        if limit is not None and len(out) >= limit:
            break
    if report.num_skipped:
        logging.getLogger(__name__).warning("%s: %s", name, report.summary())
    return out


def conversations_to_jsonl(conversations: Iterable[Conversation]) -> Iterator[str]:
    for c in conversations:
        yield json.dumps(c.to_dict(), ensure_ascii=False)
