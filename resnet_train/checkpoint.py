"""Checkpoints are data: one file, written atomically, loaded with weights_only=True.

A checkpoint is one ``TrainState``'s ``state_dict()``: everything needed to continue at the
exact next batch (see docs/architecture.md, "The checkpoint"). Each part (model, optimizer,
schedule, grad scaler, step guard, meters, timer) owns its piece through
``state_dict()``/``load_state_dict()``; TrainState adds the position, the best metric, the
RNG states, the resolved config and versions.
"""

from __future__ import annotations

import glob
import os
import random
import re
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn as nn

from .errors import CheckpointError, CheckpointWriteError, describe_os_error
from .rundir import current_umask

FORMAT = 2  # 2: TrainState layout (parts by name, global position)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``module.``) and torch.compile (``_orig_mod.``)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict:
    """The global RNG states of the saving process (rank 0). Every rank seeds alike and draws
    alike (same shapes), so they hold for every rank; on CUDA rank r draws on its own device,
    whose state is rank 0's current device's ("cuda_current"), not rank 0's copy of device
    r's (which rank 0 never drew from)."""
    cuda = torch.cuda.is_initialized()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else [],
        "cuda_current": torch.cuda.get_rng_state() if cuda else None,
    }
    if "numpy" in sys.modules:
        kind, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
        if state.get("cuda_current") is not None:  # (older checkpoints: device i's own)
            torch.cuda.set_rng_state(state["cuda_current"], torch.cuda.current_device())
    if state.get("numpy") and "numpy" in sys.modules:
        np = sys.modules["numpy"]
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _os_failure(e: BaseException) -> OSError | RuntimeError | None:
    """The OS-level failure behind a failed write, or None for anything else (a bug).

    torch.save into a Python file reports a failed ``write`` as a RuntimeError ("unexpected
    pos ...") raised while handling the OSError; its own C++ writer as "PytorchStreamWriter
    failed writing file ...: file write failed".
    """
    if isinstance(e, OSError):
        return e
    if isinstance(e, RuntimeError):
        inner, seen = e, set()
        while inner is not None and id(inner) not in seen:
            if isinstance(inner, OSError):
                return inner
            seen.add(id(inner))
            inner = inner.__cause__ or inner.__context__
        if "PytorchStreamWriter failed writing" in str(e) or "file write failed" in str(e):
            return e
    return None


def atomic_save(obj: Any, path: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    A process killed at any instant leaves either the old file or the new one, whole. The
    file gets the mode ``open`` would give it (0o666 less the umask), not mkstemp's 0o600.
    An OS failure (disk full, quota, permission denied) raises CheckpointWriteError (exit 4)
    naming ``path``; the temp file is removed and the old file at ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
        with os.fdopen(fd, "wb") as fh:
            try:
                os.fchmod(fd, 0o666 & ~current_umask())
            except OSError:
                pass  # a filesystem without modes (FAT, some CIFS mounts) keeps its own
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        cause = _os_failure(e)
        if cause is None:
            raise
        reason = (describe_os_error(cause) if isinstance(cause, OSError)
                  else str(cause).strip().splitlines()[0][:160])
        err = CheckpointWriteError(f"cannot write checkpoint {path}: {reason}; "
                                   f"the earlier checkpoints are intact")
        err.errno = getattr(cause, "errno", None)
        raise err from e
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load(path: str) -> dict:
    """Load a checkpoint as data; CheckpointError (exit 2) naming the file if unusable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, or pickled code
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a resnet-train checkpoint (no 'model' entry)")
    return ckpt


def check_fits(model: nn.Module, state: dict, path: str) -> None:
    """CheckpointError listing a few mismatched keys/shapes if ``state`` doesn't fit ``model``."""
    own = unwrap(model).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("shape mismatch", shapes), ("missing", missing),
                         ("unexpected", unexpected)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    raise CheckpointError(f"{path}: checkpoint does not fit the configured model; "
                          + "; ".join(parts))


def epoch_file(directory: str, epoch: int) -> str:
    return os.path.join(directory, f"epoch_{epoch:03d}.pt")


def epoch_end_names(ckpt: dict, every_epochs: int) -> list[str]:
    """The files the epoch-end save that wrote ``ckpt`` wrote with it ([] if ``ckpt`` is not
    an epoch-end save): last.pt, best.pt if that epoch improved, its epoch_NNN.pt if due."""
    rec = ckpt.get("metrics")
    if not rec or rec.get("global_step") != ckpt["global_step"] or \
            ckpt.get("epoch_end_pending"):
        return []
    epoch = int(rec["epoch"])  # 0-based; the file is named by epochs done
    names = ["last.pt"] + (["best.pt"] if ckpt.get("best_epoch") == epoch else [])
    if every_epochs and (epoch + 1) % every_epochs == 0:
        names.append(os.path.basename(epoch_file("", epoch + 1)))
    return names


def prune_epochs(directory: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` epoch_NNN.pt files (0 keeps all)."""
    if keep_last <= 0:
        return
    files = sorted(glob.glob(os.path.join(directory, "epoch_*.pt")), key=_epoch_number)
    for old in files[:-keep_last]:
        os.unlink(old)


def remove_stale_temps(directory: str) -> None:
    """Delete temp files left by a process killed while saving (rank 0, before training)."""
    for path in glob.glob(os.path.join(directory, ".tmp-*.pt")):
        try:
            os.unlink(path)
        except OSError:
            pass


def _epoch_number(path: str) -> int:
    m = re.search(r"epoch_(\d+)\.pt$", path)
    return int(m.group(1)) if m else -1


def position(ckpt: dict) -> tuple[int, int]:
    return int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0))


def split_change(old: dict, new: dict) -> str:
    """How a split differs from the one a checkpoint stored (data.folder.split_digest)."""
    if old["images"] != new["images"]:
        return f"{old['images']} images then, {new['images']} now"
    return f"the same number of images, {new['images']}, but other files or labels"


KEPT_BEST = "best_before_step_"  # a best.pt set aside when validation changed


def kept_best(step: int) -> str:
    return f"{KEPT_BEST}{step}.pt"


def find_resumable(directory: str, warn=print,
                   positions: dict | None = None) -> tuple[str, dict] | None:
    """The newest loadable checkpoint in ``directory`` (by training progress).

    An unreadable candidate is reported through ``warn`` and skipped, so a file corrupted by
    a crash falls back to the previous one. ``positions``, if given, receives each loaded
    file's name and (global_step, epoch).
    """
    paths = [p for p in glob.glob(os.path.join(directory, "*.pt"))
             if not os.path.basename(p).startswith((".tmp-", KEPT_BEST))]
    # last.pt, best.pt (and any other name), newest first by mtime; then the epoch files,
    # highest first, only down to the first loadable one: an older one is never further
    # on, and a run with keep_last 0 must not read 90 ResNet-50 checkpoints to resume.
    others = sorted((p for p in paths if _epoch_number(p) < 0), key=os.path.getmtime,
                    reverse=True)
    epochs = sorted((p for p in paths if _epoch_number(p) >= 0), key=_epoch_number,
                    reverse=True)
    best: tuple[str, dict] | None = None
    for path in others + epochs:
        try:
            ckpt = load(path)
        except CheckpointError as e:
            warn(f"warning: skipping {e}")
            continue
        if positions is not None:
            positions[os.path.basename(path)] = position(ckpt)
        if best is None or position(ckpt) > position(best[1]):
            best = (path, ckpt)
        if _epoch_number(path) >= 0:
            break
    return best


# --------------------------------------------------------------------------- the training state


class TrainState:
    """Everything a checkpoint holds, saved and restored with one call each.

    ``parts`` maps a name to an object with ``state_dict()``/``load_state_dict()`` (None for
    an absent part, e.g. no grad scaler). The position is ``step``, the number of optimizer
    iterations done; ``epoch_end_pending`` marks a save made after an epoch's last step but
    before its validation finished (a signal arrived during it): the resumed run validates
    first. Parts with rank-local device sums (meters, the warm-up window, the bad-image
    count) expose ``local_sums()``; before a save they are all-reduced onto rank 0, which
    alone writes.
    """

    def __init__(self, parts: dict[str, Any], config: dict, steps_per_epoch: int,
                 total_steps: int, info):
        self.parts, self.config, self.info = parts, config, info
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.step = 0
        self.best_top1, self.best_epoch = -1.0, -1
        self.epoch_end_pending = False
        self.metrics: dict | None = None  # the last epoch's record
        self.final_eval: dict | None = None  # the final evaluation's record (its protocol)
        self.classes: list[str] | None = None  # the dataset's class names, by label
        # what the folder splits are (data.folder.split_digest): a resume on other files
        # would silently change the epochs, their order and the schedule's position
        self.splits: dict | None = None

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def last_epoch(self) -> int:
        """The epoch of the last step done (at an epoch end: the epoch that just ended)."""
        return (self.step - 1) // self.steps_per_epoch

    def _local_sums(self) -> list[torch.Tensor]:
        return [t for p in self.parts.values() if hasattr(p, "local_sums")
                for t in p.local_sums()]

    def gather_sums(self) -> None:
        """Move every rank's local sums onto rank 0 (totals unchanged; a collective)."""
        tensors = self._local_sums()
        if not self.info.enabled or not tensors:
            return
        from .distributed import all_reduce_tensors
        all_reduce_tensors(tensors, self.info)
        if not self.info.is_main:
            torch._foreach_zero_(tensors)

    def state_dict(self) -> dict:
        """The checkpoint (call ``gather_sums()`` on every rank first under DDP)."""
        from . import __version__
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        state = {
            "format": FORMAT, "global_step": self.step, "epoch": epoch,
            "step_in_epoch": step_in_epoch, "epoch_end_pending": self.epoch_end_pending,
            "total_steps": self.total_steps,
            "complete": self.step >= self.total_steps and not self.epoch_end_pending,
            "best_top1": self.best_top1, "best_epoch": self.best_epoch,
            "world_size": self.info.world, "metrics": self.metrics,
            "final_eval": self.final_eval, "classes": self.classes, "splits": self.splits,
            "rng": rng_state(), "config": self.config,
            "versions": {"resnet_train": __version__, "torch": str(torch.__version__)},
            "saved_at": time.time(),
        }
        for name, part in self.parts.items():
            state[name] = None if part is None else part.state_dict()
        return state

    def load_state_dict(self, state: dict, path: str) -> None:
        """Restore every part; CheckpointError (exit 2) naming ``path`` if one doesn't fit."""
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {state.get('format')} is not "
                                  f"this version's ({FORMAT}); resume it with the resnet-train "
                                  f"that wrote it, or start a new run from its weights")
        saved = state.get("classes")
        if saved is not None and self.classes is not None and list(saved) != list(self.classes):
            from .data import class_mismatch  # a folder changed under the run: labels moved
            raise CheckpointError(f"{path}: " + class_mismatch("this run's data", self.classes,
                                                               saved))
        self._check_training_split(state.get("splits"), path)
        check_fits(self.parts["model"], state["model"], path)
        for name, part in self.parts.items():
            if part is None or state.get(name) is None:
                continue
            try:
                part.load_state_dict(state[name])
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                raise CheckpointError(f"{path}: its {name} state does not fit this run "
                                      f"({reason})") from None
        if not self.info.is_main:  # rank 0 holds the saved sums; the totals stay the same
            for t in self._local_sums():
                t.zero_()
        self.step = int(state["global_step"])
        self.best_top1, self.best_epoch = float(state["best_top1"]), int(state["best_epoch"])
        self.epoch_end_pending = bool(state["epoch_end_pending"])
        self.metrics = state.get("metrics")
        self.final_eval = state.get("final_eval")
        self.classes = state.get("classes") or self.classes  # older checkpoints: the data's
        set_rng_state(state["rng"])

    def _check_training_split(self, saved: dict | None, path: str) -> None:
        """CheckpointError unless the training split is the one the checkpoint trained on:
        its position (epoch, step) indexes that split's order. A moved dataset is the same
        one; files added, removed or renamed are not. (Older checkpoints: not checked.)"""
        old, new = (saved or {}).get("train"), (self.splits or {}).get("train")
        if old is None or new is None or old == new:
            return
        what = split_change(old, new)
        raise CheckpointError(
            f"{path}: the training split (data.root, data.train_dir, data.val_fraction) is not "
            f"the one this run trained on ({what}): its epochs, order and schedule would "
            f"silently shift. Restore those files, or start a new run.dir from these weights "
            f"(model.weights={path})")


class OptimizerPart:
    """The optimizer as a TrainState part: loading keeps this config's hyper-parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        from .optim import load_optimizer_state
        load_optimizer_state(self.optimizer, state)
