"""Reused shared-memory batch buffers for the training loader's workers.

Without them a loader worker hands over every batch in a fresh shared-memory segment, and
the kernel allocates, zeroes and maps each of its pages anew: about 4 ms of CPU a batch of
32 crops of 224 px on the 2-core VM (0.15 ms an image, 5% of the worker's decode), and what
the main process pays to map it again on top. ``BatchRing`` makes a few batch-sized slots
of shared memory once, before the workers start (forked or spawned, they reach the same
memory); a key names the slot its batch is decoded into, and the worker returns only
``RingSlot(slot, n)``.

Reuse must never hand over memory that someone still reads or writes. A slot goes to a new
key only when
  - no worker can be writing it: its batch was delivered, or its task belonged to an earlier
    pass (a pass left midway), which the DataLoader finishes before a new pass's ``iter()``
    returns (it drains the old results until every worker has acknowledged the reset); and
  - no tensor of its last batch is alive: each batch is delivered as a new torch storage
    over the slot (``torch.from_numpy``), whose weak reference expires when the last view,
    numpy array or alias of that batch is gone, whatever the consumer kept.
When no slot is free the key gets none and the worker uses a fresh segment, as without a
ring: a consumer that keeps batches costs speed, never data.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef

MAX_BYTES = 1 << 30  # a ring's shared memory at most (slots beyond it fall back to fresh)


def shared_uint8(shape) -> torch.Tensor:
    """A contiguous uint8 tensor in new shared memory (its pages are made on first use)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape, strides)


class RingSlot(NamedTuple):
    """What a worker returns for a batch decoded into a ring slot."""

    slot: int
    n: int  # samples in the batch (the slot holds up to the ring's batch size)


class BatchRing:
    """``slots`` shared uint8 buffers of shape (batch, *sample_shape), lent out per key.

    Main process only: ``take`` when the DataLoader draws a key, ``deliver`` when its batch
    arrives, ``new_pass``/``drop_stale`` around each ``iter(DataLoader)``. Workers only
    write ``memory[slot, :n]``.
    """

    def __init__(self, slots: int, batch: int, sample_shape: tuple[int, ...]):
        self.memory = shared_uint8((slots, batch, *sample_shape))
        self.batch = batch
        self._array = self.memory.numpy()
        self._free = list(range(slots - 1, -1, -1))   # a stack: slot 0 first
        self._assigned: dict[int, int] = {}            # slot -> pass of its key
        self._delivered: dict[int, StorageWeakRef] = {}
        self.pass_id = 0
        self.hits = 0  # batches delivered from the ring (the rest went fresh)

    @classmethod
    def for_loader(cls, workers: int, prefetch: int, batch: int, sample_shape):
        """A ring for a loader: every key in flight (workers x prefetch) and the batches the
        consumer and the loader's generator hold, within ``MAX_BYTES``; None if under 2."""
        slots = min(workers * prefetch + 3, MAX_BYTES // (batch * math.prod(sample_shape)))
        return cls(slots, batch, tuple(sample_shape)) if workers > 0 and slots >= 2 else None

    def new_pass(self) -> None:
        """Before ``iter(DataLoader)``: the keys it draws from now on belong to a new pass."""
        self.pass_id += 1

    def drop_stale(self) -> None:
        """After ``iter(DataLoader)`` returned: the tasks of earlier passes are finished."""
        for slot, p in list(self._assigned.items()):
            if p < self.pass_id:
                del self._assigned[slot]
                self._free.append(slot)

    def take(self, n: int) -> int | None:
        """A free slot for a key of ``n`` samples, or None (the worker allocates afresh)."""
        for slot, ref in list(self._delivered.items()):
            if ref.expired():  # in delivery order: the latest freed is reused first
                del self._delivered[slot]
                self._free.append(slot)
        if n > self.batch or not self._free:
            return None
        slot = self._free.pop()
        self._assigned[slot] = self.pass_id
        return slot

    def deliver(self, got: RingSlot) -> torch.Tensor:
        """The (n, *sample_shape) batch in ``got.slot``, on a storage of its own whose
        expiry frees the slot again."""
        if self._assigned.pop(got.slot, None) is None:
            raise RuntimeError(f"batch ring: slot {got.slot} delivered but not lent out")
        x = torch.from_numpy(self._array[got.slot, :got.n])
        self._delivered[got.slot] = StorageWeakRef(x.untyped_storage())
        self.hits += 1
        return x
