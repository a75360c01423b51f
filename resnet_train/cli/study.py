"""resnet-study table RUN_DIRS... | resnet-study degradation --out DIR [key=value ...]"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserError
from . import run_main

DESCRIPTION = """Compare finished runs.

  table   final train and val error per experiment, as "best (mean +- std)" over the runs
          that differ only in run.seed (DRL Table 6's form; --form median: IM's "median
          (mean +- std)"), with DRL's CIFAR-10 numbers where the run is one of those networks.
  degradation
          DRL's degradation experiment: plain and residual nets at several depths on one
          recipe (default: configs/cifar10_paper.yaml, depths 20 32 44 56), each an
          ordinary run under --out (rerun to resume), then the figure of DRL Fig. 6
          (degradation.png/.svg; .csv of its points) and table.md / table.json.

Exit codes: 0 done, 2 user error (a missing or unreadable run directory), 1 internal error.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnet-study", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("table", help="summary table of runs (Markdown on stdout)")
    t.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    t.add_argument("--md", metavar="OUT.md", help="also write the Markdown table here")
    t.add_argument("--json", metavar="OUT.json", help="write the raw numbers as JSON")
    t.add_argument("--form", choices=("best", "median"), default="best",
                   help="lead number of repeats: best (DRL Table 6) or median (IM's form; "
                        "the DRL paper column keeps its best)")
    t.add_argument("--group-by", action="append", metavar="KEY",
                   help="config key(s) that define an experiment (repeat, or comma-separate); "
                        "default: model.arch plus every model/data/recipe key that differs")
    d = sub.add_parser("degradation", help="train plain vs ResNet at several depths; figure")
    d.add_argument("--out", required=True, metavar="DIR", help="study directory (one run each)")
    d.add_argument("--config", help="base recipe (default: the packaged cifar10_paper.yaml)")
    d.add_argument("--depths", default="20,32,44,56", help="comma-separated, 6n+2 (default: "
                                                             "%(default)s)")
    d.add_argument("--families", default="plain,resnet", help="default: %(default)s")
    d.add_argument("--seeds", type=int, default=1, help="runs per net, seeds 0..N-1")
    d.add_argument("--title", default="", help="a first line for the figure (setting, machine)")
    d.add_argument("--report-only", action="store_true",
                   help="only redraw the figure and table from the runs there")
    d.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every run (e.g. data.dataset=synthetic)")
    return p


def _default_config() -> str:
    from ..config import resolve_config_path
    return resolve_config_path("cifar10_paper.yaml")  # the packaged recipe


def degradation(args: argparse.Namespace) -> int:
    from ..study import degradation as study
    try:
        depths = [int(v) for v in args.depths.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--depths {args.depths!r}: expected comma-separated integers") from None
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    planned = study.plan(args.out, args.config or _default_config(), args.overrides, depths,
                         families, args.seeds)
    if not args.report_only:
        study.train_all(planned)
    study.report(args.out, planned, depths, title=args.title)
    return 0


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from None


def table(args: argparse.Namespace) -> int:
    """Print the summary table; write --md / --json."""
    from ..study.runs import load_runs
    from ..study.table import markdown, summarize
    by = [k.strip() for arg in args.group_by or [] for k in arg.split(",") if k.strip()]
    rows = summarize(load_runs(args.runs), by or None)
    text = markdown(rows, args.form)
    sys.stdout.write(text)
    if args.md:
        _write(args.md, text)
    if args.json:
        _write(args.json, json.dumps({"error_unit": "fraction", "groups": rows}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main("resnet-study", lambda: (degradation if args.command == "degradation"
                                             else table)(args))


if __name__ == "__main__":
    sys.exit(main())
