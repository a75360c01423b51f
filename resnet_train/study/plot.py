"""Training curves of several runs in one figure, the papers' way (DRL Fig. 1, 4, 6).

Thin lines: training error from the per-iteration ``step`` records (the epoch records when a
run has none); bold lines: validation error from the epoch records, at their global step.
One colour per run. matplotlib (the ``plot`` extra) is imported only to draw.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from ..errors import UserError
from .runs import Run

X_AXES = ("iter", "epoch")
Y_METRICS = ("error", "loss")
FORMATS = (".png", ".svg")
INSTALL_HINT = 'matplotlib is not installed; pip install "resnet-train[plot]"'


class MatplotlibMissing(UserError):
    """The plot extra is not installed."""


@dataclass
class Series:
    """One curve: a run's training or validation error (or loss) against the step."""

    label: str
    run: str
    kind: str  # "train" or "val"
    steps: list[int]
    epochs: list[float]
    values: list[float]

    def x(self, axis: str) -> list[float]:
        return list(self.steps) if axis == "iter" else list(self.epochs)


def _train_value(rec: dict, y: str) -> float | None:
    if y == "loss":
        return rec.get("train_loss")
    if rec.get("train_error") is not None:
        return rec["train_error"]
    top1 = rec.get("train_top1")
    return None if top1 is None else 1.0 - top1


def _val_value(rec: dict, y: str) -> float | None:
    if y == "loss":
        return rec.get("val_loss")
    top1 = rec.get("val_top1")
    return None if top1 is None else 1.0 - top1


def _epoch_of(run: Run, rec: dict, per_epoch: float | None) -> float:
    """Epochs done at a record: step / steps per epoch, epoch records too (a last epoch cut
    short by train.iterations ends where its steps end, e.g. 164.1 for 64k iterations of
    390), else epoch + 1."""
    if per_epoch:
        return rec["global_step"] / per_epoch
    return float(rec.get("epoch", 0) + 1)


def _series(run: Run, label: str, kind: str, recs: list[dict], y: str) -> Series:
    value = _train_value if kind == "train" else _val_value
    per_epoch = run.steps_per_epoch
    s = Series(label, run.path, kind, [], [], [])
    for rec in recs:
        v = value(rec, y)
        if v is None or rec.get("global_step") is None:
            continue
        s.steps.append(rec["global_step"])
        s.epochs.append(_epoch_of(run, rec, per_epoch))
        s.values.append(v)
    return s


def run_series(run: Run, label: str, y: str = "error") -> list[Series]:
    """The run's training curve (step records, else epoch records) and validation curve."""
    train = _series(run, label, "train", run.steps, y)
    if not train.values:
        train = _series(run, label, "train", run.epochs, y)
    return [s for s in (train, _series(run, label, "val", run.epochs, y)) if s.values]


def write_csv(path: str, series: list[Series], y: str) -> None:
    """One row per plotted point: label, run, series, global_step, epoch, value."""
    try:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["label", "run", "series", "global_step", "epoch", y])
            for s in series:
                for step, ep, v in zip(s.steps, s.epochs, s.values, strict=True):
                    w.writerow([s.label, s.run, s.kind, step, repr(ep), repr(v)])
    except OSError as e:
        raise UserError(f"{path}: cannot write the CSV: {e.strerror or e}") from None


def check_out(path: str) -> None:
    """--out must name a .png or .svg file."""
    if os.path.splitext(path)[1].lower() not in FORMATS:
        raise UserError(f"--out {path}: expected a file name ending in .png or .svg")


def draw(path: str, series: list[Series], x: str, y: str) -> None:
    """Draw the curves into ``path`` (PNG or SVG by its extension) with the Agg canvas."""
    fig = new_figure((8, 5))
    ax = fig.add_subplot()
    colours: dict[str, str] = {}
    scale = 100.0 if y == "error" else 1.0
    for s in series:
        c = colours.setdefault(s.label, f"C{len(colours) % 10}")
        bold = s.kind == "val"
        ax.plot(s.x(x), [v * scale for v in s.values], color=c, lw=2.2 if bold else 0.8,
                alpha=1.0 if bold else 0.7, label=s.label if bold or not _has_val(series, s)
                else None)
    ax.set_xlabel("iterations" if x == "iter" else "epochs")
    ax.set_ylabel("error (%)" if y == "error" else "loss")
    ax.set_title(f"thin: training {y}, bold: validation {y}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    save_figure(fig, path)


def new_figure(size: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas (no display needed); MatplotlibMissing (exit 2,
    the install hint) without the plot extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(INSTALL_HINT) from None
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str) -> None:
    """Lay out and write ``fig`` (PNG or SVG by the extension); a failed write is exit 2."""
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise UserError(f"{path}: cannot write the figure: {e.strerror or e}") from None


def _has_val(series: list[Series], s: Series) -> bool:
    return any(o.label == s.label and o.kind == "val" for o in series)
