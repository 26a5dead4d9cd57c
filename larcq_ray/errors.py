"""The one exception type users see: a clear message naming the problem, no traceback."""


class LarcqError(Exception):
    """A problem with the user's input, config or environment, stated in one message."""
