"""Small helpers to read config mappings strictly (unknown keys are errors).

Pure: works on ``dict`` and OmegaConf ``DictConfig`` alike, imports nothing heavy.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, Mapping, Optional

from lavis_c2f.common.errors import ConfigError


def to_plain(cfg: Any) -> Any:
    """OmegaConf containers -> plain dict/list with interpolations resolved; others unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a LAVIS dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def check_keys(cfg: Optional[Mapping[str, Any]], allowed: Iterable[str], where: str) -> Dict[str, Any]:
    """``cfg`` as a plain dict; raises :class:`ConfigError` naming every unknown key (with a
    close match) and ``where`` (e.g. ``"datasets.c2f_qvh"``)."""
    if cfg is None:
        return {}
    d = to_plain(cfg)
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    allowed = set(allowed)
    unknown = sorted(set(map(str, d)) - allowed)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(allowed), n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: {', '.join(sorted(allowed))}")
    return dict(d)
