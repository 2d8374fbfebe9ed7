"""Ensemble annotation against a fake OpenAI-compatible server on 127.0.0.1.

The server answers per model name: "good" answers well, "flaky" fails each prompt's first
attempt with 503 or 429, "slow" stalls each first attempt past the client timeout,
"sleepy" answers well after 30 ms, "garbage" answers text with no score, "html" returns a
non-JSON body, "dead" always 500, "refuse" always 400.
"""

import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from xft_jax.data import annotation, synthetic
from xft_jax.data.annotation_prompts import (VARIANTS, MalformedAnswer, build_messages,
                                             parse_answer, parse_summary)
from xft_jax.data.openai_client import AnnotatorError, OpenAIChatAnnotator, from_config
from xft_jax.data.splits import build_datasets

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "data")
SECRET = "sk-test-DO-NOT-WRITE-4c7f2e"


class FakeOpenAI:
    def __init__(self):
        self.lock = threading.Lock()
        self.attempts = collections.Counter()  # (model, prompt) -> attempts
        self.auth = set()
        self.in_flight = self.max_in_flight = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    @property
    def total(self):
        return sum(self.attempts.values())

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model = body["model"]
                prompt = body["messages"][-1]["content"]
                with fake.lock:
                    fake.auth.add(self.headers.get("Authorization"))
                    fake.attempts[(model, prompt)] += 1
                    n = fake.attempts[(model, prompt)]
                with fake.lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    fake.respond(self, model, prompt, body["messages"][0]["content"], n)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        return Handler

    @staticmethod
    def send(h, code, payload, headers=()):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(code)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def respond(self, h, model, prompt, system, n):
        if model == "dead":
            return self.send(h, 500, {"error": "boom"})
        if model == "refuse":
            return self.send(h, 400, {"error": "bad request"})
        if model == "html":
            return self.send(h, 200, b"<html>gateway</html>")
        if model == "flaky" and n == 1:
            code = 429 if len(prompt) % 2 else 503
            return self.send(h, code, {"error": "busy"}, [("Retry-After", "0")])
        if model == "slow" and n == 1:
            time.sleep(0.6)
        if model == "sleepy":
            time.sleep(0.03)
        if "summarise" in system:
            text = "Explanation: The ensemble agrees the reply is decent."
        elif model == "garbage":
            text = "Honestly I quite like it!"
        else:
            scale = 4 if "1 to 4 scale" in prompt else 5
            score = 3 if scale == 4 else 4  # 3/4 -> 3.67 on 1..5
            text = f'```json\n{{"score": {score}, "explanation": "{model} finds it decent."}}\n```'
        self.send(h, 200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def client(server, model, name=None, **kw):
    kw = {"timeout": 2.0, "max_retries": 2, "backoff": 0.001, **kw}  # 2 s: shared CI boxes
    return OpenAIChatAnnotator(name or model, server.url, model, **kw)


MSGS = [{"role": "user", "content": "Rate it on a 1 to 5 scale."}]


def test_client_good_retries_timeouts_and_failures(server, monkeypatch):
    monkeypatch.setenv("XFT_TEST_KEY", SECRET)
    good = client(server, "good", api_key_env="XFT_TEST_KEY")
    assert parse_answer(good.complete(MSGS), 5) == (4, "good finds it decent.")
    assert server.auth == {f"Bearer {SECRET}"}
    assert SECRET not in repr(good) and SECRET not in str(vars(good))
    flaky = client(server, "flaky")
    assert "score" in flaky.complete(MSGS) and flaky.requests_sent == 2
    slow = client(server, "slow", timeout=0.3)  # the server stalls 0.6 s
    t = time.perf_counter()
    assert "score" in slow.complete([{"role": "user", "content": "other"}])
    assert slow.requests_sent == 2 and time.perf_counter() - t < 5.0
    cases = [("dead", "http 500", 3), ("refuse", "http 400", 1), ("html", "bad response", 1)]
    for model, kind, attempts in cases:
        c = client(server, model)
        with pytest.raises(AnnotatorError) as e:
            c.complete(MSGS)
        assert e.value.kind == kind and c.requests_sent == attempts, model
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = OpenAIChatAnnotator("x", f"http://127.0.0.1:{port}/v1", "m", timeout=0.3,
                                 max_retries=1, backoff=0.001)
    with pytest.raises(AnnotatorError) as e:
        closed.complete(MSGS)
    assert e.value.kind == "connection" and closed.requests_sent == 2


def test_backoff_grows_and_honours_retry_after(server):
    delays = []
    c = client(server, "dead", max_retries=3, backoff=0.5, max_backoff=1.5, sleep=delays.append)
    with pytest.raises(AnnotatorError):
        c.complete(MSGS)
    assert len(delays) == 3
    assert 0.5 <= delays[0] <= 0.625 and 1.0 <= delays[1] <= 1.25 and delays[2] >= 1.5
    assert c._delay(0, "0") == 0.0 and c._delay(0, "100") == 1.5


def test_keys_only_from_env(monkeypatch):
    monkeypatch.delenv("XFT_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="XFT_MISSING_KEY"):
        OpenAIChatAnnotator("a", "http://x/v1", "m", api_key_env="XFT_MISSING_KEY")
    with pytest.raises(ValueError, match="do not put API keys in config"):
        from_config({"name": "a", "base_url": "http://x", "model": "m", "api_key": "k"})
    with pytest.raises(ValueError, match="unknown field"):
        from_config({"name": "a", "base_url": "http://x", "model": "m", "key": "k"})


@pytest.mark.parametrize("text,scale,want", [
    ('{"score": 4, "explanation": "Fine."}', 5, (4, "Fine.")),
    ('Sure!\n```json\n{"Score": "3", "Explanation": "ok"}\n```', 4, (3, "ok")),
    ('Here you go: {"rating": 2, "reason": "Too  short."} Hope that helps.', 5, (2, "Too short.")),
    ("Score: 3/4\nExplanation: Mostly fluent.", 4, (3, "Mostly fluent.")),
    ("**Rating:** 5", 5, (5, "")),
    ('{"score": 4.0, "explanation": "x"}', 5, (4, "x")),
])
def test_parse_answer_accepts_real_formats(text, scale, want):
    assert parse_answer(text, scale) == want


@pytest.mark.parametrize("text,scale,why", [
    ("", 5, "empty"), ("I like it a lot", 5, "no score"),
    ('{"score": 5, "explanation": "x"}', 4, "outside 1-4"),
    ('{"score": 3.5, "explanation": "x"}', 5, "not an integer"),
    ('{"score": "high"}', 5, "not a number"),
    ("Score: 4/10", 5, "out of 10"),
    ('{"score": 2} and later {"score": 4}', 5, "conflicting"),
    ("Score: 0", 5, "outside"),
])
def test_parse_answer_never_guesses(text, scale, why):
    with pytest.raises(MalformedAnswer, match=why):
        parse_answer(text, scale)


def test_prompts_cover_four_variants_with_rubric():
    conv = synthetic.conversations(1)[0]
    texts = {v: build_messages(conv, "on_topic", v)[-1]["content"] for v in VARIANTS}
    assert "1 to 4 scale" in texts["scale4"] and "4 = fully on topic" in texts["scale4"]
    assert "1 to 5 scale" in texts["scale5"] and "3 = partly off topic" in texts["scale5"]
    assert "Example:" in texts["scale5_examples"] and "Example:" not in texts["scale5"]
    assert '"score": 4' in texts["scale4_examples"]  # example scores use the prompt's scale
    assert all(conv.response in t for t in texts.values())
    assert parse_summary("Explanation: Good.\n") == "Good."


def test_ensemble_aggregates_counts_and_caches(server, tmp_path):
    convs = synthetic.conversations(3, seed=1)
    anns = [client(server, "good"), client(server, "flaky"), client(server, "garbage")]
    cache = annotation.AnswerCache(str(tmp_path / "cache.sqlite"))
    rated, rep = annotation.annotate(convs, anns, cache, summarizer=anns[0], concurrency=4)
    n = 3 * 3 * 4  # items x axes x variants, per annotator
    assert len(rated) == 3 and rep.rated == 3 and rep.requests == 3 * n + 9
    assert rep.malformed == {"garbage: no score": n} and not rep.failed
    for ex in rated:
        for axis, r in ex.ratings.items():
            # good and flaky: 3/4 -> 4 (the rubric's anchor) twice, 4/5 twice each;
            # garbage excluded
            assert len(r.scores) == 8 and r.mean == pytest.approx(4.0)
            assert r.label == 4 and r.majority == 4 and r.agreement == 1.0
            assert {x.split("/")[0] for x in r.raters} == {"good", "flaky"}
            assert r.explanation == "The ensemble agrees the reply is decent."
    assert rep.summaries == {"summarised": 9}
    sent = server.total
    again, rep2 = annotation.annotate(convs, anns, cache, summarizer=anns[0])
    assert server.total == sent and rep2.requests == 0 and rep2.cache_hits == 3 * n + 9
    assert again == rated
    # without a summariser: the explanation closest to the consensus
    plain, _ = annotation.annotate(convs, anns[:2], cache)
    assert server.total == sent
    assert plain[0].ratings["naturalness"].explanation in ("good finds it decent.",
                                                           "flaky finds it decent.")
    cache.close()


def test_failures_are_counted_and_retried_by_a_rerun(server, tmp_path):
    convs = synthetic.conversations(2, seed=2)
    cache = annotation.AnswerCache(str(tmp_path / "c.sqlite"))
    anns = [client(server, "good"), client(server, "dead", name="late")]
    rated, rep = annotation.annotate(convs, anns, cache)
    assert len(rated) == 2  # the good annotator alone still rates every axis
    assert rep.failed == {"late: http 500": 24} and len(cache) == 24
    assert all(len(r.scores) == 4 for ex in rated for r in ex.ratings.values())
    # every axis unanswerable -> the item is left out and counted, never invented
    rated, rep = annotation.annotate(convs, [client(server, "garbage")], cache)
    assert rated == [] and rep.unrated == {f"{a}: no valid answers": 2 for a in
                                           ("naturalness", "comprehensiveness", "on_topic")}
    # the failed requests were not cached: the same name, now healthy, is asked again
    before = server.total
    rated, rep = annotation.annotate(convs, [anns[0], client(server, "good", name="late")],
                                     cache)
    assert rep.requests == 24 and server.total - before == 24 and not rep.failed
    assert all(len(r.scores) == 8 for ex in rated for r in ex.ratings.values())


def _count_in_flight(ann) -> dict:
    """Counts the annotator's requests in flight on the client side. (The server's own
    count is racy: it drops a request only after the reply has left, by which time the
    client may already have sent its next one.)"""
    state, lock, inner = {"now": 0, "max": 0}, threading.Lock(), ann._complete

    def counted(messages):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            return inner(messages)
        finally:
            with lock:
                state["now"] -= 1

    ann._complete = counted
    return state


def test_concurrency_is_bounded_and_chunking_changes_nothing(server, tmp_path):
    convs = synthetic.conversations(4, seed=4)
    cache = annotation.AnswerCache(str(tmp_path / "c.sqlite"))
    one = client(server, "sleepy", name="one", max_concurrency=2)
    seen_one = _count_in_flight(one)
    rated, _ = annotation.annotate(convs, [one], cache, concurrency=8)
    assert 1 < seen_one["max"] <= 2  # the annotator's own bound
    two = client(server, "sleepy", name="two")
    seen_two = _count_in_flight(two)
    rated2, _ = annotation.annotate(convs, [two], cache, concurrency=3, chunk_size=1)
    assert 1 < seen_two["max"] <= 3  # the pool's bound
    assert [r.ratings for r in rated] == [r.ratings for r in _renamed(rated2, "two", "one")]


def _renamed(examples, old, new):
    import dataclasses

    return [dataclasses.replace(ex, ratings={
        a: dataclasses.replace(r, raters=tuple(x.replace(old, new) for x in r.raters))
        for a, r in ex.ratings.items()}) for ex in examples]


class Interrupting:
    """Acts like Ctrl-C arriving after ``after`` answers."""

    def __init__(self, inner, after):
        self.inner, self.after, self.name, self.model = inner, after, inner.name, inner.model
        self.calls = 0

    def complete(self, messages):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.inner.complete(messages)


def test_interrupted_run_resumes_without_sending_anything_twice(server, tmp_path):
    convs = synthetic.conversations(2, seed=3)
    cache_path = str(tmp_path / "c.sqlite")
    cache = annotation.AnswerCache(cache_path)
    with pytest.raises(KeyboardInterrupt):
        annotation.annotate(convs, [Interrupting(client(server, "good"), 10)], cache,
                            concurrency=3)
    cache.close()
    assert 10 <= server.total < 24
    cache = annotation.AnswerCache(cache_path)
    rated, rep = annotation.annotate(convs, [client(server, "good")], cache, concurrency=3)
    assert len(rated) == 2 and server.total == 24  # 2 items x 3 axes x 4 variants
    assert set(server.attempts.values()) == {1}


def _run_main(args, env):
    return subprocess.run([sys.executable, "-m", "xft_jax.annotate", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_annotate_main_end_to_end_and_key_never_written(server, tmp_path):
    out = tmp_path / "rated"
    cfg = tmp_path / "annotators.json"
    cfg.write_text(json.dumps([
        {"name": "mixtral", "base_url": server.url, "model": "good", "api_key_env": "XFT_KEY"},
        {"name": "mistral", "base_url": server.url, "model": "flaky", "api_key_env": "XFT_KEY"},
        {"name": "junk", "base_url": server.url, "model": "garbage"}]))
    env = dict(os.environ, XFT_KEY=SECRET, JAX_PLATFORMS="cpu")
    args = ["--source=cornell_movie", f"--path={FIX}/cornell", f"--annotators={cfg}",
            "--summarizer=mixtral", f"--out_dir={out}", "--timeout=2", "--backoff=0.001",
            "--num_train=1", "--num_test=1"]
    res = _run_main(args, env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert SECRET not in res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["num_train"] + report["num_test"] == 2
    assert report["annotation"]["malformed"] == {"junk: no score": 24}
    assert server.auth >= {f"Bearer {SECRET}", None}
    sent = server.total
    assert sent == 3 * 24 + 24 + 6  # 3 annotators, flaky retried once each, 6 summaries
    d = build_datasets("cornell_movie", str(out))
    e = build_datasets("cornell_movie", str(out / "tfds"))
    assert d.train + d.test == e.train + e.test and len(d.train + d.test) == 2
    assert {x.conversation.source for x in d.train + d.test} == {"cornell_movie"}
    summary = json.load(open(out / "cornell_movie" / "summary.json"))
    assert set(summary["target_lengths"].get("naturalness", {})) <= {
        "label_only", "explanation", "shuffled", "bag_of_words", "random_vocab"}
    assert summary["annotators"][0]["api_key_env"] == "XFT_KEY"
    # the key appears in no file written (cache, JSONL, TFDS, summary)
    for root, _, files in os.walk(tmp_path):
        for f in files:
            assert SECRET.encode() not in open(os.path.join(root, f), "rb").read(), f
    # a rerun sends no request at all
    res = _run_main(args, env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert server.total == sent and json.loads(res.stdout)["annotation"]["requests"] == 0


def test_annotate_main_synthetic_and_bad_input(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "rated"
    res = _run_main(["--source=synthetic", "--num_synthetic=60", "--num_train=30",
                     "--num_test=10", f"--out_dir={out}"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    d = build_datasets("synthetic", str(out / "tfds"))
    assert (len(d.train), len(d.test)) == (30, 10)
    assert d.train == build_datasets("synthetic", str(out)).train
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"questionText": "Q?", "answers": [{"answerText": "A"}]}\n{oops\n')
    cfg = tmp_path / "a.json"
    cfg.write_text(json.dumps([{"name": "a", "base_url": "http://127.0.0.1:1/v1",
                                "model": "m"}]))
    out2 = tmp_path / "rated2"
    res = _run_main(["--source=amazon_qa", f"--path={bad}", f"--annotators={cfg}",
                     f"--out_dir={out2}"], env)
    assert res.returncode != 0 and f"{bad}:2: malformed JSON" in res.stderr
    assert not (out2 / "amazon_qa").exists()
