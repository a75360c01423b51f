"""The loops: one training epoch (or a slice of one) and one evaluation. No policy here.

The trainer decides when to save, when to stop and what to log; the loop runs steps from
``start`` up to ``until`` and returns early only if ``stop`` says so.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as dist_utils
from .data.transforms import eval_views


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite losses: the run stops, last good checkpoint kept."""


SCALER_CALIBRATION = 16  # log2 of GradScaler's initial scale


@dataclass
class Stepper:
    """What one optimizer step needs; built once by the trainer."""

    model: nn.Module                    # possibly DDP / compiled
    optimizer: torch.optim.Optimizer
    schedule: object                    # optim.LRSchedule
    scaler: torch.amp.GradScaler | None
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    accum_steps: int
    label_smoothing: float
    max_bad_steps: int
    dist: dist_utils.DistInfo
    probe: torch.Tensor | None = None   # a head parameter: its all-reduced grad decides for all ranks
    watch_train_error: bool = False     # the ResNet-110 warm-up needs the running train error
    bad_steps: int = 0                  # consecutive non-finite steps (checkpointed)
    global_step: int = 0                # optimizer steps taken since the start of training
    error_mark: torch.Tensor | None = None  # meter sums at the last train-error check
    # BatchNorm running statistics: a non-finite forward pass writes NaN/inf into them, so a
    # skipped step puts back their values from before it.
    buffers: list = field(default_factory=list)
    _snapshot: list = field(default_factory=list)
    scale: float | None = None          # the grad scaler's scale after the last step

    def save_buffers(self) -> None:
        if not self.buffers:
            return
        if not self._snapshot:
            self._snapshot = [torch.empty_like(b) for b in self.buffers]
        torch._foreach_copy_(self._snapshot, self.buffers)  # one fused launch on CUDA

    def restore_buffers(self) -> None:
        if self._snapshot:
            torch._foreach_copy_(self.buffers, self._snapshot)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


@dataclass
class Meter:
    """Running sums on the device; read (one sync) only when shown or at epoch end."""

    device: torch.device
    sums: torch.Tensor = None  # loss_sum, correct1, correct5, n

    def __post_init__(self):
        if self.sums is None:
            self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == y.unsqueeze(1)
        self.sums += torch.stack([loss_sum.double(), hit[:, 0].sum().double(),
                                  hit.any(1).sum().double(),
                                  torch.tensor(y.shape[0], dtype=torch.float64,
                                               device=y.device)])

    def values(self) -> dict[str, float]:
        loss, c1, c5, n = self.sums.tolist()
        n = max(n, 1.0)
        return {"loss": loss / n, "top1": c1 / n, "top5": c5 / n}


@dataclass
class Timer:
    """Wall time, time blocked waiting for data, and steps in the current epoch."""

    wall: float = 0.0
    data_wait: float = 0.0
    steps: int = 0
    images: int = 0
    skipped: int = 0        # steps not taken: non-finite loss or gradients
    extra: dict = field(default_factory=dict)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def train_one_epoch(s: Stepper, loader, prep, epoch: int, start: int, until: int, meter: Meter,
                    timer: Timer, stop, progress, seed: int) -> int:
    """Run steps ``start..until-1`` of ``epoch``; return the next step to run.

    ``stop`` is polled every step (a local flag) and agreed across ranks every few steps; on a
    stop the function returns after finishing the current step.
    """
    from .data.sampling import batch_generator

    s.model.train()
    step = start
    t_end = time.perf_counter()
    batches = loader.batches(epoch, start)
    while step < until:
        t_wait = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        x, y = _to_device(x, y, s.device)
        timer.data_wait += time.perf_counter() - t_wait
        gen = batch_generator(seed, epoch, step, s.dist.rank, s.device)
        x = prep(x, gen)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        lr = s.schedule.apply(s.global_step)
        if not _optimizer_step(s, x, y, meter):
            timer.skipped += 1
        s.global_step += 1
        step += 1
        timer.steps += 1
        timer.images += x.shape[0] * s.dist.world

        if s.watch_train_error and step % 5 == 0:
            _feed_train_error(s, meter, s.global_step - 1)
        if progress.wants(step):
            v = meter.values()
            elapsed = timer.wall + (time.perf_counter() - t_end)
            progress.update(step, {"loss": v["loss"], "top1": v["top1"], "lr": lr,
                                   "img/s": timer.images / max(elapsed, 1e-9)})
        if stop.poll(step):
            break
    timer.wall += time.perf_counter() - t_end
    if hasattr(batches, "close"):  # release a loader iterator left mid-epoch
        batches.close()
    return step


def _optimizer_step(s: Stepper, x: torch.Tensor, y: torch.Tensor, meter: Meter) -> bool:
    """Forward/backward over accum_steps micro-batches, then one (guarded) optimizer step.

    Returns False for a step skipped as non-finite; its loss and accuracy stay out of
    ``meter`` (one NaN would make the epoch's mean loss NaN).
    """
    micro = x.shape[0] // s.accum_steps
    loss_sum = torch.zeros((), device=s.device)
    step_meter = Meter(s.device)
    s.save_buffers()
    for i in range(s.accum_steps):
        xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
        last = i == s.accum_steps - 1
        # Gradients are all-reduced only on the last micro-step.
        sync = contextlib.nullcontext() if last or not hasattr(s.model, "no_sync") \
            else s.model.no_sync()
        with sync:
            with s.autocast():
                logits = s.model(xs)
                loss = F.cross_entropy(logits.float(), ys, label_smoothing=s.label_smoothing)
            scaled = loss / s.accum_steps
            if s.scaler is not None:
                s.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_sum = loss_sum + loss.detach() * ys.shape[0]
        step_meter.add(loss.detach() * ys.shape[0], logits.detach(), ys)

    if s.scaler is not None:
        # The scaler skips the step itself on inf/nan gradients (found from the all-reduced
        # gradients, so alike on every rank) and then lowers its scale: a lower scale is the
        # sign, the same on every rank, unlike this rank's own loss.
        before = s.scale if s.scale is not None else s.scaler.get_scale()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scale = s.scaler.get_scale()  # the one host read of the step
        finite = s.scale >= before
    else:
        # One host read per step: a non-finite step must never reach the weights. Under DDP
        # a NaN loss on one rank poisons the averaged gradients of all; the all-reduced grad
        # of a head parameter is the same everywhere, so every rank skips (or steps) alike.
        check = loss_sum
        if s.probe is not None and s.probe.grad is not None:
            head = s.probe.grad.sum()  # also catches a finite loss with non-finite gradients
            check = head if s.dist.enabled else check + head
        finite = bool(torch.isfinite(check))
        if finite:
            s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    if finite:
        meter.sums += step_meter.sums
        s.bad_steps = 0
    else:
        s.restore_buffers()
        s.bad_steps += 1
        # fp16: the scaler halves its scale at each overflow, from 2^16; allow it that many
        # skips in a row to find its level before a run of them counts as divergence.
        if s.bad_steps >= s.max_bad_steps + (SCALER_CALIBRATION if s.scaler else 0):
            raise NonFiniteLoss(f"{s.bad_steps} consecutive non-finite losses")
    return finite


def _feed_train_error(s: Stepper, meter: Meter, step: int) -> None:
    """Tell the schedule the training error of the steps since the last call (all ranks)."""
    now = meter.sums.clone()
    recent = now - s.error_mark if s.error_mark is not None and \
        s.error_mark[3] <= now[3] else now
    s.error_mark = now
    _, c1, _, n = dist_utils.all_reduce_sum(recent.tolist(), s.device, s.dist)
    if n > 0:
        s.schedule.on_train_error(step, 1.0 - c1 / n)
        # Once the low-lr phase is over it never returns: stop paying for the sync.
        s.watch_train_error = s.schedule.state_dict().get("low_lr_ended_at") is None


def view_scorer(protocol: str, crop: int, scales=(), flip: bool = False):
    """The ``views`` argument of :func:`evaluate` for ``data.val.protocol``; None for centre.

    ``ten_crop``: the loader's (N, 10, C, crop, crop) batch runs as one (10N, ...) forward
    pass. ``multiscale``: each view (one image per batch, every short side in ``scales``,
    mirrored too with ``flip``) runs fully convolutionally. Either way the score of an image
    is the log of its views' mean softmax (the papers average the class scores).
    """
    if protocol == "center":
        return None

    def score(model: nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        if protocol == "ten_crop" and x.dim() == 5:
            n, v = x.shape[:2]
            flat = x.flatten(0, 1)
            if channels_last:
                flat = flat.contiguous(memory_format=torch.channels_last)
            probs = F.softmax(model(flat).float(), dim=1)
            return probs.view(n, v, -1).mean(1).log()
        total = None
        views = eval_views(x, protocol, crop, scales, flip)
        for view in views:
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            p = F.softmax(model(view).float(), dim=1)
            total = p if total is None else total + p
        return (total / len(views)).log()

    return score


@torch.inference_mode()
def evaluate(model: nn.Module, loader, prep, device: torch.device, amp_dtype, channels_last: bool,
             info: dist_utils.DistInfo, views=None) -> dict[str, float]:
    """Loss, top-1, top-5 and N over the whole split; every image counted exactly once.

    ``views`` (optional) maps a prepared batch to (V*N, C, H, W) views whose softmax outputs
    are averaged per image (10-crop, multi-scale).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for x, y in loader.batches(0, 0):
        x, y = _to_device(x, y, device)
        x = prep(x)
        with autocast:
            if views is None:
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = model(x).float()
                logp = F.log_softmax(logits, dim=1)
            else:
                logp = views(model, x, channels_last)
        loss = F.nll_loss(logp, y, reduction="sum")
        top5 = logp.topk(min(5, logp.shape[1]), dim=1).indices
        hit = top5 == y.unsqueeze(1)
        sums += torch.stack([loss.double(), hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device)])
    loss, c1, c5, n = dist_utils.all_reduce_sum(sums.tolist(), device, info)
    n_safe = max(n, 1.0)
    return {"loss": loss / n_safe, "top1": c1 / n_safe, "top5": c5 / n_safe, "n": int(n)}
