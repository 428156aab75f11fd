"""Error types that name where bad input came from."""
from __future__ import annotations

from typing import Optional, Tuple


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


def user_error_types() -> Tuple[type, ...]:
    """The exceptions the package raises for bad input: files, options, queries (``ValueError``,
    ``KeyError`` and their subclasses such as :class:`ConfigError`, :class:`DataFormatError` and
    ``IndexMismatchError``), missing or unreadable paths, mismatched checkpoints and undecodable
    videos. ``lavis-c2f search`` / ``annotate`` and the web demo report these in one line instead
    of a traceback."""
    from lavis_c2f.models.checkpoint_utils import CheckpointMismatchError
    from lavis_c2f.models.grounder.checkpoint import CheckpointMismatchError as GrounderMismatchError
    from lavis_c2f.video.decode import VideoDecodeError

    return (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
            VideoDecodeError, CheckpointMismatchError, GrounderMismatchError)
