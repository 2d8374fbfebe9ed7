"""Row readers for local files, with error locations and an explicit skip policy.

Every row comes out with a location string ("path:line" for JSONL/CSV, "path:row N"
for parquet, "path:record N" for a JSON array) so that any complaint about it can name
the exact place. ``ErrorPolicy`` decides whether a bad row stops the run (default) or
is skipped and counted in a ``LoadReport``: nothing is ever dropped silently.
Writes go through ``xft_jax.atomic``, so a failed run leaves no half-written output.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import io
import json
import os
from typing import Iterator, Sequence

from xft_jax.atomic import atomic_open
from xft_jax.data.schema import RatedExample, SchemaError
from xft_jax.errors import UserError

ROW_EXTENSIONS = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz", ".parquet", ".csv",
                  ".tsv")


class DataError(UserError, ValueError):
    """Bad input data. The message starts with where it is ("file:line: ...")."""


class RowError(ValueError):
    """Raised by adapters for a bad row; the reader adds the location."""


@dataclasses.dataclass
class LoadReport:
    """What a load read, produced and skipped (reason -> count, plus a few examples)."""

    rows: int = 0
    items: int = 0
    duplicates: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, where: str, reason: str) -> None:
        self.skipped[_reason_kind(reason)] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")

    def summary(self) -> str:
        parts = [f"{self.rows} rows read, {self.items} items"]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate ids merged (same id = same content)")
        if self.skipped:
            kinds = ", ".join(f"{n} x {k}" for k, n in sorted(self.skipped.items()))
            parts.append(f"{self.num_skipped} skipped ({kinds})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "items": self.items, "duplicates": self.duplicates,
                "skipped": dict(self.skipped), "skip_examples": list(self.examples)}


def _reason_kind(reason: str) -> str:
    """Groups reasons for counting: the text before the first ':' or '(' ."""
    for sep in (":", "("):
        reason = reason.split(sep, 1)[0]
    return reason.strip()


class ErrorPolicy:
    """``on_error='raise'`` raises ``DataError``; ``'skip'`` counts into ``report``."""

    def __init__(self, on_error: str = "raise", report: LoadReport | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.report = report if report is not None else LoadReport()

    def fail(self, where: str, reason: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{where}: {reason}")
        self.report.add_skip(where, reason)


def list_row_files(path: str) -> list[str]:
    """The file itself, or every supported file under a directory (sorted, recursive)."""
    if os.path.isfile(path):
        if not path.endswith(ROW_EXTENSIONS):
            raise DataError(f"{path}: unsupported file type; expected one of {ROW_EXTENSIONS}")
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or directory")
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith(ROW_EXTENSIONS)]
    if not found:
        raise DataError(f"{path}: no {'/'.join(ROW_EXTENSIONS)} files in directory")
    return found


def iter_rows(path: str, policy: ErrorPolicy) -> Iterator[tuple[str, dict]]:
    """Yields (location, row dict) for every row of every file under ``path``."""
    for file in list_row_files(path):
        if file.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            rows = _jsonl_rows(file, policy)
        elif file.endswith((".json", ".json.gz")):
            rows = _json_rows(file, policy)
        elif file.endswith(".parquet"):
            rows = _parquet_rows(file)
        else:
            rows = _csv_rows(file, policy)
        for where, row in rows:
            policy.report.rows += 1
            if not isinstance(row, dict):
                policy.fail(where, f"wrong type: expected a JSON object, got "
                                   f"{type(row).__name__}")
                continue
            yield where, row


def _open_bytes(file: str):
    return gzip.open(file, "rb") if file.endswith(".gz") else open(file, "rb")


def _utf8_error(e: UnicodeDecodeError) -> str:
    return (f"not valid UTF-8: byte 0x{e.object[e.start]:02x} at column {e.start + 1}")


def _jsonl_rows(file: str, policy: ErrorPolicy):
    with _open_bytes(file) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{file}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                policy.report.rows += 1
                policy.fail(where, _utf8_error(e))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                policy.report.rows += 1
                policy.fail(where, f"malformed JSON: {e.msg} at column {e.colno}")
                continue
            yield where, row


def _decode_whole(file: str, data: bytes, policy: ErrorPolicy) -> str | None:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        policy.report.rows += 1
        policy.fail(f"{file}:{line}", f"not valid UTF-8: byte 0x{data[e.start]:02x} at "
                                      f"column {col} (whole file unreadable)")
        return None


def _json_rows(file: str, policy: ErrorPolicy):
    """A JSON array of rows, or an object holding one under "data" (CoQA's layout)."""
    with _open_bytes(file) as f:
        text = _decode_whole(file, f.read(), policy)
    if text is None:
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        policy.report.rows += 1
        policy.fail(f"{file}:{e.lineno}", f"malformed JSON: {e.msg} at column {e.colno} "
                                          "(whole file unreadable)")
        return
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        policy.report.rows += 1
        policy.fail(f"{file}:1", "wrong type: expected a JSON array of rows or an object "
                                 "with a 'data' array")
        return
    for i, row in enumerate(doc):
        yield f"{file}:record {i + 1}", row


def _parquet_rows(file: str):
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{file}:row {n}", row


def _csv_rows(file: str, policy: ErrorPolicy):
    with open(file, "rb") as f:
        text = _decode_whole(file, f.read(), policy)
    if text is None:
        return
    reader = csv.DictReader(io.StringIO(text, newline=""),
                            delimiter="\t" if file.endswith(".tsv") else ",")
    start = 2
    for row in reader:
        yield f"{file}:{start}", row
        start = reader.line_num + 1


def write_jsonl(path: str, records: list[dict]) -> None:
    """Atomically writes one JSON object per line (UTF-8, non-ASCII kept)."""
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_rated_jsonl(path: str, on_error: str = "raise",
                     report: LoadReport | None = None) -> list[RatedExample]:
    """RatedExamples from a JSONL export; errors name file and line."""
    policy = ErrorPolicy(on_error, report)
    out = []
    for where, row in iter_rows(path, policy):
        try:
            out.append(RatedExample.from_dict(row))
        except SchemaError as e:
            policy.fail(where, f"invalid item: {e}")
    return out


def write_rated_jsonl(path: str, examples: Sequence[RatedExample]) -> None:
    write_jsonl(path, [ex.to_dict() for ex in examples])
