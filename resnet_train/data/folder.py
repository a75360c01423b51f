"""ImageNet and any image folder: ``root/<split>/<class>/*`` decoded by worker processes.

Class index = position in the sorted class folder names (torchvision's ImageFolder
convention, so labels line up with torchvision's weights). Workers decode whole batches:
each sample's crop window is chosen in source coordinates and only that box is resized
("crop before resize" in docs/architecture.md), and a batch leaves the worker as one uint8
NCHW tensor ("uint8 until the device"). The
batch order comes from ``sampling``; a sample's augmentation from ``random.Random`` seeded
by (seed, epoch, index), so resuming at batch k decodes nothing before it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import sys
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError, DataError
from . import NOT_COUNTED, REPORT_PATHS, DataBundle, Loader, final_val_config
from .geometry import (Crop, crop_box_center, crop_box_full, crop_box_paper, crop_box_resized,
                       crop_box_rrc)
from .device_decode import FIXED_SIZE, Encoded, decode_on_device
from .jpeg import _jpeg_sof, ends_complete, load_crop, torch_decoder_missing
from .prep import IMAGENET_MEAN, IMAGENET_STD, DevicePrep
from .ring import BatchRing, RingSlot, shared_uint8
from .sampling import (epoch_permutation, mix_seed, train_batch_indices, train_steps_per_epoch,
                       val_shard)
from .views import ten_crop

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_TRIES = 10          # replacement attempts for an unreadable image (on_bad_image: skip)
PREPARE_HINT = "scripts/prepare_imagenet_val.py"


# --------------------------------------------------------------------------- scanning


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def warn_stderr(line: str) -> None:
    """One warning line on stderr (the data builders get no console of the trainer's)."""
    print(line, file=sys.stderr, flush=True)


def _quiet(line: str) -> None:
    """Discard a warning (ranks other than 0: rank 0 speaks)."""


def find_classes(split_dir: str, warn=warn_stderr) -> list[str]:
    """Sorted class folder names of a split; DataError for a missing, empty or flat split.

    Images beside the class folders are ignored, with one ``warn(line)``."""
    if not os.path.isdir(split_dir):
        raise DataError(f"{split_dir}: split directory not found")
    entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    images = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if classes:
        if images:  # what an interrupted --apply of the val script leaves behind
            warn(f"warning: {split_dir} holds {len(images)} image files outside class folders "
                 f"(ignored); an interrupted {PREPARE_HINT} --apply leaves this: "
                 f"run it again")
        return classes
    if images:
        raise DataError(
            f"{split_dir}: {len(images)} images but no class folders (a flat ILSVRC validation "
            f"folder?); sort them into class folders with {PREPARE_HINT} {split_dir} "
            f"--devkit <ILSVRC2012_devkit_t12> --apply")
    raise DataError(f"{split_dir}: no class folders and no images (empty split)")


def scan_split(root: str, split: str, classes: list[str] | None = None, warn=warn_stderr):
    """(classes, paths, labels) of ``root/split``; ``classes`` fixes the label mapping.
    ``warn(line)`` reports what is ignored (see ``find_classes``)."""
    split_dir = os.path.join(root, split)
    found = find_classes(split_dir, warn)
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"{split_dir}: class folders not in the training split: "
                            f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in found:
        class_dir = os.path.join(split_dir, c)
        files = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames.sort()
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
        if not files:
            raise DataError(f"{class_dir}: class folder has no images "
                            f"({', '.join(e.lower() for e in IMG_EXTENSIONS[:3])}, ...)")
        paths.extend(files)
        labels.extend([index[c]] * len(files))
    # One bytes array, not a list of str: forked workers then share it without refcount
    # writes touching every page (the classic DataLoader memory growth).
    return classes, np.array([os.fsencode(p) for p in paths]), np.array(labels, dtype=np.int64)


# --------------------------------------------------------------------------- worker side


def _identity(x):
    return x


# geometry name -> (w, h, rng, *args) -> (box, size, flip); the args follow the name in the
# geometry tuple. ten_crop loads the whole resized image; the worker cuts the 10 views.
GEOMETRIES = {
    "paper": lambda w, h, rng, scale, crop, flip: crop_box_paper(w, h, scale, crop, flip, rng),
    "rrc": lambda w, h, rng, scale, ratio, crop, flip: crop_box_rrc(w, h, scale, ratio, crop,
                                                                    flip, rng),
    "center": lambda w, h, rng, resize, crop: crop_box_center(w, h, resize, crop),
    "ten_crop": lambda w, h, rng, resize, crop: crop_box_resized(w, h, resize),
    "full": lambda w, h, rng, side: crop_box_full(w, h, side),
}


class BatchDecoder(Dataset):
    """Decodes a whole batch in a worker: key (epoch, indices) -> (uint8 batch, labels, bad).

    ``geometry`` is ('paper', scale, crop, flip) | ('rrc', scale, ratio, crop, flip) |
    ('center', resize, crop) | ('ten_crop', resize, crop) | ('full', side). ``bad`` lists
    (path, reason) of the unreadable images met; with on_bad='error' the batch is None and
    the main process raises (an exception raised here would lose its type and path).
    A key (epoch, indices, slot) with a slot of ``ring`` (a ``BatchRing``'s memory) is
    decoded into that slot and returned as ``RingSlot``.
    """

    ring: torch.Tensor | None = None

    def __init__(self, paths: np.ndarray, labels: np.ndarray, geometry: tuple, seed: int,
                 on_bad: str = "skip", draft: bool = False, encoded: bool = False,
                 scoring: bool = False):
        self.paths, self.labels, self.geometry = paths, labels, geometry
        self.seed, self.on_bad, self.draft = seed, on_bad, draft
        # A scored split (validation, resnet-eval): a replacement only fills the unreadable
        # image's place in the batch; its label NOT_COUNTED keeps it out of every count.
        self.scoring = scoring
        # data.decode=device: hand over the JPEG bytes and crops (device_decode.Encoded)
        self.encoded = encoded and geometry[0] in FIXED_SIZE

    def __len__(self) -> int:
        return len(self.paths)

    def _choose(self, w: int, h: int, rng: random.Random):
        kind, *args = self.geometry
        return GEOMETRIES[kind](w, h, rng, *args)

    def sample(self, epoch: int, i: int, bad: list):
        """(HWC or view array, label) of sample i, or None if it (and replacements) failed."""
        j = i
        for attempt in range(MAX_TRIES):
            path = os.fsdecode(self.paths[j])
            rng = random.Random(mix_seed(self.seed, epoch, i, attempt))
            try:
                arr = load_crop(path, functools.partial(self._choose, rng=rng), self.draft)
            except Exception as e:  # noqa: BLE001 - any failure to decode is bad data
                if attempt == 0:  # one report a sample; a bad replacement is just redrawn
                    bad.append((path, f"{type(e).__name__}: {e}"))
                if self.on_bad == "error":
                    return None
                j = random.Random(mix_seed(self.seed, epoch, i, attempt, 7)).randrange(
                    len(self.paths))
                continue
            if self.geometry[0] == "ten_crop":
                arr = ten_crop(arr, self.geometry[2]).permute(0, 2, 3, 1).numpy()
            return arr, NOT_COUNTED if self.scoring and attempt else int(self.labels[j])
        bad.append((os.fsdecode(self.paths[i]), f"no readable replacement in {MAX_TRIES} tries"))
        return None

    def encode(self, key) -> tuple[Encoded, np.ndarray, list]:
        """The batch of ``key`` undecoded: each complete plain 8-bit JPEG's bytes and its
        crop, drawn from the header with the CPU path's seed (the same box); other files
        decoded here (a truncated JPEG too: nvjpeg may decode it without an error, and it
        would be trained on with grey rows, neither replaced nor counted)."""
        epoch, indices = key
        bad: list[tuple[str, str]] = []
        blobs, sizes, crops, decoded = [], [], [], {}
        labels = np.empty(len(indices), dtype=np.int64)
        for k, i in enumerate(indices):
            path = os.fsdecode(self.paths[int(i)])
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError:
                data = b""
            sof = _jpeg_sof(data)
            if sof is not None and data[sof[2] - 1] == 8 and ends_complete(data):
                rng = random.Random(mix_seed(self.seed, epoch, int(i), 0))
                crops.append(Crop(*self._choose(sof[0], sof[1], rng)))
                blobs.append(data)
                sizes.append(len(data))
                labels[k] = self.labels[int(i)]
                continue
            got = self.sample(epoch, int(i), bad)  # the CPU way: replacement and reports
            if got is None:
                return None, None, bad
            decoded[k], labels[k] = got
            crops.append(None)
            sizes.append(0)
        data = _empty_batch((sum(sizes),))
        buf, offset = data.numpy(), 0
        for blob in blobs:  # straight into the (shared) batch buffer: one copy of the bytes
            buf[offset:offset + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
            offset += len(blob)
        return Encoded(key, data, sizes, crops, decoded), labels, bad

    def __getitem__(self, key):
        return self.encode(key[:2]) if self.encoded else self.decode(key)

    def decode(self, key):
        """The batch of ``key`` decoded here (the CPU path)."""
        epoch, indices, slot = (*key, None)[:3]
        bad: list[tuple[str, str]] = []
        fixed = self.geometry[0] in FIXED_SIZE  # every sample crop x crop
        nhwc, arrays = None, []
        labels = np.empty(len(indices), dtype=np.int64)
        for k, i in enumerate(indices):
            got = self.sample(epoch, int(i), bad)
            if got is None:
                return None, None, bad
            if fixed:  # decode straight into the batch
                if nhwc is None:
                    nhwc = _empty_batch((len(indices), *got[0].shape)) if slot is None \
                        else self.ring[slot, :len(indices)]
                nhwc.numpy()[k] = got[0]
            else:
                arrays.append(got[0])
            labels[k] = got[1]
        if fixed and slot is not None:
            return RingSlot(slot, len(indices)), labels, bad
        if fixed:
            # NCHW shape over the decoded NHWC memory (channels_last strides): no transpose
            # on the CPU; the float conversion on the device keeps this layout.
            return nhwc.permute(0, 3, 1, 2), labels, bad
        x = torch.from_numpy(np.stack(arrays))       # (N, H, W, C) or (N, 10, H, W, C)
        return x.movedim(-1, -3).contiguous(), labels, bad


def _empty_batch(shape) -> torch.Tensor:
    """A uint8 tensor; in a worker, in shared memory, so sending it to the main process
    copies nothing (what default_collate does for its stacks)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    return shared_uint8(shape)


class _Keys(Sampler):
    """The batch keys of the current epoch; set before each pass over the DataLoader. Drawn
    by the DataLoader in the main process as it hands each key to a worker: that is when a
    ring slot is lent to the key (``ring.take``)."""

    def __init__(self, ring: BatchRing | None = None):
        self.keys: list = []
        self.ring = ring

    def __iter__(self):
        for epoch, indices in self.keys:
            yield epoch, indices, None if self.ring is None else self.ring.take(len(indices))

    def __len__(self) -> int:
        return len(self.keys)


# --------------------------------------------------------------------------- main process


class FolderLoader(Loader):
    """Batches of one split through a DataLoader of ``BatchDecoder`` workers.

    ``order(epoch, b)`` gives the sample indices of batch b; ``batches(epoch, start)``
    hands only batches start.. to the workers. ``ring_batch`` (the batch size of a
    fixed-size geometry, decoded on the CPU into unpinned memory) lends the workers reused
    shared buffers (``ring.BatchRing``) instead of a fresh segment a batch.
    """

    def __init__(self, decoder: BatchDecoder, order, num_batches: int, num_samples: int,
                 workers: int, pin_memory: bool, prefetch: int, seed: int,
                 device: torch.device | None = None, ring_batch: int = 0):
        self.decoder, self.order, self.device = decoder, order, device
        self.num_batches, self.num_samples = num_batches, num_samples
        shape = fixed_sample_shape(decoder.geometry)
        # Pinning copies every batch anyway; the device decode's batches are byte strings.
        self._ring = BatchRing.for_loader(workers, prefetch, ring_batch, shape) \
            if ring_batch and shape and not pin_memory and not decoder.encoded else None
        decoder.ring = None if self._ring is None else self._ring.memory
        self._keys = _Keys(self._ring)
        self._bad_count, self._bad_paths = 0, []
        self._oom_said = False  # the device decode's fallback after an OOM, said once
        # data.decode=device on CUDA: the stream its decodes run on (device_decode.decode_jpegs)
        self._side = torch.cuda.Stream(device) if decoder.encoded and device is not None \
            and device.type == "cuda" else None
        # generator=: the DataLoader draws its worker base seed from here, not from the global
        # torch RNG (the trainer's RNG state stays untouched; the workers' own seeds are unused).
        self._dl = DataLoader(
            decoder, batch_size=None, sampler=self._keys, num_workers=workers,
            collate_fn=_identity, pin_memory=pin_memory,
            prefetch_factor=prefetch if workers > 0 else None,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.num_batches

    def batches(self, epoch: int, start: int = 0):
        return self._batches(epoch, start, count=True)

    def uncounted_batches(self, epoch: int, start: int = 0):
        return self._batches(epoch, start, count=False)

    def _batches(self, epoch: int, start: int, count: bool):
        self._keys.keys = [(epoch, self.order(epoch, b)) for b in range(start, self.num_batches)]
        if self._ring is not None:
            self._ring.new_pass()
        it = iter(self._dl)  # (persistent workers: returns once the last pass's tasks are done)
        if self._ring is not None:
            self._ring.drop_stale()
        # Labels travel pickled in the message (a numpy array): a tensor would cost a second
        # shared-memory segment and file-descriptor hand-over per batch.
        for x, y, bad in it:
            if isinstance(x, RingSlot):  # NCHW shape over NHWC memory, as decode() returns
                x = self._ring.deliver(x).permute(0, 3, 1, 2)
            elif isinstance(x, Encoded):
                x, y, bad = self._decode(x, y, bad)
            if bad and count:
                self._bad_count += len(bad)
                for p, _ in bad:
                    if len(self._bad_paths) < REPORT_PATHS and p not in self._bad_paths:
                        self._bad_paths.append(p)
            if x is None:
                path, reason = bad[-1]
                raise DataError(f"{path}: unreadable image ({reason}); "
                                f"set data.on_bad_image=skip to replace such images")
            yield x, torch.from_numpy(y)

    def _decode(self, x: Encoded, y, bad):
        """An encoded batch decoded on the device; if the device cannot decode it (a corrupt
        file, or no memory left), the whole batch again the CPU way, which skips and reports
        bad images."""
        try:
            return decode_on_device(x, self.device, self._side), y, bad
        except RuntimeError as e:
            # Not silent when the device is out of memory: every such batch costs the main
            # process a CPU decode (said once a loader; on the rank it happens on).
            if not self._oom_said and _out_of_memory(e):
                warn_stderr(f"warning: data.decode=device: out of device memory decoding a "
                            f"batch of {len(x.sizes)}; such batches are decoded on the CPU "
                            f"(slower). A smaller data.batch_size leaves nvjpeg room")
                self._oom_said = True
            return self.decoder.decode(x.key)

    def bad_report(self) -> tuple[int, list[str]]:
        out = (self._bad_count, list(self._bad_paths))
        self._bad_count, self._bad_paths = 0, []
        return out

    def close(self) -> None:
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl._iterator = None
        # A worker that did not exit in time is only sent SIGTERM: no slot is lent again (a
        # later pass, with new workers, allocates fresh segments), and the ring's shared
        # memory goes once the batches delivered from it are gone.
        self._keys.ring = self._ring = self.decoder.ring = None


def _out_of_memory(e: RuntimeError) -> bool:
    """Whether a failed device decode ran out of memory: torch's allocator (our buffers, or
    torchvision's outputs, whose error torchvision re-raises as a plain RuntimeError) or
    nvjpeg's own (its status 5, NVJPEG_STATUS_ALLOCATOR_FAILURE, ends the message)."""
    text = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower() \
        or text.rstrip().endswith(": 5")


def fixed_sample_shape(geometry: tuple) -> tuple[int, int, int] | None:
    """(crop, crop, 3): the HWC shape of every sample of a fixed-size geometry, else None."""
    crop = {"paper": 2, "rrc": 3, "center": 2}.get(geometry[0])
    return None if crop is None else (geometry[crop], geometry[crop], 3)


def _train_order(n: int, global_batch: int, seed: int, rank: int, world: int):
    cache: dict = {}

    def order(epoch: int, step: int) -> np.ndarray:
        if cache.get("epoch") != epoch:
            cache.update(epoch=epoch, perm=epoch_permutation(n, seed, epoch))
        return train_batch_indices(cache["perm"], step, global_batch, rank, world).numpy()
    return order


def _val_order(shard: range, local: int):
    def order(epoch: int, b: int) -> np.ndarray:
        return np.arange(shard.start + b * local, min(shard.start + (b + 1) * local, shard.stop))
    return order


def train_geometry(cfg) -> tuple:
    t, d = cfg.data.train, cfg.data
    if t.aug == "paper":
        return ("paper", tuple(t.scale), t.crop, t.flip)
    if t.aug == "random_resized_crop":
        return ("rrc", tuple(t.rrc_scale), tuple(t.rrc_ratio), t.crop, t.flip)
    if t.aug == "none":
        return ("center", max(d.val.resize, t.crop), t.crop)
    raise ConfigError(f"data.train.aug: {t.aug!r} is for CIFAR; image folders take paper, "
                      f"random_resized_crop or none")


def val_geometry(cfg, local: int) -> tuple[tuple, int]:
    """(geometry, images per batch) for data.val.protocol and this rank's batch size."""
    v = cfg.data.val
    if v.protocol == "ten_crop":  # 10 views an image: the same pixels per batch as center
        return ("ten_crop", v.resize, v.crop), max(1, local // 10)
    if v.protocol == "multiscale":  # whole images differ in shape: one per batch
        if not v.scales:
            raise ConfigError("data.val.scales: the multiscale protocol needs at least one scale")
        return ("full", max(v.scales)), 1
    return ("center", v.resize, v.crop), local


def make_loader(paths, labels, geometry, cfg, order, num_batches, *, device, seed_tag: int,
                ring_batch: int = 0, scoring: bool = False):
    d = cfg.data
    dec = BatchDecoder(paths, labels, geometry, cfg.run.seed, d.on_bad_image, d.jpeg_draft,
                       encoded=d.decode == "device", scoring=scoring)
    pin = bool(d.pin_memory and torch.device(device).type == "cuda")
    return FolderLoader(dec, order, num_batches, len(paths), d.workers, pin, d.prefetch,
                        mix_seed(cfg.run.seed, seed_tag), torch.device(device), ring_batch)


# --------------------------------------------------------------------------- pixel mean


def pixel_mean_image(paths, labels, resize: int, crop: int, samples: int, workers: int,
                     on_bad: str = "skip", draft: bool = False) -> torch.Tensor:
    """Mean (3, crop, crop) image in [0, 1] of the training images (short side -> resize,
    centre crop), over ``samples`` evenly spaced images (0 = all)."""
    n = len(paths)
    k = n if samples <= 0 else min(samples, n)
    idx = np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))
    dec = BatchDecoder(paths, labels, ("center", resize, crop), 0, on_bad, draft)
    per = 64
    keys = [(0, idx[i:i + per]) for i in range(0, len(idx), per)]
    total, count = torch.zeros(3, crop, crop, dtype=torch.float64), 0
    dl = DataLoader(dec, batch_size=None, sampler=keys, num_workers=workers,
                    collate_fn=_identity, generator=torch.Generator().manual_seed(0))
    for x, _, bad in dl:
        if x is None:
            raise DataError(f"{bad[-1][0]}: unreadable image ({bad[-1][1]})")
        total += x.double().sum(0)
        count += x.shape[0]
    return (total / (count * 255.0)).float()


def cached_pixel_mean(cfg, paths, labels, run_dir, rank: int) -> torch.Tensor:
    """The training set's mean image, computed once and cached in the run directory (or
    in <root>/.resnet_train_cache when there is none)."""
    d = cfg.data
    resize, crop = max(d.val.resize, d.train.crop), d.train.crop
    key = json.dumps([os.path.abspath(d.root), d.train_dir, len(paths), os.fsdecode(paths[0]),
                      os.fsdecode(paths[-1]), resize, crop, d.pixel_mean_samples]
                     + (["draft"] if d.jpeg_draft else [])
                     + ([d.val_fraction, d.holdout_seed] if d.val_fraction else []))
    name = f"pixel_mean_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npy"
    cache_dir = run_dir if run_dir else os.path.join(d.root, ".resnet_train_cache")
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (3, crop, crop):
                return torch.from_numpy(arr)
        except (OSError, ValueError):
            pass  # a damaged cache is recomputed
    mean = pixel_mean_image(paths, labels, resize, crop, d.pixel_mean_samples, d.workers,
                            d.on_bad_image, d.jpeg_draft)
    if rank == 0:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                np.save(fh, mean.numpy())
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"could not cache the pixel mean in {cache_dir}: {e}", stacklevel=2)
    return mean


# --------------------------------------------------------------------------- builder


def split_digest(root: str, paths: np.ndarray, labels: np.ndarray) -> dict:
    """What a split is, to tell on resume whether it is the one the run trained on: its size
    and a hash of its files (relative to ``root``, so a moved dataset is the same one) and
    labels, in order (a sample's index names its file)."""
    h = hashlib.sha256()
    prefix = os.fsencode(os.path.join(root, ""))
    for p in paths:
        h.update((p[len(prefix):] if p.startswith(prefix) else p) + b"\0")
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return {"images": int(len(paths)), "sha256": h.hexdigest()[:16]}


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: ``fraction`` of every class, drawn with ``seed``.

    Stratified so that a small or unbalanced folder still validates every class: each class
    of n >= 2 images gives round(fraction * n) of them, at least 1 and at most n - 1. The draw
    depends only on the seed and the sorted scan, so every run and resume gets the same split.
    """
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(max(round(fraction * len(idx)), 1), len(idx) - 1)
        perm = torch.randperm(len(idx), generator=g).numpy()
        held.append(idx[perm[:k]])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def scan_splits(d, warn) -> tuple[list[str], tuple, tuple]:
    """(classes, (train paths, labels), (val paths, labels)) of ``cfg.data``: val/ or, with
    data.val_fraction, a holdout of train/."""
    classes, train_paths, train_labels = scan_split(d.root, d.train_dir, warn=warn)
    val_dir = os.path.join(d.root, d.val_dir)
    if d.val_fraction > 0:
        if os.path.isdir(val_dir):
            warn(f"note: data.val_fraction={d.val_fraction}: validating on a holdout of "
                 f"{d.train_dir}/; {val_dir} is not read")
        keep, held = holdout_split(train_labels, d.val_fraction, d.holdout_seed)
        return (classes, (train_paths[keep], train_labels[keep]),
                (train_paths[held], train_labels[held]))
    if not os.path.isdir(val_dir):
        raise DataError(f"{val_dir}: split directory not found (set data.val_fraction=0.1 to "
                        f"hold out part of {d.train_dir}/ instead)")
    _, val_paths, val_labels = scan_split(d.root, d.val_dir, classes, warn=warn)
    return classes, (train_paths, train_labels), (val_paths, val_labels)


def eval_splits(d, classes, need_train: bool, warn) -> tuple[list[str], tuple | None, tuple]:
    """``scan_splits`` for scoring only: the validation split and its label mapping, with
    train/ walked only when its files are needed (a holdout, or a mean to compute); its
    training split is then None.

    The mapping is ``classes`` (the checkpoint's: its labels are what the model learned),
    else train/'s folder names, else, where there is no train/ (a machine that holds only
    ImageNet's val/), val/'s own: one line says so, since a class missing from val/ then
    shifts every label after it (the model's head size still has to match)."""
    if d.val_fraction > 0 or need_train:  # (build_data compares the names with ``classes``)
        return scan_splits(d, warn)
    if classes is None:
        train_dir = os.path.join(d.root, d.train_dir)
        if os.path.isdir(train_dir):
            classes = find_classes(train_dir, warn)
        else:
            warn(f"note: {train_dir} not found: the labels follow the class folders of "
                 f"{os.path.join(d.root, d.val_dir)}, in sorted order")
    val_dir = os.path.join(d.root, d.val_dir)
    if not os.path.isdir(val_dir):
        raise DataError(f"{val_dir}: split directory not found")
    classes, val_paths, val_labels = scan_split(d.root, d.val_dir, classes, warn=warn)
    return classes, None, (val_paths, val_labels)


def folder_splits(cfg, rank: int, stored, classes, eval_only: bool):
    """(classes, train paths, train labels, val paths, val labels) of ``cfg.data``, the
    training split (None, None) when ``eval_only`` did not need it; checked against
    data.num_classes and, for training, data.batch_size."""
    d = cfg.data
    if not d.root or not os.path.isdir(d.root):
        raise DataError(f"{d.root}: data root directory not found")
    warn = warn_stderr if rank == 0 else _quiet
    if eval_only:
        need_mean = stored is None and d.normalize == "pixel_mean"
        classes, train, val = eval_splits(d, classes, need_mean, warn)
    else:
        classes, train, val = scan_splits(d, warn)
    if d.num_classes is not None and d.num_classes != len(classes):
        raise ConfigError(f"data.num_classes: {d.num_classes} does not match "
                          f"{os.path.join(d.root, d.train_dir)}: {len(classes)} class folders")
    train = train or (None, None)
    if not eval_only and len(train[0]) < d.batch_size:
        raise ConfigError(f"data.batch_size: {d.batch_size} is larger than the training split "
                          f"({len(train[0])} images)")
    return classes, *train, *val


def check_decoder(d, rank: int) -> None:
    """Without torchvision's JPEG decoder: data.decode=device is a config error; the CPU
    path still works through PIL, slower, and rank 0 says so in one line."""
    missing = torch_decoder_missing()
    if missing is None:
        return
    if d.decode == "device":
        raise ConfigError(f"data.decode: device needs torchvision.io.decode_jpeg ({missing}); "
                          f"use data.decode=cpu")
    if rank == 0:
        warn_stderr(f"note: {missing}: JPEGs are decoded by PIL instead (the same crops, "
                    f"about 1.3x the CPU time)")


def build_folder(cfg, device, rank: int, world: int, run_dir=None,
                 stored=None, classes=None, eval_only: bool = False) -> DataBundle:
    """ImageNet or any folder of class folders; the val loader follows data.val.protocol.

    ``eval_only``: no training loader (``train`` is None) and no walk of train/ unless
    needed; ``classes`` (a checkpoint's) then fixes the labels."""
    d, t = cfg.data, cfg.data.train
    check_decoder(d, rank)
    classes, train_paths, train_labels, val_paths, val_labels = folder_splits(
        cfg, rank, stored, classes, eval_only)
    k, n = len(classes), 0 if train_paths is None else len(train_paths)
    seed, local = cfg.run.seed, d.batch_size // world
    # Only the training loader reuses its batch buffers (ring.py): it runs all the time,
    # while a validation loader's would hold shared memory idle between passes.
    train = None if eval_only else make_loader(
        train_paths, train_labels, train_geometry(cfg), cfg,
        _train_order(n, d.batch_size, seed, rank, world),
        train_steps_per_epoch(n, d.batch_size), device=device, seed_tag=11, ring_batch=local)
    shard = val_shard(len(val_paths), rank, world)

    def val_loader(val_cfg, seed_tag: int) -> FolderLoader:
        """This rank's shard of the validation split under the ``data.val`` section."""
        vcfg = dataclasses.replace(cfg, data=dataclasses.replace(d, val=val_cfg))
        geometry, per = val_geometry(vcfg, local)
        return make_loader(val_paths, val_labels, geometry, vcfg, _val_order(shard, per),
                           math.ceil(len(shard) / per), device=device, seed_tag=seed_tag,
                           scoring=True)
    val = val_loader(d.val, 12)
    final = final_val_config(cfg)
    final = None if final is None else val_loader(final, 13)
    if stored is not None:  # the checkpoint's values: no scan of the training set
        mean = stored[0]
    elif d.normalize == "pixel_mean":
        mean = cached_pixel_mean(cfg, train_paths, train_labels, run_dir, rank)
    else:
        mean = d.mean or IMAGENET_MEAN
    std = (d.std or IMAGENET_STD) if d.divide_std else None
    reuse = torch.device(device).type == "cpu"  # the trainer is done with a batch per step
    train_prep = DevicePrep(mean, std, pca_alpha=t.pca_lighting, channels_last=False,
                            device=device, color_jitter=t.color_jitter, reuse_output=reuse,
                            rank=rank, world=world)
    val_prep = DevicePrep(mean, std, channels_last=False, device=device, reuse_output=reuse)
    info = {"classes": classes, "train_samples": n, "val_samples": len(val_paths),
            "val_protocol": d.val.protocol,
            "splits": None if eval_only else {
                "train": split_digest(d.root, train_paths, train_labels),
                "val": split_digest(d.root, val_paths, val_labels)}}
    return DataBundle(train, val, k, train_prep, val_prep, info, final,
                      lambda p: val_loader(dataclasses.replace(d.val, protocol=p), 12))
