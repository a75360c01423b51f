"""resnet-train under torchrun with one test hook: ``python ddp_probe.py MODE args...``.

slow_save: rank 0's checkpoint writes take 1.5 s; every rank prints when it leaves a save.
disk_full: rank 0's checkpoint writes fail with ENOSPC.
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
if mode == "slow_save":
    real_atomic, real_save = ckpt_io.atomic_save, trainer.Trainer._save

    def slow(obj, path):
        time.sleep(1.5)
        real_atomic(obj, path)
        print(f"probe: rank {rank} wrote {os.path.basename(path)} at {time.time():.3f}",
              flush=True)

    def save(self, names):
        real_save(self, names)
        print(f"probe: rank {rank} left save at {time.time():.3f}", flush=True)
    ckpt_io.atomic_save, trainer.Trainer._save = slow, save
elif mode == "disk_full" and rank == 0:
    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    torch.save = full
sys.exit(train_cli.main(sys.argv[2:]))
