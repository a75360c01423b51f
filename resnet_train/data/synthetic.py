"""Built-in synthetic datasets: no files, no download, seeded, generated on the device.

``synthetic`` is the quickstart dataset: each class is a *structure* (a shape or an oriented
texture) and every nuisance is random per image: position, scale, foreground and background
colour, contrast and pixel noise. Training images are fresh every epoch (a pure function of
seed, epoch and step); the validation set is fixed. ``synthetic_imagenet`` is 224x224, 1000
classes of noise for throughput benchmarks without data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from . import DataBundle, Loader
from .sampling import batch_generator, mix_seed, train_steps_per_epoch, val_shard
from .prep import DevicePrep

# The classes, in label order. Shapes are centred at a random point; textures fill the image.
CLASS_NAMES = (
    "disk", "ring", "square", "cross", "triangle",
    "h_stripes", "v_stripes", "diag_stripes", "antidiag_stripes", "checker",
    "frame", "x_cross", "dots", "h_bar", "v_bar", "diamond",
)


def _masks(label: torch.Tensor, u: torch.Tensor, v: torch.Tensor, cx, cy, s, freq, phase,
           num_classes: int):
    """Boolean foreground masks (N, H, W) for each image's class (< num_classes)."""
    dx, dy = u - cx, v - cy
    r = torch.sqrt(dx * dx + dy * dy)
    adx, ady = dx.abs(), dy.abs()
    cheb = torch.maximum(adx, ady)
    arm = 0.3 * s
    f = freq * math.pi
    shapes = [
        r < s,                                                        # disk
        (r - 0.72 * s).abs() < 0.28 * s,                              # ring
        cheb < 0.85 * s,                                              # square
        ((adx < arm) & (ady < s)) | ((ady < arm) & (adx < s)),        # cross
        (dy < 0.75 * s) & (adx < (dy + 0.75 * s) * 0.62),             # triangle (apex up)
        torch.sin(f * v + phase) > 0,                                 # horizontal stripes
        torch.sin(f * u + phase) > 0,                                 # vertical stripes
        torch.sin(f * (u + v) * 0.7071 + phase) > 0,                  # diagonal stripes
        torch.sin(f * (u - v) * 0.7071 + phase) > 0,                  # anti-diagonal stripes
        torch.sin(f * u + phase) * torch.sin(f * v + phase) > 0,      # checkerboard
        (cheb < s) & (cheb > 0.62 * s),                               # hollow square
        ((dx - dy).abs() < arm) & (cheb < s) | ((dx + dy).abs() < arm) & (cheb < s),  # x
        torch.sin(f * u + phase).abs() * torch.sin(f * v + phase).abs() > 0.6,  # dots
        (ady < arm) & (adx < 1.3 * s),                                # horizontal bar
        (adx < arm) & (ady < 1.3 * s),                                # vertical bar
        adx + ady < s,                                                # diamond
    ]
    out = torch.zeros_like(r, dtype=torch.bool)
    for k in range(num_classes):  # (not label.max(): reading it would sync every batch)
        sel = (label == k).view(-1, 1, 1)
        out = torch.where(sel, shapes[k], out)
    return out


def render(labels: torch.Tensor, size: int, gen: torch.Generator,
           num_classes: int = len(CLASS_NAMES)) -> torch.Tensor:
    """uint8 (N, 3, size, size) images of the given classes, all nuisances drawn from gen."""
    n, dev = labels.shape[0], labels.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=dev)

    coords = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    u, v = u.expand(n, size, size), v.expand(n, size, size)
    col = lambda t: t.view(n, 1, 1)  # noqa: E731
    s = col(0.22 + 0.4 * rand(n))                      # scale
    cx = col((rand(n) * 2 - 1) * (0.9 - s.view(n)))    # position keeps the shape inside
    cy = col((rand(n) * 2 - 1) * (0.9 - s.view(n)))
    freq = col(2.0 + 3.0 * rand(n))                    # texture: 2-5 cycles across the image
    phase = col(rand(n) * 2 * math.pi)
    mask = _masks(labels, u, v, cx, cy, s, freq, phase, num_classes).unsqueeze(1)
    fg, bg = rand(n, 3, 1, 1), rand(n, 3, 1, 1)
    # Guarantee a little contrast: push fg away from bg by at least 0.12 in mean intensity.
    gap = (fg.mean(1, keepdim=True) - bg.mean(1, keepdim=True))
    fg = (fg + torch.sign(gap + 1e-6) * (0.12 - gap.abs()).clamp(min=0)).clamp(0, 1)
    img = torch.where(mask, fg, bg)
    # Clutter: a random rectangle of a third colour occludes part of each image.
    x0, y0 = col(rand(n) * 2 - 1), col(rand(n) * 2 - 1)
    w, h = col(0.1 + 0.3 * rand(n)), col(0.1 + 0.3 * rand(n))
    occ = (((u - x0).abs() < w) & ((v - y0).abs() < h)).unsqueeze(1)
    img = torch.where(occ, rand(n, 3, 1, 1), img)
    img = img + (0.1 + 0.15 * rand(n, 1, 1, 1)) * torch.randn(n, 3, size, size, generator=gen,
                                                              device=dev)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


class SyntheticTrain(Loader):
    """Fresh images every epoch: global batch k of epoch e is rendered from (seed, e, k).

    Each rank renders the whole global batch and keeps its slice, so the samples of a step
    do not depend on the world size (DDP == one process with gradient accumulation).
    """

    def __init__(self, num_samples: int, global_batch: int, size: int, num_classes: int,
                 seed: int, rank: int, world: int, device: torch.device):
        self.num_samples, self.global_batch, self.local = num_samples, global_batch, \
            global_batch // world
        self.steps = train_steps_per_epoch(num_samples, global_batch)
        self.size, self.num_classes, self.seed = size, num_classes, seed
        self.rank, self.device = rank, device

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        part = slice(self.rank * self.local, (self.rank + 1) * self.local)
        gen = torch.Generator(device=self.device)  # reseeded for every step
        for step in range(start, self.steps):
            batch_generator(self.seed, epoch, step, 0, gen)
            labels = torch.randint(self.num_classes, (self.global_batch,), generator=gen,
                                   device=self.device)
            yield render(labels, self.size, gen, self.num_classes)[part], labels[part]


class TensorSplit(Loader):
    """A fixed split held as one uint8 tensor on the device; this rank's shard, in order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, local_batch: int,
                 rank: int, world: int):
        shard = val_shard(images.shape[0], rank, world)
        self.num_samples = images.shape[0]
        self.images, self.labels = images[shard.start:shard.stop], labels[shard.start:shard.stop]
        self.local = local_batch

    def __len__(self) -> int:
        return math.ceil(self.images.shape[0] / self.local)

    def batches(self, epoch: int = 0, start: int = 0):
        for i in range(start * self.local, self.images.shape[0], self.local):
            yield self.images[i:i + self.local], self.labels[i:i + self.local]


def _fixed_split(n: int, size: int, num_classes: int, seed: int, device) -> tuple:
    """A fixed, class-balanced validation set, rendered in chunks to bound memory."""
    gen = torch.Generator(device=device).manual_seed(mix_seed(seed, 7919))
    labels = (torch.arange(n, device=device) % num_classes)
    labels = labels[torch.randperm(n, generator=gen, device=device)]
    images = torch.cat([render(labels[i:i + 1024], size, gen) for i in range(0, n, 1024)])
    return images, labels


def build_synthetic(cfg, device, rank: int, world: int, run_dir=None,
                    stored=None) -> DataBundle:
    d = cfg.data
    k = d.num_classes or d.synthetic_classes
    if k > len(CLASS_NAMES) or k < 2:
        from ..errors import ConfigError
        raise ConfigError(f"data.num_classes: the synthetic dataset has 2..{len(CLASS_NAMES)} "
                          f"classes, got {k}")
    local = d.batch_size // world
    train = SyntheticTrain(d.train_samples, d.batch_size, d.image_size, k, cfg.run.seed, rank,
                           world, device)
    # The validation set depends on the data seed only, never on the run's seed or rank.
    val_images, val_labels = _fixed_split(d.val_samples, d.image_size, k, 12345, device)
    val = TensorSplit(val_images, val_labels, local, rank, world)
    prep = _prep(cfg, device, mean=(0.5, 0.5, 0.5), std=(0.29, 0.29, 0.29))
    return DataBundle(train, val, k, prep, prep, {"classes": list(CLASS_NAMES[:k])})


def _prep(cfg, device, mean, std) -> DevicePrep:
    d = cfg.data
    return DevicePrep(d.mean or mean, (d.std or std) if d.divide_std else None,
                      channels_last=False, device=device)


class SyntheticImageNetTrain(Loader):
    """Random 224x224 uint8 noise and labels rendered on the device: input-free throughput."""

    def __init__(self, num_samples, global_batch, size, num_classes, seed, rank, world, device):
        self.num_samples, self.local = num_samples, global_batch // world
        self.steps = max(1, train_steps_per_epoch(num_samples, global_batch))
        self.size, self.num_classes, self.seed = size, num_classes, seed
        self.rank, self.device = rank, device

    def __len__(self):
        return self.steps

    def batches(self, epoch: int, start: int = 0):
        gen = torch.Generator(device=self.device)  # reseeded for every step
        for step in range(start, self.steps):
            batch_generator(self.seed, epoch, step, self.rank, gen)
            x = torch.randint(0, 256, (self.local, 3, self.size, self.size), generator=gen,
                              device=self.device, dtype=torch.uint8)
            y = torch.randint(self.num_classes, (self.local,), generator=gen, device=self.device)
            yield x, y


def build_synthetic_imagenet(cfg, device, rank: int, world: int, run_dir=None,
                             stored=None) -> DataBundle:
    d = cfg.data
    k = d.num_classes or 1000
    size = d.train.crop
    train = SyntheticImageNetTrain(d.train_samples, d.batch_size, size, k, cfg.run.seed, rank,
                                   world, device)
    gen = torch.Generator(device=device).manual_seed(1)
    n = d.val_samples
    val = TensorSplit(torch.randint(0, 256, (n, 3, size, size), generator=gen, device=device,
                                    dtype=torch.uint8),
                      torch.randint(k, (n,), generator=gen, device=device),
                      d.batch_size // world, rank, world)
    from .prep import IMAGENET_MEAN, IMAGENET_STD
    prep = _prep(cfg, device, IMAGENET_MEAN, IMAGENET_STD)
    return DataBundle(train, val, k, prep, prep, {})
