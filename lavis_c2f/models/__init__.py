"""Registered models (imported by lavis_c2f/__init__.py).

* ``c2f_tmass_retriever`` and ``c2f_ucofia_retriever`` (stage 1), in :mod:`lavis_c2f.models.retriever`
* ``c2f_qd_detr`` and ``c2f_mesm_qd_detr`` (stage 2), in :mod:`lavis_c2f.models.grounder`
* ``c2f_feature_*`` frame/text feature backbones, in :mod:`lavis_c2f.video.backbones`

The stage-3 refiner (:mod:`lavis_c2f.models.refiner`) is imported lazily, only when enabled.
"""
from lavis_c2f.models import grounder  # noqa: F401
from lavis_c2f.models import retriever  # noqa: F401
from lavis_c2f.video import backbones  # noqa: F401,E402
