"""Error types that name where bad input came from, and the one rule that turns them into a
one-line message.

Every user-facing error of the package is defined here (or subclasses one defined here), so
that the layer that reports errors (:func:`user_message`: the ``lavis-c2f`` commands and the
web demo) needs no import of the layers that raise them.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple


class DataFormatError(ValueError):
    """Bad input data. The message always names the file and, where known, the line and field.

    Attributes ``path``, ``line`` (1-based) and ``field`` are kept for programmatic use.
    """

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None,
                 field: Optional[str] = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model (strict loading); the message lists them.

    Attributes ``missing`` and ``unexpected`` (state-dict keys) and ``mismatched``
    (``(key, checkpoint shape, model shape)``) hold the full lists; the message shows at most
    :attr:`SHOWN` of each.
    """

    SHOWN = 30

    def __init__(self, source: str, missing: Iterable[str], unexpected: Iterable[str],
                 mismatched: Iterable[Tuple[str, Sequence[int], Sequence[int]]]):
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.mismatched = [(str(k), tuple(a), tuple(b)) for k, a, b in mismatched]
        n = self.SHOWN
        lines = [f"checkpoint {source} does not match the model:"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {name} keys ({len(keys)}): {', '.join(keys[:n])}" + (" ..." if len(keys) > n else ""))
        for key, got, want in self.mismatched[:n]:
            lines.append(f"  shape mismatch for {key}: checkpoint {got} vs model {want}")
        super().__init__("\n".join(lines))


class VideoDecodeError(RuntimeError):
    """A video file cannot be probed or decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.reason))


class IndexUnavailableError(ConnectionError):
    """A remote index store (a Milvus server) cannot be reached or stopped answering; the message
    names the store (its URI) and the time waited."""


#: What the package raises for bad input: files, options, queries (``ValueError``, ``KeyError``
#: and their subclasses such as :class:`ConfigError`, :class:`DataFormatError` and the index's
#: ``IndexMismatchError``), missing or unreadable paths, mismatched checkpoints, undecodable videos, an unreachable index store.
USER_ERRORS: Tuple[type, ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                 PermissionError, VideoDecodeError, CheckpointMismatchError, IndexUnavailableError)


def user_message(exc: BaseException) -> Optional[str]:
    """The one-line (or, for a checkpoint mismatch, key-listing) message of a user error, or
    None when ``exc`` is not one (a bug or resource exhaustion: let its traceback show).
    A ``KeyError`` gives its message without the quotes ``str(KeyError)`` adds."""
    if not isinstance(exc, USER_ERRORS):
        return None
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


__all__: List[str] = ["CheckpointMismatchError", "ConfigError", "DataFormatError", "IndexUnavailableError", "USER_ERRORS",
                      "VideoDecodeError", "user_message"]
