"""resnet-train --config c.yaml [key=value ...] [--print-config] | --list-configs | --version"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..config import dump, help_text, load_config, packaged_configs
from . import run_main

DESCRIPTION = """Train a ResNet from a YAML config.

Overrides are positional dotted key=value pairs, parsed to the key's type, e.g.
  resnet-train --config configs/cifar10_resnet20.yaml optim.lr=0.05 schedule.milestones=[80,120]

A bare name (--config imagenet_r50.yaml, the .yaml optional) that is not a local file is
the config of that name shipped in the package; --list-configs lists them.

Exit codes: 0 done (or the run was already complete), 1 internal error or non-finite loss,
2 user error (config, path, data, checkpoint, a refused config change on resume, run
directory in use), 3 stopped by a signal after saving last.pt (run the same command to
resume), 4 a checkpoint could not be written (disk full, permission), 130 interrupted.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resnet-train", description=DESCRIPTION,
        epilog="config keys (type, default, help):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file, or the name of a packaged one "
                   "(base: chains are followed)")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved config and exit (the data need not exist)")
    p.add_argument("--list-configs", action="store_true",
                   help="list the packaged configs with their descriptions and exit")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if args.list_configs:
            configs = packaged_configs()
            width = max(len(name) for name, _ in configs)
            for name, description in configs:
                print(f"{name:<{width}}  {description}")
            return 0
        cfg = load_config(args.config, args.overrides, paths=not args.print_config)
        if args.print_config:
            sys.stdout.write(dump(cfg))
            return 0
        from ..trainer import Trainer
        return Trainer(cfg).fit()

    return run_main("resnet-train", body)


if __name__ == "__main__":
    sys.exit(main())
