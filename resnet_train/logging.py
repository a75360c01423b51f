"""Where numbers go: TensorBoard, metrics.jsonl and the console (tqdm bar or plain lines)."""

from __future__ import annotations

import json
import math
import os
import sys

from tqdm import tqdm


def say(msg: str) -> None:
    """A console line that doesn't tear an active tqdm bar."""
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


class RunLogger:
    """Rank 0's writer of metrics.jsonl and TensorBoard scalars; inert on other ranks."""

    def __init__(self, run_dir: str, enabled: bool, resume_step: int = 0,
                 redo_epoch_end: bool = False):
        """``resume_step``: the global step training starts from (0 for a fresh start, which
        forgets what a run killed before its first checkpoint logged); ``redo_epoch_end``:
        the resumed run starts by redoing the epoch end at that step (its checkpoint was
        saved while it was pending), so the epoch and final records there go too: a run
        stopped after writing them, before its next save, must not leave them twice."""
        self.enabled = enabled
        self.tb = None
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if not enabled:
            return
        self._drop_after(resume_step, redo_epoch_end)
        from torch.utils.tensorboard import SummaryWriter
        # purge_step hides events from steps that this run repeats; events are logged at
        # the global step reached, so those at resume_step itself are kept.
        self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1)

    def _drop_after(self, step: int, redo_epoch_end: bool) -> None:
        """Forget metric lines past global step ``step`` (and the epoch end's at ``step``
        when it is redone): the resumed run writes them again."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as fh:
            lines = [ln for ln in fh if ln.strip()]
        keep = []
        for ln in lines:
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            at = rec.get("global_step", 0)
            if at < step or (at == step and not (
                    redo_epoch_end and rec.get("kind") in ("epoch", "final"))):
                keep.append(json.dumps(rec) + "\n")
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(keep)
        os.replace(tmp, self.metrics_path)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def histograms(self, values: dict, step: int) -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            self.tb.add_histogram(k, v.detach().float().cpu(), step)

    def record(self, rec: dict) -> None:
        """Append one JSON object to metrics.jsonl."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

    def flush(self) -> None:
        """Put the queued TensorBoard events on disk (SummaryWriter itself waits up to 120 s):
        before a checkpoint, as a resumed run never logs the steps up to it again."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


class Progress:
    """Per-epoch progress: a tqdm bar on a terminal, a plain line at each log point otherwise.

    ``tick`` (every step) only moves the bar; ``show`` (at log points, where the trainer has
    read its meters anyway) prints values, so progress never costs a device sync.
    """

    def __init__(self, mode: str, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.bar = None
        self.epoch, self.total = 0, 0

    def start(self, epoch: int, total: int, start: int) -> None:
        self.close()
        self.epoch, self.total = epoch, total
        if self.mode == "bar":
            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch}", dynamic_ncols=True,
                            leave=False, file=sys.stdout)

    def tick(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, step: int, values: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=True)
        elif self.mode == "lines":
            body = " ".join(f"{k} {_fmt(v)}" for k, v in values.items())
            say(f"epoch {self.epoch} step {step}/{self.total} {body}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(v: float) -> str:
    if isinstance(v, int) or (abs(v) >= 100 and float(v).is_integer()):
        return f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.4g}"
