"""Command-line entry points: argument parsing and the error -> exit code mapping."""

from __future__ import annotations

import sys
from typing import Callable

from ..errors import UserError


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a UserError becomes one line on stderr and exit code 2."""
    try:
        return body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed checkpoints are intact", file=sys.stderr)
        return 130
