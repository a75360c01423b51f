"""resnet-study table RUN_DIRS... [--md OUT.md] [--json OUT.json] [--group-by KEY]"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserError
from . import run_main

DESCRIPTION = """Compare finished runs.

  table   final train and val error per experiment, as "best (mean +- std)" over the runs
          that differ only in run.seed (DRL Table 6's form), with DRL's CIFAR-10 numbers
          where the run is one of those networks.

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
    t.add_argument("--group-by", action="append", metavar="KEY",
                   help="config key(s) that define an experiment (repeat, or comma-separate); "
                        "default: model.arch plus every model/data/recipe key that differs")
    return p


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
    text = markdown(rows)
    sys.stdout.write(text)
    if args.md:
        _write(args.md, text)
    if args.json:
        _write(args.json, json.dumps({"error_unit": "fraction", "groups": rows}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main("resnet-study", lambda: table(args))


if __name__ == "__main__":
    sys.exit(main())
