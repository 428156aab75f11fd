"""Evaluation: pure metric functions over JSON-lines rows (numpy only, no LAVIS, no torch).

* :mod:`.qvh`: official QVHighlights moment retrieval + highlight detection, and the
  Charades-STA / TACoS R@k / mIoU convention (``python -m lavis_c2f.evaluation.qvh``).
* :mod:`.retrieval`: text-to-video / video-to-text ranks and recalls, streaming accumulator.
* :mod:`.vcmr`: video-corpus moment retrieval recall (TVR style).
* :mod:`.cli`: the ``lavis-c2f eval`` sub-command.

The names below are re-exported lazily (PEP 562), so importing this package costs nothing
and ``python -m lavis_c2f.evaluation.qvh`` does not find its module imported twice.
"""
from __future__ import annotations

import importlib
from typing import Any, List

_EXPORTS = {
    "JsonlRows": "_rows", "QidMismatchError": "_rows", "load_rows": "_rows",
    "eval_submission": "qvh", "eval_r1_miou": "qvh", "evaluate_files": "qvh",
    "format_brief_table": "qvh",
    "RetrievalAccumulator": "retrieval", "rank_metrics": "retrieval",
    "retrieval_metrics": "retrieval", "t2v_ranks": "retrieval", "v2t_ranks": "retrieval",
    "topk_from_scores": "retrieval", "dual_softmax": "retrieval",
    "eval_vcmr": "vcmr",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
