"""Small helpers to read config mappings strictly (unknown keys are errors), and the defaults
YAMLs shipped in ``lavis_c2f/configs``.

Pure: works on ``dict`` and OmegaConf ``DictConfig`` alike (OmegaConf and PyYAML come with LAVIS).
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, Mapping, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.paths import config_path

#: the keys LAVIS itself reads from a ``model:`` node (every ``from_config`` accepts them)
LAVIS_KEYS = frozenset({"arch", "model_type", "load_finetuned", "load_pretrained", "pretrained", "finetuned"})


def to_plain(cfg: Any) -> Any:
    """OmegaConf containers -> plain dict/list with interpolations resolved; others unchanged."""
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


def yaml_defaults(rel: str, node: str) -> Dict[str, Any]:
    """The ``node:`` mapping of a defaults YAML in ``lavis_c2f/configs`` (``rel`` relative to
    it): the one place where a default value of the package is written."""
    with open(config_path(rel), "r", encoding="utf-8") as f:
        d = yaml.safe_load(f)
    if not isinstance(d, Mapping) or not isinstance(d.get(node), Mapping):
        raise ConfigError(f"{config_path(rel)}: expected a '{node}:' mapping")
    return dict(d[node])
