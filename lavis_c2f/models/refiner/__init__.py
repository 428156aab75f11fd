"""Stage 3: the caption-assisted BLIP-2 T5 refiner (imported only when enabled).

Importing this package registers ``c2f_caption_refiner`` (model) and ``c2f_refiner`` (dataset
builder) with LAVIS's registry. ``lavis_c2f.models`` does not import it: code that enables the
refiner calls :func:`ensure_registered` (idempotent) before building a LAVIS config.

Pure helpers (no LAVIS/torch model code): :mod:`.srt` (captions), :mod:`.keyframes`
(k-means key frames), :mod:`.prompt` (prompt text), :mod:`.parsing` (answer parsing and
fallback counters). The pipeline hook is :class:`lavis_c2f.models.refiner.hook.CaptionRefiner`.
"""
from __future__ import annotations


def ensure_registered() -> None:
    """Register the refiner's model and builder with LAVIS (idempotent; imports LAVIS)."""
    from lavis_c2f.models.refiner import data as _data  # noqa: F401
    from lavis_c2f.models.refiner import model as _model  # noqa: F401


ensure_registered()
