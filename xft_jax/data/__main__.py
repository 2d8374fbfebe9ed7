"""Prints a source's canonical items as JSON lines, to see what an adapter extracts.

    python -m xft_jax.data --source=coqa --path=coqa-dev-v1.0.json --limit=5

A summary (rows read, items, skipped rows and why) goes to stderr.
"""

from __future__ import annotations

import sys

from absl import flags

from xft_jax import errors

from xft_jax import console
from xft_jax.data import sources
from xft_jax.data.readers import LoadReport

_SOURCE = flags.DEFINE_enum("source", None, sorted(sources.SOURCES), "Source name.")
_PATH = flags.DEFINE_string("path", None, "File or directory in the source's own schema; "
                                          "default: the Hugging Face Hub dataset.")
_LIMIT = flags.DEFINE_integer("limit", 10, "Print at most this many items (0 = all).")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                              "Bad rows: stop with file:line, or skip and count them.")

console.define_flags(with_config=False)


def main(argv):
    del argv
    console.start()
    report = LoadReport()
    convs = sources.load_source(_SOURCE.value, _PATH.value, _LIMIT.value or None,
                                _ON_ERROR.value, report)
    for line in sources.conversations_to_jsonl(convs):
        print(line)
    print(f"{_SOURCE.value}: {report.summary()}", file=sys.stderr)
    for example in report.examples:
        print(f"  skipped {example}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("source")
    errors.run_main(main)
