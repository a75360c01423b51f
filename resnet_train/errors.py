"""Expected failures: one line on stderr, a documented exit code, no traceback.

``run_main`` catches ``ResnetTrainError`` and exits with the instance's ``exit_code``:
2 for a ``UserError`` (the user can fix the config, path, data or checkpoint), 4 for an
``EnvironmentFailure`` (the machine failed: disk full, quota, permission denied, I/O error).
Anything else is a bug: exit code 1 with a traceback.
"""


class ResnetTrainError(Exception):
    """Base of the errors reported as one line on stderr; never raised itself."""

    exit_code = 1


class UserError(ResnetTrainError):
    """A mistake the user can fix (bad config, path, data, checkpoint); exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """Bad key, type or value in a config."""


class DataError(UserError):
    """Missing, empty or malformed data."""


class CheckpointError(UserError):
    """Unreadable or mismatched checkpoint."""


class RunDirInUse(UserError):
    """Another live process holds the run directory's lock."""


class EnvironmentFailure(ResnetTrainError):
    """The operating system refused a write (disk full, quota, permission, I/O); exit code 4."""

    exit_code = 4


class CheckpointWriteError(EnvironmentFailure, OSError):
    """A checkpoint could not be written; the file it would have replaced is intact.

    Also an OSError, so code that handles failed writes as OSError keeps working; ``errno``
    is the underlying error's.
    """


def describe_os_error(e: OSError) -> str:
    """``[Errno 28] No space left on device``: the error without the (temp) file name."""
    if e.errno is not None and e.strerror:
        return f"[Errno {e.errno}] {e.strerror}"
    return str(e) or type(e).__name__
