"""The step and the evaluation pass. No policy here: the trainer decides what to do when.

``TrainStep(x, y)`` runs forward/backward over the micro-batches and one optimizer step and
returns a device tensor of statistics. It never waits for the device: a non-finite loss or
gradient skips the update *on the device* (the fused SGD kernel reads a ``found_inf`` flag,
as GradScaler does for fp16) and puts back the BatchNorm statistics the bad forward pass
wrote. The trainer reads the statistics (``Meter``) only at logging points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as dist_utils
from .data import NOT_COUNTED
from .data.views import eval_views
from .runtime import Runtime

SCALER_CALIBRATION = 16  # log2 of GradScaler's initial scale: room for its first overflows

# The statistics of one step, and of a Meter: sums over the batches the optimizer took.
STATS = ("loss_sum", "correct1", "correct5", "n", "skipped")


class Meter:
    """Running sums of step statistics on the device; read (one sync) only when shown."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(STATS), dtype=torch.float64, device=device)

    def add(self, stats: torch.Tensor) -> None:
        self.sums += stats

    def reset(self) -> None:
        self.sums.zero_()

    def read(self, info: dist_utils.DistInfo, extra: tuple = ()) -> dict:
        """Means over every rank (a collective under DDP); ``extra`` device scalars and host
        floats come back summed over ranks in ``"extra"``. One host read."""
        dev = self.sums.device
        parts = [e.reshape(1).double() if torch.is_tensor(e)
                 else torch.full((1,), float(e), dtype=torch.float64, device=dev) for e in extra]
        loss, c1, c5, n, skipped, *rest = dist_utils.all_reduce_sum(
            torch.cat([self.sums, *parts]), dev, info)
        per = max(n, 1.0)
        return {"loss": loss / per, "top1": c1 / per, "top5": c5 / per, "n": int(n),
                "skipped": int(skipped), "extra": rest}

    def local_sums(self) -> list[torch.Tensor]:
        return [self.sums]

    def state_dict(self) -> dict:
        return {"sums": self.sums.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(torch.tensor(state["sums"], dtype=torch.float64))


@dataclass
class Timer:
    """Host-side time and counts of the current epoch (kept across a mid-epoch resume), and
    where the current log window began, relative to them (a window may span an epoch end)."""

    wall: float = 0.0        # seconds in training steps, data waits included
    data_wait: float = 0.0   # seconds blocked on the loader
    steps: int = 0
    images: int = 0          # global images (all ranks)
    window_wall: float = 0.0  # wall and images at the previous log point
    window_images: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        # (a checkpoint from before the window fields: its window runs from the epoch start)
        for f in dataclasses.fields(self):
            setattr(self, f.name, type(getattr(self, f.name))(state.get(f.name, f.default)))

    def count(self, images: int, data_wait: float) -> None:
        """One training step: its global images and its wait for the loader."""
        self.steps += 1
        self.images += images
        self.data_wait += data_wait

    def window_rate(self, wall: float) -> float | None:
        """Images/s since the previous call, ``wall`` being this epoch's wall so far; starts
        the next window. None if no time passed."""
        images, secs = self.images - self.window_images, wall - self.window_wall
        self.window_images, self.window_wall = self.images, wall
        return images / secs if secs > 0 else None

    def reset(self) -> None:
        """A new epoch: its counts start at 0, the open window goes on."""
        self.window_wall -= self.wall
        self.window_images -= self.images
        self.wall = self.data_wait = 0.0
        self.steps = self.images = 0


class _BufferGuard:
    """Puts back buffers (BatchNorm running statistics) that a skipped step wrote.

    A non-finite forward pass writes NaN into the running statistics, which no later step
    repairs. Per dtype, one preallocated flat snapshot per step and a masked copy back: a
    handful of kernels whatever the number of layers, and no host read.
    """

    def __init__(self, buffers: list[torch.Tensor]):
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in buffers:
            groups.setdefault(b.dtype, []).append(b)
        self.groups = []
        for bufs in groups.values():
            flat = [b.view(-1) for b in bufs]
            snap = torch.empty(sum(f.numel() for f in flat), dtype=bufs[0].dtype,
                               device=bufs[0].device)
            scratch = torch.empty_like(snap)
            parts = scratch.split([f.numel() for f in flat])
            views = [v.view_as(b) for v, b in zip(parts, bufs, strict=True)]
            self.groups.append((bufs, flat, snap, scratch, views))

    def save(self) -> None:
        for _, flat, snap, _, _ in self.groups:
            torch.cat(flat, out=snap)

    def keep_if(self, good: torch.Tensor) -> None:
        """Keep the new values where ``good`` (a device bool), else restore the snapshot."""
        for bufs, flat, snap, scratch, views in self.groups:
            torch.cat(flat, out=scratch)
            torch.where(good, scratch, snap, out=scratch)
            torch._foreach_copy_(bufs, views)


def stage_groups(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Parameters by stage: "stem" (conv1, bn1), layer1..layer4, "fc", by top-level name."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        groups.setdefault("stem" if top in ("conv1", "bn1") else top, []).append(p)
    return groups


def grad_norms(groups: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The L2 norm of each group's gradients (device scalars; no host read)."""
    out = {}
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            out[name] = torch.linalg.vector_norm(torch.stack(
                [g.float() for g in torch._foreach_norm(grads)]))
    return out


class TrainStep:
    """One optimizer step over ``accum_steps`` micro-batches; returns ``STATS`` on the device.

    The update is skipped on the device when the loss or gradients are not finite: with a
    GradScaler (fp16) the scaler decides from all gradients; otherwise the (all-reduced, so
    alike on every rank) gradient of a head parameter, which a NaN loss anywhere poisons.
    ``bad_run`` counts consecutive skips and ``peak_bad_run`` its maximum since the last
    ``take_peak()``, both on the device.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, runtime: Runtime, accum_steps: int,
                 label_smoothing: float, probe: torch.Tensor, buffers: list[torch.Tensor],
                 distributed: bool, counts_skips: bool = True):
        self.model, self.optimizer, self.scaler, self.runtime = model, optimizer, scaler, runtime
        self.accum_steps, self.label_smoothing = accum_steps, label_smoothing
        self.probe, self.distributed = probe, distributed
        # Every rank skips alike (all-reduced gradients): one rank counts, so the sums over
        # ranks hold each skip once, whatever the world size a resume continues at.
        self.skip_weight = 1.0 if counts_skips else 0.0
        self.guard = _BufferGuard(buffers)
        device = runtime.device
        self.bad_run = torch.zeros((), dtype=torch.float64, device=device)
        self.peak_bad_run = torch.zeros((), dtype=torch.float64, device=device)
        self._batch_n: dict[int, torch.Tensor] = {}  # batch size -> device scalar, made once
        # Diagnostics: the trainer sets grad_groups (stage -> parameters) and, for the steps it
        # logs, want_grad_norms; the norms are then kept as device scalars before zero_grad.
        self.grad_groups: dict[str, list[torch.Tensor]] = {}
        self.want_grad_norms = False
        self.grad_norms: dict[str, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.guard.save()
        loss_sum, shown_sum, correct1, correct5 = self._forward_backward(x, y)
        good = self._guarded_update(loss_sum)
        if self.want_grad_norms:
            self.grad_norms = grad_norms(self.grad_groups)
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.keep_if(good)
        bad = (~good).double()
        self.bad_run.add_(1).mul_(bad)
        torch.maximum(self.peak_bad_run, self.bad_run, out=self.peak_bad_run)
        stats = torch.stack([shown_sum.double(), correct1, correct5, self._n(x.shape[0])])
        # where, not a product: a skipped step's NaN loss times 0 would still be NaN
        return torch.cat([torch.where(good, stats, 0.0), (bad * self.skip_weight).view(1)])

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor):
        """Sums over the batch: the objective (for the skip), the shown loss, the hits."""
        micro = x.shape[0] // self.accum_steps
        loss_sum = shown_sum = correct1 = correct5 = None
        for i, (xs, ys) in enumerate(zip(x.split(micro), y.split(micro), strict=True)):
            last = i == self.accum_steps - 1
            # DDP all-reduces the gradients on the last micro-step only.
            sync = self.model.no_sync() if not last and hasattr(self.model, "no_sync") \
                else contextlib.nullcontext()
            with sync:
                with self.runtime.autocast():
                    logits = self.model(xs)
                    loss = F.cross_entropy(logits.float(), ys,
                                           label_smoothing=self.label_smoothing)
                scaled = loss / self.accum_steps
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            c1, c5 = _hits(logits.detach(), ys)
            part = loss.detach() * ys.shape[0]
            # The logged train loss is the plain cross-entropy, as the validation loss: with
            # smoothing the objective's floor is far above 0 (0.50 nats at 10 classes, 0.1).
            shown = part if not self.label_smoothing else F.cross_entropy(
                logits.detach().float(), ys, reduction="sum")
            loss_sum = part if loss_sum is None else loss_sum + part
            shown_sum = shown if shown_sum is None else shown_sum + shown
            correct1 = c1 if correct1 is None else correct1 + c1
            correct5 = c5 if correct5 is None else correct5 + c5
        return loss_sum, shown_sum, correct1, correct5

    def _guarded_update(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Step the optimizer unless something is non-finite; the device bool 'stepped'."""
        opt = self.optimizer
        if self.scaler is not None:
            # The scaler finds inf/nan in the (all-reduced) unscaled gradients and hands the
            # fused kernel its found_inf flag; we read that same flag before update().
            self.scaler.step(opt)
            found = sum(self.scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
                        .values())
            self.scaler.update()
            return found == 0
        check = self.probe.grad.sum() if self.probe.grad is not None else loss_sum
        if not self.distributed:  # one process: the local loss is the whole story too
            check = check + loss_sum
        good = torch.isfinite(check)
        opt.grad_scale, opt.found_inf = None, (~good).float()
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        return good

    def _n(self, batch: int) -> torch.Tensor:
        if batch not in self._batch_n:
            self._batch_n[batch] = torch.full((), float(batch), dtype=torch.float64,
                                              device=self.runtime.device)
        return self._batch_n[batch]

    def reset_peak(self) -> None:
        """Start a new window for ``peak_bad_run`` (after the caller read it)."""
        self.peak_bad_run.copy_(self.bad_run)

    def state_dict(self) -> dict:
        return {"bad_run": float(self.bad_run)}

    def load_state_dict(self, state: dict) -> None:
        self.bad_run.fill_(float(state["bad_run"]))
        self.peak_bad_run.fill_(float(state["bad_run"]))


def _top5(logits: torch.Tensor) -> torch.Tensor:
    """The indices of the 5 best classes (fewer if there are fewer), best first."""
    return logits.topk(min(5, logits.shape[1]), dim=1).indices


def _hits(logits: torch.Tensor, y: torch.Tensor,
          top5: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 correct counts (float64 device scalars); ``top5``: ``_top5(logits)``
    if the caller has it already."""
    top5 = _top5(logits) if top5 is None else top5
    hit = top5 == y.unsqueeze(1)
    return hit[:, 0].sum().double(), hit.any(1).sum().double()


def view_scorer(protocol: str, crop: int, scales=(), flip: bool = False):
    """The ``views`` argument of :func:`evaluate` for ``data.val.protocol``; None for centre.

    ``ten_crop``: the loader's (N, 10, C, crop, crop) batch runs as one (10N, ...) forward
    pass. ``multiscale``: each view (one image per batch, every short side in ``scales``,
    mirrored too with ``flip``) runs fully convolutionally. Either way the score of an image
    is the log of its views' mean softmax (the papers average the class scores), computed
    as logsumexp(log_softmax) - log(views): a class every view rules out gets a finite log
    probability, where the log of the summed probabilities would underflow to -inf.
    """
    if protocol == "center":
        return None

    def score(model: nn.Module, x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
        if protocol == "ten_crop" and x.dim() == 5:
            n, v = x.shape[:2]
            logp = F.log_softmax(model(runtime.layout(x.flatten(0, 1))).float(), dim=1)
            return torch.logsumexp(logp.view(n, v, -1), dim=1) - math.log(v)
        views = eval_views(x, protocol, crop, scales, flip)
        logp = [F.log_softmax(model(runtime.layout(view)).float(), dim=1) for view in views]
        return torch.logsumexp(torch.stack(logp), dim=0) - math.log(len(views))

    return score


def scorer_for(val_cfg):
    """The view scorer of a ``data.val`` config section."""
    return view_scorer(val_cfg.protocol, val_cfg.crop, val_cfg.scales, val_cfg.flip)


@torch.no_grad()
def precise_bn(model: nn.Module, inputs, runtime: Runtime, info: dist_utils.DistInfo) -> int:
    """Replace every BatchNorm's running statistics by their plain average over the batches
    of ``inputs`` (prepared device tensors; "precise BN", as pycls and Wu & Johnson 2021,
    "Rethinking BatchNorm"), averaged over ranks. Train-mode forwards without gradients: the
    weights and the optimizer are untouched. Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and not getattr(m, "frozen", False)]  # model.freeze
    if not bns:
        return 0
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # a cumulative average: batch k counts 1/k
    was_training, n = model.training, 0
    model.train()
    try:
        for x in inputs:
            with runtime.autocast():
                model(runtime.layout(x))
            n += 1
    finally:
        for b, m in zip(bns, momenta, strict=True):
            b.momentum = m
        model.train(was_training)
    if info.enabled:  # the mean over ranks
        stats = [t for b in bns for t in (b.running_mean, b.running_var)]
        dist_utils.all_reduce_tensors(stats, info)
        torch._foreach_div_(stats, info.world)
    return n


@torch.inference_mode()
def evaluate(model: nn.Module, loader, prep, runtime: Runtime, info: dist_utils.DistInfo,
             views=None, stop=None, confusion: int = 0) -> dict | None:
    """Loss, top-1, top-5 and N over the whole split; every image counted exactly once.

    ``views`` (optional) maps a prepared batch to per-image log mean softmax over its views
    (10-crop, multi-scale). ``stop(i)``, asked before batch i, ends the pass early (None is
    returned): it must answer alike on every rank. ``confusion`` = C > 0 also counts (true
    class, top-1 prediction) pairs on the device: the result's "confusion" is a (C, C) int64
    CPU tensor, rows the true class, summed over ranks (its trace is the top-1 count).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=runtime.device)
    # Made before the first batch: a rank whose shard is empty still joins the all-reduce.
    pairs = torch.zeros(confusion * confusion, dtype=torch.int64, device=runtime.device) \
        if confusion else None
    batches = loader.batches(0, 0)
    for i, (x, y) in enumerate(batches):
        if stop is not None and stop(i):
            if hasattr(batches, "close"):  # release a loader iterator left midway
                batches.close()
            return None
        x = prep(x.to(runtime.device, non_blocking=True))
        y = y.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            if views is None:
                logp = F.log_softmax(model(runtime.layout(x)).float(), dim=1)
            else:
                logp = views(model, x, runtime)
        top5 = _top5(logp)
        counted = y != NOT_COUNTED  # (a replacement for an unreadable image)
        c1, c5 = _hits(logp, y, top5)  # a NOT_COUNTED label never equals a class
        if pairs is not None:  # index_put_, not bincount: bincount reads its size on the host
            pairs.index_put_((torch.where(counted, y * confusion + top5[:, 0], 0),),
                             counted.long(), accumulate=True)
        loss = F.nll_loss(logp, y, reduction="sum", ignore_index=NOT_COUNTED).double()
        sums += torch.stack([loss, c1, c5, counted.sum().double()])
    loss, c1, c5, n = dist_utils.all_reduce_sum(sums, runtime.device, info)
    per = max(n, 1.0)
    out = {"loss": loss / per, "top1": c1 / per, "top5": c5 / per, "n": int(n)}
    if pairs is not None:
        dist_utils.all_reduce_tensors([pairs], info)  # float64 sums: exact below 2**53
        out["confusion"] = pairs.view(confusion, confusion).cpu()
    return out
