"""Exceptions -> one-line messages the demo shows instead of tracebacks (pure python).

:func:`describe_error` knows the package's user-facing errors (bad files, mismatched checkpoints
or backbones, undecodable videos, bad queries); anything else is an unexpected error whose
message says so and points at the server log (the app logs its traceback there).
"""
from __future__ import annotations

import os
from typing import Tuple

from lavis_c2f.common.errors import VideoDecodeError, user_message


class UserError(Exception):
    """A problem with what the user typed or chose (shown as is)."""


def check_query(text: object) -> str:
    """The query with white space collapsed; :class:`UserError` when nothing is left."""
    q = " ".join(str(text or "").split())
    if not q:
        raise UserError("Type a query first: the query box is empty.")
    return q


def describe_error(exc: BaseException) -> Tuple[str, bool]:
    """``(message, expected)`` for the UI.

    ``expected`` is False for errors the package does not raise on bad input (bugs, resource
    exhaustion): their message names the exception type and says the traceback is in the log.
    """
    if isinstance(exc, VideoDecodeError):
        return f"Cannot read the video {os.path.basename(exc.path) or exc.path}: {exc.reason}", True
    if isinstance(exc, UserError):
        return str(exc), True
    if isinstance(exc, ValueError) and str(exc).strip() == "the query is empty":
        return "Type a query first: the query box is empty.", True
    if isinstance(exc, KeyError):
        return str(exc.args[0] if exc.args else exc), True
    msg = user_message(exc)
    if msg is not None:   # bad files and options, the predictor's argument checks
        return msg, True
    if isinstance(exc, MemoryError):
        return "Out of memory: try a shorter video or fewer results.", False
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"Unexpected error ({type(exc).__name__}{': ' + detail if detail else ''}). The traceback is in "
            "the server's log."), False


__all__ = ["UserError", "check_query", "describe_error"]
