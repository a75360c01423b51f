#!/usr/bin/env python
"""Cost of run.diagnostics_every: the same short training run with and without it.

ResNet-20 on the built-in synthetic data (32 px, batch 128, fp32), one run each way per
round, alternating; the measure is the mean seconds per optimizer step of the run's epoch
record (its step_seconds, which includes the diagnostics' own work at their steps). Prints
min / median / max of each and the ratio of the medians. About a minute per round here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_train.cli import train as train_cli  # noqa: E402


def step_seconds(run_dir: str, extra: list[str], iterations: int) -> float:
    args = ["--config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                     "quickstart.yaml"),
            f"run.dir={run_dir}", f"train.iterations={iterations}", "train.amp=none",
            "run.progress=none", "run.log_every=1000", "data.train_samples=12800",
            "data.val_samples=256", *extra]
    assert train_cli.main(args) == 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    return [r for r in recs if r["kind"] == "epoch"][-1]["step_seconds"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--every", type=int, default=20, help="run.diagnostics_every (default 20)")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    off, on = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            off.append(step_seconds(os.path.join(tmp, f"off{r}"), [], args.iterations))
            on.append(step_seconds(os.path.join(tmp, f"on{r}"),
                                   [f"run.diagnostics_every={args.every}"], args.iterations))
    for name, v in (("off", off), (f"every {args.every}", on)):
        print(f"{name:>10}: ms/step min {1e3 * min(v):.1f} median "
              f"{1e3 * statistics.median(v):.1f} max {1e3 * max(v):.1f}")
    ratio = statistics.median(on) / statistics.median(off)
    print(f"cost: {100 * (ratio - 1):+.1f}% of the step time (target <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
