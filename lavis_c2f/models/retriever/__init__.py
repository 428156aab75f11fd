"""Stage-1 retrievers: T-MASS + UCoFiA-style scoring (``c2f_tmass_retriever``) and UCoFiA itself
(``c2f_ucofia_retriever``).

``load_tmass_checkpoint`` reads an official T-MASS checkpoint (see
:mod:`lavis_c2f.models.retriever.tmass_checkpoint`), ``load_ucofia_checkpoint`` an official UCoFiA
one (key mapping in :mod:`lavis_c2f.models.retriever.ucofia_checkpoint`).
"""
from lavis_c2f.models.retriever.embeddings import (  # noqa: F401
    TextEmbedding, UCoFiAText, UCoFiAVideo, VideoEmbedding)
from lavis_c2f.models.retriever.baseline import MeanPoolingBaseline  # noqa: F401
from lavis_c2f.models.retriever.tmass import C2FTMassRetriever, load_tmass_checkpoint  # noqa: F401
from lavis_c2f.models.retriever.ucofia import (  # noqa: F401
    C2FUCoFiA, init_ucofia_from_clip, load_ucofia_checkpoint)
