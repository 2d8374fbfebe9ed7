"""Annotators: the ``Annotator`` protocol and an OpenAI-compatible chat-completions client.

Any server speaking ``POST {base_url}/chat/completions`` works (vLLM, TGI, llama.cpp,
hosted APIs). Transient failures (HTTP 429 and 5xx, timeouts, refused or reset
connections) are retried with exponential backoff and jitter, honouring Retry-After; other
failures raise ``AnnotatorError`` at once. The API key is read from the environment
variable the config names, at request time, and is never stored on the object, logged,
or put into an error message.

A local xft_jax checkpoint can become an annotator by implementing ``Annotator``
(``name`` plus ``complete(messages)``) once the model has KV-cache generation.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Protocol, runtime_checkable


class AnnotatorError(RuntimeError):
    """A request that failed for good (after retries, or not retryable)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind  # short reason used for counting: "http 500", "timeout", ...


@runtime_checkable
class Annotator(Protocol):
    """Something that answers chat messages. ``name`` keys the on-disk answer cache."""

    name: str

    def complete(self, messages: list[dict]) -> str:
        """Returns the assistant's reply text or raises ``AnnotatorError``."""


_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIChatAnnotator:
    """Chat-completions client with retries and a per-annotator concurrency bound."""

    def __init__(self, name: str, base_url: str, model: str, *, api_key_env: str | None = None,
                 timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 30.0, temperature: float = 0.0, max_tokens: int = 256,
                 max_concurrency: int | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        if not name or "/" in name:
            raise ValueError(f"annotator name {name!r} must be non-empty without '/'")
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"annotator {name!r}: environment variable {api_key_env} "
                             "(api_key_env) is not set")
        scheme = urllib.parse.urlsplit(str(base_url)).scheme.lower()
        if scheme not in ("http", "https") or not urllib.parse.urlsplit(str(base_url)).netloc:
            raise ValueError(f"annotator {name!r}: base_url={base_url!r} must be an http:// "
                             f"or https:// URL")
        self.name, self.model = name, model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self._slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        self._sleep = sleep
        self.requests_sent = 0  # HTTP attempts, retries included
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"OpenAIChatAnnotator(name={self.name!r}, url={self.url!r}, "
                f"model={self.model!r}, api_key_env={self.api_key_env!r})")

    def _request(self, messages: list[dict]) -> urllib.request.Request:
        body = json.dumps({"model": self.model, "messages": messages,
                           "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise AnnotatorError(f"{self.name}: {self.api_key_env} is not set", "no key")
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass
        base = min(self.max_backoff, self.backoff * 2 ** attempt)
        return base * (1.0 + 0.25 * random.random())

    def complete(self, messages: list[dict]) -> str:
        if self._slots:
            with self._slots:
                return self._complete(messages)
        return self._complete(messages)

    def _complete(self, messages: list[dict]) -> str:
        last: AnnotatorError | None = None
        for attempt in range(self.max_retries + 1):
            retry_after = None
            with self._lock:
                self.requests_sent += 1
            try:
                with urllib.request.urlopen(self._request(messages), timeout=self.timeout) as r:
                    raw = r.read()
                return self._content(raw)
            except urllib.error.HTTPError as e:
                retry_after = e.headers.get("Retry-After") if e.headers else None
                last = AnnotatorError(f"{self.name}: HTTP {e.code} from {self.url}",
                                      f"http {e.code}")
                e.close()
                if e.code not in _RETRY_STATUS:
                    raise last from None
            except (TimeoutError, socket.timeout):
                last = AnnotatorError(f"{self.name}: timed out after {self.timeout}s", "timeout")
            except urllib.error.URLError as e:
                kind = "timeout" if isinstance(e.reason, (TimeoutError, socket.timeout)) \
                    else "connection"
                last = AnnotatorError(f"{self.name}: {kind} error: {e.reason}", kind)
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                last = AnnotatorError(f"{self.name}: connection error: {type(e).__name__}",
                                      "connection")
            if attempt < self.max_retries:
                self._sleep(self._delay(attempt, retry_after))
        assert last is not None
        raise AnnotatorError(f"{last} (gave up after {self.max_retries + 1} attempts)",
                             last.kind)

    def _content(self, raw: bytes) -> str:
        try:
            doc = json.loads(raw.decode("utf-8"))
            content = doc["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise AnnotatorError(f"{self.name}: response is not a chat completion "
                                 f"({raw[:80]!r})", "bad response") from None
        if not isinstance(content, str):
            raise AnnotatorError(f"{self.name}: message content is not text", "bad response")
        return content


def from_config(cfg: dict, **defaults) -> OpenAIChatAnnotator:
    """An annotator from a JSON config entry; refuses inline keys (use ``api_key_env``)."""
    if "api_key" in cfg:
        raise ValueError(f"annotator {cfg.get('name')!r}: do not put API keys in config "
                         "files; export the key and name the variable in 'api_key_env'")
    allowed = {"name", "base_url", "model", "api_key_env", "timeout", "max_retries",
               "backoff", "max_backoff", "temperature", "max_tokens", "max_concurrency"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"annotator {cfg.get('name')!r}: unknown field(s) {unknown}")
    missing = [k for k in ("name", "base_url", "model") if k not in cfg]
    if missing:
        raise ValueError(f"annotator config {cfg}: missing field(s) {missing}")
    kwargs = {**defaults, **{k: v for k, v in cfg.items() if k not in ("name", "base_url",
                                                                        "model")}}
    return OpenAIChatAnnotator(cfg["name"], cfg["base_url"], cfg["model"], **kwargs)
