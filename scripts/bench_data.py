#!/usr/bin/env python
"""Input-pipeline throughput: resnet-train's loaders side by side with plain torchvision.

Folder (ImageNet-style): a folder of realistic JPEGs (about 500x375, quality 75-95, smooth
gradients + shapes + noise, so file sizes are photo-like) is generated, then

  torchvision: ImageFolder + [whole-image resize to a random short side in [256, 480],
               RandomCrop(224), flip, ToTensor, Normalize] in DataLoader workers
  ours:        build_data(dataset=folder, aug=paper): box crop-resize in workers, uint8
               batches, + DevicePrep (float, normalisation) on the device

CIFAR: fabricated CIFAR-10 pickles (10k images by default), then

  torchvision: datasets.CIFAR10 + [RandomCrop(32, padding=4), flip, ToTensor, Normalize],
               DataLoader with 2 workers
  ours:        build_data(dataset=cifar10): the device-resident split, pad-crop-flip gather,
               + DevicePrep

Both pipelines of a pair get the same workers and batch size; after a warm-up pass their
timed epochs alternate, so background load hits both alike. Prints img/s and the ratio.
Default run: about 2 minutes on 2 cores. Bigger: --images 2000 --epochs 3 --rounds 4.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_train.config import load_config  # noqa: E402
from resnet_train.data import build_data  # noqa: E402
from resnet_train.data.sampling import batch_generator  # noqa: E402


# --------------------------------------------------------------------------- fake data


def realistic_jpeg(rng: np.random.Generator, size=(500, 375), quality=85) -> bytes:
    """A photo-like JPEG: smooth colour gradients, a dozen shapes, sensor-like noise."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 80 * np.sin(xx / w * a * 6 + yy / h * b * 6 + p * 3)
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(10, 200))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    noisy = np.asarray(im, np.float32) + rng.normal(0, rng.uniform(15, 35), (h, w, 3))
    im = Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def make_folder(root: str, images: int, classes: int = 8, seed: int = 0) -> float:
    """root/{train,val}/<class>/*.JPEG; returns the mean JPEG size in KB."""
    rng = np.random.default_rng(seed)
    sizes = [(500, 375)] * 6 + [(500, 333), (375, 500), (500, 400), (480, 360)]
    total = 0
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        for i in range(n):
            d = os.path.join(root, split, f"c{i % classes:03d}")
            os.makedirs(d, exist_ok=True)
            data = realistic_jpeg(rng, sizes[int(rng.integers(len(sizes)))],
                                  rng.integers(75, 96))
            total += len(data)
            with open(os.path.join(d, f"img_{i:06d}.JPEG"), "wb") as fh:
                fh.write(data)
    return total / (images + max(classes, images // 10)) / 1024


def make_cifar(root: str, images: int, seed: int = 0) -> None:
    """CIFAR-10 python pickles (5 train batches + test) of random images."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    per = max(1, images // 5)
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", per)]:
        with open(os.path.join(d, name), "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist(),
                         "batch_label": name}, fh, protocol=2)
    with open(os.path.join(d, "batches.meta"), "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh, protocol=2)


# --------------------------------------------------------------------------- pipelines


class RandomShortSide:
    """Resize the whole image so that its short side is a random integer in [lo, hi]."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, img):
        import torchvision.transforms.functional as TF
        return TF.resize(img, random.randint(self.lo, self.hi))


def _epoch_fn(loader, batches):
    """epoch(e) -> images, plus the loader's worker pids for CPU accounting."""
    def epoch(e):
        n = 0
        for x, _ in batches(e):
            n += x.shape[0]
        return n

    def pids():
        it = getattr(loader, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", [])]
    epoch.pids = pids
    return epoch


def torchvision_folder(root, batch, workers):
    import torchvision
    import torchvision.transforms as T
    tf = T.Compose([RandomShortSide(256, 480), T.RandomCrop(224), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                     num_workers=workers, persistent_workers=workers > 0,
                                     prefetch_factor=4 if workers else None)
    return _epoch_fn(dl, lambda e: dl)


def torchvision_cifar(root, batch, workers):
    import torchvision
    import torchvision.transforms as T
    # Fabricated files have no official checksums: skip torchvision's md5 checks.
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    ds = torchvision.datasets.CIFAR10(root, train=True, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                     num_workers=workers, persistent_workers=workers > 0)
    return _epoch_fn(dl, lambda e: dl)


def ours(data: dict, device, seed=0):
    """Our loader + the on-device prep (float, normalisation) the trainer applies."""
    cfg = load_config(data={"run": {"seed": seed}, "data": data})
    bundle = build_data(cfg, device, 0, 1, run_dir=None)

    def batches(e):
        for step, (x, y) in enumerate(bundle.train.batches(e)):
            x = x.to(device, non_blocking=True)
            yield bundle.train_prep(x, batch_generator(seed, e, step, 0, device)), y
        if device.type == "cuda":
            torch.cuda.synchronize()
    return _epoch_fn(getattr(bundle.train, "_dl", None), batches), bundle


def _cpu_seconds(pids) -> float:
    """User + system CPU time of other processes (DataLoader workers), from /proc."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def race(name: str, base, mine, epochs: int, rounds: int) -> float:
    """Warm both up, then alternate timed epochs. Prints wall-clock img/s and img/s per CPU
    core (images / CPU-seconds of the main process and the workers), returns the per-core
    ratio. Per core is the steadier number on a shared machine; the CPU milliseconds per
    image are split into main process and workers, user + system time."""
    base(10_000), mine(10_000)
    keys = ("torchvision", "ours")
    wall = dict.fromkeys(keys, 0.0)
    n = dict.fromkeys(keys, 0)
    main_cpu, work_cpu = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)
    e = 0
    for _ in range(rounds):
        for key, fn in zip(keys, (base, mine), strict=True):
            for _ in range(epochs):
                pids = fn.pids()
                m0, w0, t0 = time.process_time(), _cpu_seconds(pids), time.perf_counter()
                n[key] += fn(e)
                wall[key] += time.perf_counter() - t0
                main_cpu[key] += time.process_time() - m0
                work_cpu[key] += _cpu_seconds(pids) - w0
                e += 1
    rate = {k: n[k] / wall[k] for k in keys}
    per_core = {k: n[k] / (main_cpu[k] + work_cpu[k]) for k in keys}
    ratio = per_core["ours"] / per_core["torchvision"]
    ms = {k: (1e3 * main_cpu[k] / n[k], 1e3 * work_cpu[k] / n[k]) for k in keys}
    print(f"{name}, {n['ours']} images each\n"
          f"  img/s           torchvision {rate['torchvision']:9.1f}   ours {rate['ours']:9.1f}"
          f"   ratio {rate['ours'] / rate['torchvision']:5.2f}x\n"
          f"  img/s per core  torchvision {per_core['torchvision']:9.1f}   ours "
          f"{per_core['ours']:9.1f}   ratio {ratio:5.2f}x\n"
          f"  CPU ms/img      torchvision {ms['torchvision'][0]:.3f} main + "
          f"{ms['torchvision'][1]:.3f} workers   ours {ms['ours'][0]:.3f} main + "
          f"{ms['ours'][1]:.3f} workers", flush=True)
    return ratio


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=384, help="folder: training JPEGs generated")
    p.add_argument("--batch", type=int, default=32, help="folder: batch size")
    p.add_argument("--workers", type=int, default=2, help="folder: workers of both pipelines")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--cifar-images", type=int, default=10000, help="CIFAR: training images")
    p.add_argument("--cifar-batch", type=int, default=128)
    p.add_argument("--cifar-epochs", type=int, default=2)
    p.add_argument("--dir", default=None, help="keep/reuse the generated data here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the main process (device-side prep on a CPU)")
    p.add_argument("--cifar-threads", type=int, default=os.cpu_count(),
                   help="CIFAR: torch threads of ours (default: every core, as in training; "
                        "torchvision gets 2 worker processes)")
    p.add_argument("--skip-folder", action="store_true")
    p.add_argument("--skip-cifar", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="bench_data_")
    base_dir = args.dir or tmp.name
    print(f"device {device}, {os.cpu_count()} CPU cores, {args.threads} torch thread(s) in the "
          f"main process, torch {torch.__version__}", flush=True)
    try:
        if not args.skip_folder:
            root = os.path.join(base_dir, f"folder_{args.images}")
            if not os.path.isdir(os.path.join(root, "train")):
                t0 = time.perf_counter()
                kb = make_folder(root, args.images)
                print(f"generated {args.images} JPEGs (mean {kb:.0f} KB) in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            mine, bundle = ours({"dataset": "folder", "root": root, "batch_size": args.batch,
                                 "workers": args.workers, "train": {"aug": "paper"}}, device)
            try:
                race(f"folder  (paper aug, {args.workers} workers, batch {args.batch})",
                     torchvision_folder(root, args.batch, args.workers), mine,
                     args.epochs, args.rounds)
            finally:
                bundle.train.close()
                bundle.val.close()
        if not args.skip_cifar:
            root = os.path.join(base_dir, f"cifar_{args.cifar_images}")
            if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
                make_cifar(root, args.cifar_images)
            torch.set_num_threads(args.cifar_threads)
            print(f"CIFAR: {args.cifar_threads} torch thread(s) for ours", flush=True)
            mine, _ = ours({"dataset": "cifar10", "root": root, "batch_size": args.cifar_batch,
                            "train": {"aug": "cifar"}}, device)
            race(f"cifar10 (pad-crop-flip, torchvision 2 workers, batch {args.cifar_batch})",
                 torchvision_cifar(root, args.cifar_batch, 2), mine, args.cifar_epochs,
                 args.rounds)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
