#!/usr/bin/env python
"""The README's experiment table, from resnet_train/study/experiments.py.

  python scripts/experiment_table.py           print it
  python scripts/experiment_table.py --write   rewrite it in README.md
  python scripts/experiment_table.py --check   exit 1 if README.md's copy is stale
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_train.study.experiments import EXPERIMENTS, NOT_COVERED  # noqa: E402

BEGIN, END = "<!-- experiments:begin -->", "<!-- experiments:end -->"
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def table() -> str:
    lines = ["| paper | where | row | config | paper's number | measured here |",
             "| --- | --- | --- | --- | --- | --- |"]
    for e in EXPERIMENTS:
        cfg = f"`{e.config}.yaml`" + (f", then `{e.how}`" if e.how.startswith("resnet-")
                                      else f" ({e.how})" if e.how else "")
        lines.append(f"| {e.paper} | {e.where} | {e.row} | {cfg} | {e.number} | {e.measured} |")
    lines += ["", "Not covered: " + "; ".join(NOT_COVERED) + "."]
    return "\n".join(lines)


def main() -> int:
    new = f"{BEGIN}\n{table()}\n{END}"
    if not {"--write", "--check"} & set(sys.argv):
        print(table())
        return 0
    with open(README, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} block")
        return 1
    start, end = text.index(BEGIN), text.index(END) + len(END)
    if "--check" in sys.argv:
        if text[start:end] != new:
            print("README.md experiment table is stale: run scripts/experiment_table.py --write")
            return 1
        return 0
    with open(README, "w", encoding="utf-8") as f:
        f.write(text[:start] + new + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
