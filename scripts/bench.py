#!/usr/bin/env python
"""Benchmarks of resnet-train against a plain reference, measured in the same run.

    python scripts/bench.py data      # input pipelines: ours vs torchvision (folder, CIFAR)
    python scripts/bench.py step      # our training step vs a bare loop: our overhead
    python scripts/bench.py epoch     # a CIFAR ResNet-20 epoch: resnet-train vs the usual script
    python scripts/bench.py scaling   # torchrun, 1 vs N processes: scaling efficiency
    python scripts/bench.py threads   # CPU folder training: run.threads' default vs every core
    python scripts/bench.py compare a.json b.json c.json   # do repeated runs agree?
    python scripts/bench.py env | summarize DIR          # (scripts/gpu_check.sh's helpers)

Every subcommand prints the thread settings first, then a table: each figure is the median
of --rounds rounds with its min and max, the rounds alternating ours, reference, ours, ...,
so background load hits both alike; the ratio is the median of the rounds' paired ratios
and "spread" is its max / min - 1. ``--json OUT`` writes the same (schema in the README's
"Performance" section).

Isolation. ``data`` and ``epoch`` run every timed round in a fresh process (forked on CPU
from a parent that never runs a torch op in parallel; spawned on CUDA), which builds its
pipeline, warms it up, times it and exits: no DataLoader worker, thread pool or spinning
OpenMP thread of one pipeline is alive while the other is timed. ``epoch`` runs ours as the
real CLI in a subprocess. ``scaling`` runs torchrun subprocesses. ``step`` has no worker
processes; both steps live in the one process and alternate timed windows.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import multiprocessing as mp
import os
import pickle
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCHEMA = 1
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


# =========================================================================== shared helpers


def thread_settings() -> dict:
    """What decides how many threads compete for the cores (printed first, saved in JSON)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = None
    return {"torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            **{k: os.environ.get(k) for k in THREAD_ENV},
            "cpu_count": os.cpu_count(), "affinity_cpus": affinity,
            "load_average": load_average()}  # 1, 5, 15 min: was the machine quiet?


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def print_threads(t: dict) -> None:
    env = " ".join(f"{k}={t[k] if t[k] is not None else '(unset)'}" for k in THREAD_ENV)
    print(f"threads: torch {t['torch_num_threads']} intra-op, "
          f"{t['torch_num_interop_threads']} inter-op | {env} | os.cpu_count() "
          f"{t['cpu_count']}, affinity {t['affinity_cpus']} CPUs | load average "
          f"{t['load_average']}", flush=True)


def stat(values: list[float]) -> dict:
    v = sorted(values)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "values": list(values)}


def compare_row(name: str, unit: str, ours: list[float], ref: list[float], *,
                labels=("ours", "reference"), target: float | None = None,
                extra: dict | None = None) -> dict:
    """One table row: ours vs the reference, round by round (ratio = ours / reference)."""
    ratios = [o / r for o, r in zip(ours, ref, strict=True)]
    r = stat(ratios)
    return {"name": name, "unit": unit, "labels": list(labels), "ours": stat(ours),
            "reference": stat(ref), "ratio": r, "spread": r["max"] / r["min"] - 1,
            "target_ratio": target,
            "meets_target": None if target is None else r["median"] >= target,
            **(extra or {})}


def alternate(rounds: int, ours, reference) -> tuple[list, list]:
    """ours(i), reference(i), ours(i + 1), ...: each returns one round's result."""
    a, b = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        a.append(ours(i))
        t1 = time.perf_counter()
        b.append(reference(i))
        print(f"  round {i + 1}/{rounds}: {t1 - t0:.1f} s + {time.perf_counter() - t1:.1f} s",
              flush=True)
    return a, b


def _fmt(x: float) -> str:
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3f}"


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    head = ("figure", "unit", "ours [min, max]", "reference [min, max]", "ratio [min, max]",
            "spread", "target")
    lines = [head]
    for r in rows:
        o, b, q = r["ours"], r["reference"], r["ratio"]
        lines.append((
            r["name"], r["unit"],
            f"{_fmt(o['median'])} [{_fmt(o['min'])}, {_fmt(o['max'])}]",
            f"{_fmt(b['median'])} [{_fmt(b['min'])}, {_fmt(b['max'])}]",
            f"{q['median']:.3f}x [{q['min']:.3f}, {q['max']:.3f}]",
            f"{100 * r['spread']:.0f}%",
            "" if r["target_ratio"] is None else
            f">= {r['target_ratio']}x {'ok' if r['meets_target'] else 'MISSED'}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    for r in rows:
        named = [f"{k} = {v}" for k, v in zip(("ours", "reference"), r["labels"], strict=True)
                 if k != v]
        if named:
            print(f"  {r['name']}: {', '.join(named)}")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def finish(args, threads: dict, title: str, rows: list[dict], t0: float, **extra) -> int:
    """Print the table and write the JSON document of one subcommand."""
    import torchvision
    print_table(title, rows)
    doc = {"schema": SCHEMA, "bench": args.command, "argv": sys.argv[1:], "pid": os.getpid(),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(),
           "torch": torch.__version__, "torchvision": torchvision.__version__,
           "device": args.device, "device_name": device_name(args.device),
           "threads": threads,
           "settings": {k: v for k, v in vars(args).items() if k not in ("func", "json")},
           "rows": rows, "seconds": time.perf_counter() - t0,
           "load_average_at_end": load_average(), **extra}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


def resolve_device(kind: str) -> str:
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return kind


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- a fresh process per round


def in_fresh_process(fn, spec: dict, device: str):
    """fn(spec) in a new process; its result comes back through a pipe.

    CPU: forked (cheap; the parent has imported everything and never ran a parallel torch
    op, so no OpenMP pool is inherited). CUDA: spawned, since CUDA does not survive a fork.
    """
    ctx = mp.get_context("spawn" if device == "cuda" else "fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, spec, send))
    proc.start()
    send.close()
    try:
        status, value = recv.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"{fn.__name__}: the round's process died "
                           f"(exit code {proc.exitcode})") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__} failed in its round:\n{value}")
    return value


def _child(fn, spec, conn) -> None:
    try:
        conn.send(("ok", fn(spec)))
    except BaseException:  # noqa: B036 - everything goes back to the parent as text
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _proc_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of other live processes (DataLoader workers), from /proc."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _worker_pids(dl) -> list[int]:
    it = getattr(dl, "_iterator", None)
    return [w.pid for w in getattr(it, "_workers", [])]


def _apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# =========================================================================== fabricated data


def realistic_jpeg(rng: np.random.Generator, size=(500, 375), quality=85) -> bytes:
    """A photo-like JPEG: smooth colour gradients, a dozen shapes, sensor-like noise (so
    file sizes and decode costs are those of photos, not of flat test images)."""
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


_SIZES = [(500, 375)] * 6 + [(500, 333), (375, 500), (500, 400), (480, 360)]


def _write_jpeg(job: tuple) -> int:
    path, seed, i = job
    rng = np.random.default_rng([seed, i])  # one stream per image: any pool order
    data = realistic_jpeg(rng, _SIZES[int(rng.integers(len(_SIZES)))], rng.integers(75, 96))
    with open(path, "wb") as fh:
        fh.write(data)
    return len(data)


def make_folder(root: str, images: int, classes: int = 8, seed: int = 0) -> float:
    """root/{train,val}/<class>/*.JPEG (val: one image a class); returns the mean KB."""
    jobs = []
    for split, n in (("train", images), ("val", classes)):
        for i in range(n):
            d = os.path.join(root, split, f"c{i % classes:03d}")
            os.makedirs(d, exist_ok=True)
            jobs.append((os.path.join(d, f"img_{i:06d}.JPEG"), seed + (split == "val"), i))
    procs = max(1, min(16, os.cpu_count() or 1))
    with mp.get_context("fork").Pool(procs) as pool:  # PIL and numpy only: fork is safe
        sizes = pool.map(_write_jpeg, jobs, chunksize=8)
    return sum(sizes) / len(sizes) / 1024


def make_cifar(root: str, train: int, test: int, seed: int = 0) -> None:
    """CIFAR-10 python pickles in the exact format (5 train batches, test_batch, meta)."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    sizes = [train // 5 + (i < train % 5) for i in range(5)]
    files = [(f"data_batch_{i + 1}", n) for i, n in enumerate(sizes)] + [("test_batch", test)]
    for name, n in files:
        with open(os.path.join(d, name), "wb") as fh:
            pickle.dump({"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                         "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "filenames": [f"{name}_{j}.png" for j in range(n)]}, fh, protocol=2)
    with open(os.path.join(d, "batches.meta"), "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)],
                     "num_cases_per_batch": sizes[0], "num_vis": 3072}, fh, protocol=2)


def cached(base: str, name: str, make) -> str:
    """base/name, made once (a marker file says it is complete, for --dir reuse)."""
    path = os.path.join(base, name)
    if not os.path.exists(os.path.join(path, ".complete")):
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        note = make(path) or ""
        print(f"generated {name}{note} in {time.perf_counter() - t0:.1f} s", flush=True)
        open(os.path.join(path, ".complete"), "w").close()
    return path


def _torchvision_cifar_unchecked():
    import torchvision
    # Fabricated files have no official checksums: skip torchvision's md5 check.
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
    return torchvision


# =========================================================================== data


class RandomShortSide:
    """Resize the whole image so that its short side is a random integer in [lo, hi]."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, img):
        import torchvision.transforms.functional as TF
        return TF.resize(img, random.randint(self.lo, self.hi))


def _loader_pipeline(dl, device):
    """(run_epoch, worker pids) of a torchvision DataLoader whose batches go to the device."""
    def run_epoch(epoch: int) -> int:
        n = 0
        for x, _ in dl:
            x = x.to(device, non_blocking=True)
            n += x.shape[0]
        sync(device)
        return n
    return run_epoch, lambda: _worker_pids(dl), lambda: _shutdown(dl)


def _shutdown(dl) -> None:
    """Stop and join a DataLoader's persistent workers now (a round's process leaves with
    os._exit, which would leave them to notice their dead parent seconds later)."""
    it = getattr(dl, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    dl._iterator = None


def torchvision_folder(spec):
    """ImageFolder + [random short side in [256, 480], RandomCrop(224), flip, ToTensor,
    Normalize] in DataLoader workers: the straightforward version of the paper's aug."""
    import torchvision
    import torchvision.transforms as T
    tf = T.Compose([RandomShortSide(256, 480), T.RandomCrop(224), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = torchvision.datasets.ImageFolder(os.path.join(spec["root"], "train"), transform=tf)
    w = spec["workers"]
    dl = torch.utils.data.DataLoader(
        ds, batch_size=spec["batch"], shuffle=True, drop_last=True, num_workers=w,
        persistent_workers=w > 0, prefetch_factor=spec["prefetch"] if w else None,
        pin_memory=spec["device"] == "cuda")
    return _loader_pipeline(dl, spec["device"])


def torchvision_cifar(spec):
    """torchvision CIFAR10 + [RandomCrop(32, padding=4), flip, ToTensor, Normalize]."""
    import torchvision.transforms as T
    tv = _torchvision_cifar_unchecked()
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    ds = tv.datasets.CIFAR10(spec["root"], train=True, transform=tf)
    w = spec["workers"]
    dl = torch.utils.data.DataLoader(ds, batch_size=spec["batch"], shuffle=True, drop_last=True,
                                     num_workers=w, persistent_workers=w > 0,
                                     pin_memory=spec["device"] == "cuda")
    return _loader_pipeline(dl, spec["device"])


def ours_pipeline(spec):
    """Our loader + the on-device prep (float, normalisation) the trainer applies."""
    from resnet_train import runtime
    from resnet_train.config import load_config
    from resnet_train.data import build_data
    from resnet_train.data.sampling import batch_generator
    data = {"root": spec["root"], "batch_size": spec["batch"]}
    if spec["pipeline"] == "folder":
        data.update(dataset="folder", workers=spec["workers"], prefetch=spec["prefetch"],
                    train={"aug": "paper"}, decode=spec.get("decode", "cpu"))
    else:
        data.update(dataset="cifar10", train={"aug": "cifar"})
    cfg = load_config(data={"run": {"seed": 0, "device": spec["device"]}, "data": data})
    device = torch.device(spec["device"])
    if spec["threads"] is None and hasattr(runtime, "configure_threads"):
        runtime.configure_threads(cfg, device)  # the trainer's choice
    bundle = build_data(cfg, device, 0, 1, run_dir=None)
    gen = torch.Generator(device=device)

    def run_epoch(epoch: int) -> int:
        n = 0
        for step, (x, _) in enumerate(bundle.train.batches(epoch)):
            x = bundle.train_prep(x.to(device, non_blocking=True),
                                  batch_generator(0, epoch, step, 0, gen))
            n += x.shape[0]
        sync(device)
        return n

    def close():
        bundle.train.close()
        bundle.val.close()
    return run_epoch, lambda: _worker_pids(getattr(bundle.train, "_dl", None)), close


PIPELINES = {"ours": ours_pipeline, ("torchvision", "folder"): torchvision_folder,
             ("torchvision", "cifar"): torchvision_cifar}


def data_round(spec: dict) -> dict:
    """One round in a fresh process: build, warm up (starts the workers), time, close."""
    _apply_threads(spec["threads"])
    build = PIPELINES["ours"] if spec["impl"] == "ours" else \
        PIPELINES[("torchvision", spec["pipeline"])]
    run_epoch, pids, close = build(spec)
    try:
        for e in range(spec["warmup_epochs"]):
            run_epoch(e)
        workers = pids()
        m0, w0, t0 = time.process_time(), _proc_cpu(workers), time.perf_counter()
        n, e = 0, spec["warmup_epochs"]
        while e < spec["warmup_epochs"] + spec["epochs"] or \
                time.perf_counter() - t0 < spec["min_seconds"]:
            n += run_epoch(e)
            e += 1
        wall = time.perf_counter() - t0
        main_cpu, work_cpu = time.process_time() - m0, _proc_cpu(workers) - w0
    finally:
        close()
    stopped = not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    return {"pid": os.getpid(), "workers_stopped": stopped, "images": n,
            "epochs": e - spec["warmup_epochs"], "wall_s": wall,
            "cpu_main_s": main_cpu, "cpu_workers_s": work_cpu, "workers": len(workers),
            "threads": torch.get_num_threads(), "images_per_s": n / wall,
            "images_per_cpu_s": n / max(main_cpu + work_cpu, 1e-9)}


def _data_rows(name: str, ours: list[dict], ref: list[dict], targets: tuple) -> list[dict]:
    def ms(rounds, key):
        return statistics.median(1e3 * r[key] / r["images"] for r in rounds)
    extra = {"threads": {"ours": ours[0]["threads"], "reference": ref[0]["threads"]},
             "workers": {"ours": ours[0]["workers"], "reference": ref[0]["workers"]},
             "images_per_round": {"ours": ours[0]["images"], "reference": ref[0]["images"]},
             "pids": {"ours": [r["pid"] for r in ours], "reference": [r["pid"] for r in ref]},
             "workers_stopped": all(r["workers_stopped"] for r in ours + ref),
             "cpu_ms_per_image": {side: {"main": ms(rounds, "cpu_main_s"),
                                         "workers": ms(rounds, "cpu_workers_s")}
                                  for side, rounds in (("ours", ours), ("reference", ref))}}
    return [
        compare_row(f"{name} wall", "images/s", [r["images_per_s"] for r in ours],
                    [r["images_per_s"] for r in ref], target=targets[0], extra=extra),
        compare_row(f"{name} per core", "images/CPU-s", [r["images_per_cpu_s"] for r in ours],
                    [r["images_per_cpu_s"] for r in ref], target=targets[1], extra=extra)]


def cmd_data(args) -> int:
    """Folder and CIFAR input pipelines, ours vs torchvision, each round in a fresh process."""
    t0, threads = time.perf_counter(), thread_settings()
    print_threads(threads)
    import torchvision  # noqa: F401 - imported once here, not in every forked round

    import resnet_train.data.cifar  # noqa: F401
    import resnet_train.data.folder  # noqa: F401
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="bench_data_")
    base = args.dir or tmp.name
    rows = []
    try:
        common = {"device": args.device, "min_seconds": args.min_seconds,
                  "warmup_epochs": args.warmup_epochs}
        if "folder" in args.pipelines:
            root = cached(base, f"folder_{args.images}", lambda p: (
                f" ({args.images} JPEGs, mean {make_folder(p, args.images):.0f} KB)"))
            spec = {**common, "pipeline": "folder", "root": root, "batch": args.batch,
                    "workers": args.workers, "prefetch": args.prefetch,
                    "epochs": args.epochs, "threads": args.threads, "decode": args.decode}
            print(f"folder: paper aug, {args.workers} workers each, batch {args.batch}, "
                  f"{args.images} images", flush=True)
            ours, ref = alternate(
                args.rounds,
                lambda i: in_fresh_process(data_round, {**spec, "impl": "ours"}, args.device),
                lambda i: in_fresh_process(data_round, {**spec, "impl": "torchvision"},
                                           args.device))
            rows += _data_rows("folder", ours, ref, (None, 2.5))
        if "cifar" in args.pipelines:
            root = cached(base, f"cifar_{args.cifar_images}", lambda p: make_cifar(
                p, args.cifar_images, max(10, args.cifar_images // 5)))
            spec = {**common, "pipeline": "cifar", "root": root, "batch": args.cifar_batch,
                    "epochs": args.cifar_epochs, "prefetch": args.prefetch}
            print(f"cifar10: pad-crop-flip, ours {args.cifar_threads or 'default'} torch "
                  f"threads, torchvision {args.cifar_workers} workers, batch {args.cifar_batch},"
                  f" {args.cifar_images} images", flush=True)
            ours, ref = alternate(
                args.rounds,
                lambda i: in_fresh_process(data_round, {**spec, "impl": "ours", "workers": 0,
                                                        "threads": args.cifar_threads},
                                           args.device),
                lambda i: in_fresh_process(data_round, {**spec, "impl": "torchvision",
                                                        "workers": args.cifar_workers,
                                                        "threads": args.cifar_threads},
                                           args.device))
            rows += _data_rows("cifar", ours, ref, (None, 20.0))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return finish(args, threads, "data: images/s of the input pipeline (ours vs torchvision)",
                  rows, t0)


# =========================================================================== step


READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


class SyncCounter:
    """Host reads (Tensor.item, .tolist, bool(), ...) on any device, and on CUDA the
    synchronising calls torch.cuda's sync debug mode reports, while active."""

    def __init__(self, device: torch.device):
        self.device, self.reads, self.cuda_syncs = device, 0, 0

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, self._counted(real))
        if self.device.type == "cuda":
            self._warn = warnings.catch_warnings(record=True)
            self._caught = self._warn.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def _counted(self, real):
        def counted(*a, **k):
            self.reads += 1
            return real(*a, **k)
        return counted

    def __exit__(self, *exc):
        if self.device.type == "cuda":  # (warnings come at the host call: no sync needed)
            torch.cuda.set_sync_debug_mode("default")
            self.cuda_syncs = sum("synchroniz" in str(w.message) for w in self._caught)
            self._warn.__exit__(*exc)
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        return False


def _step_config(args):
    from resnet_train.config import load_config
    over = [f"model.arch={args.arch}", f"data.batch_size={args.batch}",
            f"train.amp={args.amp}", f"train.channels_last={args.channels_last}",
            f"run.device={args.device}", f"train.compile={str(args.compile).lower()}",
            f"run.keep_host_memory={str(not args.no_keep_host_memory).lower()}"]
    if args.width:
        over.append(f"model.width={args.width}")
    return load_config(None, over)


def build_ours(args, cfg, runtime):
    """engine.TrainStep as trainer.Trainer._build makes it (fused SGD from build_optimizer,
    the schedule, the guard, device-side stats); one call = the loop's per-step work on an
    already prepared batch: schedule.apply, the step, the meters."""
    from resnet_train.engine import Meter, TrainStep
    from resnet_train.optim import LRSchedule, build_optimizer
    from resnet_train.runtime import build_model_for
    torch.manual_seed(0)
    model = build_model_for(cfg, args.classes, runtime)
    optimizer = build_optimizer(model, cfg)
    schedule = LRSchedule(cfg, optimizer, 1000, 1_000_000)
    scaler = torch.amp.GradScaler(runtime.device.type) \
        if runtime.amp_dtype == torch.float16 else None
    step = TrainStep(model, optimizer, scaler, runtime, cfg.train.accum_steps,
                     cfg.train.label_smoothing, probe=list(model.parameters())[-1],
                     buffers=list(model.buffers()), distributed=False)
    step.model = torch.compile(model) if cfg.train.compile else model
    epoch_meter, window_meter = Meter(runtime.device), Meter(runtime.device)
    model.train()
    it = [0]

    def one(x, y):
        schedule.apply(it[0])
        stats = step(x, y)
        epoch_meter.add(stats)
        window_meter.add(stats)
        it[0] += 1
    return one


def build_bare(args, cfg, runtime):
    """The reference: forward, cross entropy, backward, torch's SGD.step, zero_grad (plus
    GradScaler for fp16), same arch, init, precision and layout."""
    import torch.nn.functional as F

    from resnet_train.runtime import build_model_for
    torch.manual_seed(0)
    model = build_model_for(cfg, args.classes, runtime)  # the same module, device and layout
    o = cfg.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay, nesterov=o.nesterov,
                          fused=True if args.bare_fused else None)
    scaler = torch.amp.GradScaler(runtime.device.type) \
        if runtime.amp_dtype == torch.float16 else None
    net = torch.compile(model) if cfg.train.compile else model
    model.train()

    def one(x, y):
        with runtime.autocast():
            loss = F.cross_entropy(net(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return one


def _warm_up(args, steps: dict, x, y, device) -> dict:
    """Untimed steps of each (compilation, cudnn autotuning, the allocator): their seconds
    and, on CUDA, the peak memory after them."""
    out: dict = {"warmup_s": {}, "peak_mem_gib": {}}
    for name, one in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        w0 = time.perf_counter()
        for _ in range(args.warmup):
            one(x, y)
        sync(device)
        out["warmup_s"][name] = time.perf_counter() - w0
        if device.type == "cuda":  # (includes the other step's resident weights, ~1%)
            out["peak_mem_gib"][name] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def cmd_step(args) -> int:
    """images/s of our step vs the bare loop, alternating timed windows in one process."""
    t0, threads = time.perf_counter(), thread_settings()
    print_threads(threads)
    from resnet_train.runtime import configure_host_memory, resolve_runtime
    cfg = _step_config(args)
    runtime = resolve_runtime(cfg)
    device = runtime.device
    kept = configure_host_memory(cfg, device)  # as the CLI does; both loops share it
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as Trainer.fit sets it
    gen = torch.Generator(device=device).manual_seed(0)
    x = runtime.layout(torch.randn(args.batch, 3, args.image_size, args.image_size,
                                   device=device, generator=gen))
    y = torch.randint(args.classes, (args.batch,), device=device, generator=gen)
    print(f"step: {args.arch} {args.image_size}px batch {args.batch}, {runtime.describe()}, "
          f"compile={args.compile}, host memory kept={kept}, {args.steps} steps a round after "
          f"{args.warmup} warm-up "
          f"steps; bare loop SGD {'fused' if args.bare_fused else 'default (foreach/for-loop)'}",
          flush=True)
    steps = {"ours": build_ours(args, cfg, runtime), "bare": build_bare(args, cfg, runtime)}
    extra: dict = {"runtime": runtime.describe(), "host_memory_kept": kept,
                   **_warm_up(args, steps, x, y, device),
                   "host_reads_per_step": {}, "cuda_syncs_per_step": {}}

    def timed(name):
        def round_(i):
            sync(device)
            s0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name](x, y)
            sync(device)
            return args.steps * args.batch / (time.perf_counter() - s0)
        return round_
    ours, bare = alternate(args.rounds, timed("ours"), timed("bare"))
    for name, one in steps.items():  # a few untimed steps with the counters on
        with SyncCounter(device) as c:
            for _ in range(args.sync_steps):
                one(x, y)
        extra["host_reads_per_step"][name] = c.reads / args.sync_steps
        extra["cuda_syncs_per_step"][name] = \
            c.cuda_syncs / args.sync_steps if device.type == "cuda" else None
    row = compare_row("train step", "images/s", ours, bare, labels=("ours", "bare loop"),
                      target=0.97, extra=extra)
    row["overhead_pct"] = 100 * (1 / row["ratio"]["median"] - 1)  # step time vs the bare loop
    print(f"\nour step's overhead: {row['overhead_pct']:+.1f}% step time (target <= 3%); "
          f"host reads/step ours {extra['host_reads_per_step']['ours']:g}, bare "
          f"{extra['host_reads_per_step']['bare']:g}"
          + ("" if device.type != "cuda" else
             f"; CUDA syncs/step ours {extra['cuda_syncs_per_step']['ours']:g}, bare "
             f"{extra['cuda_syncs_per_step']['bare']:g}; peak memory ours "
             f"{extra['peak_mem_gib']['ours']:.2f} GiB, bare {extra['peak_mem_gib']['bare']:.2f}"
             f" GiB"))
    return finish(args, threads, "step: training images/s on on-device input", [row], t0)


# =========================================================================== epoch


def cli_env(extra: dict | None = None) -> dict:
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_logged(cmd: list[str], log: str, timeout: float, env: dict) -> float:
    """Run cmd with output to log; its wall seconds. A failure raises with the log's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        with open(log) as fh:
            tail = "".join(fh.readlines()[-30:])
        raise RuntimeError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


def epoch_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    return [r for r in recs if r.get("kind") == "epoch"]


def throughput(recs: list[dict]) -> dict:
    """images/s over the epochs' training loops (metrics.jsonl: validation, checkpoints and
    start-up excluded), and the last epoch's (steady state)."""
    images = sum(r["images_per_sec"] * r["epoch_seconds"] for r in recs)
    seconds = sum(r["epoch_seconds"] for r in recs)
    return {"images_per_s": images / seconds, "last_epoch_images_per_s": recs[-1]["images_per_sec"],
            "images": round(images), "seconds": seconds}


TRAIN_CLI = [sys.executable, "-m", "resnet_train.cli.train"]


def train_run(cmd: list[str], run_dir: str, timeout: float, env: dict) -> tuple:
    """Run a resnet-train command (its run.dir=run_dir) and remove the run directory:
    (wall seconds, its metrics.jsonl epoch records, its console output)."""
    wall = run_logged(cmd, run_dir + ".log", timeout, env)
    recs = epoch_records(run_dir)
    with open(run_dir + ".log") as fh:
        text = fh.read()
    shutil.rmtree(run_dir, ignore_errors=True)
    return wall, recs, text


def ours_epoch(args, root: str, base: str, i: int) -> dict:
    run_dir = os.path.join(base, f"ours_{i}")
    over = ["data.dataset=cifar10", f"data.root={root}", "model.arch=resnet20",
            f"data.batch_size={args.batch}", f"train.epochs={args.epochs}",
            f"run.dir={run_dir}", f"run.device={args.device}"]
    wall, recs, _ = train_run([*TRAIN_CLI, *over], run_dir, args.timeout, cli_env())
    return {**throughput(recs), "cli_wall_s": wall,
            "data_wait_frac": recs[-1].get("data_wait_frac"),
            "peak_mem_gb": recs[-1].get("peak_mem_gb"), "command": over}


def reference_epoch(spec: dict) -> dict:
    """The usual CIFAR script: fp32 NCHW, torchvision CIFAR10 + PIL transforms, a DataLoader
    with 2 workers, the same ResNet-20 and SGD settings; images/s over the training loop."""
    import torch.nn.functional as F
    import torchvision.transforms as T

    from resnet_train.models import build_model
    tv = _torchvision_cifar_unchecked()
    device = torch.device(spec["device"])
    torch.backends.cudnn.benchmark = True  # what such scripts set (and ours does)
    torch.manual_seed(0)
    model = build_model("resnet20", 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"],
                          weight_decay=spec["weight_decay"])
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    ds = tv.datasets.CIFAR10(spec["root"], train=True, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=spec["batch"], shuffle=True,
                                     num_workers=spec["workers"], drop_last=True,
                                     pin_memory=device.type == "cuda")
    model.train()
    recs = []
    for _ in range(spec["epochs"]):
        t0, n = time.perf_counter(), 0
        for x, y in dl:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += x.shape[0]
        sync(device)
        seconds = time.perf_counter() - t0
        recs.append({"images_per_sec": n / seconds, "epoch_seconds": seconds})
    return {**throughput(recs), "threads": torch.get_num_threads(), "pid": os.getpid()}


def cmd_epoch(args) -> int:
    """A CIFAR ResNet-20 epoch: the resnet-train CLI (auto defaults) vs the usual script."""
    t0, threads = time.perf_counter(), thread_settings()
    print_threads(threads)
    import torchvision  # noqa: F401 - imported once, before the rounds fork

    import resnet_train.models  # noqa: F401
    from resnet_train.config import load_config
    o = load_config(None, []).optim  # our defaults: the reference uses the same SGD
    with tempfile.TemporaryDirectory(prefix="bench_epoch_") as base:
        root = cached(args.dir or base, f"cifar_{args.samples}_{args.val_samples}",
                      lambda p: make_cifar(p, args.samples, args.val_samples))
        spec = {"root": root, "device": args.device, "batch": args.batch,
                "epochs": args.epochs, "workers": args.ref_workers, "lr": o.lr,
                "momentum": o.momentum, "weight_decay": o.weight_decay}
        print(f"epoch: ResNet-20, batch {args.batch}, {args.samples} images x {args.epochs} "
              f"epoch(s); ours: resnet-train run.device={args.device} (amp/layout auto); "
              f"reference: fp32 NCHW, torchvision CIFAR10 + PIL, {args.ref_workers} workers",
              flush=True)
        ours, ref = alternate(args.rounds, lambda i: ours_epoch(args, root, base, i),
                              lambda i: in_fresh_process(reference_epoch, spec, args.device))
    extra = {"source": "metrics.jsonl training-loop time (ours) / the same loop's wall time "
                       "(reference); start-up, validation and checkpoints excluded",
             "ours_rounds": ours, "reference_rounds": ref}
    rows = [compare_row("cifar epoch", "images/s", [r["images_per_s"] for r in ours],
                        [r["images_per_s"] for r in ref], target=2.0, extra=extra)]
    if args.epochs > 1:
        rows.append(compare_row("cifar last epoch", "images/s",
                                [r["last_epoch_images_per_s"] for r in ours],
                                [r["last_epoch_images_per_s"] for r in ref]))
    print(f"ours: whole CLI wall {statistics.median(r['cli_wall_s'] for r in ours):.1f} s "
          f"(median), data wait {100 * (ours[-1]['data_wait_frac'] or 0):.0f}%")
    return finish(args, threads, "epoch: CIFAR ResNet-20 training images/s", rows, t0)


# =========================================================================== scaling


def scaling_run(args, base: str, nproc: int, i: int) -> dict:
    run_dir = os.path.join(base, f"n{nproc}_{i}")
    over = [f"model.arch={args.arch}", "data.dataset=synthetic",
            f"data.image_size={args.image_size}",
            f"data.train_samples={args.batch * args.steps * nproc}",
            f"data.val_samples={args.batch * nproc}", f"data.batch_size={args.batch * nproc}",
            f"train.epochs={args.epochs}", "schedule.name=constant", f"run.dir={run_dir}",
            f"run.device={args.device}", "run.progress=none"]
    if args.width:
        over.append(f"model.width={args.width}")
    env = {}
    if args.device == "cpu":  # the same threads per process in both runs: per-worker scaling
        env["OMP_NUM_THREADS"] = str(args.threads_per_proc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "resnet_train.cli.train", *over]
    wall, recs, _ = train_run(cmd, run_dir, args.timeout, cli_env(env))
    return {"images_per_s": recs[-1]["images_per_sec"], "torchrun_wall_s": wall}


def cmd_scaling(args) -> int:
    """images/s of 1 and N processes under torchrun (gloo on CPU, nccl on CUDA)."""
    t0, threads = time.perf_counter(), thread_settings()
    print_threads(threads)
    n = args.nproc
    if args.threads_per_proc is None:
        args.threads_per_proc = max(1, (threads["affinity_cpus"] or threads["cpu_count"]) // n)
    print(f"scaling: {args.arch} {args.image_size}px synthetic, {args.batch} images per "
          f"process per step, {args.steps} steps x {args.epochs} epoch(s) (images/s of the last "
          f"epoch, metrics.jsonl), 1 vs {n} processes"
          + (f", OMP_NUM_THREADS={args.threads_per_proc} each" if args.device == "cpu" else ""),
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as base:
        many, one = alternate(args.rounds, lambda i: scaling_run(args, base, n, i),
                              lambda i: scaling_run(args, base, 1, i))
    row = compare_row(f"{n} vs 1 processes", "images/s", [r["images_per_s"] for r in many],
                      [r["images_per_s"] for r in one], labels=(f"{n} processes", "1 process"),
                      extra={"nproc": n, "threads_per_proc": args.threads_per_proc,
                             "backend": "nccl" if args.device == "cuda" else "gloo"})
    row["efficiency"] = stat([v / n for v in row["ratio"]["values"]])
    print(f"\nscaling efficiency (speed-up / {n}): {row['efficiency']['median']:.3f} "
          f"[{row['efficiency']['min']:.3f}, {row['efficiency']['max']:.3f}]")
    return finish(args, threads, f"scaling: images/s, 1 vs {n} processes", [row], t0)


# =========================================================================== threads


def folder_train_run(args, root: str, base: str, workers: int, threads: int | None,
                     i: int) -> dict:
    """resnet-train on the generated folder (CPU); run.threads given, or the default."""
    tag = "default" if threads is None else f"t{threads}"
    run_dir = os.path.join(base, f"w{workers}_{tag}_{i}")
    over = ["data.dataset=folder", f"data.root={root}", f"data.workers={workers}",
            f"data.batch_size={args.batch}", f"data.train.scale=[{args.crop + args.crop // 7},"
            f"{args.crop + args.crop // 2}]", f"data.train.crop={args.crop}",
            f"data.val.resize={args.crop}", f"data.val.crop={args.crop}",
            f"model.arch={args.arch}", f"model.width={args.width}",
            f"train.epochs={args.epochs}", "schedule.name=constant", "run.device=cpu",
            "run.progress=none", f"run.dir={run_dir}"]
    if threads is not None:
        over.append(f"run.threads={threads}")
    env = {k: v for k, v in cli_env().items() if k != "OMP_NUM_THREADS"}
    _, recs, text = train_run([*TRAIN_CLI, *over], run_dir, args.timeout, env)
    used = re.search(r", (\d+) threads\b", text)  # the banner: "..., N threads[, ...] | ..."
    return {"images_per_s": recs[-1]["images_per_sec"],
            "data_wait_frac": recs[-1].get("data_wait_frac"),
            "main_threads": int(used.group(1)) if used else None}


def cmd_threads(args) -> int:
    """CPU training on JPEG folders: run.threads' default vs torch's (every core), by
    data.workers: does the main process starve the workers that decode?"""
    t0, threads = time.perf_counter(), thread_settings()
    print_threads(threads)
    cores = threads["affinity_cpus"] or threads["cpu_count"]
    print(f"threads: {args.arch} width {args.width}, {args.crop} px crops of ~500x375 JPEGs, "
          f"batch {args.batch}, {args.epochs} epochs (the last one's images/s, metrics.jsonl); "
          f"ours: the default run.threads, reference: run.threads={cores} (torch's default)",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as base:
        root = cached(args.dir or base, f"folder_{args.images}",
                      lambda p: f", {make_folder(p, args.images):.0f} KB a JPEG")
        for w in args.workers:
            ours, ref = alternate(
                args.rounds, lambda i, w=w: folder_train_run(args, root, base, w, None, i),
                lambda i, w=w: folder_train_run(args, root, base, w, cores, i))
            rows.append(compare_row(
                f"workers={w}", "images/s", [r["images_per_s"] for r in ours],
                [r["images_per_s"] for r in ref], labels=("default threads", f"{cores} threads"),
                extra={"workers": w,
                       "main_threads": {"ours": [r["main_threads"] for r in ours],
                                        "reference": [r["main_threads"] for r in ref]},
                       "data_wait_frac": {"ours": [r["data_wait_frac"] for r in ours],
                                          "reference": [r["data_wait_frac"] for r in ref]}}))
    return finish(args, threads, "threads: CPU folder training images/s", rows, t0)


# =========================================================================== compare


def cmd_compare(args) -> int:
    """Ratios of repeated runs side by side, and whether they agree within --tolerance."""
    docs = []
    for path in args.files:
        with open(path) as fh:
            docs.append(json.load(fh))
    names = [r["name"] for r in docs[0]["rows"]]
    ok = True
    print(f"{'figure':<20} " + " ".join(f"{os.path.basename(p):>12}" for p in args.files)
          + "   spread")
    for name in names:
        vals = [next((r["ratio"]["median"] for r in d["rows"] if r["name"] == name), None)
                for d in docs]
        if None in vals:
            print(f"{name:<20} (not in every file)")
            ok = False
            continue
        spread = max(vals) / min(vals) - 1
        ok &= spread <= args.tolerance
        print(f"{name:<20} " + " ".join(f"{v:>11.3f}x" for v in vals) + f"   {100 * spread:.0f}%")
    print(f"agree within {100 * args.tolerance:.0f}%: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


# =========================================================================== env


def cmd_env(args) -> int:
    """Versions, the device and the thread settings (gpu_check.sh's first part)."""
    import torchvision
    threads = thread_settings()
    print_threads(threads)
    cuda = torch.cuda.is_available()
    doc = {"torch": torch.__version__, "torchvision": torchvision.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
           "cuda_available": cuda, "gpus": torch.cuda.device_count() if cuda else 0,
           "device_name": device_name("cuda" if cuda else "cpu"),
           "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "threads": threads}
    print(json.dumps(doc))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    if args.require_cuda and not cuda:
        print("error: no CUDA device", file=sys.stderr)
        return 1
    return 0


# =========================================================================== summarize


# gpu_check.sh's goals for one H200 (issue 16): (part, figure, at least)
GPU_GOALS = [("r50_eager", "images_per_s", 4500), ("r50_compiled", "images_per_s", 5500)]


def key_figures(doc: dict) -> dict:
    """The few numbers of a bench JSON document that a summary shows."""
    rows = {r["name"]: r for r in doc["rows"]}
    if doc["bench"] == "step":
        r = rows["train step"]
        return {"images_per_s": r["ours"]["median"], "bare_images_per_s": r["reference"]["median"],
                "ratio": r["ratio"]["median"], "overhead_pct": r["overhead_pct"],
                "peak_mem_gib": r["peak_mem_gib"].get("ours"),
                "warmup_s": r["warmup_s"]["ours"], "runtime": r["runtime"],
                "host_reads_per_step": r["host_reads_per_step"]["ours"],
                "cuda_syncs_per_step": r["cuda_syncs_per_step"]["ours"]}
    if doc["bench"] == "epoch":
        r, ours = rows["cifar epoch"], rows["cifar epoch"]["ours_rounds"]
        return {"images_per_s": r["ours"]["median"],
                "last_epoch_images_per_s": statistics.median(
                    x["last_epoch_images_per_s"] for x in ours),
                "reference_images_per_s": r["reference"]["median"], "ratio": r["ratio"]["median"],
                "peak_mem_gb": ours[-1].get("peak_mem_gb"),
                "data_wait_frac": ours[-1].get("data_wait_frac")}
    return {name: {"ours": r["ours"]["median"], "reference": r["reference"]["median"],
                   "ratio": r["ratio"]["median"], "unit": r["unit"]} for name, r in rows.items()}


def junit_counts(path: str) -> dict:
    import xml.etree.ElementTree as ET
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    cases = [c for s in suites for c in s.iter("testcase")]
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in cases
                        if c.find("failure") is not None or c.find("error") is not None]
    # figures a test measured on the device (pytest's record_property), by test
    counts["properties"] = {f"{c.get('classname')}::{c.get('name')}": {
        p.get("name"): p.get("value") for p in c.iter("property")}
        for c in cases if c.find("properties") is not None}
    return counts


def cmd_summarize(args) -> int:
    """gpu_check.sh's summary: each part's rc, seconds and key figures, in one JSON."""
    out = args.dir
    with open(os.path.join(out, "parts.jsonl")) as fh:
        parts = [json.loads(line) for line in fh if line.strip()]
    for p in parts:
        rc = p.get("rc")
        p["status"] = {None: "dry", 0: "ok", 124: "timeout", 137: "timeout",
                       125: "skipped"}.get(rc, "failed")
        path = os.path.join(out, f"{p['part']}.json")
        if p["part"] == "tests" and os.path.exists(os.path.join(out, "tests.xml")):
            p["figures"] = junit_counts(os.path.join(out, "tests.xml"))
        elif os.path.exists(path):
            with open(path) as fh:
                doc = json.load(fh)
            p["figures"] = key_figures(doc) if "rows" in doc else doc
    figures = {p["part"]: p.get("figures") or {} for p in parts}
    goals = [{"part": part, "figure": fig, "at_least": goal,
              "value": figures.get(part, {}).get(fig),
              "met": None if figures.get(part, {}).get(fig) is None
              else figures[part][fig] >= goal} for part, fig, goal in GPU_GOALS]
    # Does the folder loader (16 workers) keep up with ResNet-50 on the GPU?
    loader = figures.get("folder_loader", {}).get("folder wall", {}).get("ours")
    r50 = [figures.get(p, {}).get("images_per_s") for p in ("r50_eager", "r50_compiled")]
    r50 = max((v for v in r50 if v is not None), default=None)
    keeps_up = {"loader_images_per_s": loader, "r50_images_per_s": r50,
                "keeps_up": None if loader is None or r50 is None else loader >= r50}
    summary = {"schema": SCHEMA, "date": datetime.datetime.now().astimezone().isoformat(
                   timespec="seconds"),
               "dry_run": all(p["status"] == "dry" for p in parts),
               "ok": all(p["status"] in ("ok", "dry") for p in parts),
               "parts": parts, "goals": goals, "folder_loader_vs_r50": keeps_up}
    path = os.path.join(out, "gpu_check.json")
    with open(path, "w") as fh:
        json.dump(summary, fh, indent=1)
    for p in parts:
        print(f"{p['part']:<14} {p['status']:<8} {p.get('seconds', 0):>4} s  "
              f"{json.dumps(p.get('figures'))[:160] if p.get('figures') else ''}")
    for g in goals:
        print(f"goal {g['part']} {g['figure']} >= {g['at_least']}: {g['value']} "
              f"({'met' if g['met'] else 'not met' if g['met'] is False else 'not measured'})")
    print(f"folder loader {loader} img/s vs ResNet-50 {r50} img/s: keeps up "
          f"{keeps_up['keeps_up']}")
    print(f"wrote {path}")
    return 0


# =========================================================================== main


def _common(sp, rounds: int):
    sp.add_argument("--rounds", type=int, default=rounds, help="alternating rounds")
    sp.add_argument("--json", metavar="OUT", help="write the results here")
    sp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return sp


def _data_args(d) -> None:
    d.add_argument("--pipelines", default="folder,cifar", help="comma list: folder, cifar")
    d.add_argument("--images", type=int, default=384, help="folder: training JPEGs generated")
    d.add_argument("--batch", type=int, default=32, help="folder: batch size")
    d.add_argument("--workers", type=int, default=2, help="folder: workers of both pipelines")
    d.add_argument("--prefetch", type=int, default=4, help="folder: batches prefetched a worker")
    d.add_argument("--threads", type=int, default=None,
                   help="folder: torch threads of the main process (default: the trainer's "
                        "choice, run.threads)")
    d.add_argument("--decode", default="cpu", choices=("cpu", "device"),
                   help="folder: ours decodes in the workers (cpu) or on the device (data.decode)")
    d.add_argument("--epochs", type=int, default=2, help="folder: timed epochs a round")
    d.add_argument("--cifar-images", type=int, default=10000)
    d.add_argument("--cifar-batch", type=int, default=128)
    d.add_argument("--cifar-epochs", type=int, default=2, help="CIFAR: timed epochs a round")
    d.add_argument("--cifar-workers", type=int, default=2, help="CIFAR: torchvision's workers")
    d.add_argument("--cifar-threads", type=int, default=None,
                   help="CIFAR: torch threads of both main processes (default: torch's)")
    d.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs first")
    # 7 rounds (the default) of >= 4 s: on the noisy 2-core VM a single round's ratio
    # varies by +-18%; 3 rounds of 2 s gave folder ratios of 2.14x-2.62x in four runs,
    # 7 of 4 s 2.73x-2.86x in three (CIFAR 30.9x-32.1x).
    d.add_argument("--min-seconds", type=float, default=4.0,
                   help="more timed epochs until a round lasts this long")
    d.add_argument("--dir", help="keep/reuse the generated data here")


def _step_args(s) -> None:
    s.add_argument("--arch", default="resnet20")
    s.add_argument("--width", type=int, default=None, help="model.width (tiny tests)")
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"))
    s.add_argument("--channels-last", default="auto", choices=("auto", "true", "false"))
    s.add_argument("--compile", action="store_true", help="torch.compile both models")
    s.add_argument("--no-keep-host-memory", action="store_true",
                   help="glibc's default malloc for both loops (the CLI keeps freed memory)")
    s.add_argument("--bare-fused", action="store_true",
                   help="the bare loop's SGD fused too (isolates the step's own overhead)")
    s.add_argument("--steps", type=int, default=20, help="timed steps a round")
    s.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    s.add_argument("--sync-steps", type=int, default=3, help="steps counting host syncs")


def _epoch_args(e) -> None:
    e.add_argument("--samples", type=int, default=50000, help="training images (CIFAR: 50000)")
    e.add_argument("--val-samples", type=int, default=10000, help="test images")
    e.add_argument("--epochs", type=int, default=1)
    e.add_argument("--batch", type=int, default=128)
    e.add_argument("--ref-workers", type=int, default=2, help="the reference's DataLoader workers")
    e.add_argument("--timeout", type=float, default=3600, help="seconds per CLI run")
    e.add_argument("--dir", help="keep/reuse the generated data here")


def _scaling_args(c) -> None:
    c.add_argument("--nproc", type=int, default=2, help="N")
    c.add_argument("--arch", default="resnet20")
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--image-size", type=int, default=32)
    c.add_argument("--batch", type=int, default=128, help="images per process per step")
    c.add_argument("--steps", type=int, default=20, help="steps per epoch")
    c.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    c.add_argument("--threads-per-proc", type=int, default=None,
                   help="CPU: OMP_NUM_THREADS of every process in both runs (default: "
                        "usable cores / N)")
    c.add_argument("--timeout", type=float, default=1800, help="seconds per torchrun")


def _threads_args(t) -> None:
    t.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2],
                   help="comma list of data.workers (default 0,1,2)")
    t.add_argument("--images", type=int, default=512, help="training JPEGs generated")
    t.add_argument("--arch", default="resnet18")
    t.add_argument("--width", type=int, default=16, help="model.width (a light model: the "
                   "decode is a large share of the step)")
    t.add_argument("--crop", type=int, default=112)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    t.add_argument("--timeout", type=float, default=1800, help="seconds per CLI run")
    t.add_argument("--dir", help="keep/reuse the generated data here")


def _tool_parsers(sub) -> None:
    """The subcommands that measure nothing: env, summarize, compare."""
    v = sub.add_parser("env", help=cmd_env.__doc__)
    v.set_defaults(func=cmd_env)
    v.add_argument("--json", metavar="OUT")
    v.add_argument("--require-cuda", action="store_true", help="exit 1 without a CUDA device")

    g = sub.add_parser("summarize", help=cmd_summarize.__doc__)
    g.set_defaults(func=cmd_summarize)
    g.add_argument("dir", help="gpu_check.sh's output folder (parts.jsonl, <part>.json)")

    m = sub.add_parser("compare", help=cmd_compare.__doc__)
    m.set_defaults(func=cmd_compare)
    m.add_argument("files", nargs="+", help="JSON files of the same subcommand")
    m.add_argument("--tolerance", type=float, default=0.2, help="max / min - 1 allowed")


# the measuring subcommands: (name, function, default rounds, its arguments)
MEASURES = (("data", cmd_data, 7, _data_args), ("step", cmd_step, 5, _step_args),
            ("epoch", cmd_epoch, 3, _epoch_args), ("scaling", cmd_scaling, 3, _scaling_args),
            ("threads", cmd_threads, 3, _threads_args))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, rounds, add_args in MEASURES:
        sp = _common(sub.add_parser(name, help=func.__doc__), rounds)
        sp.set_defaults(func=func)
        add_args(sp)
    _tool_parsers(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("data", "step", "epoch", "scaling", "threads"):
        args.device = resolve_device(args.device)
    if args.command == "data":
        args.pipelines = [x.strip() for x in args.pipelines.split(",") if x.strip()]
        bad = set(args.pipelines) - {"folder", "cifar"}
        if bad:
            parser().error(f"--pipelines: unknown {', '.join(sorted(bad))}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
