"""Command-line entry points: argument parsing and the error -> exit code mapping."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ..errors import ResnetTrainError


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
