"""CIFAR-10 / CIFAR-100 held in memory on the training device.

docs/architecture.md, "CIFAR lives in memory".

The python-pickle files are read once (shapes, dtype and label range validated, not
checksums, so converted or subsetted files work); each split becomes one uint8 tensor on
the device. A training step gathers its images and the paper's augmentation (4-pixel zero
padding, random 32x32 crop, horizontal flip) in one indexing op; no worker processes.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import DataBundle, Loader
from .prep import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DevicePrep,
                   PadCropFlip, pad_crop_flip_params)
from .sampling import epoch_permutation, mix_seed, train_batch_indices, train_steps_per_epoch
from .synthetic import TensorSplit

# name -> (directory, train files, test files, label key, classes, archive url, archive md5)
LAYOUTS = {
    "cifar10": dict(dir="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", names_key="label_names",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a"),
    "cifar100": dict(dir="cifar-100-python", train=["train"], test=["test"],
                     meta="meta", names_key="fine_label_names",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85"),
}
_LABELS = {("cifar10", "fine"): ("labels", 10), ("cifar10", "coarse"): ("labels", 10),
           ("cifar100", "fine"): ("fine_labels", 100),
           ("cifar100", "coarse"): ("coarse_labels", 20)}
_NAMES = {("cifar100", "coarse"): "coarse_label_names"}


class _SafeUnpickler(pickle.Unpickler):
    """Only what a CIFAR file holds: dicts, lists, bytes and numpy arrays. No code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
                ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core."):  # numpy >= 2 moved it; avoid the shim's warning
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def read_pickle(path: str) -> dict:
    """A CIFAR batch file as a dict with str keys; DataError naming the file if unreadable."""
    try:
        with open(path, "rb") as fh:
            obj = _SafeUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: CIFAR file not found") from None
    except Exception as e:  # noqa: BLE001 - any decoding problem is bad data
        raise DataError(f"{path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict in the CIFAR pickle, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 3, 32, 32) images, int64 labels) of one file, validated."""
    d = read_pickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: missing key {'data' if 'data' not in d else label_key!r} "
                        f"(has {sorted(d)})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be a uint8 array, got "
                        f"{getattr(data, 'dtype', type(data).__name__)}")
    if data.ndim == 2 and data.shape[1] == 3072:
        data = data.reshape(-1, 3, 32, 32)
    if data.ndim != 4 or data.shape[1:] != (3, 32, 32):
        raise DataError(f"{path}: 'data' must have shape (N, 3072) or (N, 3, 32, 32), got "
                        f"{data.shape}")
    try:
        labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {label_key!r} must be a list of integers") from None
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must be in [0, {num_classes}), got "
                        f"[{labels.min()}, {labels.max()}]")
    return np.ascontiguousarray(data), labels


def find_dir(root: str, name: str, download: bool = False) -> str:
    """The directory holding the batch files: root itself or root/<standard dir>."""
    lay = LAYOUTS[name]
    for d in (os.path.join(root, lay["dir"]), root):
        if os.path.isfile(os.path.join(d, lay["train"][0])):
            return d
    if download:
        _download(root, name)
        return os.path.join(root, lay["dir"])
    raise DataError(f"{root}: no {name.upper()} files (expected {lay['dir']}/{lay['train'][0]} "
                    f"there, or {lay['train'][0]} in it); set data.download=true to fetch them")


def _download(root: str, name: str) -> None:
    lay = LAYOUTS[name]
    try:
        from torchvision.datasets.utils import download_and_extract_archive
        download_and_extract_archive(lay["url"], download_root=root, md5=lay["md5"])
    except Exception as e:  # noqa: BLE001 - offline, bad checksum, disk full: all user-facing
        raise DataError(f"data.download: could not fetch {lay['url']} into {root}: "
                        f"{type(e).__name__}: {e}") from None


def load_cifar(root: str, name: str, labels: str = "fine", download: bool = False):
    """{'train': (images, labels), 'test': (...), 'classes': [...]} as numpy arrays."""
    lay = LAYOUTS[name]
    label_key, k = _LABELS[(name, labels)]
    d = find_dir(root, name, download)
    out = {}
    for split in ("train", "test"):
        parts = [read_batch(os.path.join(d, f), label_key, k) for f in lay[split]]
        out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        if out[split][0].shape[0] == 0:
            raise DataError(f"{d}: the {split} split of {name} is empty")
    out["classes"] = [str(i) for i in range(k)]
    meta = os.path.join(d, lay["meta"])
    if os.path.isfile(meta):  # optional: class names only
        try:
            names = read_pickle(meta).get(_NAMES.get((name, labels), lay["names_key"]))
            if names is not None and len(names) == k:
                out["classes"] = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        except DataError:
            pass
    return out


def holdout_split(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, holdout indices), disjoint, sorted; the same for a given seed."""
    if size >= n:
        raise ConfigError(f"data.holdout_size: {size} leaves no training images of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 45_000)))
    return perm[size:].sort().values, perm[:size].sort().values


class CifarTrain(Loader):
    """Exact epochs over a device-resident split; step k's images and crops depend only on
    (seed, epoch, k), so a rank's slice is the same whatever the world size."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, global_batch: int,
                 aug: bool, pad: int, flip: bool, seed: int, rank: int, world: int):
        self.num_samples = images.shape[0]
        self.images, self.labels = images, labels
        self.global_batch, self.local = global_batch, global_batch // world
        self.steps = train_steps_per_epoch(self.num_samples, global_batch)
        self.seed, self.rank, self.world = seed, rank, world
        self.aug = PadCropFlip(images, pad, flip) if aug else None
        self.pad, self.flip = pad, flip

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int, start: int = 0):
        dev = self.images.device
        perm = epoch_permutation(self.num_samples, self.seed, epoch).to(dev)
        lo = self.rank * self.local
        gen = torch.Generator(device=dev)  # reseeded for every step
        for step in range(start, self.steps):
            idx = train_batch_indices(perm, step, self.global_batch, self.rank, self.world)
            if self.aug is None:
                x = self.images[idx]
            else:  # draw for the whole global batch, keep this rank's part
                gen.manual_seed(mix_seed(self.seed, epoch, step, 3))
                oy, ox, fl = (p[lo:lo + self.local] for p in pad_crop_flip_params(
                    self.global_batch, self.pad, self.flip, gen, dev))
                x = self.aug(idx, oy, ox, fl)
            yield x, self.labels[idx]


def build_cifar(cfg, device, rank: int, world: int, run_dir=None,
                stored=None) -> DataBundle:
    d, t = cfg.data, cfg.data.train
    name = d.dataset
    if t.aug == "random_resized_crop":
        raise ConfigError("data.train.aug: random_resized_crop is for image folders; "
                          "use cifar (or paper) or none for CIFAR")
    data = load_cifar(d.root, name, d.cifar100_labels, d.download)
    k = len(data["classes"])
    if d.num_classes is not None and d.num_classes != k:
        raise ConfigError(f"data.num_classes: {d.num_classes} does not match {name} "
                          f"({d.cifar100_labels} labels): {k} classes")
    train_x, train_y = (torch.from_numpy(a) for a in data["train"])
    if d.val_split == "holdout":
        tr, ho = holdout_split(train_x.shape[0], d.holdout_size, d.holdout_seed)
        val_x, val_y = train_x[ho], train_y[ho]
        train_x, train_y = train_x[tr], train_y[tr]
    else:
        val_x, val_y = (torch.from_numpy(a) for a in data["test"])
    mean_c, std_c = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" \
        else (CIFAR100_MEAN, CIFAR100_STD)
    mean = d.mean or mean_c
    if d.normalize == "pixel_mean":  # the paper: the per-pixel mean of the training images
        mean = torch.from_numpy(train_x.numpy().mean(0, dtype=np.float64) / 255.0).float()
    std = (d.std or std_c) if d.divide_std else None
    if train_x.shape[0] < d.batch_size:
        raise ConfigError(f"data.batch_size: {d.batch_size} is larger than the {name} training "
                          f"split ({train_x.shape[0]} images)")
    aug = t.aug != "none"  # paper and cifar are the CIFAR paper's pad-crop-flip
    train = CifarTrain(train_x.to(device), train_y.to(device), d.batch_size, aug, t.pad, t.flip,
                       cfg.run.seed, rank, world)
    val = TensorSplit(val_x.to(device), val_y.to(device), d.batch_size // world, rank, world)
    reuse = torch.device(device).type == "cpu"  # the trainer is done with a batch per step
    train_prep = DevicePrep(mean, std, pca_alpha=t.pca_lighting, channels_last=False,
                            device=device, color_jitter=t.color_jitter, reuse_output=reuse,
                            rank=rank, world=world)
    val_prep = DevicePrep(mean, std, channels_last=False, device=device, reuse_output=reuse)
    info = {"classes": data["classes"], "train_samples": train.num_samples,
            "val_samples": val.num_samples}
    return DataBundle(train, val, k, train_prep, val_prep, info)
