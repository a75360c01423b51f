"""Run N consecutive tiny 2-rank training runs under torchrun (gloo) and count clean exits.

A finished DDP run must exit 0: a process-group resource released after
destroy_process_group aborts with "terminate called without an active exception" (SIGABRT),
and torchrun then reports failure (and with --max-restarts restarts a finished job).

    python scripts/ddp_exit_check.py --runs 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.arch=resnet20", "model.width=4", "data.dataset=synthetic", "data.image_size=16",
        "data.train_samples=64", "data.val_samples=8", "data.batch_size=32",
        "train.iterations=1", "train.amp=none", "run.progress=none", "run.log_every=100"]


def run_once(run_dir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "resnet_train.cli.train", *TINY, f"run.dir={run_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    bad, t0 = 0, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            r = run_once(os.path.join(tmp, f"r{i}"))
            aborted = "terminate called" in r.stderr
            if r.returncode != 0 or aborted:
                bad += 1
                print(f"run {i}: exit {r.returncode}{' (abort at exit)' if aborted else ''}")
    print(f"{args.runs - bad}/{args.runs} runs exited 0 ({time.time() - t0:.0f}s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
