"""User errors: one line on stderr, exit code 2, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad config, path, data, checkpoint); exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """Bad key, type or value in a config."""


class DataError(UserError):
    """Missing, empty or malformed data."""


class CheckpointError(UserError):
    """Unreadable or mismatched checkpoint."""
