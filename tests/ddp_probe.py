"""resnet-train under torchrun with one test hook: ``python ddp_probe.py MODE args...``.

slow_then_full: rank 0's checkpoint writes take 1.5 s; the first one succeeds, every later
one fails with ENOSPC. Every rank prints when it leaves a save.
other_copy_on_rank1: rank 1 reads its data.root with "_other" appended (a node-local copy).
"""

import errno
import os
import sys
import time

import torch

from resnet_train import checkpoint as ckpt_io
from resnet_train import trainer
from resnet_train.cli import train as train_cli

mode, rank = sys.argv[1], int(os.environ["RANK"])
if mode == "slow_then_full":
    real_atomic, real_save, writes = ckpt_io.atomic_save, trainer.Trainer._save, []

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def slow(obj, path):
        time.sleep(1.5)
        if rank == 0 and writes:  # the disk is full from the second write on
            torch.save = full
        real_atomic(obj, path)
        writes.append(path)
        print(f"probe: rank {rank} wrote {os.path.basename(path)} at {time.time():.3f}",
              flush=True)

    def save(self, names):
        real_save(self, names)
        print(f"probe: rank {rank} left save at {time.time():.3f}", flush=True)
    ckpt_io.atomic_save, trainer.Trainer._save = slow, save
args = sys.argv[2:]
if mode == "other_copy_on_rank1" and rank == 1:
    args = [a + "_other" if a.startswith("data.root=") else a for a in args]
rc = train_cli.main(args)
# printed by the worker itself: torchrun may stop a slower rank before it reports its code
print(f"probe: rank {rank} exits {rc}", flush=True)
sys.exit(rc)
