"""Run logs: a tqdm bar, ``metrics.jsonl`` and TensorBoard events; only process 0 writes.

On resume, lines of ``metrics.jsonl`` past the restored step (written after the last
checkpoint by a run that was then killed) are dropped, so a resumed run's file equals an
uninterrupted run's.
"""

from __future__ import annotations

import json
import os

import jax

from xft_jax import atomic

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:   # a line cut by a kill mid-write
                    break
    return out


class RunLogger:
    def __init__(self, workdir: str, total_steps: int, start_step: int):
        self.primary = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb = None
        self.bar = None
        if not self.primary:
            return
        kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= start_step]
        with atomic.atomic_open(self.path) as f:
            for r in kept:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        self.file = open(self.path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, metrics: dict) -> None:
        if not self.primary:
            return
        rec = {"step": int(step), **atomic.json_safe({k: float(v) for k, v in metrics.items()})}
        self.file.write(json.dumps(rec, sort_keys=True) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            if isinstance(rec[k], float):
                self.tb.add_scalar(k, rec[k], step)
        self.tb.flush()

    def progress(self, step: int, metrics: dict) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                             tok_s=f"{metrics.get('tokens_per_sec', 0):.0f}", refresh=False)
        self.bar.refresh()

    def write(self, msg: str) -> None:
        if self.primary:
            (self.bar.write if self.bar else print)(msg)

    def close(self) -> None:
        if not self.primary:
            return
        self.file.close()
        self.tb.close()
        self.bar.close()
