"""Source adapters: each real schema -> Conversations, bad input, skip policy, the CLI."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

from xft_jax.data import sources
from xft_jax.data.readers import DataError, LoadReport
from xft_jax.data.schema import Conversation

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "data")


def fx(name):
    return os.path.join(FIX, name)


def test_chatbot_arena_one_item_per_model_response():
    convs = sources.load_source("chatbot_arena", fx("chatbot_arena.jsonl"))
    assert [c.id for c in convs] == [
        "chatbot_arena:58210e39b3fd4441a2bd4a518bb44c2d#a",
        "chatbot_arena:58210e39b3fd4441a2bd4a518bb44c2d#b",
        "chatbot_arena:2564acd09e3942fd97657d05282d4389#a",
        "chatbot_arena:2564acd09e3942fd97657d05282d4389#b"]
    assert convs[1].response.startswith("OpenCL and CUDA are both")
    assert convs[0].context == (("User", "What is the difference between OpenCL and CUDA?"),)
    multi = convs[3]
    assert [s for s, _ in multi.context] == ["User", "Assistant", "User"]
    assert multi.response == "Ask them — gently — why."


def test_chatbot_arena_parquet_and_csv_read_the_same(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in open(fx("chatbot_arena.jsonl"), encoding="utf-8")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    from_parquet = sources.load_source("chatbot_arena", str(tmp_path))
    assert from_parquet == sources.load_source("chatbot_arena", fx("chatbot_arena.jsonl"))
    import csv
    with open(tmp_path / "arena.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["question_id", "conversation_a", "conversation_b"])
        w.writeheader()
        for r in rows:  # CSV cells hold the message lists as JSON, as HF exports do
            w.writerow({"question_id": r["question_id"],
                        "conversation_a": json.dumps(r["conversation_a"]),
                        "conversation_b": json.dumps(r["conversation_b"])})
    assert sources.load_source("chatbot_arena", str(tmp_path / "arena.csv")) == from_parquet


def test_hh_rlhf_chosen_and_rejected_last_assistant_turn(tmp_path):
    chosen = sources.load_source("hh_rlhf_chosen", fx("hh_rlhf.jsonl"))
    rejected = sources.load_source("hh_rlhf_rejected", fx("hh_rlhf.jsonl"))
    assert [c.response for c in chosen] == [
        "I don't have one.",
        "Mix flour, sugar, eggs and butter, then bake at 180°C for 30 minutes."]
    assert [c.response for c in rejected] == ["Ass.", "Buy one."]
    assert chosen[0].context == rejected[0].context == (
        ("User", "What are some cuss words in english?"),
        ("Assistant", "I'd rather not list those."), ("User", "What's your favorite one?"))
    assert all(c.id.startswith("hh_rlhf_chosen:") for c in chosen)
    assert chosen[0].id != rejected[0].id
    # the Hub ships train.jsonl.gz: gzip is read the same way, ids are content hashes
    gz = tmp_path / "train.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(open(fx("hh_rlhf.jsonl"), "rb").read())
    assert sources.load_source("hh_rlhf_chosen", str(gz)) == chosen


def test_amazon_qa_one_item_per_answer_with_reviews():
    convs = sources.load_source("amazon_qa", fx("amazon_qa.jsonl"))
    assert [c.id for c in convs] == ["amazon_qa:B00004T1HY:101#0", "amazon_qa:B00004T1HY:101#1",
                                     "amazon_qa:B000050FEU:102#0"]
    assert convs[0].context[0][0] == "Reviews" and "MacBook" in convs[0].context[0][1]
    assert convs[0].context[1] == ("Customer", "Does this fit a 15 inch laptop?")
    assert convs[1].response == "It does, snugly."
    assert convs[2].context == (("Customer", "How long does the battery last?"),)


def test_coqa_original_json_last_answer_is_response():
    convs = sources.load_source("coqa", fx("coqa.json"))
    assert [c.id for c in convs] == ["coqa:3zotghdk5ibi9cex97fepx7jetpso7",
                                     "coqa:3wj1oxy92agboo5nlq4r7bndc3a8a8"]
    c = convs[0]
    assert c.context[0][0] == "Story" and c.context[0][1].startswith("The Vatican")
    assert c.context[1:] == (("User", "When was the Vat formally opened?"),
                             ("Assistant", "It was formally established in 1475"),
                             ("User", "what is the library for?"), ("Assistant", "the Holy See"),
                             ("User", "where is it?"))
    assert c.response == "Vatican City"


def test_coqa_from_a_tfds_builder_directory(tmp_path):
    """TFDS's own coqa feature spec, written as array_record and read back."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.question_answering.coqa import Coqa

    from xft_jax.data import tfds_builder

    doc = json.load(open(fx("coqa.json"), encoding="utf-8"))

    class CoqaFixture(Coqa, skip_registration=True):  # the real features, local rows
        name = "coqa"
        code_path = tfds_builder.XftRated.code_path  # see tfds_builder: no importlib_resources

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(None)}

        def _generate_examples(self, filepath):
            for row in doc["data"]:
                yield row["id"], {
                    "source": row["source"], "story": row["story"],
                    "questions": [q["input_text"] for q in row["questions"]],
                    "answers": {"input_text": [a["input_text"] for a in row["answers"]],
                                "answer_start": [a["span_start"] for a in row["answers"]],
                                "answer_end": [a["span_end"] for a in row["answers"]]}}

    b = CoqaFixture(data_dir=str(tmp_path), file_format="array_record")
    b.download_and_prepare()
    convs = sources.load_source("coqa", str(b.data_dir))
    assert str(b.data_dir) == str(tmp_path / "coqa" / "1.0.0")
    assert sources.load_source("coqa", str(tmp_path)) == convs  # a TFDS data_dir works too
    original = {c.response: c for c in sources.load_source("coqa", fx("coqa.json"))}
    assert len(convs) == 2
    for c in convs:  # TFDS rows have no id: a content hash instead, same conversation
        assert c.context == original[c.response].context
        assert c.id.startswith("coqa:") and len(c.id) == len("coqa:") + 16
    assert isinstance(tfds.builder_from_directory(str(b.data_dir)), tfds.core.DatasetBuilder)


def test_cornell_raw_files_latin1_and_hf_rows():
    convs = sources.load_source("cornell_movie", fx("cornell"))
    assert [c.id for c in convs] == ["cornell_movie:m0:L1044", "cornell_movie:m0:L984"]
    assert convs[0].context == (("Cameron", "They do to!"),) and convs[0].response == "They do not!"
    assert convs[1].response == "Let's go to the café."  # ISO-8859-1 as distributed
    assert [s for s, _ in convs[1].context] == ["Cameron", "Bianca", "Cameron"]
    hf = sources.load_source("cornell_movie", fx("cornell_movie_dialog.jsonl"))
    assert hf[0].id == "cornell_movie:m0:L194"
    assert hf[0].context == (("Bianca", "Can we make this quick?"),
                             ("Cameron", "Well, I thought we'd start with pronunciation."))
    assert hf[0].response == "Not the hacking and gagging and spitting part."


def test_ids_are_deterministic_and_limit_works():
    a = sources.load_source("amazon_qa", fx("amazon_qa.jsonl"))
    assert sources.load_source("amazon_qa", fx("amazon_qa.jsonl"), limit=2) == a[:2]
    assert sources.load_source("amazon_qa", fx("amazon_qa.jsonl"), limit=0) == []


def test_synthetic_source_and_registry():
    assert set(sources.SOURCES) == {"chatbot_arena", "hh_rlhf_chosen", "hh_rlhf_rejected",
                                    "amazon_qa", "coqa", "cornell_movie", "chitchat",
                                    "synthetic", "chitchat_degraded"}
    convs = sources.load_source("synthetic", limit=5)
    assert len(convs) == 5 and all(isinstance(c, Conversation) for c in convs)
    with pytest.raises(ValueError, match="unknown source"):
        sources.load_source("nope", fx("amazon_qa.jsonl"))


def test_hub_path_calls_datasets_load_dataset(monkeypatch):
    """No path -> datasets.load_dataset(hub name); faked here, never reached in tests."""
    import datasets

    calls = []
    rows = [json.loads(line) for line in open(fx("hh_rlhf.jsonl"), encoding="utf-8")]

    def fake(name, split=None, **kw):
        calls.append((name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake)
    convs = sources.load_source("hh_rlhf_rejected")
    assert calls == [("Anthropic/hh-rlhf", "train")]
    assert convs == sources.load_source("hh_rlhf_rejected", fx("hh_rlhf.jsonl"))
    with pytest.raises(DataError, match="no Hugging Face Hub dataset"):
        sources.load_source("amazon_qa")


BAD_CASES = [
    (b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"}\n{"chosen": broken\n', 2,
     "malformed JSON"),
    (b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"}\n{"rejected": "x"}\n', 2,
     "missing field"),
    (b'{"chosen": 42}\n', 1, "wrong type"),
    (b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: ok"}\n{"chosen": "caf\xe9"}\n', 2,
     "not valid UTF-8"),
    (b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: ok"}\n'
     b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant:   "}\n', 2, "empty response"),
    (b'[1, 2]\n', 1, "wrong type"),
]


@pytest.mark.parametrize("content,line,reason", BAD_CASES)
def test_bad_input_names_file_and_line(tmp_path, content, line, reason):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        sources.load_source("hh_rlhf_chosen", str(p))
    assert str(e.value).startswith(f"{p}:{line}: ") and reason in str(e.value)
    report = LoadReport()
    convs = sources.load_source("hh_rlhf_chosen", str(p), on_error="skip", report=report)
    assert report.num_skipped == 1 and len(convs) == line - 1
    assert report.rows == line and report.items == line - 1
    assert reason in report.examples[0] and f"{p}:{line}" in report.examples[0]


def test_skip_counts_by_reason_and_nothing_silently_dropped(tmp_path):
    rows = [{"questionText": "Q1?", "qid": 1, "answers": [{"answerText": "A"},
                                                          {"answerText": " "}]},
            {"questionText": "Q2?", "qid": 2},
            {"questionText": 7, "qid": 3, "answers": []},
            {"questionText": "Q4?", "qid": 4, "answers": [{"answerText": "fine"}]}]
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = LoadReport()
    convs = sources.load_source("amazon_qa", str(p), on_error="skip", report=report)
    assert [c.id for c in convs] == ["amazon_qa::1#0", "amazon_qa::4#0"]
    assert report.skipped == {"empty response": 1, "missing field": 1, "wrong type": 1}
    assert report.items + report.num_skipped == 5  # 4 answers + 1 answerless row
    assert "3 skipped" in report.summary()


def test_bad_whole_json_file_and_csv_non_utf8(tmp_path):
    p = tmp_path / "coqa.json"
    p.write_text('{"data": [\n{"story": "x",\n oops}]}')
    with pytest.raises(DataError, match=rf"^{p}:3: malformed JSON"):
        sources.load_source("coqa", str(p))
    c = tmp_path / "hh.csv"
    c.write_bytes(b"chosen,rejected\n\"\n\nHuman: a\n\nAssistant: b\",x\n\xff,y\n")
    with pytest.raises(DataError, match=rf"^{c}:7: not valid UTF-8: byte 0xff"):
        sources.load_source("hh_rlhf_chosen", str(c))
    with pytest.raises(DataError, match="unsupported file type"):
        sources.load_source("coqa", fx("cornell/movie_lines.txt"))


def test_duplicates_merged_and_conflicts_flagged(tmp_path):
    line = open(fx("hh_rlhf.jsonl"), encoding="utf-8").readline()
    p = tmp_path / "dup.jsonl"
    p.write_text(line + line)
    report = LoadReport()
    assert len(sources.load_source("hh_rlhf_chosen", str(p), report=report)) == 1
    assert report.duplicates == 1
    row = json.loads(open(fx("chatbot_arena.jsonl"), encoding="utf-8").readline())
    other = dict(row, conversation_b=row["conversation_a"])  # same question_id, new content
    q = tmp_path / "arena.jsonl"
    q.write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    with pytest.raises(DataError, match=rf"^{q}:2: duplicate id: chatbot_arena:.*#b with "
                                        "different content"):
        sources.load_source("chatbot_arena", str(q))


def test_cli_prints_canonical_json_lines(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "xft_jax.data", "--source=coqa",
                          f"--path={fx('coqa.json')}", "--limit=1"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    item = Conversation.from_dict(json.loads(lines[0]))
    assert item == sources.load_source("coqa", fx("coqa.json"), limit=1)[0]
    assert "1 items" in out.stderr
    bad = tmp_path / "bad.jsonl"
    shutil.copy(fx("hh_rlhf.jsonl"), bad)
    with open(bad, "a") as f:
        f.write("{not json\n")
    out = subprocess.run([sys.executable, "-m", "xft_jax.data", "--source=hh_rlhf_chosen",
                          f"--path={bad}", "--limit=0"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and f"{bad}:3: malformed JSON" in out.stderr
    out = subprocess.run([sys.executable, "-m", "xft_jax.data", "--source=hh_rlhf_chosen",
                          f"--path={bad}", "--limit=0", "--on_error=skip"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and len(out.stdout.strip().splitlines()) == 2
    assert "1 skipped (1 x malformed JSON)" in out.stderr


def test_chitchat_real_rows_from_the_installed_package(tmp_path):
    """Every chat of the package is an item or a counted skip; items match the raw JSON."""
    path = sources.chitchat_package_file()
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    report = LoadReport()
    convs = sources.load_source("chitchat", report=report)
    assert report.rows == len(raw) == 7168
    assert report.items == len(convs) and report.items + report.num_skipped == len(raw)
    assert set(report.skipped) == {"no reply", "blank turn"}
    by_id = {c.id: c for c in convs}
    two = [k for k, chat in raw.items() if len({m[0]["sender"] for m in chat["messages"]}) == 2]
    assert len(convs) > 3900 and set(by_id) <= {f"chitchat:{k}" for k in two}
    key = next(iter(raw))
    turns = raw[key]["messages"]
    c = by_id[f"chitchat:{key}"]
    assert c.source == "chitchat" and len(c.context) == len(turns) - 1
    assert c.response == " ".join(m["text"].strip() for m in turns[-1])
    assert c.context[0] == ("A", " ".join(m["text"].strip() for m in turns[0]))
    assert [s for s, _ in c.context[:4]] == ["A", "B", "A", "B"]
    # the same chats as JSONL rows (id + messages) give the same items
    rows = tmp_path / "chats.jsonl"
    rows.write_text("".join(json.dumps({"id": k, "messages": raw[k]["messages"]}) + "\n"
                            for k in list(raw)[:40]))
    again = sources.load_source("chitchat", str(rows), on_error="skip")
    assert again == [by_id[i.id] for i in again] and len(again) > 10


CHITCHAT_BAD = [
    ({"id": "x", "messages": "hello"}, "wrong type"),
    ({"messages": [[{"text": "hi", "sender": "a"}], [{"text": "yo", "sender": "b"}]]},
     "missing field: 'id'"),
    ({"id": "x", "messages": [[{"text": "hi", "sender": "a"}], [{"sender": "b"}]]},
     "missing field: messages[1][0].'text'"),
    ({"id": "x", "messages": [[{"text": 3, "sender": "a"}], [{"text": "yo", "sender": "b"}]]},
     "wrong type"),
    ({"id": "x", "messages": [[{"text": "hi", "sender": "a"}, {"text": "yo", "sender": "b"}]]},
     "invalid item: messages[0] mixes senders"),
    ({"id": "x", "messages": [[{"text": "hi", "sender": "a"}], [{"text": "yo", "sender": "b"}],
                              [{"text": "hey", "sender": "c"}]]}, "third sender"),
    ({"id": "x", "messages": [[{"text": "hi", "sender": "a"}], []]}, "wrong type"),
]


@pytest.mark.parametrize("bad,reason", CHITCHAT_BAD)
def test_chitchat_bad_rows_name_file_and_line(tmp_path, bad, reason):
    good = {"id": "g", "messages": [[{"text": "hi", "sender": "a"}],
                                    [{"text": "hello", "sender": "b"}]]}
    p = tmp_path / "chats.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        sources.load_source("chitchat", str(p))
    assert str(e.value).startswith(f"{p}:2: ") and reason in str(e.value)
    report = LoadReport()
    convs = sources.load_source("chitchat", str(p), on_error="skip", report=report)
    assert [c.id for c in convs] == ["chitchat:g"] and convs[0].context == (("A", "hi"),)
    assert report.rows == 2 and report.num_skipped == 1


def test_chitchat_package_layout_file_errors(tmp_path):
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps([{"messages": []}]))
    with pytest.raises(DataError, match=rf"^{p}:1: wrong type: expected a JSON object"):
        sources.load_source("chitchat", str(p))
    p.write_text(json.dumps({"c1": [1], "c2": {"messages": [
        [{"text": "a", "sender": "u"}], [{"text": " ", "sender": "v"}]]}}))
    with pytest.raises(DataError, match=rf"^{p}:chat c1: wrong type"):
        sources.load_source("chitchat", str(p))
    report = LoadReport()
    assert sources.load_source("chitchat", str(p), on_error="skip", report=report) == []
    assert report.skipped == {"wrong type": 1, "blank turn": 1} and report.rows == 2
    p.write_text('{"c1": {"messages": [oops]}}')
    with pytest.raises(DataError, match=rf"^{p}:1: malformed JSON"):
        sources.load_source("chitchat", str(p))
