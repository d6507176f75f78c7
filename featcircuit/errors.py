"""The one exception type for bad user input.

The CLI turns a :class:`UserError` into a one-line message on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: the message names the bad value and what would be accepted."""
