"""Stage 3: the refiner, CALCE on BLIP-2 T5 (imported only when enabled).

Importing this package registers ``c2f_caption_refiner`` (model) and ``c2f_refiner`` (dataset
builder) with LAVIS's registry. ``lavis_c2f.models`` does not import it: code that enables the
refiner calls :func:`ensure_registered` (idempotent) before building a LAVIS config.

The one public path (used by the refiner's dataset and training, the corpus task and the
predictor through :class:`~lavis_c2f.models.refiner.hook.CaptionRefiner`):
:func:`load_calce_checkpoint`, :func:`build_calce_inputs`, :func:`calce_teacher_forcing`,
:func:`calce_generate`, :func:`calce_post_process`.

Pure helpers (no model): :mod:`.calce_text` (CALCE's subtitles, numbers, prompt, answers),
:mod:`.calce_keyframes` (DPC-KNN key frames, torch only), :mod:`.srt`, :mod:`.keyframes`,
:mod:`.prompt` and :mod:`.parsing` (the ``interleaved`` variant).
"""
from __future__ import annotations

from lavis_c2f.models.refiner.calce import (build_calce_inputs, calce_generate, calce_teacher_forcing,
                                            collate_calce_inputs)
from lavis_c2f.models.refiner.calce_text import calce_post_process
from lavis_c2f.models.refiner.data import RefinerDatasetBuilder
from lavis_c2f.models.refiner.model import C2FCaptionRefiner, load_calce_checkpoint
from lavis_c2f.registry_utils import get as registry_get

__all__ = ["C2FCaptionRefiner", "RefinerDatasetBuilder", "build_calce_inputs", "calce_generate", "calce_post_process",
           "calce_teacher_forcing", "collate_calce_inputs", "ensure_registered", "load_calce_checkpoint"]


def ensure_registered() -> None:
    """Make sure the refiner's model and builder are in LAVIS's registry (importing this package
    registered them; a missing one raises naming it)."""
    registry_get("model", C2FCaptionRefiner.ARCH)
    registry_get("builder", RefinerDatasetBuilder.NAME)
