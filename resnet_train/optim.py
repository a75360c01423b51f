"""Parameter groups, the SGD optimizer and the learning-rate schedules.

Every schedule is a closed form of the global optimizer iteration (fractional epochs:
epoch = step / steps_per_epoch), so the lr of any iteration can be computed directly and a
resumed run continues at exactly the right lr. State is kept only where a rule depends on the
run's history: the plateau rule (current factor, best error, bad epochs) and the ResNet-110
low-lr warm-up (whether, and from which step, it ended). We do not use
``torch.optim.lr_scheduler``: its step-counter state makes per-iteration resume and closed
forms awkward, but the semantics below match StepLR, MultiStepLR, CosineAnnealingLR,
LinearLR and ReduceLROnPlateau(mode="min", threshold_mode="abs") where those exist.

lr(step) = schedule(step) x warmup(step) x low_lr(step)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch
from torch import nn

from .config import Config
from .errors import CheckpointError

# Goyal et al. 2017: lr is linear in the batch size, relative to the reference batch of 256.
REFERENCE_BATCH = 256


def param_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool,
                 backbone_lr_scale: float = 1.0) -> list[dict]:
    """Trainable parameters in optimizer groups; with no_decay_bn_bias, ndim <= 1 gets no decay.

    Parameters of ndim <= 1 are exactly the BN gammas/betas and the biases; decaying them only
    shrinks the scale of normalised layers, which is why large-batch recipes exempt them.
    With ``backbone_lr_scale`` != 1 everything outside the head ``fc`` is in groups of their
    own whose ``lr_scale`` LRSchedule.apply multiplies in (fine-tuning: pre-trained layers
    move slower than the new head). The head's groups come first (with the head frozen there
    are none: the logs report LRSchedule's lr, not a group's).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if backbone_lr_scale == 1.0:
        parts = [(1.0, [p for _, p in named])]
    else:
        parts = [(1.0, [p for n, p in named if n.split(".")[0] == "fc"]),
                 (backbone_lr_scale, [p for n, p in named if n.split(".")[0] != "fc"])]
    groups = []
    for scale, params in parts:
        extra = {} if backbone_lr_scale == 1.0 else {"lr_scale": scale}
        if not no_decay_bn_bias:
            groups.append({"params": params, "weight_decay": weight_decay, **extra})
            continue
        groups.append({"params": [p for p in params if p.ndim > 1],
                       "weight_decay": weight_decay, **extra})
        groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0,
                       **extra})
    return [g for g in groups if g["params"]]


def base_lr(cfg: Config) -> float:
    """The peak lr: optim.lr, x global_batch / 256 under linear scaling."""
    scale = {"none": 1.0, "linear": cfg.data.batch_size / REFERENCE_BATCH}[cfg.optim.lr_scaling]
    return cfg.optim.lr * scale


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    """SGD with momentum / Nesterov and (optionally selective) weight decay at base_lr(cfg).

    Fused: the fused kernel honours a device-side ``found_inf`` flag, so a non-finite step
    is skipped without the host waiting for the device (engine.TrainStep). The momentum
    buffers start as zeros rather than being created by the first step: a skipped first step
    would otherwise leave the fused kernel's uninitialised buffers behind. With dampening 0,
    0.9 x 0 + g is exactly SGD's first-step buffer g, so the trajectory is unchanged.
    """
    o = cfg.optim  # config validation already refused nesterov without momentum
    groups = param_groups(model, o.weight_decay, o.no_decay_bn_bias, o.backbone_lr_scale)
    optimizer = torch.optim.SGD(groups, lr=base_lr(cfg), momentum=o.momentum,
                                nesterov=o.nesterov, weight_decay=o.weight_decay, fused=True)
    if o.momentum:
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)
    return optimizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this config's hyper-parameters.

    ``Optimizer.load_state_dict`` restores the saved groups' momentum, weight decay and
    Nesterov flag too; the resume check (config.resume_changes) has refused any change the
    user did not allow, so what is configured now is what must run.
    """
    configured = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                  for g in optimizer.param_groups]
    optimizer.load_state_dict(state)  # a misfit: TrainState names the file and the part
    for group, keep in zip(optimizer.param_groups, configured, strict=True):
        group.update(keep)
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state[p].get("momentum_buffer")
            if buf is None and group["momentum"]:  # e.g. momentum allowed to change from 0
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
            elif buf is not None and buf.stride() != p.stride():
                # Saved from a run of another memory format (train.channels_last, or amp /
                # the device under "auto"): the fused kernel pairs raw memory element by
                # element, so on the CPU it mixed up the momentum of other weights; on CUDA
                # it refuses the step. The buffer takes its parameter's layout.
                optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Training length in optimizer iterations: train.iterations, else epochs x steps/epoch."""
    if cfg.train.iterations is not None:
        return cfg.train.iterations
    return cfg.train.epochs * steps_per_epoch


# --------------------------------------------------------------------------- schedules
# Each returns the schedule's lr at `step` before the warm-up and low-lr multipliers.


def _constant(s: LRSchedule, step: int) -> float:
    return s.base


def _step(s: LRSchedule, step: int) -> float:
    # Integer division on iterations: same as floor(epoch / step_size) without float rounding.
    return s.base * s.cfg.gamma ** (step // (s.cfg.step_size * s.unit_steps))


def _multistep(s: LRSchedule, step: int) -> float:
    # A milestone m takes effect at the first iteration of epoch m (or at iteration m).
    passed = bisect.bisect_right([m * s.unit_steps for m in s.cfg.milestones], step)
    return s.base * s.cfg.gamma ** passed


def _plateau(s: LRSchedule, step: int) -> float:
    return max(s.base * s.plateau_factor, s.cfg.min_lr)


def _cosine(s: LRSchedule, step: int) -> float:
    # The cosine starts where the warm-up ends so the peak lr is actually reached; past
    # total_steps it stays at min_lr (CosineAnnealingLR would climb back up).
    span = s.total_steps - s.warmup_steps
    progress = 1.0 if span <= 0 else min(max(step - s.warmup_steps, 0) / span, 1.0)
    return s.cfg.min_lr + (s.base - s.cfg.min_lr) * (1 + math.cos(math.pi * progress)) / 2


SCHEDULES: dict[str, Callable[[LRSchedule, int], float]] = {
    "constant": _constant,
    "step": _step,
    "multistep": _multistep,
    "plateau": _plateau,
    "cosine": _cosine,
}

_STATE_KEYS = ("plateau_factor", "plateau_best", "plateau_bad_epochs", "plateau_last_epoch",
               "low_lr_ended_at", "low_lr_window")


class LowLRWarmup:
    """He et al. 2015, sec. 4.2 (ResNet-110): lr x ``factor`` until the training error is
    below ``threshold``, then the normal schedule (whose step count is not shifted).

    The training error is that of the last ``CHECK_EVERY`` optimizer steps over all ranks:
    ``window`` sums (correct top-1, images) on the device and is read, all-reduced, every
    ``CHECK_EVERY`` steps while the low phase lasts; then the phase is over for good and
    costs nothing more.
    """

    CHECK_EVERY = 5

    def __init__(self, threshold: float | None, factor: float, device: torch.device | str):
        self.threshold, self.factor = threshold, factor
        self.ended_at: int | None = None  # first iteration at the normal lr
        self.window = torch.zeros(2, dtype=torch.float64, device=device)

    @property
    def watching(self) -> bool:
        return self.threshold is not None and self.ended_at is None

    def factor_at(self, step: int) -> float:
        if self.threshold is None or (self.ended_at is not None and step >= self.ended_at):
            return 1.0
        return self.factor

    def observe(self, step: int, stats: torch.Tensor, reduce) -> None:
        """After iteration ``step``: add its engine.STATS; every CHECK_EVERY steps compare
        the window's error (``reduce`` sums a list of floats over ranks)."""
        if not self.watching:
            return
        self.window += stats[1:4:2]  # correct1, n
        if (step + 1) % self.CHECK_EVERY:
            return
        correct, n = reduce(self.window.tolist())
        self.window.zero_()
        if n > 0 and 1.0 - correct / n < self.threshold:
            self.ended_at = step + 1


class LRSchedule:
    """Per-iteration lr from config.schedule; call apply(step) before each optimizer step."""

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                 total_steps: int):
        if steps_per_epoch < 1 or total_steps < 1:
            raise ValueError(f"steps_per_epoch ({steps_per_epoch}) and total_steps "
                             f"({total_steps}) must be >= 1")
        self.cfg = cfg.schedule
        self.optimizer = optimizer
        self.base = base_lr(cfg)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.unit_steps = {"epoch": steps_per_epoch, "iter": 1}[self.cfg.unit]
        self.warmup_steps = self.cfg.warmup * {"epoch": steps_per_epoch, "iter": 1}[
            self.cfg.warmup_unit]
        self._schedule = SCHEDULES[self.cfg.name]
        # Plateau rule state (ReduceLROnPlateau's best / num_bad_epochs, as a factor on base).
        self.plateau_factor = 1.0
        self.plateau_best = math.inf
        self.plateau_bad_epochs = 0
        self.plateau_last_epoch = -1
        self.low_lr = LowLRWarmup(self.cfg.low_lr_until_error, self.cfg.low_lr_factor,
                                  optimizer.param_groups[0]["params"][0].device)

    def warmup_factor(self, step: int) -> float:
        """At iteration `step`: LinearLR(start_factor, 1.0, total_iters=warm-up steps), or
        ConstantLR(start_factor, total_iters=warm-up steps) for warmup_shape: constant."""
        if step >= self.warmup_steps:
            return 1.0
        start = self.cfg.warmup_start_factor
        if self.cfg.warmup_shape == "constant":
            return start
        return start + (1.0 - start) * step / self.warmup_steps

    def lr_at(self, step: int) -> float:
        """The lr for global optimizer iteration `step` (0-based), given the current state."""
        return self._schedule(self, step) * self.warmup_factor(step) * self.low_lr.factor_at(step)

    def apply(self, step: int) -> float:
        """Set the lr of every param group for iteration `step` (x the group's lr_scale, see
        param_groups); return it."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def on_epoch_end(self, epoch: int, val_error: float | None) -> None:
        """Plateau rule after validating `epoch`: x gamma after patience+1 epochs without an
        absolute improvement of more than threshold. Epochs without validation (None) and
        epochs already seen (a repeated call after resume) do not count."""
        if self.cfg.name != "plateau" or val_error is None or epoch <= self.plateau_last_epoch:
            return
        self.plateau_last_epoch = epoch
        if val_error < self.plateau_best - self.cfg.threshold:
            self.plateau_best = val_error
            self.plateau_bad_epochs = 0
        else:
            self.plateau_bad_epochs += 1
        if self.plateau_bad_epochs > self.cfg.patience:
            self.plateau_factor *= self.cfg.gamma
            self.plateau_bad_epochs = 0

    def observe(self, step: int, stats: torch.Tensor, reduce) -> None:
        """After iteration ``step`` with engine.STATS ``stats``: feeds the ResNet-110 warm-up."""
        self.low_lr.observe(step, stats, reduce)

    def local_sums(self) -> list[torch.Tensor]:
        """Rank-local device sums in the state (TrainState reduces them before a save)."""
        return [self.low_lr.window]

    def state_dict(self) -> dict:
        """Plain Python data (loadable with torch.load(weights_only=True))."""
        return {"plateau_factor": self.plateau_factor, "plateau_best": self.plateau_best,
                "plateau_bad_epochs": self.plateau_bad_epochs,
                "plateau_last_epoch": self.plateau_last_epoch,
                "low_lr_ended_at": self.low_lr.ended_at,
                "low_lr_window": self.low_lr.window.tolist()}

    def load_state_dict(self, d: dict) -> None:
        missing = [k for k in _STATE_KEYS if k not in d]
        if missing:
            raise CheckpointError(f"lr schedule state is missing {', '.join(missing)}")
        self.plateau_factor = float(d["plateau_factor"])
        self.plateau_best = float(d["plateau_best"])
        self.plateau_bad_epochs = int(d["plateau_bad_epochs"])
        self.plateau_last_epoch = int(d["plateau_last_epoch"])
        ended = d["low_lr_ended_at"]
        self.low_lr.ended_at = None if ended is None else int(ended)
        self.low_lr.window.copy_(torch.tensor(d["low_lr_window"], dtype=torch.float64))
