"""One exception for problems with the user's files and flags, and how scripts report it.

A `UsageError` message is one line: the path, what is wrong, and what to do. Scripts wrap `main` in
`exit_on_usage_error`, so such a problem prints `error: ...` and exits with status 2 instead of a traceback;
genuine bugs still raise with their traceback.
"""

from __future__ import annotations

import functools
import sys


class UsageError(ValueError):
    """A bad input file or flag combination; the message tells the user what to do."""


def exit_on_usage_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper
