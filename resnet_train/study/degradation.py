"""``resnet-study degradation``: plain and residual nets of several depths on one recipe,
the runs, the figure of DRL Fig. 6 and the summary table (He et al. 2015, Sec. 4.2).

Each (family, depth, seed) is one ordinary run in ``STUDY/<arch>_s<seed>``, trained in
this process by the same Trainer as ``resnet-train``; rerunning the command resumes the
unfinished ones and skips the complete ones (a complete run exits at once). The study
turns precise BatchNorm statistics on (``train.precise_bn``) unless told otherwise: the
running averages misjudge plain nets early in training (README, "Precise BatchNorm
statistics"), which would bend the test curves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import UserError
from .plot import MatplotlibMissing, Series, new_figure, run_series, save_figure, write_csv
from .runs import load_run
from .table import markdown, summarize

FAMILIES = ("plain", "resnet")
DEFAULT_DEPTHS = (20, 32, 44, 56)
PRECISE_BN = 20  # batches, unless the overrides say otherwise


@dataclass(frozen=True)
class Planned:
    family: str
    depth: int
    seed: int
    run_dir: str
    args: list[str]  # resnet-train's argv


def plan(out: str, config: str | None, overrides: list[str], depths, families,
         seeds: int) -> list[Planned]:
    """One run per family x depth x seed, seeds 0..seeds-1, in that order."""
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: at least one run per depth")
    for f in families:
        if f not in FAMILIES:
            raise UserError(f"--families: {f!r} is not one of {', '.join(FAMILIES)}")
    extra = list(overrides)
    if not any(o.split("=", 1)[0] == "train.precise_bn" for o in extra):
        extra.append(f"train.precise_bn={PRECISE_BN}")
    runs = []
    for family in families:
        for depth in depths:
            for seed in range(seeds):
                d = os.path.join(out, f"{family}{depth}_s{seed}")
                args = ([] if config is None else ["--config", config]) + extra + [
                    f"model.arch={family}{depth}", f"run.seed={seed}", f"run.dir={d}",
                    f"run.name={family}{depth}_s{seed}"]
                runs.append(Planned(family, depth, seed, d, args))
    return runs


def train_all(planned: list[Planned], say=print) -> None:
    """Train (or resume, or skip) each run in turn; stop at the first that fails, with
    its exit code (a user error, a signal: rerun the command to go on)."""
    from ..cli import train as train_cli
    for i, p in enumerate(planned, 1):
        say(f"[{i}/{len(planned)}] {p.family}-{p.depth} seed {p.seed}: {p.run_dir}")
        code = train_cli.main(p.args)
        if code != 0:
            raise StudyStopped(code, f"{p.run_dir}: resnet-train exited {code}; rerun the same "
                                     f"command to resume the study")


class StudyStopped(UserError):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.exit_code = code


def series(planned: list[Planned]) -> list[Series]:
    """The figure's curves: every run's training and test error against iterations,
    labelled "<family>-<depth>" (seeds of one depth share the label and colour)."""
    out = []
    for p in planned:
        if os.path.isfile(os.path.join(p.run_dir, "metrics.jsonl")):
            out += run_series(load_run(p.run_dir), f"{p.family}-{p.depth}", "error")
    return out


def draw(path: str, curves: list[Series], depths, title: str = "") -> None:
    """DRL Fig. 6: plain nets left, ResNets right; thin training error, bold test error
    against iterations, one colour per depth, linear axes."""
    fig = new_figure((11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    colour = {d: f"C{i % 10}" for i, d in enumerate(depths)}
    for ax, family in zip(axes, FAMILIES, strict=True):
        seen = set()
        for s in curves:
            fam, depth = s.label.split("-")
            if fam != family:
                continue
            bold = s.kind == "val"  # one legend entry per depth: its first test curve
            label = s.label if bold and s.label not in seen else None
            if bold:
                seen.add(s.label)
            ax.plot(s.steps, [100 * v for v in s.values], color=colour[int(depth)],
                    lw=2.0 if bold else 0.7, alpha=1.0 if bold else 0.6, label=label)
        ax.set_title("plain networks" if family == "plain" else "ResNets", fontsize=11)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    axes[0].set_ylabel("error (%)")
    fig.suptitle((title + "\n" if title else "") + "thin: training error, bold: test error",
                 fontsize=10)
    save_figure(fig, path)


def report(out: str, planned: list[Planned], depths, say=print, title: str = "") -> dict:
    """degradation.csv, degradation.png/.svg (with matplotlib), table.md and table.json."""
    curves = series(planned)
    if not curves:
        raise UserError(f"{out}: no run has metrics yet")
    csv_path = os.path.join(out, "degradation.csv")
    write_csv(csv_path, curves, "error")
    written = [csv_path]
    try:
        for ext in (".png", ".svg"):
            draw(os.path.join(out, "degradation" + ext), curves, depths, title)
            written.append(os.path.join(out, "degradation" + ext))
    except MatplotlibMissing as e:
        say(f"resnet-study: {e} (the CSV and the table are still written)")
    runs = [load_run(p.run_dir) for p in planned
            if os.path.isfile(os.path.join(p.run_dir, "metrics.jsonl"))]
    rows = summarize(runs, ["model.arch"])
    for name, text in (("table.md", markdown(rows)), ("table.json", json.dumps(
            {"error_unit": "fraction", "groups": rows}, indent=2) + "\n")):
        path = os.path.join(out, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        written.append(path)
    say("wrote " + ", ".join(written))
    return {"rows": rows, "written": written}
