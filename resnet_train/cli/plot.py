"""resnet-plot RUN_DIRS... --out FILE.png [--x iter|epoch] [--y error|loss] [--csv OUT.csv]"""

from __future__ import annotations

import argparse
import sys

from . import run_main

DESCRIPTION = """Overlay the training curves of runs in one figure (PNG, or SVG for .svg).

Thin lines: training error (or loss) per log point; bold: validation error at each epoch
end; one colour per run. Needs matplotlib (pip install "resnet-train[plot]"); --csv writes
the plotted points even without it.

Exit codes: 0 done, 2 user error (missing run directory, bad --out, matplotlib missing).
"""


def parser() -> argparse.ArgumentParser:
    from ..study.plot import X_AXES, Y_METRICS
    p = argparse.ArgumentParser(prog="resnet-plot", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", required=True, metavar="FILE.png", help="figure file (.png, .svg)")
    p.add_argument("--x", choices=X_AXES, default="iter", help="x axis (default: iter)")
    p.add_argument("--y", choices=Y_METRICS, default="error", help="y axis (default: error)")
    p.add_argument("--csv", metavar="OUT.csv", help="also write the plotted points as CSV")
    return p


def plot(args: argparse.Namespace) -> int:
    """Write the CSV (if asked), then the figure."""
    from ..errors import UserError
    from ..study.plot import check_out, draw, run_series, write_csv
    from ..study.runs import load_runs, run_labels
    check_out(args.out)
    runs = load_runs(args.runs)
    series = [s for run, label in zip(runs, run_labels(runs), strict=True)
              for s in run_series(run, label, args.y)]
    if args.csv:
        write_csv(args.csv, series, args.y)
    if not series:
        raise UserError(f"nothing to plot: no {args.y} values in {', '.join(args.runs)}")
    draw(args.out, series, args.x, args.y)
    print(f"wrote {args.out}" + (f" and {args.csv}" if args.csv else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..study.plot import MatplotlibMissing
    args = parser().parse_args(argv)

    def body() -> int:
        try:
            return plot(args)
        except MatplotlibMissing as e:
            # The install hint is the whole message: no "error:" prefix.
            note = " (the CSV was still written)" if args.csv else ""
            print(f"resnet-plot: {e}{note}", file=sys.stderr)
            return e.exit_code

    return run_main("resnet-plot", body)


if __name__ == "__main__":
    sys.exit(main())
