"""The one exception type users see: a clear message naming the problem, no traceback."""

from __future__ import annotations


class LarcqError(Exception):
    """A problem with the user's input, config or environment, stated in one message."""


def user_message(exc: BaseException) -> str | None:
    """The LarcqError message behind an exception, also when Ray wrapped it in a task or actor
    error (as its cause, in its args, or flattened into its text); None when there is none."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LarcqError):
            return str(e)
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        stack += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    text = str(exc)
    if "LarcqError: " in text:
        return text.split("LarcqError: ", 1)[1].strip().splitlines()[0]
    return None
