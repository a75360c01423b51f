#!/usr/bin/env python
"""Training throughput of the real step (engine) for precision / memory-format choices,
and its overhead against a bare loop (plain forward/backward/SGD.step) in the same run.

    python scripts/bench_train.py                       # CPU, CIFAR ResNet-20, batch 128
    python scripts/bench_train.py --device cuda --arch resnet50 --size 224 --batch 256

Each setting runs warm-up steps, then timed steps; the first setting (fp32, NCHW) is the
reference and every row prints its ratio to it, all measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from resnet_train.config import load_config  # noqa: E402
from resnet_train.engine import Meter, TrainStep  # noqa: E402
from resnet_train.models import build_model  # noqa: E402
from resnet_train.optim import LRSchedule, build_optimizer  # noqa: E402
from resnet_train.runtime import Runtime  # noqa: E402

SETTINGS = [  # (amp, channels_last)
    ("none", False), ("none", True), ("bf16", False), ("bf16", True),
]


def _setup(args, amp: str, channels_last: bool):
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.arch, args.classes).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(args.classes, (args.batch,), device=device)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return device, model, x, y, Runtime(device, dtype, channels_last)


def _timed(args, device, one_step) -> float:
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        one_step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch / (time.perf_counter() - t0)


def bench(args, amp: str, channels_last: bool) -> float:
    """images/s of engine.TrainStep (guarded fused SGD, BN restore, device-side stats)."""
    device, model, x, y, rt = _setup(args, amp, channels_last)
    cfg = load_config(None, [f"model.arch={args.arch}", f"data.batch_size={args.batch}"])
    opt = build_optimizer(model, cfg)
    sched = LRSchedule(cfg, opt, 100, 10_000)
    scaler = torch.amp.GradScaler(device.type) if rt.amp_dtype == torch.float16 else None
    step = TrainStep(model, opt, scaler, rt, 1, 0.0, probe=list(model.parameters())[-1],
                     buffers=list(model.buffers()), distributed=False)
    meter = Meter(device)
    model.train()

    def one(i):
        sched.apply(i)
        meter.add(step(x, y))
    return _timed(args, device, one)


def bench_bare(args, amp: str, channels_last: bool) -> float:
    """The reference: forward, cross entropy, backward, torch's default SGD.step."""
    device, model, x, y, rt = _setup(args, amp, channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()

    def one(i):
        with rt.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _timed(args, device, one)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fp16", action="store_true", help="also measure fp16 (CUDA)")
    args = p.parse_args()
    settings = SETTINGS + ([("fp16", False), ("fp16", True)] if args.fp16 else [])
    print(f"{args.arch} {args.size}px batch {args.batch} on {args.device} "
          f"({torch.get_num_threads()} threads), {args.steps} timed steps")
    ref = None
    for amp, cl in settings:
        bare = bench_bare(args, amp, cl)
        ips = bench(args, amp, cl)
        ref = ref or ips
        print(f"amp={amp:<5} channels_last={str(cl):<5} {ips:9.1f} img/s   ratio {ips / ref:5.2f}"
              f"   bare loop {bare:9.1f} img/s   ours/bare {ips / bare:5.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
