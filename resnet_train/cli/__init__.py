"""Command-line entry points: argument parsing and the error -> exit code mapping."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

from ..errors import ResnetTrainError, UserError, describe_os_error


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a ResnetTrainError becomes one line on stderr and its ``exit_code``.

    2 for a UserError, 4 for an EnvironmentFailure (disk full, permission denied, ...).
    """
    try:
        return body()
    except ResnetTrainError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # e.g. resnet-train --list-configs | head: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed checkpoints are intact", file=sys.stderr)
        return 130


def write_json(path: str, obj, what: str = "--json") -> None:
    """``obj`` as indented JSON at ``path``; an OS failure is a one-line UserError."""
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write ({describe_os_error(e)})") from None
