"""`UsageError`: a mistake in what was asked, as opposed to a bug.

Raised for an argument, a problem, a file or a path that cannot be used as given: the `workbench`
command line prints its message in one line and exits 2, while any other exception is a bug and
shows its traceback. It is a ValueError, so library callers that catch ValueError still do. It lives
in the lowest package so that every layer (kernels, database, autotune, ...) can raise it.
"""

from __future__ import annotations


class UsageError(ValueError):
    """What was asked cannot be done as given: the message says which argument, value or path, and why."""
