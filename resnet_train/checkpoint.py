"""Checkpoints are data: one file, written atomically, loaded with weights_only=True.

A checkpoint holds everything needed to continue at the exact next batch: model (unwrapped),
optimizer, schedule, grad scaler, epoch, step within the epoch, global step, best metric,
the partial epoch's metric sums, RNG states, the resolved config and versions.
"""

from __future__ import annotations

import glob
import os
import random
import re
import sys
import tempfile
from typing import Any

import torch
import torch.nn as nn

from .errors import CheckpointError

FORMAT = 1


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
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
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
    if state.get("numpy") and "numpy" in sys.modules:
        np = sys.modules["numpy"]
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def atomic_save(obj: Any, path: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    A process killed at any instant leaves either the old file or the new one, whole.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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


def _position(ckpt: dict) -> tuple[int, int]:
    return int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0))


def find_resumable(directory: str, warn=print) -> tuple[str, dict] | None:
    """The newest loadable checkpoint in ``directory`` (by training progress).

    An unreadable candidate is reported through ``warn`` and skipped, so a file corrupted by
    a crash falls back to the previous one.
    """
    candidates = [p for p in glob.glob(os.path.join(directory, "*.pt"))
                  if not os.path.basename(p).startswith(".tmp-")]
    # Newest first by mtime; among loadable ones the most advanced wins.
    candidates.sort(key=os.path.getmtime, reverse=True)
    best: tuple[str, dict] | None = None
    for path in candidates:
        try:
            ckpt = load(path)
        except CheckpointError as e:
            warn(f"warning: skipping {e}")
            continue
        if best is None or _position(ckpt) > _position(best[1]):
            best = (path, ckpt)
    return best
