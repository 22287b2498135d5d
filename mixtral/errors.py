"""The one exception type for mistakes a user can fix: the CLI prints its message and exits 2."""


class MixtralError(Exception):
    """A user-facing error whose message names the problem and the fix."""
