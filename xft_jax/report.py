"""The paper-style report of a sweep directory.

    python -m xft_jax.report --sweep_dir=runs/paper [--out=runs/paper/report]

Writes report.md (a summary of what differs from label_only and what does not, tables,
figures, predicted labels and confusion matrices, baselines and timing), results.csv and
PNG figures; prints the Markdown. The grid comes from the sweep's sweep.json unless given
by flags; a demo's timing from its timing.json. Missing cells are shown as missing.
"""

from __future__ import annotations

import os

from absl import flags

from xft_jax import errors

from xft_jax import console
from xft_jax.study import probe_summary, report_io

_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Sweep directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Report directory (default <sweep_dir>/report).")
_SOURCES = flags.DEFINE_list("sources", None, "Override the grid's sources.")
_AXES = flags.DEFINE_list("axes", None, "Override the grid's axes.")
_VARIANTS = flags.DEFINE_list("variants", None, "Override the grid's variants.")
_SEEDS = flags.DEFINE_list("seeds", None, "Override the grid's seeds.")
_N_BOOT = flags.DEFINE_integer("n_boot", 2000, "Bootstrap resamples.")

console.define_flags(with_config=False)


def main(argv):
    del argv
    console.start()
    sweep_dir = _SWEEP_DIR.value
    given = [_SOURCES.value, _AXES.value, _VARIANTS.value, _SEEDS.value]
    g = report_io.grid_of(sweep_dir) if not all(given) else {}
    sources = _SOURCES.value or g["sources"]
    axes = _AXES.value or g["axes"]
    variants = _VARIANTS.value or g["variants"]
    seeds = [int(s) for s in (_SEEDS.value or g["seeds"])]
    out = _OUT.value or os.path.join(sweep_dir, "report")
    text = report_io.write_report(sweep_dir, out, sources, axes, variants, seeds,
                                  n_boot=_N_BOOT.value,
                                  probe_summary=probe_summary.summarize)
    print(text)


if __name__ == "__main__":
    errors.run_main(main)
