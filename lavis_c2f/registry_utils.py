"""Registry lookups that fail loudly for unknown ``c2f_`` names.

LAVIS's ``registry.get_*_class`` return ``None`` for unknown names, which later turns into
an ``AttributeError: 'NoneType' ...`` far from the cause.  :func:`install_lookup_errors`
wraps those lookups so that an unknown name starting with ``c2f_`` raises a ``KeyError``
listing the known ``c2f_`` names of that kind.  Names of LAVIS's own components behave
exactly as before. Optional components in :data:`LAZY_COMPONENTS` (the stage-3 refiner) are
imported the first time their name is looked up, so ``import lavis_c2f`` stays free of them.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Dict, List, Tuple

from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_c2f.common.errors import ConfigError

PREFIX = "c2f_"

# Optional components registered only when first looked up (their imports are heavy or
# optional): name -> (registry kind, module whose import registers it).
LAZY_COMPONENTS: Dict[str, Tuple[str, str]] = {
    "c2f_caption_refiner": ("model", "lavis_c2f.models.refiner"),  # stage-3 model
    "c2f_refiner": ("builder", "lavis_c2f.models.refiner"),  # stage-3 dataset builder
    "c2f_tiny_caption_refiner": ("model", "lavis_c2f.testing.tiny_refiner"),  # tiny random stage 3 (demos)
}

# kind -> (registry mapping key, getter name)
_KINDS: Dict[str, tuple] = {
    "model": ("model_name_mapping", "get_model_class"),
    "builder": ("builder_name_mapping", "get_builder_class"),
    "task": ("task_name_mapping", "get_task_class"),
    "processor": ("processor_name_mapping", "get_processor_class"),
    "runner": ("runner_name_mapping", "get_runner_class"),
}


class UnknownComponentError(KeyError):
    """An unknown ``c2f_`` name was looked up in the LAVIS registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def known_names(kind: str, prefix: str = PREFIX) -> List[str]:
    """Sorted registered names of ``kind`` (model, builder, task, processor, runner)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown registry kind '{kind}', expected one of {sorted(_KINDS)}")
    mapping = registry.mapping[_KINDS[kind][0]]
    return sorted(set(n for n in mapping if n.startswith(prefix))
                  | {n for n, (k, _) in LAZY_COMPONENTS.items() if n.startswith(prefix) and k == kind})


def _error(kind: str, name: str) -> UnknownComponentError:
    known = known_names(kind)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownComponentError(
        f"unknown {kind} '{name}'. Known c2f_ {kind}s: {', '.join(known) or '(none)'}.{hint}"
    )


def get(kind: str, name: str):
    """Registered class of ``kind`` called ``name``; raises with the known names if absent."""
    if kind not in _KINDS:
        raise ValueError(f"unknown registry kind '{kind}', expected one of {sorted(_KINDS)}")
    cls = registry.mapping[_KINDS[kind][0]].get(name)
    if cls is None and name in LAZY_COMPONENTS:
        importlib.import_module(LAZY_COMPONENTS[name][1])
        cls = registry.mapping[_KINDS[kind][0]].get(name)
    if cls is None:
        raise _error(kind, name)
    return cls


def install_lookup_errors() -> None:
    """Make ``registry.get_<kind>_class('c2f_unknown')`` raise instead of returning None."""
    for kind, (_mapping, getter) in _KINDS.items():
        original = getattr(registry, getter)
        if getattr(original, "_c2f_wrapped", False):
            continue

        def make(orig, kind=kind):
            def lookup(name):
                cls = orig(name)
                if cls is None and isinstance(name, str) and name in LAZY_COMPONENTS:
                    importlib.import_module(LAZY_COMPONENTS[name][1])
                    cls = orig(name)
                if cls is None and isinstance(name, str) and name.startswith(PREFIX):
                    raise _error(kind, name)
                return cls

            lookup._c2f_wrapped = True
            lookup.__doc__ = orig.__doc__
            return lookup

        setattr(registry, getter, make(original))


def with_model_defaults(node, default_arch: str):
    """A ``model:`` mapping merged over its ``model_type`` defaults, as LAVIS's ``Config`` does
    when it builds a model (``arch`` picks the class, ``model_type`` its default YAML; keys of
    ``node`` win). Without ``model_type`` the mapping is returned unchanged (as a plain dict)."""
    node = dict(node)
    model_type = node.get("model_type")
    if not model_type:
        return node
    cls = get("model", node.get("arch") or default_arch)
    if not hasattr(cls, "default_config_path"):
        return node
    known = getattr(cls, "PRETRAINED_MODEL_CONFIG_DICT", None)
    if known is not None and model_type not in known:
        raise ConfigError(f"model.model_type: '{model_type}' is not a type of {node.get('arch') or default_arch}; "
                          f"known: {sorted(known)}")
    defaults = OmegaConf.load(cls.default_config_path(model_type))
    defaults = defaults.model if "model" in defaults else defaults
    merged = OmegaConf.merge(defaults, OmegaConf.create(node))
    return OmegaConf.to_container(merged, resolve=True)
