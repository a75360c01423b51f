"""Builds everything from a Config and runs it: epochs, validation, checkpoints, logs, signals."""

from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import __version__
from . import checkpoint as ckpt_io
from . import distributed as dist_utils
from .config import Config, dump, to_dict
from .engine import (Meter, NonFiniteLoss, Stepper, Timer, evaluate, train_one_epoch,
                     view_scorer)
from .errors import CheckpointError, ConfigError
from .logging import Progress, RunLogger, say

PREEMPTED_EXIT = 3  # stopped by a signal after saving last.pt; the same command resumes


# --------------------------------------------------------------------------- devices and precision


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda requested but no CUDA device is available")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if kind == "cuda" else torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp: fp16 needs a CUDA device (use bf16 on CPU)")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def resolve_channels_last(mode: str, device: torch.device, amp: torch.dtype | None) -> bool:
    if mode == "auto":
        # CPU (oneDNN): NHWC measured faster in every precision (scripts/bench_train.py:
        # ResNet-20 fp32 x1.30, bf16 x1.18; ResNet-50 fp32 x1.07, bf16 x1.15). CUDA: NHWC is
        # what tensor cores want for bf16/fp16; fp32 stays in cuDNN's native NCHW.
        return device.type == "cpu" or amp is not None
    return mode == "true"


# --------------------------------------------------------------------------- signals


class StopFlag:
    """Set by a signal handler; under DDP agreed by all ranks every ``every`` steps."""

    def __init__(self, names: list[str], every: int, device: torch.device,
                 info: dist_utils.DistInfo):
        self.received: str | None = None
        self.agreed = False
        self.every, self.device, self.info = every, device, info
        self._old = {}
        for name in names:
            sig = getattr(signal, name)
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): no preemption handling
                pass

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def poll(self, step: int) -> bool:
        """Whether to stop after this step (a collective only every ``every`` steps)."""
        if not self.info.enabled:
            self.agreed = self.received is not None
        elif step % self.every == 0:
            self.agreed = dist_utils.any_rank(self.received is not None, self.device, self.info)
        return self.agreed

    def check_now(self) -> bool:
        self.agreed = dist_utils.any_rank(self.received is not None, self.device, self.info)
        return self.agreed

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- the trainer


@dataclass
class Position:
    epoch: int = 0          # the epoch in progress (or next to start)
    step: int = 0           # next batch within that epoch
    best_top1: float = -1.0
    best_epoch: int = -1


class Trainer:
    """``Trainer(cfg).fit()`` trains ``cfg`` to completion, resuming what it can."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def fit(self) -> int:
        """Train; return the process exit code (0 done, PREEMPTED_EXIT after a signal)."""
        cfg = self.cfg
        if cfg.run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        kind = cfg.run.device
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        self.info = dist_utils.init(kind)
        try:
            return self._fit()
        finally:
            dist_utils.shutdown()

    # -- setup -------------------------------------------------------------------------------

    def _fit(self) -> int:
        cfg, info = self.cfg, self.info
        device = self.device = resolve_device(cfg.run.device, info.local_rank)
        torch.backends.cudnn.benchmark = not cfg.run.deterministic
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        self.amp = resolve_amp(cfg.train.amp, device)
        self.channels_last = resolve_channels_last(cfg.train.channels_last, device, self.amp)
        run_dir = self.run_dir = cfg.run_dir
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")

        # Find what to resume before building anything heavy: a finished run stops here.
        resume_path, ckpt = self._find_resume()
        if ckpt is not None and self._is_complete(ckpt):
            if info.is_main:
                say(f"run {run_dir} is complete ({ckpt['epoch']} epochs, global step "
                    f"{ckpt['global_step']}); raise train.epochs to train further")
            return 0

        if info.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            ckpt_io.remove_stale_temps(self.ckpt_dir)

        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        from .data import build_data
        self.data = build_data(cfg, device, info.rank, info.world, run_dir)
        from .models import build_model
        self.model = build_model(cfg.model.arch, self.data.num_classes, **self._model_options())
        self.model.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

        from .optim import LRSchedule, build_optimizer, total_steps
        self.steps_per_epoch = len(self.data.train)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the "
                              f"{self.data.train.num_samples} training images")
        self.total_steps = total_steps(cfg, self.steps_per_epoch)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        optimizer = build_optimizer(self.model, cfg)
        schedule = LRSchedule(cfg, optimizer, self.steps_per_epoch, self.total_steps)
        scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None

        pos, partial = Position(), None
        stepper_state = {"global_step": 0, "bad_steps": 0}
        if ckpt is not None:
            ckpt_io.check_fits(self.model, ckpt["model"], resume_path)
            self.model.load_state_dict(ckpt["model"])
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
                schedule.load_state_dict(ckpt["schedule"])
                if scaler is not None and ckpt.get("scaler"):
                    scaler.load_state_dict(ckpt["scaler"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{resume_path}: its optimizer/schedule state does not fit this config "
                    f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); "
                    f"optim.* or schedule.* differ from the run that wrote it") from None
            ckpt_io.set_rng_state(ckpt["rng"])
            pos = Position(ckpt["epoch"], ckpt["step_in_epoch"], ckpt["best_top1"],
                           ckpt["best_epoch"])
            stepper_state = {"global_step": ckpt["global_step"], "bad_steps": ckpt["bad_steps"]}
            partial = ckpt.get("partial")
            if info.is_main:
                say(f"resuming from {resume_path}: epoch {pos.epoch} step {pos.step} "
                    f"(global step {ckpt['global_step']})")
        del ckpt
        if info.is_main:  # the run's config, once the checkpoint is known to fit it
            with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as fh:
                fh.write(dump(cfg))

        train_model: nn.Module = self.model
        if cfg.train.compile:
            train_model = torch.compile(train_model)
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda"
                              else None)
        self.stepper = Stepper(
            model=train_model, optimizer=optimizer, schedule=schedule, scaler=scaler,
            device=device, amp_dtype=self.amp, channels_last=self.channels_last,
            accum_steps=cfg.train.accum_steps, label_smoothing=cfg.train.label_smoothing,
            max_bad_steps=cfg.train.max_bad_steps, dist=info,
            probe=list(self.model.parameters())[-1], buffers=list(self.model.buffers()),
            watch_train_error=(cfg.schedule.low_lr_until_error is not None
                               and schedule.state_dict().get("low_lr_ended_at") is None),
            **stepper_state)
        self.logger = RunLogger(run_dir, info.is_main, stepper_state["global_step"],
                                resume_epoch=pos.epoch if stepper_state["global_step"] else None)
        self.stop = StopFlag(cfg.checkpoint.signals, cfg.checkpoint.signal_check_every, device,
                             info)
        try:
            if info.is_main:
                say(self._banner())
            return self._loop(pos, partial)
        except NonFiniteLoss as e:
            say(f"error: {e}; stopping. The last good checkpoint in {self.ckpt_dir} is kept.")
            return 1
        finally:
            self.stop.restore()
            self.logger.close()
            self.data.train.close()
            self.data.val.close()

    def _model_options(self) -> dict:
        m = self.cfg.model
        return {"variant": m.variant, "shortcut": m.shortcut, "unit": m.unit,
                "zero_init_residual": m.zero_init_residual, "width": m.width}

    def _banner(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters())
        amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp]
        return (f"{self.cfg.model.arch} ({n_params:,} params) on {self.data.train.num_samples} "
                f"images, {self.data.num_classes} classes | {self.device} x{self.info.world}, "
                f"{amp}, channels_last={self.channels_last} | {self.epochs} epochs x "
                f"{self.steps_per_epoch} steps, global batch {self.cfg.data.batch_size} | "
                f"run dir {self.run_dir}")

    def _find_resume(self) -> tuple[str | None, dict | None]:
        """(path, checkpoint) to resume from, agreed by all ranks; (None, None) to start fresh."""
        mode = self.cfg.checkpoint.resume
        path, error, ckpt = None, None, None
        if self.info.is_main:
            # The run's own progress always wins: "run the same command to resume" must hold
            # for resume=<path> too (the path seeds a new run only), and resume=none must not
            # overwrite a run's checkpoints.
            ckpt_dir = os.path.join(self.cfg.run_dir, "checkpoints")
            found = ckpt_io.find_resumable(ckpt_dir, warn=say) \
                if os.path.isdir(ckpt_dir) else None
            own = found[0] if found else None
            if mode == "none":
                if own:
                    error = (f"checkpoint.resume: none, but {self.cfg.run_dir} already holds "
                             f"checkpoints ({own}) that a fresh run would overwrite; choose "
                             f"another run.dir, or resume=auto to continue that run")
            elif mode == "auto" or own:
                if mode != "auto":
                    say(f"note: {self.cfg.run_dir} has its own checkpoint; continuing from it "
                        f"rather than from checkpoint.resume={mode}")
                path, ckpt = found or (None, None)
            else:
                path = mode
        path, error = dist_utils.broadcast_object((path, error), self.info)
        if error:
            raise ConfigError(error)
        if path is None:
            return None, None
        if ckpt is None:  # rank 0 already holds what find_resumable loaded
            ckpt = ckpt_io.load(path)
        missing = [k for k in ("optimizer", "schedule", "epoch", "step_in_epoch",
                               "global_step", "rng") if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path}: not a resnet-train training checkpoint "
                                  f"(no {', '.join(missing)})")
        return path, ckpt

    def _is_complete(self, ckpt: dict) -> bool:
        """Whether the checkpoint already covers the configured training length."""
        if self.cfg.train.iterations is not None:
            return ckpt["global_step"] >= self.cfg.train.iterations
        return ckpt["epoch"] >= self.cfg.train.epochs and ckpt["step_in_epoch"] == 0

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self, pos: Position, partial: dict | None) -> int:
        cfg, s = self.cfg, self.stepper
        progress = Progress(cfg.run.progress, self.info.is_main, cfg.run.log_every)
        every = cfg.checkpoint.every_steps
        for epoch in range(pos.epoch, self.epochs):
            meter, timer = Meter(self.device), Timer()
            # The warm-up's "error since the last look" restarts with each epoch's meter.
            s.error_mark = None
            if partial is not None and self.info.is_main:
                meter.sums += torch.tensor(partial["sums"], dtype=torch.float64,
                                           device=self.device)
                timer.wall, timer.images = partial["wall"], int(partial["images"])
                timer.steps = int(partial.get("steps", 0))
                timer.data_wait = float(partial.get("data_wait", 0.0))
                timer.skipped = int(partial.get("skipped", 0))
                if partial.get("error_mark") is not None:
                    s.error_mark = torch.tensor(partial["error_mark"], dtype=torch.float64,
                                                device=self.device)
            partial = None
            steps_this_epoch = min(self.steps_per_epoch,
                                   self.total_steps - epoch * self.steps_per_epoch)
            step = pos.step if epoch == pos.epoch else 0
            progress.start(epoch, steps_this_epoch, step)
            while step < steps_this_epoch:
                until = steps_this_epoch
                if every:  # stop at the next multiple of every_steps to save last.pt
                    until = min(until, step + every - s.global_step % every)
                step = train_one_epoch(s, self.data.train, self.data.train_prep, epoch, step,
                                       until, meter, timer, self.stop, progress, cfg.run.seed)
                if self.stop.agreed:
                    progress.close()
                    return self._preempted(epoch, step, pos, meter, timer)
                if every and s.global_step % every == 0 and step < steps_this_epoch:
                    self._save(Position(epoch, step, pos.best_top1, pos.best_epoch), meter,
                               timer, names=("last.pt",))
            progress.close()
            # A run measured in iterations may end inside an epoch: resume there if extended.
            done = step >= self.steps_per_epoch
            self._end_epoch(epoch, pos, meter, timer, next_epoch=epoch + 1 if done else epoch,
                            next_step=0 if done else step)
            pos = Position(epoch + 1, 0, pos.best_top1, pos.best_epoch)
            if self.stop.check_now():
                return self._preempted(epoch + 1, 0, pos, None, None, saved=True)
        if self.info.is_main:
            say(f"done: best val top-1 {pos.best_top1:.4f} at epoch {pos.best_epoch}; "
                f"checkpoints in {self.ckpt_dir}")
        return 0

    def _end_epoch(self, epoch: int, pos: Position, meter: Meter, timer: Timer, next_epoch: int,
                   next_step: int) -> None:
        cfg, info = self.cfg, self.info
        last_epoch = epoch == self.epochs - 1
        val = None
        if (epoch + 1) % cfg.train.eval_every == 0 or last_epoch:
            v = cfg.data.val
            val = evaluate(self.model, self.data.val, self.data.val_prep, self.device, self.amp,
                           self.channels_last, info,
                           views=view_scorer(v.protocol, v.crop, v.scales, v.flip))
        self.stepper.schedule.on_epoch_end(epoch, None if val is None else 1.0 - val["top1"])
        improved = val is not None and val["top1"] > pos.best_top1
        if improved:
            pos.best_top1, pos.best_epoch = val["top1"], epoch
        bad_count, bad_paths = self.data.train.bad_report()
        val_bad, val_paths = self.data.val.bad_report()
        # One collective for the epoch's training sums and the unreadable-image counts (each
        # rank decodes its own shard: the counts add up).
        loss, c1, c5, n, bad_count, val_bad = dist_utils.all_reduce_sum(
            meter.sums.tolist() + [bad_count, val_bad], self.device, info)
        bad_count, val_bad = int(bad_count), int(val_bad)
        train = {"loss": loss / max(n, 1), "top1": c1 / max(n, 1), "top5": c5 / max(n, 1)}
        perf = {"images_per_sec": timer.images / max(timer.wall, 1e-9),
                "epoch_seconds": timer.wall,
                "data_wait_frac": timer.data_wait / max(timer.wall, 1e-9),
                "step_seconds": timer.wall / max(timer.steps, 1)}
        if self.device.type == "cuda":
            perf["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        lr = self.stepper.optimizer.param_groups[0]["lr"]
        rec = {"kind": "epoch", "epoch": epoch, "global_step": self.stepper.global_step, "lr": lr,
               "train_loss": train["loss"], "train_top1": train["top1"],
               "train_top5": train["top5"],
               "val_loss": None if val is None else val["loss"],
               "val_top1": None if val is None else val["top1"],
               "val_top5": None if val is None else val["top5"],
               "val_n": None if val is None else val["n"], **perf,
               "bad_images": bad_count, "val_bad_images": val_bad,
               "skipped_steps": timer.skipped}
        if info.is_main:
            step = self.stepper.global_step
            self.logger.record(rec)
            self.logger.scalars({"train/loss": train["loss"], "train/top1": train["top1"],
                                 "train/top5": train["top5"], "lr": lr,
                                 **{f"perf/{k}": v for k, v in perf.items()}}, step)
            if val is not None:
                self.logger.scalars({"val/loss": val["loss"], "val/top1": val["top1"],
                                     "val/top5": val["top5"]}, step)
            if cfg.model.log_block_norms:
                self._log_block_norms(step)
            if timer.skipped:  # alike on every rank (the check reads all-reduced gradients)
                say(f"warning: epoch {epoch}: skipped {timer.skipped} optimizer steps with a "
                    f"non-finite loss or gradients (their batches are not in the train metrics)")
            for split, count, paths in (("train", bad_count, bad_paths),
                                        ("val", val_bad, val_paths)):
                if count:
                    eg = (", e.g. " + ", ".join(paths[:3])) if paths else " (on other ranks)"
                    say(f"warning: epoch {epoch}: skipped {count} unreadable {split} "
                        f"images{eg}")
            val_txt = "" if val is None else (f" | val loss {val['loss']:.4f} top1 "
                                              f"{val['top1']:.4f} top5 {val['top5']:.4f}")
            say(f"epoch {epoch}: train loss {train['loss']:.4f} top1 {train['top1']:.4f}"
                f"{val_txt} | lr {lr:.4g} | {perf['images_per_sec']:.0f} img/s, "
                f"{1e3 * perf['step_seconds']:.0f} ms/step, data wait "
                f"{100 * perf['data_wait_frac']:.0f}%"
                + (f", peak {perf['peak_mem_gb']:.1f} GiB" if "peak_mem_gb" in perf else "")
                + f", {timer.wall:.1f}s")
        names = ["last.pt"]
        if improved:
            names.append("best.pt")
        if cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0:
            names.append(os.path.basename(ckpt_io.epoch_file(self.ckpt_dir, epoch + 1)))
        self._save(Position(next_epoch, next_step, pos.best_top1, pos.best_epoch), None, None,
                   names=tuple(names), metrics=rec)

    def _log_block_norms(self, step: int) -> None:
        from .models import collect_block_norms, set_report_norms
        x, _ = next(iter(self.data.val.batches(0, 0)))
        if x.dim() == 5:  # a ten-crop batch: its first view of each image
            x = x[:, 0]
        x = self.data.val_prep(x.to(self.device))
        set_report_norms(self.model, True)
        with torch.inference_mode():
            self.model.eval()(x)
        ratios = {f"block_norms/{name}": fx / max(xn, 1e-12)
                  for name, (fx, xn) in collect_block_norms(self.model).items()}
        set_report_norms(self.model, False)  # (also forgets the values: collect first)
        self.logger.scalars(ratios, step)

    def _preempted(self, epoch: int, step: int, pos: Position, meter, timer,
                   saved: bool = False) -> int:
        if not saved:
            self._save(Position(epoch, step, pos.best_top1, pos.best_epoch), meter, timer,
                       names=("last.pt",))
        if self.info.is_main:
            say(f"received {self.stop.received or 'a stop signal on another rank'}: saved "
                f"{os.path.join(self.ckpt_dir, 'last.pt')} at epoch {epoch} step {step}; "
                f"run the same command to resume (exit code {PREEMPTED_EXIT})")
        return PREEMPTED_EXIT

    # -- checkpoints -------------------------------------------------------------------------

    def _save(self, pos: Position, meter: Meter | None, timer: Timer | None, names: tuple,
              metrics: dict | None = None) -> None:
        """Write the named checkpoint files (rank 0); every rank calls this at the same point."""
        s = self.stepper
        partial = None
        if meter is not None:  # mid-epoch: keep the epoch's running sums, summed over ranks
            mark = [0.0] * 4 if s.error_mark is None else s.error_mark.tolist()
            summed = dist_utils.all_reduce_sum(meter.sums.tolist() + mark, self.device,
                                               self.info)
            partial = {"sums": summed[:4], "wall": timer.wall, "images": timer.images,
                       "steps": timer.steps, "data_wait": timer.data_wait,
                       "skipped": timer.skipped,
                       "error_mark": summed[4:] if s.error_mark is not None else None}
        if not self.info.is_main:
            return
        model_state = ckpt_io.unwrap(self.model).state_dict()
        if not all(bool(torch.isfinite(v).all()) for v in model_state.values()
                   if v.is_floating_point()):
            # A finite loss can still blow the weights up; never replace a good checkpoint.
            say(f"warning: weights are not finite at global step {s.global_step}; "
                f"not saving {', '.join(names)}")
            return
        state = {
            "format": ckpt_io.FORMAT,
            "model": model_state,
            "optimizer": s.optimizer.state_dict(),
            "schedule": s.schedule.state_dict(),
            "scaler": s.scaler.state_dict() if s.scaler is not None else None,
            "epoch": pos.epoch, "step_in_epoch": pos.step, "global_step": s.global_step,
            "total_steps": self.total_steps, "complete": s.global_step >= self.total_steps,
            "best_top1": pos.best_top1, "best_epoch": pos.best_epoch,
            "bad_steps": s.bad_steps, "partial": partial, "metrics": metrics,
            "rng": ckpt_io.rng_state(), "data_seed": self.cfg.run.seed,
            "config": to_dict(self.cfg),
            "versions": {"resnet_train": __version__, "torch": str(torch.__version__)},
            "saved_at": time.time(),
        }
        # last.pt last: a crash in between leaves best/epoch files at least as new as
        # last.pt, and resume (the most advanced loadable file) rewrites what is missing.
        for name in sorted(names, key=lambda n: n == "last.pt"):
            ckpt_io.atomic_save(state, os.path.join(self.ckpt_dir, name))
        if any(n.startswith("epoch_") for n in names):
            ckpt_io.prune_epochs(self.ckpt_dir, self.cfg.checkpoint.keep_last)
