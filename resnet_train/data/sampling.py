"""Epoch order, rank sharding and per-batch RNG: everything that makes data order exact.

The order of an epoch is a pure function of (seed, epoch); a step's samples and its
augmentation randomness are pure functions of (seed, epoch, step): draws are made for the
whole global batch and each rank keeps its slice (the world size changes nothing). Resuming
at step k therefore needs no saved RNG state and decodes nothing before step k.
"""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes and platforms."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h ^= (int(p) + _MIX + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch (int64, CPU)."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 1))
    return torch.randperm(n, generator=g)


def train_steps_per_epoch(n: int, global_batch: int) -> int:
    """Full global batches per epoch (the incomplete tail is dropped, fresh each epoch)."""
    return n // global_batch


def train_batch_indices(perm: torch.Tensor, step: int, global_batch: int, rank: int,
                        world: int) -> torch.Tensor:
    """This rank's slice of global batch ``step``: rank r takes the r-th contiguous part.

    One process with accum_steps=world and micro-batch B/world sees exactly the same
    micro-batches in the same order as the ranks of a world-size DDP run.
    """
    local = global_batch // world
    start = step * global_batch + rank * local
    return perm[start:start + local]


def val_shard(n: int, rank: int, world: int) -> range:
    """Validation indices of one rank: every image exactly once across ranks, no padding."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def batch_generator(seed: int, epoch: int, step: int, rank: int,
                    device: torch.device | str | torch.Generator = "cpu") -> torch.Generator:
    """The RNG for one step's on-device augmentation; pass a Generator to reseed it (one per
    run serves every step) instead of making a new one on ``device``."""
    gen = device if isinstance(device, torch.Generator) else torch.Generator(device=device)
    return gen.manual_seed(mix_seed(seed, epoch, step, rank, 2))
