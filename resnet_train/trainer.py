"""Builds everything from a Config and runs it: the iteration-indexed loop and its policy.

``Trainer(cfg).fit()`` reads top to bottom: find what to resume (and whether the config
still fits it), build data, model, optimizer and the one ``TrainState``, then loop over
global iterations (``epoch, step = divmod(state.step, steps_per_epoch)``). Inside the loop
happen, at their iterations: logging (``run.log_every``), mid-epoch saves
(``checkpoint.every_steps``), the epoch end (validation, records, checkpoints) and the
agreed stop after a signal. The step itself is ``engine.TrainStep``.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import signal
import time

import torch
import torch.nn as nn

from . import checkpoint as ckpt_io
from . import distributed as dist_utils
from .config import Config, dump, resume_changes, resume_notice, resume_refusal, to_dict
from .data import BadImages, final_val_config
from .data.sampling import batch_generator
from .engine import (SCALER_CALIBRATION, Meter, Timer, TrainStep, evaluate, precise_bn,
                     scorer_for, stage_groups)
from .errors import ConfigError, DataError, EnvironmentFailure, ResnetTrainError, UserError
from .logging import Progress, RunLogger, say
from .runtime import (AMP_NAMES, build_model_for, configure_host_memory, configure_threads,
                      device_kind, resolve_runtime)

PREEMPTED_EXIT = 3  # stopped by a signal after saving last.pt; the same command resumes


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite steps: the run stops, last good checkpoint kept."""


# --------------------------------------------------------------------------- signals


class StopFlag:
    """Set by a signal handler; under DDP agreed by all ranks every ``every`` polls."""

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
        """Whether to stop now (a collective only every ``every`` steps under DDP)."""
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


class Trainer:
    """``Trainer(cfg).fit()`` trains ``cfg`` to completion, resuming what it can."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.lock = self.data = self.logger = self.stop = None

    def fit(self) -> int:
        """Train; return the process exit code (0 done, PREEMPTED_EXIT after a signal)."""
        cfg = self.cfg
        # Process-wide switches this run sets are put back afterwards (in-process callers).
        flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                 torch.get_num_threads())
        if cfg.run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.info = dist_utils.init(device_kind(cfg.run.device))
        try:
            torch.backends.cudnn.benchmark = not cfg.run.deterministic
            # Only on a change: the call imports torch._inductor's config (1-2 s a process).
            if flags[0] != cfg.run.deterministic:
                torch.use_deterministic_algorithms(cfg.run.deterministic)
            return self._fit()
        finally:
            self._release()
            if torch.are_deterministic_algorithms_enabled() != flags[0]:
                torch.use_deterministic_algorithms(flags[0])
            torch.backends.cudnn.benchmark = flags[1]
            torch.set_num_threads(flags[2])
            dist_utils.shutdown()

    def _release(self) -> None:
        """Drop everything that holds process-group resources (the DDP reducer, loaders)
        before the group is destroyed: a DDP module collected after destroy_process_group
        aborts the process at exit."""
        if self.stop is not None:
            self.stop.restore()
        if self.logger is not None:
            self.logger.close()
        if self.data is not None:
            self.data.close()
        for name in ("train_step", "state", "model", "data", "schedule", "epoch_meter",
                     "window_meter", "train_bad"):
            self.__dict__.pop(name, None)
        gc.collect()
        if self.lock is not None:
            self.lock.release()

    def _fit(self) -> int:
        cfg, info = self.cfg, self.info
        self.runtime = resolve_runtime(cfg, info.local_rank)
        self.threads = configure_threads(cfg, self.runtime.device)
        self.host_memory_kept = configure_host_memory(cfg, self.runtime.device)
        # The first epoch's peak is this run's, not that of an earlier run in this process
        # (resnet-study degradation trains its networks one after another in one process).
        self.runtime.reset_peak_memory()
        self.ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
        resume_path, ckpt = self._find_resume()
        if info.is_main:  # (under the run's lock) also of a complete run: a kill in its
            os.makedirs(self.ckpt_dir, exist_ok=True)  # last save can leave one behind
            ckpt_io.remove_stale_temps(self.ckpt_dir)
        if ckpt is not None and self._is_complete(ckpt):
            if info.is_main:
                say(f"run {cfg.run_dir} is complete ({ckpt['epoch']} epochs, global step "
                    f"{ckpt['global_step']}); raise train.epochs to train further")
            return 0
        self._build(ckpt, resume_path)
        del ckpt
        if info.is_main:  # the run's config, once the checkpoint is known to fit it
            from .rundir import atomic_write  # a kill never leaves it torn

            def write(tmp: str) -> None:
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(dump(cfg))
            atomic_write(os.path.join(cfg.run_dir, "config.yaml"), write)
        self.logger = RunLogger(cfg.run_dir, info.is_main, self.state.step,
                                redo_epoch_end=self.state.epoch_end_pending)
        self.stop = StopFlag(cfg.checkpoint.signals, cfg.checkpoint.signal_check_every,
                             self.runtime.device, info)
        self.progress = Progress(cfg.run.progress, info.is_main)
        if info.is_main:
            say(self._banner())
        try:
            return self._loop()
        except NonFiniteLoss as e:
            if info.is_main:
                say(f"error: {e}; stopping. The last good checkpoint in {self.ckpt_dir} is "
                    f"kept.")
            return 1
        finally:
            self.progress.close()

    # -- resume ------------------------------------------------------------------------------

    def _find_resume(self) -> tuple[str | None, dict | None]:
        """(path, checkpoint) to resume from, agreed by all ranks; (None, None) to start fresh.

        Rank 0 takes the run directory's lock first, then decides; a refusal (lock held,
        resume=none over checkpoints, a config change that alters the saved state) reaches
        every rank as the same one-line error.
        """
        path, error, ckpt, notice = None, None, None, []
        if self.info.is_main:
            try:
                path, ckpt, notice = self._choose_resume()
            except ResnetTrainError as e:
                error = e
        path, relayed = dist_utils.broadcast_object(
            (path, None if error is None else (error.exit_code, str(error))), self.info)
        if error is not None:
            raise error
        if relayed is not None:  # the other ranks fail alike (same message and exit code)
            raise _relayed(*relayed)
        if path is None:
            return None, None
        if ckpt is None:  # the other ranks read the file rank 0 chose
            ckpt = ckpt_io.load(path)
        for line in notice:
            say(line)
        return path, ckpt

    def _choose_resume(self) -> tuple[str | None, dict | None, list[str]]:
        """Rank 0: lock the run dir, find the checkpoint to resume, check the config fits."""
        from .rundir import RunLock
        cfg, mode = self.cfg, self.cfg.checkpoint.resume
        self.lock = RunLock(cfg.run_dir, notify=say).acquire()
        positions: dict[str, tuple[int, int]] = {}
        found = ckpt_io.find_resumable(self.ckpt_dir, warn=say, positions=positions) \
            if os.path.isdir(self.ckpt_dir) else None
        # The run's own progress always wins: "run the same command to resume" holds for
        # resume=<path> too (the path seeds a new run only); resume=none never overwrites.
        if mode == "none":
            if found:
                raise ConfigError(f"checkpoint.resume: none, but {cfg.run_dir} already holds "
                                  f"checkpoints ({found[0]}) that a fresh run would "
                                  f"overwrite; choose another run.dir, or resume=auto to "
                                  f"continue that run")
            return None, None, []
        notice = []
        if found:
            if mode != "auto":
                notice.append(f"note: {cfg.run_dir} has its own checkpoint; continuing from "
                              f"it rather than from checkpoint.resume={mode}")
            path, ckpt = found
        elif mode == "auto":
            return None, None, []
        else:
            path, ckpt = mode, ckpt_io.load(mode)
        missing = [k for k in ("optimizer", "schedule", "global_step", "rng", "config")
                   if k not in ckpt]
        if missing:
            raise ckpt_io.CheckpointError(f"{path}: not a resnet-train training checkpoint "
                                          f"(no {', '.join(missing)})")
        diff = resume_changes(ckpt["config"], cfg)
        if diff.refused:
            raise ConfigError(resume_refusal(path, diff))
        if diff.applied:
            notice.append(resume_notice(diff))
        world = ckpt.get("world_size", 1)
        if world != self.info.world:
            old_accum = ckpt["config"].get("train", {}).get("accum_steps", 1)
            notice.append(world_change_note(world, self.info.world, cfg.data.batch_size,
                                            old_accum, cfg.train.accum_steps))
        if found:
            notice += self._finish_interrupted_save(path, ckpt, positions)
        return path, ckpt, notice

    def _finish_interrupted_save(self, path: str, ckpt: dict, positions: dict) -> list[str]:
        """Rank 0: write what a kill during the epoch-end save of ``ckpt`` left unwritten
        (best.pt is written first, then epoch_NNN.pt, last.pt, then the pruning), so the
        files are those of an uninterrupted run: training on from ``ckpt`` never writes
        them. Returns the notice."""
        position = ckpt_io.position(ckpt)
        every = ckpt["config"].get("checkpoint", {}).get("every_epochs",
                                                         self.cfg.checkpoint.every_epochs)
        names = ckpt_io.epoch_end_names(ckpt, every)  # the files the save that was cut wrote
        # (a best.pt set aside at this position, for a changed validation, was not cut)
        set_aside = os.path.exists(os.path.join(self.ckpt_dir, ckpt_io.kept_best(position[0])))
        missing = [n for n in names if positions.get(n) != position
                   and not (n == "best.pt" and set_aside)]
        for name in missing:
            ckpt_io.atomic_save(ckpt, os.path.join(self.ckpt_dir, name))
        ckpt_io.prune_epochs(self.ckpt_dir, self.cfg.checkpoint.keep_last)
        return [f"note: the epoch-end save at global step {position[0]} was cut short; "
                f"wrote {', '.join(missing)} from {path}"] if missing else []

    def _is_complete(self, ckpt: dict) -> bool:
        """Whether the checkpoint already covers the configured training length."""
        if ckpt.get("epoch_end_pending"):
            return False
        if self.cfg.train.iterations is not None:
            return ckpt["global_step"] >= self.cfg.train.iterations
        return ckpt["epoch"] >= self.cfg.train.epochs and ckpt["step_in_epoch"] == 0

    # -- building ----------------------------------------------------------------------------

    def _build(self, ckpt: dict | None, path: str | None) -> None:
        """Data, model, optimizer, schedule, the step and the TrainState (loaded if resuming)."""
        cfg, info, runtime = self.cfg, self.info, self.runtime
        from .data import Normalization, build_data
        from .optim import LRSchedule, build_optimizer, total_steps
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.data = build_data(cfg, runtime.device, info.rank, info.world, cfg.run_dir,
                               norm=None if ckpt is None else ckpt.get("normalization"))
        self._check_same_data_on_every_rank()
        self.model = build_model_for(cfg, self.data.num_classes, runtime)
        self._start_model(ckpt is None)
        self.steps_per_epoch = len(self.data.train)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the "
                              f"{self.data.train.num_samples} training images")
        total = total_steps(cfg, self.steps_per_epoch)
        optimizer = build_optimizer(self.model, cfg)
        self.schedule = LRSchedule(cfg, optimizer, self.steps_per_epoch, total)
        scaler = torch.amp.GradScaler(runtime.device.type) \
            if runtime.amp_dtype == torch.float16 else None
        self.train_step = TrainStep(
            self.model, optimizer, scaler, runtime, cfg.train.accum_steps,
            cfg.train.label_smoothing,
            probe=[p for p in self.model.parameters() if p.requires_grad][-1],
            buffers=list(self.model.buffers()), distributed=info.enabled,
            counts_skips=info.is_main)
        if cfg.run.diagnostics_every:
            self.train_step.grad_groups = stage_groups(self.model)
        self.epoch_meter, self.window_meter = Meter(runtime.device), Meter(runtime.device)
        self.timer = Timer()
        self.train_bad = BadImages(self.data.train, runtime.device)
        self.state = ckpt_io.TrainState(
            {"model": self.model, "optimizer": ckpt_io.OptimizerPart(optimizer),
             "schedule": self.schedule, "scaler": scaler, "train_step": self.train_step,
             "epoch_meter": self.epoch_meter, "window_meter": self.window_meter,
             "timer": self.timer, "bad_images": self.train_bad,
             "normalization": Normalization(self.data, cfg.data.normalize)},
            to_dict(cfg), self.steps_per_epoch, total, info)
        self.state.classes = self.data.info.get("classes")  # for resnet-export, resnet-eval
        self.state.splits = self.data.info.get("splits")
        if ckpt is not None:
            self.state.load_state_dict(ckpt, path)
            self._restart_best_if_validation_changed(ckpt, path)
            if info.is_main:
                st, spe = self.state, self.steps_per_epoch
                where = (f"epoch {st.last_epoch}'s validation" if st.epoch_end_pending
                         else f"epoch {st.epoch} step {st.step % spe}")
                say(f"resuming from {path}: {where} (global step {st.step})")
        self.train_step.model = self._wrapped(self.model)

    def _check_same_data_on_every_rank(self) -> None:
        """Under DDP each rank scans its own folders (node-local copies of a dataset): a rank
        whose splits differ would read other images under the same sample numbers, silently.
        One collective; every rank refuses alike (exit 2)."""
        splits, info = self.data.info.get("splits"), self.info
        if not info.enabled or not splits:
            return
        # 52 bits of the splits' hashes: exact in the float64 the reduction carries
        key = int(hashlib.sha256(repr(sorted(splits.items())).encode())
                  .hexdigest()[:13], 16)
        device = self.runtime.device
        if dist_utils.min_over_ranks(key, device, info) != -dist_utils.min_over_ranks(
                -key, device, info):
            t = splits["train"]
            raise DataError(f"{self.cfg.data.root}: the folder splits differ between processes "
                            f"(rank {info.rank}: {t['images']} training images, hash "
                            f"{t['sha256']}); every node's copy of the dataset must hold the "
                            f"same files")

    def _restart_best_if_validation_changed(self, ckpt: dict, path: str) -> None:
        """A resume whose validation measures differently (MEASURE_KEYS, or other files in
        the validation split) would compare the next top-1 with a best measured the old way:
        the comparison starts again, and rank 0 keeps the old best.pt under another name.
        Under the plateau schedule a changed split is refused, as those keys are."""
        from .config import measuring, resume_changes
        st, cfg = self.state, self.cfg
        changed = measuring(resume_changes(ckpt["config"], cfg).applied_keys, cfg)
        old, new = (ckpt.get("splits") or {}).get("val"), (st.splits or {}).get("val")
        if old is not None and new is not None and old != new:
            what = ckpt_io.split_change(old, new)
            if cfg.schedule.name == "plateau":
                raise ckpt_io.CheckpointError(
                    f"{path}: the validation split is not the one this run validated on "
                    f"({what}) and schedule.name=plateau decides from its errors; restore "
                    f"those files")
            changed.append(f"validation split: {what}")
        if not changed or st.best_epoch < 0:
            return
        if self.info.is_main:
            best = os.path.join(self.ckpt_dir, "best.pt")
            kept = os.path.join(self.ckpt_dir, ckpt_io.kept_best(st.step))
            moved = os.path.exists(best)
            if moved:
                os.replace(best, kept)
            say(f"note: validation changed ({', '.join(changed)}): the best top-1 so far "
                f"({st.best_top1:.4f} at epoch {st.best_epoch}) was measured the old way; "
                f"best.pt starts again from the next validation"
                + (f" (the old one is now {os.path.basename(kept)})" if moved else ""))
        st.best_top1, st.best_epoch = -1.0, -1

    def _wrapped(self, model: nn.Module) -> nn.Module:
        """The model as the step runs it: compiled, in DDP. Wrapped after loading: DDP
        broadcasts rank 0's weights when it is built. The compiled module goes inside DDP,
        as PyTorch's "Where to apply torch.compile?" advises: Dynamo sees the DDP module
        around it and splits the graph at DDP's buckets (DDPOptimizer), so the gradient
        all-reduce still overlaps the backward."""
        if self.cfg.train.compile:
            model = torch.compile(model)
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            dev = self.runtime.device
            model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        return model

    def _start_model(self, fresh: bool) -> None:
        """model.weights (a new run only: a resume's weights are the checkpoint's), then
        model.freeze (always: it is part of how the run trains)."""
        cfg, main = self.cfg, self.info.is_main
        from .finetune import freeze, start_from_weights
        if fresh and cfg.model.weights:
            start_from_weights(self.model, cfg, say if main else (lambda line: None))
        if cfg.model.freeze:
            n = freeze(self.model, cfg.model.freeze)
            if main:
                say(f"model.freeze: {', '.join(cfg.model.freeze)} frozen ({n:,} parameters, "
                    f"BatchNorm statistics kept)")

    def _banner(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters())
        rt = self.runtime
        return (f"{self.cfg.model.arch} ({n_params:,} params) on {self.data.train.num_samples} "
                f"images, {self.data.num_classes} classes | {rt.device} x{self.info.world}, "
                f"{AMP_NAMES[rt.amp_dtype]}, channels_last={rt.channels_last}, "
                f"{self.threads} threads{', host memory kept' if self.host_memory_kept else ''} | "
                f"{-(-self.state.total_steps // self.steps_per_epoch)} epochs x "
                f"{self.steps_per_epoch} steps, global batch {self.cfg.data.batch_size} | "
                f"run dir {self.cfg.run_dir}")

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> int:
        cfg, st, info, device = self.cfg, self.state, self.info, self.runtime.device
        spe, every = self.steps_per_epoch, cfg.checkpoint.every_steps
        diag = cfg.run.diagnostics_every  # 0: TrainStep never computes gradient norms
        if st.epoch_end_pending and self._end_epoch():
            return self._preempted()
        gen = torch.Generator(device=device)  # one per run, reseeded for each step
        batches = None
        while st.step < st.total_steps:
            epoch, step = divmod(st.step, spe)
            if batches is None:  # a new epoch, or the resumed one at its next batch
                batches = self.data.train.batches(epoch, step)
                self.train_step.model.train()
                self.progress.start(epoch, min(spe, st.total_steps - epoch * spe), step)
            t0 = time.perf_counter()
            x, y = next(batches)
            t1 = time.perf_counter()
            x = self.data.train_prep(x.to(device, non_blocking=True),
                                     batch_generator(cfg.run.seed, epoch, step, 0, gen))
            lr = self.schedule.apply(st.step)
            self.train_step.want_grad_norms = diag > 0 and (st.step + 1) % diag == 0
            stats = self.train_step(self.runtime.layout(x), y.to(device, non_blocking=True))
            self.epoch_meter.add(stats)
            self.window_meter.add(stats)
            self.schedule.observe(st.step, stats, self._reduce)
            st.step += 1
            self.timer.count(x.shape[0] * info.world, t1 - t0)
            self.progress.tick(step + 1)
            self._log_points(lr, t0)
            epoch_end = st.step % spe == 0 or st.step == st.total_steps
            if epoch_end:  # the epoch's queued device work is its time, not validation's
                self.runtime.synchronize()
            self.timer.wall += time.perf_counter() - t0
            saved = False
            if epoch_end:
                batches = _close(batches)
                st.epoch_end_pending = True
                if self._end_epoch():
                    return self._preempted()
                saved = True
            elif every and st.step % every == 0:
                self._save(("last.pt",))
                saved = True
            if self.stop.poll(st.step) or (saved and self.stop.check_now()):
                _close(batches)
                return self._preempted(save=not saved)
        if info.is_main:
            say(f"done: best val top-1 {st.best_top1:.4f} at epoch {st.best_epoch}; "
                f"checkpoints in {self.ckpt_dir}")
        return 0

    def _log_points(self, lr: float, t0: float) -> None:
        """``t0``: when this step began (its time is not in the timer yet)."""
        step, diag = self.state.step, self.cfg.run.diagnostics_every
        if step % self.cfg.run.log_every == 0:
            self._log_step(lr, t0)
        if diag and step % diag == 0 and self.info.is_main:
            self._log_diagnostics(step)
        if self.schedule.low_lr.threshold is not None and self.info.is_main:
            self._warmup_notes(step)

    def _warmup_notes(self, step: int) -> None:
        """The ResNet-110 low-lr warm-up: one line when it ends, and a warning if it is still
        on at the first milestone (the whole run would train at a fraction of its lr)."""
        low, s = self.schedule.low_lr, self.cfg.schedule
        if low.ended_at == step:
            say(f"note: low-lr warm-up over at iteration {step}: the train error of the last "
                f"{low.CHECK_EVERY} steps is below {low.threshold:.0%}; lr x{low.factor} ends")
        elif low.watching and s.name == "multistep" and s.milestones \
                and step == s.milestones[0] * self.schedule.unit_steps:
            say(f"warning: the low-lr warm-up (lr x{low.factor} until the train error is below "
                f"{low.threshold:.0%}) is still on at the first milestone (iteration {step}): "
                f"the run goes on at x{low.factor} its schedule")

    def _reduce(self, values: list[float]) -> list[float]:
        return dist_utils.all_reduce_sum(values, self.runtime.device, self.info)

    def _read(self, meter: Meter, extra: tuple = ()) -> dict:
        """A meter's all-reduced means, checking the run of skipped steps on the way (the
        same one host read)."""
        vals = meter.read(self.info, (self.train_step.peak_bad_run, *extra))
        self.train_step.reset_peak()
        peak = vals["extra"][0] / self.info.world  # alike on every rank
        limit = self.cfg.train.max_bad_steps + (
            SCALER_CALIBRATION if self.train_step.scaler is not None else 0)
        if peak >= limit:
            raise NonFiniteLoss(f"{peak:.0f} consecutive non-finite losses or gradients "
                                f"(train.max_bad_steps={self.cfg.train.max_bad_steps})")
        vals["extra"] = vals["extra"][1:]
        return vals

    def _log_step(self, lr: float, t0: float) -> None:
        """Windowed train loss, error and speed since the last log point: metrics.jsonl, TB,
        the console."""
        w = self._read(self.window_meter)
        self.window_meter.reset()
        st = self.state
        # after the read: on a GPU it waits for the window's queued work
        rate = self.timer.window_rate(self.timer.wall + time.perf_counter() - t0)
        rec = {"kind": "step", "global_step": st.step,
               "epoch": st.last_epoch, "lr": lr,
               "train_loss": w["loss"] if w["n"] else None,
               "train_error": 1.0 - w["top1"] if w["n"] else None,
               "train_top1": w["top1"] if w["n"] else None, "n": w["n"],
               "skipped_steps": w["skipped"], "images_per_sec": rate}
        if not self.info.is_main:
            return
        self.logger.record(rec)
        self.logger.scalars({"iter/train_loss": rec["train_loss"],
                             "iter/train_error": rec["train_error"], "iter/lr": lr}, st.step)
        nan = float("nan")
        self.progress.show(st.step - rec["epoch"] * self.steps_per_epoch, {
            "loss": nan if rec["train_loss"] is None else rec["train_loss"],
            "top1": nan if rec["train_top1"] is None else rec["train_top1"], "lr": lr,
            "img/s": nan if rate is None else rate})

    # -- the epoch end -----------------------------------------------------------------------

    def _end_epoch(self) -> bool:
        """Validate, record and checkpoint the epoch that just ended; True if a signal
        interrupted the validation (last.pt then holds the pending epoch end)."""
        cfg, st, info = self.cfg, self.state, self.info
        epoch = st.last_epoch
        self.progress.close()
        val, final = None, None
        if cfg.train.precise_bn:
            self._precise_bn(epoch)
        if (epoch + 1) % cfg.train.eval_every == 0 or st.step >= st.total_steps:
            val = self._validate()
            if st.step >= st.total_steps and val is not None and self.data.final is not None:
                final = self._validate(final=True)
                if final is None:  # stopped by a signal: the pending epoch end redoes both
                    val = None
            if val is None:
                self._save(("last.pt",))
                return True
        self.train_bad.collect()
        bad_paths = self.train_bad.paths
        # (an interrupted validation is redone whole: its count need not be saved)
        val_bad, val_paths = self.data.val.bad_report()
        # One collective: the epoch's sums, the skipped-run check and the unreadable-image
        # counts (each rank decodes its own shard: the counts add up).
        train = self._read(self.epoch_meter, (self.train_bad.count, float(val_bad)))
        bad, val_bad = (int(v) for v in train["extra"])
        # The plateau rule judges whole epochs: an epoch cut short by train.iterations is
        # judged at its real end if a longer run resumes it (else never: the run is over).
        whole = st.step % self.steps_per_epoch == 0
        lr = self.schedule.lr_at(st.step - 1)  # the last step's (before a plateau decision)
        self.schedule.on_epoch_end(epoch, 1.0 - val["top1"] if val and whole else None)
        improved = val is not None and val["top1"] > st.best_top1
        if improved:
            st.best_top1, st.best_epoch = val["top1"], epoch
        rec = self._epoch_record(epoch, train, val, bad, val_bad, lr)
        if info.is_main:
            self._report_epoch(rec, val, (bad_paths, val_paths))
        if final is not None:
            st.final_eval = self._report_final(epoch, final)
        self.epoch_meter.reset()
        self.timer.reset()
        self.train_bad.reset()
        st.epoch_end_pending, st.metrics = False, rec
        names = ["last.pt"] + (["best.pt"] if improved else [])
        if cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0:
            names.append(os.path.basename(ckpt_io.epoch_file(self.ckpt_dir, epoch + 1)))
        self._save(tuple(names))
        return False

    def _validate(self, final: bool = False) -> dict | None:
        """Score the weights that the checkpoint will hold (``final``: under
        data.val.final_protocol); None if a signal stopped it."""
        # DDP keeps only the parameters in sync: every rank's BatchNorm statistics differ.
        # Rank 0's are the saved ones, so every rank scores with those.
        dist_utils.broadcast_tensors(list(self.model.buffers()), self.info)
        loader = self.data.final if final else self.data.val
        val = final_val_config(self.cfg) if final else self.cfg.data.val
        views = scorer_for(val)
        common = dist_utils.min_over_ranks(len(loader), self.runtime.device, self.info)
        # Multiscale: one image a batch, each of its own size: cuDNN would autotune every
        # convolution for each (and cache them all).
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = benchmark and val.protocol != "multiscale"
        try:
            return evaluate(self.model, loader, self.data.val_prep, self.runtime, self.info,
                            views=views, stop=lambda i: i < common and self.stop.poll(i))
        finally:
            torch.backends.cudnn.benchmark = benchmark

    def _precise_bn(self, epoch: int) -> None:
        """BatchNorm statistics of the current weights over the epoch's first
        train.precise_bn batches (the same ones whatever the interruptions: resumable)."""
        cfg, device, gen = self.cfg, self.runtime.device, torch.Generator(self.runtime.device)
        batches = self.data.train.uncounted_batches(epoch, 0)  # (counted when trained on)
        # the batches as trained on: same images, same augmentation draws
        inputs = (self.data.train_prep(x.to(device, non_blocking=True),
                                       batch_generator(cfg.run.seed, epoch, i, 0, gen))
                  for i, (x, _) in zip(range(cfg.train.precise_bn), batches, strict=False))
        # Its train-mode forwards draw dropout masks: forked, the global RNG the training
        # steps use is where it was, so a pending epoch end redoing this resumes exactly.
        devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                precise_bn(self.model, inputs, self.runtime, self.info)
        finally:
            _close(batches)

    def _report_final(self, epoch: int, final: dict) -> dict:
        """The final evaluation's record: metrics.jsonl "final", TB final/*, the console."""
        protocol = self.cfg.data.val.final_protocol
        bad, paths = self.data.final.bad_report()
        bad = int(self._reduce([float(bad)])[0])  # (a collective: every rank is here)
        rec = {"kind": "final", "epoch": epoch, "global_step": self.state.step,
               "protocol": protocol, "val_loss": final["loss"], "val_top1": final["top1"],
               "val_top5": final["top5"], "val_n": final["n"], "val_bad_images": bad}
        if self.info.is_main:
            if bad:
                eg = (", e.g. " + ", ".join(paths[:3])) if paths else " (on other ranks)"
                say(f"warning: final evaluation: skipped {bad} unreadable val images{eg}")
            self.logger.record(rec)
            self.logger.scalars({"final/top1": final["top1"], "final/top5": final["top5"],
                                 "final/loss": final["loss"]}, self.state.step)
            say(f"final evaluation ({protocol}): val loss {final['loss']:.4f} top1 "
                f"{final['top1']:.4f} top5 {final['top5']:.4f} on {final['n']} images")
        return rec

    def _epoch_record(self, epoch: int, train: dict, val: dict | None, bad: int,
                      val_bad: int, lr: float) -> dict:
        timer = self.timer
        perf = {"images_per_sec": timer.images / max(timer.wall, 1e-9),
                "epoch_seconds": timer.wall,
                "data_wait_frac": timer.data_wait / max(timer.wall, 1e-9),
                "step_seconds": timer.wall / max(timer.steps, 1)}
        peak = self.runtime.peak_memory_gb()
        if peak is not None:
            perf["peak_mem_gb"] = peak
        v = val or {}
        return {"kind": "epoch", "epoch": epoch, "global_step": self.state.step, "lr": lr,
                # (None: every step of the epoch was skipped)
                **{f"train_{k}": train[k] if train["n"] else None for k in ("loss", "top1",
                                                                             "top5")},
                "val_protocol": self.cfg.data.val.protocol,
                "val_loss": v.get("loss"),
                "val_top1": v.get("top1"), "val_top5": v.get("top5"), "val_n": v.get("n"),
                **perf, "bad_images": bad, "val_bad_images": val_bad,
                "skipped_steps": train["skipped"]}

    def _report_epoch(self, rec: dict, val: dict | None, paths: tuple) -> None:
        """Rank 0: metrics.jsonl, TensorBoard and the console line of an epoch."""
        step, epoch = rec["global_step"], rec["epoch"]
        self.logger.record(rec)
        perf = ("images_per_sec", "epoch_seconds", "data_wait_frac", "step_seconds",
                "peak_mem_gb")
        self.logger.scalars({"train/loss": rec["train_loss"], "train/top1": rec["train_top1"],
                             "train/top5": rec["train_top5"], "lr": rec["lr"],
                             **{f"perf/{k}": rec[k] for k in perf if k in rec}}, step)
        if val is not None:
            self.logger.scalars({"val/loss": val["loss"], "val/top1": val["top1"],
                                 "val/top5": val["top5"]}, step)
        if self.cfg.model.log_block_norms:
            self._log_block_norms(step)
        if rec["skipped_steps"]:  # alike on every rank (decided from all-reduced gradients)
            say(f"warning: epoch {epoch}: skipped {rec['skipped_steps']} optimizer steps with "
                f"a non-finite loss or gradients (their batches are not in the train metrics)")
        for split, count, some in (("train", rec["bad_images"], paths[0]),
                                   ("val", rec["val_bad_images"], paths[1])):
            if count:
                eg = (", e.g. " + ", ".join(some[:3])) if some else " (on other ranks)"
                say(f"warning: epoch {epoch}: skipped {count} unreadable {split} images{eg}")
        val_txt = "" if val is None else (f" | val loss {val['loss']:.4f} top1 "
                                          f"{val['top1']:.4f} top5 {val['top5']:.4f}")
        mem = f", peak {rec['peak_mem_gb']:.1f} GiB" if "peak_mem_gb" in rec else ""
        train_txt = "every step skipped" if rec["train_loss"] is None else (
            f"loss {rec['train_loss']:.4f} top1 {rec['train_top1']:.4f}")
        say(f"epoch {epoch}: train {train_txt}{val_txt} | lr {rec['lr']:.4g} | "
            f"{rec['images_per_sec']:.0f} img/s, "
            f"{1e3 * rec['step_seconds']:.0f} ms/step, data wait "
            f"{100 * rec['data_wait_frac']:.0f}%{mem}, {rec['epoch_seconds']:.1f}s")

    def _log_block_norms(self, step: int, prefix: str = "block_norms/") -> None:
        """||F(x)|| / ||x|| per block on the first validation batch (eval mode, which
        leaves every buffer alone); the model's mode is put back."""
        from .models import collect_block_norms, set_report_norms
        batches = self.data.val.uncounted_batches(0, 0)  # (not a validation: not counted)
        x, _ = next(iter(batches))
        _close(batches)
        if x.dim() == 5:  # a ten-crop batch: its first view of each image
            x = x[:, 0]
        x = self.runtime.layout(self.data.val_prep(x.to(self.runtime.device)))
        was_training = self.model.training
        set_report_norms(self.model, True)
        with torch.inference_mode():
            self.model.eval()(x)
        self.model.train(was_training)
        ratios = {f"{prefix}{name}": fx / max(xn, 1e-12)
                  for name, (fx, xn) in collect_block_norms(self.model).items()}
        set_report_norms(self.model, False)  # (also forgets the values: collect first)
        self.logger.scalars(ratios, step)

    def _log_diagnostics(self, step: int) -> None:
        """run.diagnostics_every (rank 0): the step's gradient norm per stage (computed in
        TrainStep before zero_grad, all-reduced already under DDP), block norms, and BN
        gamma histograms per stage, to TensorBoard diag/*."""
        norms = self.train_step.grad_norms
        values = torch.stack(list(norms.values())).tolist() if norms else []  # one read
        self.logger.scalars({f"diag/grad_norm/{k}": v for k, v in zip(norms, values,
                                                                      strict=True)}, step)
        self._log_block_norms(step, prefix="diag/block_norms/")
        gammas = {id(m.weight) for m in self.model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None}
        self.logger.histograms({f"diag/bn_gamma/{stage}": torch.cat(
            [p.detach().flatten() for p in params if id(p) in gammas])
            for stage, params in self.train_step.grad_groups.items()
            if any(id(p) in gammas for p in params)}, step)

    # -- stopping and checkpoints ------------------------------------------------------------

    def _preempted(self, save: bool = False) -> int:
        if save:
            self._save(("last.pt",))
        if self.info.is_main:
            st = self.state
            epoch, step = divmod(st.step, self.steps_per_epoch)
            where = (f"after epoch {st.last_epoch}'s last step, before its validation"
                     if st.epoch_end_pending else f"at epoch {epoch} step {step}")
            say(f"received {self.stop.received or 'a stop signal on another rank'}: saved "
                f"{os.path.join(self.ckpt_dir, 'last.pt')} {where}; run the same command to "
                f"resume (exit code {PREEMPTED_EXIT})")
        return PREEMPTED_EXIT

    def _save(self, names: tuple[str, ...]) -> None:
        """Write the named checkpoint files. Every rank calls this at the same point and
        returns only once rank 0's files are on disk (or all raise its write error)."""
        self.train_bad.collect()
        self.state.gather_sums()
        error = None
        if self.info.is_main:
            self.logger.flush()  # what was logged up to here is not logged again on resume
            try:
                self._write(names)
            except EnvironmentFailure as e:
                error = e
        relayed = dist_utils.broadcast_object(
            None if error is None else (error.exit_code, str(error)), self.info)
        if error is not None:
            raise error
        if relayed is not None:
            raise _relayed(*relayed)

    def _write(self, names: tuple[str, ...]) -> None:
        state = self.state.state_dict()
        if not all(bool(torch.isfinite(v).all()) for v in state["model"].values()
                   if v.is_floating_point()):
            # A finite loss can still blow the weights up; never replace a good checkpoint.
            say(f"warning: weights are not finite at global step {self.state.step}; "
                f"not saving {', '.join(names)}")
            return
        # last.pt last: a crash in between leaves best/epoch files at least as new as
        # last.pt; resume takes the most advanced loadable file and writes what is missing
        # (_finish_interrupted_save).
        for name in sorted(names, key=lambda n: n == "last.pt"):
            ckpt_io.atomic_save(state, os.path.join(self.ckpt_dir, name))
        if any(n.startswith("epoch_") for n in names):
            ckpt_io.prune_epochs(self.ckpt_dir, self.cfg.checkpoint.keep_last)


def world_change_note(old: int, new: int, batch: int, old_accum: int, accum: int) -> str:
    """The note of a resume at another number of processes: the global batch and the data
    order do not change, but BatchNorm's batch (a process's micro-batch) may."""
    note = (f"note: resuming a run of {old} process(es) with {new}; the global batch and "
            f"data order are unchanged")
    before, now = batch // (old * old_accum), batch // (new * accum)
    if before == now:
        return note
    keep = old_accum * old / new
    hint = (f"; train.accum_steps={keep:.0f} with checkpoint.allow_changes=[train.accum_steps] "
            f"keeps it" if keep == int(keep) and keep >= 1 and batch % (new * keep) == 0 else "")
    return (f"{note}, BatchNorm's batch (images per process and micro-batch) is not: "
            f"{before} -> {now}{hint}")


def _close(batches) -> None:
    """Release a loader iterator (its worker pipeline) left before its end; returns None."""
    if batches is not None and hasattr(batches, "close"):
        batches.close()
    return None


def _relayed(exit_code: int, message: str) -> ResnetTrainError:
    """Rank 0's error, raised on another rank with the same message and exit code."""
    return (EnvironmentFailure if exit_code == EnvironmentFailure.exit_code else UserError)(
        message)
