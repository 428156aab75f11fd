"""Error types that name where bad input came from."""
from __future__ import annotations

from typing import Optional


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
