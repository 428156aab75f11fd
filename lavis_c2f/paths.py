"""The one place that turns package-relative paths into absolute ones.

LAVIS resolves relative config paths against its own installed ``lavis/`` folder and
its default cache root points at a foreign absolute path.  Everything this package
hands to LAVIS therefore goes through :func:`config_path` (package data) or
:func:`resolve_path` (user paths), which always return absolute paths.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

from lavis_c2f.common.errors import ConfigError

PathLike = Union[str, os.PathLike]

PACKAGE_ROOT = Path(__file__).resolve().parent
CONFIG_ROOT = PACKAGE_ROOT / "configs"
PROJECT_ROOT = PACKAGE_ROOT.parent  # the checkout when installed with ``pip install -e .``


def config_path(rel: PathLike) -> str:
    """Absolute path of a YAML shipped in ``lavis_c2f/configs``.

    ``rel`` is relative to ``lavis_c2f/configs`` (e.g. ``"models/c2f_qd_detr.yaml"``).
    Raises ``FileNotFoundError`` naming the folder searched when it does not exist.
    """
    p = Path(rel)
    if p.is_absolute():
        out = p
    else:
        parts = p.parts
        if parts and parts[0] == "configs":  # tolerate "configs/models/x.yaml"
            p = Path(*parts[1:])
        out = CONFIG_ROOT / p
    if not out.is_file():
        raise FileNotFoundError(f"config file '{rel}' not found (looked for {out})")
    return str(out)



def table_config_path(owner: str, table: Mapping[str, str], type: str = "default") -> str:  # noqa: A002
    """Absolute path of the YAML named ``table[type]`` (a LAVIS ``*_CONFIG_DICT``), or a
    :class:`~lavis_c2f.common.errors.ConfigError` naming ``owner`` and the known types."""
    if type not in table:
        raise ConfigError(f"{owner}: unknown dataset config type {type!r}; known: {sorted(table)}")
    return config_path(table[type])

def resolve_path(path: PathLike, base: Optional[PathLike] = None) -> str:
    """Expand ``~`` and ``$VARS`` and make ``path`` absolute (relative to ``base`` or cwd)."""
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    if not p.is_absolute():
        p = Path(base if base is not None else os.getcwd()) / p
    return str(p.resolve())


def cache_root() -> str:
    """Cache folder for this package: ``$C2F_CACHE`` or ``~/.cache/lavis_c2f`` (absolute)."""
    return resolve_path(os.environ.get("C2F_CACHE", "~/.cache/lavis_c2f"))


def register_lavis_paths() -> None:
    """Point LAVIS's ``cache_root`` at :func:`cache_root` instead of its foreign default.

    ``library_root`` is left alone: LAVIS's own models resolve their configs with it.
    """
    from lavis.common.registry import registry

    registry.mapping["paths"]["cache_root"] = cache_root()
