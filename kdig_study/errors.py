"""The one exception type that reaches a user as a single line instead of a traceback."""

from __future__ import annotations


class KdigError(Exception):
    """Bad input or a missing resource: the message says what, where, and what is allowed.

    Command-line entry points catch it, print ``error: <message>`` and exit with status 2.
    """
