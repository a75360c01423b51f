"""The summary table of ``resnet-study table``: final errors per experiment, papers' form.

Runs that differ only in ``run.seed`` are repeats of one experiment; a group's errors read
``best (mean +- std)`` over its runs, as in DRL Table 6, or ``median (mean +- std)``, IM's
form (its Table 4's 4.92 (4.89 +- 0.14) leads with a number above the mean: the median of 5
runs, not the best; one run: just the number). "Final" is the last epoch
record; error = 1 - top-1. The std is the sample standard deviation.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..config import iter_keys
from ..errors import UserError
from .runs import Run, differing, experiment_keys, short_names, value_text

# He et al. 2015 ("Deep Residual Learning"), Table 6: CIFAR-10 test error (%), option A
# shortcuts, original units; ResNet-110 is "best (mean+-std)" over 5 runs.
PAPER_CIFAR10_TEST_ERROR: dict[str, tuple[float, float | None, float | None]] = {
    "resnet20": (8.75, None, None),
    "resnet32": (7.51, None, None),
    "resnet44": (7.17, None, None),
    "resnet56": (6.97, None, None),
    "resnet110": (6.43, 6.61, 0.16),
    "resnet1202": (7.93, None, None),
}


@dataclass
class Group:
    """Runs of one experiment: the grouping keys' values alike, the seed free."""

    label: str
    settings: dict
    runs: list[Run]


def grouping_keys(runs: list[Run], by: list[str] | None) -> list[str]:
    """``by`` (checked against the schema), or model.arch plus every experiment key that
    differs between the runs."""
    if by:
        known = {k for k, _, _ in iter_keys()}
        for k in by:
            if k not in known:
                raise UserError(f"--group-by: unknown config key {k!r}")
        return list(by)
    return ["model.arch"] + [k for k in differing(runs, experiment_keys()) if k != "model.arch"]


def group_runs(runs: list[Run], by: list[str] | None = None) -> list[Group]:
    """Split runs into groups by ``grouping_keys``, in order of first appearance."""
    keys = grouping_keys(runs, by)
    names = short_names(keys)
    groups: dict[str, Group] = {}
    for run in runs:
        parts = [value_text(run.get(k)) if k == "model.arch"
                 else f"{names[k]}={value_text(run.get(k))}" for k in keys]
        label = " ".join(parts)
        if label not in groups:
            groups[label] = Group(label, {k: run.get(k) for k in keys}, [])
        groups[label].runs.append(run)
    return list(groups.values())


def final_errors(run: Run) -> tuple[float | None, float | None]:
    """(train error, val error) of the last epoch record; the val error from the last epoch
    that validated when the last one did not."""
    final = run.final
    if final is None:
        return None, None
    train = None if final.get("train_top1") is None else 1.0 - final["train_top1"]
    vals = [r["val_top1"] for r in run.epochs if r.get("val_top1") is not None]
    return train, (1.0 - vals[-1] if vals else None)


def summary(values: list[float | None]) -> dict | None:
    """best (lowest), median, mean, sample std and the values; None when no value is known."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    std = statistics.stdev(known) if len(known) > 1 else None
    return {"best": min(known), "median": statistics.median(known),
            "mean": statistics.fmean(known), "std": std, "n": len(known), "values": values}


def fmt_percent(best: float, mean: float | None = None, std: float | None = None,
                scale: float = 100.0) -> str:
    """``6.43 (6.61 +- 0.16)``; just ``6.43`` without a mean and std."""
    if mean is None or std is None:
        return f"{best * scale:.2f}"
    return f"{best * scale:.2f} ({mean * scale:.2f} +- {std * scale:.2f})"


FORMS = ("best", "median")  # DRL Table 6's lead number, IM's


def _fmt(s: dict | None, form: str) -> str:
    return "-" if s is None else fmt_percent(s[form], s["mean"], s["std"])


def paper_error(run: Run) -> tuple[float, float | None, float | None] | None:
    """DRL Table 6's CIFAR-10 test error (%) for the run's network, if it is one of those,
    trained from scratch as there (IM Table 1's shortcut variants are other networks)."""
    if (run.get("data.dataset") != "cifar10" or run.get("data.val_split", "test") != "test"
            or run.get("model.shortcut") not in (None, "A")
            or run.get("model.unit") not in (None, "original") or run.get("model.width")
            or run.get("model.shortcut_variant") is not None or run.get("model.weights")
            or run.get("model.freeze") or run.get("model.zero_init_residual")):
        return None
    return PAPER_CIFAR10_TEST_ERROR.get(str(run.get("model.arch")))


def summarize(runs: list[Run], by: list[str] | None = None) -> list[dict]:
    """One row of raw numbers per group (errors as fractions, as in metrics.jsonl)."""
    rows = []
    for g in group_runs(runs, by):
        errs = [final_errors(r) for r in g.runs]
        paper = paper_error(g.runs[0])
        rows.append({
            "label": g.label, "settings": g.settings, "n_runs": len(g.runs),
            "runs": [r.path for r in g.runs], "seeds": [r.get("run.seed") for r in g.runs],
            "iterations": [r.iterations for r in g.runs],
            "train_error": summary([e[0] for e in errs]),
            "val_error": summary([e[1] for e in errs]),
            "paper_test_error_pct": None if paper is None else dict(
                zip(("best", "mean", "std"), paper, strict=True)),
        })
    return rows


def _iterations(its: list[int]) -> str:
    return str(its[0]) if len(set(its)) == 1 else f"{min(its)}-{max(its)}"


def markdown(rows: list[dict], form: str = "best") -> str:
    """The summary as a Markdown table (a paper column when any group has a paper number);
    ``form``: the lead number of repeats, "best" (DRL) or "median" (IM)."""
    paper = any(r["paper_test_error_pct"] for r in rows)
    lead = "" if form == "best" else f", {form}"
    head = ["experiment", "runs", "iterations", f"train error (%{lead})",
            f"val error (%{lead})"]
    head += ["paper test error (%)"] if paper else []
    lines = ["| " + " | ".join(head) + " |",
             "| --- | " + " | ".join("---:" for _ in head[1:]) + " |"]
    for r in rows:
        cells = [r["label"], str(r["n_runs"]), _iterations(r["iterations"]),
                 _fmt(r["train_error"], form), _fmt(r["val_error"], form)]
        if paper:
            p = r["paper_test_error_pct"]
            cells.append("-" if p is None else fmt_percent(p["best"], p["mean"], p["std"], 1.0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
