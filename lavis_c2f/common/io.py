"""Atomic writes and line-numbered JSON-lines reading.

Every result file of this package is written to a temporary name in the same folder and
renamed into place, so an interrupted run never leaves a half-written file and never
destroys a previous result.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

from lavis_c2f.common.errors import DataFormatError


@contextlib.contextmanager
def atomic_path(path: "os.PathLike | str") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: "os.PathLike | str", mode: str = "w", **kwargs):
    """``open`` that writes to a temporary file and renames it onto ``path`` on success."""
    if "r" in mode or "a" in mode:
        raise ValueError("atomic_open is for writing ('w' or 'wb') only")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json(obj: Any, path: "os.PathLike | str", indent: Optional[int] = 2) -> str:
    """Write ``obj`` as JSON atomically; returns the path."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
    return str(path)


def write_jsonl(rows: Iterable[Any], path: "os.PathLike | str") -> str:
    """Write one JSON object per line atomically; returns the path."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row))
            f.write("\n")
    return str(path)


def read_json(path: "os.PathLike | str") -> Any:
    """Read a JSON file; a missing file or bad JSON raises :class:`DataFormatError` naming it."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataFormatError("file not found", path=path)
    with open(path, "r", encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"invalid JSON: {e.msg} (column {e.colno})", path=path,
                                  line=e.lineno) from None


def iter_jsonl(path: "os.PathLike | str") -> Iterator[Tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file.

    A missing file or a line that is not valid JSON raises :class:`DataFormatError`
    naming the file and the 1-based line.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataFormatError("file not found", path=path)
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"invalid JSON: {e.msg} (column {e.colno})", path=path,
                                      line=lineno) from None


def read_jsonl(path: "os.PathLike | str") -> List[Any]:
    """All objects of a JSON-lines file (see :func:`iter_jsonl` for errors)."""
    return [obj for _, obj in iter_jsonl(path)]
