"""Shared test helpers: tiny, fast training configs and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A run that takes about a second per epoch on 2 CPU cores.
TINY = [
    "model.arch=resnet20", "model.width=4",
    "data.dataset=synthetic", "data.image_size=16", "data.train_samples=256",
    "data.val_samples=96", "data.batch_size=32",
    "optim.lr=0.05", "schedule.name=multistep", "schedule.milestones=[2]",
    "train.epochs=2", "train.amp=none", "train.channels_last=false",
    "run.progress=lines", "run.log_every=4", "run.seed=3",
]


def tiny(run_dir, *extra) -> list[str]:
    return [*TINY, f"run.dir={run_dir}", *extra]


def cli(module: str, *args, timeout: int = 240, env: dict | None = None,
        **kw) -> subprocess.CompletedProcess:
    """Run ``python -m resnet_train.cli.<module>`` in a subprocess."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"resnet_train.cli.{module}", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=full_env, **kw)


def popen(module: str, *args, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", f"resnet_train.cli.{module}", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)


def records(run_dir, kind: str = "epoch") -> list[dict]:
    """metrics.jsonl lines of one kind ("epoch" or "step")."""
    import json
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    return [r for r in recs if r.get("kind") == kind]


def wait_for(proc, text, timeout=120):
    """Read the child's stdout until a line contains ``text``; return the lines read."""
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never saw {text!r}; got:\n{''.join(lines)}")
