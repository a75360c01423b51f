"""Datasets as epoch loaders of uint8 NCHW batches, plus the on-device preparation.

``build_data(cfg, device, rank, world)`` returns a ``DataBundle``. A loader yields
``(images_uint8_nchw, labels_int64)`` for ``batches(epoch, start)``; the trainer moves the
batch to the device (if it is not there already) and applies ``train_prep`` / ``val_prep``
(float conversion, normalisation, PCA lighting), batched. A new dataset is one module here
and one entry in ``BUILDERS``.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import torch

from ..config import Config
from ..errors import ConfigError, DataError


class Loader:
    """Base of every split loader; subclasses set ``num_samples`` and implement the rest."""

    num_samples: int = 0

    def __len__(self) -> int:  # batches per epoch on this rank
        raise NotImplementedError

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of one epoch beginning at batch ``start`` (mid-epoch resume)."""
        raise NotImplementedError

    def uncounted_batches(self, epoch: int, start: int = 0):
        """``batches`` left out of ``bad_report``: a second look at batches that were (or
        will be) counted once already (precise BN, block norms)."""
        return self.batches(epoch, start)

    def bad_report(self) -> tuple[int, list[str]]:
        """(count, first paths) of images skipped as unreadable since the last call."""
        return 0, []

    def close(self) -> None:
        """Release workers; the loader is not used afterwards."""


REPORT_PATHS = 10  # bad paths kept for a report
# The label of a batch entry that a scored split must not count: the readable image that
# took an unreadable one's place (batches keep their shape). ``engine.evaluate`` skips it.
NOT_COUNTED = -1


class BadImages:
    """The unreadable images a loader skipped in this epoch so far, as a checkpointed part:
    a mid-epoch resume, or a pending epoch end, still reports the whole epoch. The count is
    a device sum of this rank's images (all-reduced onto rank 0 before a save, as the
    meters); the paths are the first few this rank saw."""

    def __init__(self, loader: Loader, device: torch.device):
        self.loader = loader
        self.count = torch.zeros(1, dtype=torch.float64, device=device)
        self.paths: list[str] = []

    def collect(self) -> None:
        """Take in what the loader counted since the last call."""
        n, paths = self.loader.bad_report()
        if n:
            self.count += n
            self.paths = list(dict.fromkeys(self.paths + paths))[:REPORT_PATHS]

    def reset(self) -> None:
        self.count.zero_()
        self.paths = []

    def local_sums(self) -> list[torch.Tensor]:
        return [self.count]

    def state_dict(self) -> dict:
        return {"count": self.count.item(), "paths": list(self.paths)}

    def load_state_dict(self, state: dict) -> None:
        self.count.fill_(float(state["count"]))
        self.paths = [str(p) for p in state["paths"]][:REPORT_PATHS]


@dataclass
class DataBundle:
    train: Loader
    val: Loader
    num_classes: int
    train_prep: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
    val_prep: Callable[[torch.Tensor], torch.Tensor]
    info: dict = field(default_factory=dict)
    final: Loader | None = None  # the validation split under data.val.final_protocol
    # protocol -> a loader of the validation split under it (folder datasets: resnet-eval
    # scores several protocols without scanning the splits again)
    val_for: Callable[[str], Loader] | None = None

    def close(self) -> None:
        for loader in (self.train, self.val, self.final):
            if loader is not None:
                loader.close()


def final_val_config(cfg: Config):
    """``cfg.data.val`` with the final evaluation's protocol, or None when there is no
    final evaluation beyond the per-epoch one."""
    v = cfg.data.val
    if v.final_protocol in ("same", v.protocol):
        return None
    return dataclasses.replace(v, protocol=v.final_protocol)


# Views other than the centre crop are cut from full-size images, which only the folder
# datasets have; the others hold their images at one size.
VIEW_DATASETS = ("imagenet", "folder")


def check_view_protocol(dataset: str, protocol: str, key: str) -> None:
    """ConfigError naming ``key`` if ``dataset`` cannot cut ``protocol``'s views."""
    if protocol not in ("center", "same") and dataset not in VIEW_DATASETS:
        raise ConfigError(f"{key}: {protocol} views are cut from full-size images "
                          f"({', '.join(VIEW_DATASETS)}); {dataset} is evaluated on its own "
                          f"images: use center")


# dataset name -> "module:function"; each builder takes (cfg, device, rank, world, run_dir,
# stored) where stored is stored_stats(): the checkpoint's (mean, std) or None.
BUILDERS = {
    "synthetic": "synthetic:build_synthetic",
    "synthetic_imagenet": "synthetic:build_synthetic_imagenet",
    "cifar10": "cifar:build_cifar",
    "cifar100": "cifar:build_cifar",
    "imagenet": "folder:build_folder",
    "folder": "folder:build_folder",
}


class Normalization:
    """The mean and std a run normalises with, as a TrainState part. Every checkpoint holds
    them, so a resumed run and ``resnet-eval`` use the training run's exact values without
    computing them again (a folder's per-pixel mean image is a scan of the training set)."""

    def __init__(self, bundle: DataBundle, normalize: str):
        self.preps, self.normalize = (bundle.train_prep, bundle.val_prep), normalize

    def state_dict(self) -> dict:
        return {"normalize": self.normalize, **self.preps[1].stats()}

    def load_state_dict(self, state: dict) -> None:
        if state["normalize"] == self.normalize:  # else: an allowed change, the new values
            for prep in self.preps:
                prep.set_stats(state["mean"], state["std"])


def class_mismatch(where: str, found: list[str], classes: list[str]) -> str:
    """The one line for a split whose class folders are not the checkpoint's classes."""
    gone, new = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
    what = [f"missing {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}" if gone else "",
            f"new {', '.join(new[:3])}{' ...' if len(new) > 3 else ''}" if new else ""]
    return (f"{where}: its classes are not the checkpoint's {len(classes)} "
            f"({'; '.join(w for w in what if w) or 'same names, another order'}): the labels "
            f"would mean other classes")


def stored_stats(cfg: Config, norm: dict | None):
    """(mean, std) of a checkpoint's normalization entry if it is for this config's
    ``data.normalize``, else None (compute them)."""
    if not norm or norm.get("normalize") != cfg.data.normalize:
        return None
    return norm["mean"], norm["std"]


def build_data(cfg: Config, device: torch.device, rank: int = 0, world: int = 1,
               run_dir: str | None = None, norm: dict | None = None,
               classes: list[str] | None = None, eval_only: bool = False) -> DataBundle:
    """The train and validation loaders and on-device preparation for ``cfg.data``.
    ``norm``: a checkpoint's ``normalization`` entry, used instead of computing the mean
    (and std) again. ``eval_only`` (resnet-eval): ``train`` may be None, and an image folder
    takes its labels from ``classes`` (a checkpoint's) without walking train/; any other
    dataset whose classes differ from ``classes`` is refused."""
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size: global batch {cfg.data.batch_size} is not divisible "
                          f"by the world size {world}")
    if cfg.data.batch_size % (world * cfg.train.accum_steps):
        raise ConfigError(f"train.accum_steps: per-rank batch {cfg.data.batch_size // world} is "
                          f"not divisible by accum_steps={cfg.train.accum_steps}")
    module, fn = BUILDERS[cfg.data.dataset].split(":")
    builder = getattr(importlib.import_module(f"{__name__}.{module}"), fn)
    stored = stored_stats(cfg, norm)
    final = final_val_config(cfg)
    check_view_protocol(cfg.data.dataset, cfg.data.val.protocol, "data.val.protocol")
    if final is not None:
        check_view_protocol(cfg.data.dataset, final.protocol, "data.val.final_protocol")
    # only an image folder can label by names or skip its training split
    extra = {"classes": classes, "eval_only": eval_only} if module == "folder" else {}
    bundle = builder(cfg, device, rank, world, run_dir, stored, **extra)
    found = bundle.info.get("classes")
    if classes is not None and found is not None and list(found) != list(classes):
        bundle.close()
        raise DataError(class_mismatch(cfg.data.root or f"data.dataset {cfg.data.dataset}",
                                       found, classes))
    if stored is not None:  # (only the folder builder needs them up front, to skip its scan)
        for prep in (bundle.train_prep, bundle.val_prep):
            prep.set_stats(*stored)
    return bundle
